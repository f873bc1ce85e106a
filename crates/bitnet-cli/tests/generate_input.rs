//! `bitnet generate`'s inputs and limits: the prompt from a file or standard input, the
//! checkpoint's sampling defaults, `-n 0`, and a context beyond the model's.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn packed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf-bitnet-tiny/packed")
}

mod support;

fn bitnet(args: &[&str], stdin: Option<&str>) -> Output {
    support::run_with_stdin(args, stdin)
}

fn json(out: &Output) -> Value {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_prompt_comes_from_a_flag_a_file_or_stdin_alike() {
    let dir = packed();
    let model = dir.to_str().unwrap();
    let prompt = "The quick brown fox";
    let base = ["generate", "--model", model, "-n", "6", "--json"];
    let by_flag = json(&bitnet(&[&base[..], &["--prompt", prompt]].concat(), None));
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prompt.txt");
    std::fs::write(&file, prompt).unwrap();
    let by_file = json(&bitnet(&[&base[..], &["-f", file.to_str().unwrap()]].concat(), None));
    let by_stdin = json(&bitnet(&[&base[..], &["--prompt", "-"]].concat(), Some(prompt)));
    assert_eq!(by_flag["generated"], by_file["generated"]);
    assert_eq!(by_flag["generated"], by_stdin["generated"]);
    assert_eq!(by_flag["tokens"], by_stdin["tokens"]);
    let missing = bitnet(&["generate", "--model", model, "-f", "/nonexistent/prompt.txt"], None);
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(1));
    assert!(err.contains("/nonexistent/prompt.txt") && !err.contains("panicked"), "{err}");
}

#[test]
fn limits_are_clear_errors_or_honest_notices() {
    let dir = packed();
    let model = dir.to_str().unwrap();
    // A context far beyond the model's is refused before any allocation.
    let out =
        bitnet(&["generate", "--model", model, "-p", "hi", "--ctx", "1000000000", "-n", "1000000000"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--ctx 1000000000 is more than the model's context of 256"), "{err}");
    // More new tokens than fit: a notice, then generation up to the context.
    let out = bitnet(&["generate", "--model", model, "-p", "hi", "--ctx", "8", "-n", "50", "--json"], None);
    let v = json(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at most"), "{err}");
    let total = v["tokens"].as_array().unwrap().len() + v["generated"].as_array().unwrap().len();
    assert!(total <= 8, "{v}");
    // -n 0 reads the prompt and generates nothing.
    let v = json(&bitnet(&["generate", "--model", model, "-p", "hi there", "-n", "0", "--json"], None));
    assert_eq!(v["generated"].as_array().unwrap().len(), 0);
    // A temperature too small to divide by is greedy, not NaN.
    let tiny = json(&bitnet(
        &["generate", "--model", model, "-p", "hi", "-n", "5", "--temperature", "1e-40", "--json"],
        None,
    ));
    let greedy = json(&bitnet(
        &["generate", "--model", model, "-p", "hi", "-n", "5", "--temperature", "0", "--json"],
        None,
    ));
    assert_eq!(tiny["generated"], greedy["generated"]);
}

#[test]
fn the_default_model_samples_as_its_generation_config_asks_unless_told_otherwise() {
    let out = bitnet(&["generate", "-p", "It is a truth", "-n", "4"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("temperature 0.8, top-k 40"), "{err}");
    let out = bitnet(&["generate", "-p", "It is a truth", "-n", "4", "--temperature", "0"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("generation_config.json asks"), "{err}");
    // --echo prints the prompt first.
    let out = bitnet(&["generate", "-p", "It is a truth", "-n", "2", "--echo", "--temperature", "0"], None);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("It is a truth"));
}

#[test]
fn a_generation_cut_by_the_context_says_so() {
    // 40 tokens asked for, 16 in the context: the notice up front, the stop at the end, and
    // the JSON's stop reason.
    let args =
        ["generate", "-p", "Once upon a time", "-n", "40", "--ctx", "16", "--temperature", "0", "-t", "1"];
    let out = bitnet(&args, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("so at most") && err.contains("context of 16 tokens is full"), "{err}");
    let out = bitnet(&[&args[..], &["--json"]].concat(), None);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stop_reason"], "contextfull", "{v}");
    // Room to spare: the token limit is what stopped it.
    let out = bitnet(
        &["generate", "-p", "Once upon a time", "-n", "3", "--temperature", "0", "-t", "1", "--json"],
        None,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stop_reason"], "maxtokens", "{v}");
}

#[test]
fn ctrl_c_stops_a_generation_with_what_it_has_and_status_130() {
    use std::io::Read;
    // A long generation on the embedded model; SIGINT once text has appeared.
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["generate", "-p", "Once upon a time", "-n", "100000", "--ctx", "256", "-t", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first).unwrap();
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Either the signal stopped it, or (a fast machine) the 256-token context ended it first.
    if !err.contains("context of 256 tokens is full") {
        assert_eq!(out.status.code(), Some(130), "{err}");
        assert!(err.contains("interrupted") && err.contains("generation:"), "{err}");
    }
}
