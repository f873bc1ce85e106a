//! `bitnet chat` through a pipe, and `generate --chat`.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

mod support;

fn run(args: &[&str], stdin: &str) -> Output {
    support::run_with_stdin(args, Some(stdin))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn chat_reads_turns_from_a_pipe_and_obeys_commands() {
    let out =
        run(&["chat", "--temperature", "0", "-n", "6"], "Hello there\n/system Be brief.\nAgain\n/help\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("no chat template"), "the fallback is announced: {err}");
    assert!(err.contains("system message set; conversation reset"), "{err}");
    assert!(err.contains("/reset"), "/help lists the commands: {err}");
    // One line per reply (replies of the tiny model may hold newlines of their own).
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.ends_with('\n') && !stdout.trim().is_empty(), "{stdout:?}");
    // The same first turn gives the same reply: greedy and a fresh conversation.
    let again = run(&["chat", "--temperature", "0", "-n", "6"], "Hello there\n");
    assert!(stdout.starts_with(String::from_utf8_lossy(&again.stdout).trim_end()), "{stdout:?}");
    // End of input at once: a clean exit.
    assert!(run(&["chat"], "").status.success());
    // A bad model path is a clear error.
    let bad = run(&["chat", "--model", "/nonexistent/model"], "hi\n");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1));
    assert!(err.contains("/nonexistent/model") && !err.contains("panicked"), "{err}");
}

#[test]
fn generate_chat_feeds_the_rendered_template() {
    // The tiny fixture with SmolLM2's ChatML template beside it.
    let tmp = tempfile::tempdir().unwrap();
    let src = repo().join("tests/fixtures/hf-bitnet-tiny/packed");
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let template =
        std::fs::read_to_string(repo().join("tests/data/chat-templates/smollm2-instruct.jinja")).unwrap();
    let config = serde_json::json!({ "chat_template": template, "eos_token": "<|im_end|>" });
    std::fs::write(tmp.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let model = tmp.path().to_str().unwrap();
    let json = |args: &[&str]| -> Value {
        let out = run(args, "");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let chat = json(&[
        "generate",
        "--model",
        model,
        "--chat",
        "--system",
        "Be brief.",
        "-p",
        "Hello",
        "-n",
        "0",
        "--json",
    ]);
    let rendered =
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n";
    let plain = json(&["generate", "--model", model, "-p", rendered, "-n", "0", "--json"]);
    let ids =
        |v: &Value| v["tokens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect::<Vec<_>>();
    // The plain prompt gets the tokenizer's special tokens (BOS); the template's text none.
    let (chat_ids, plain_ids) = (ids(&chat), ids(&plain));
    assert!(
        plain_ids.ends_with(&chat_ids) && plain_ids.len() - chat_ids.len() <= 1,
        "{chat_ids:?} vs {plain_ids:?}"
    );
    let out = run(&["generate", "--model", model, "--chat", "--tokens", "1,2"], "");
    assert_eq!(out.status.code(), Some(2), "clap refuses --chat with --tokens");
}
