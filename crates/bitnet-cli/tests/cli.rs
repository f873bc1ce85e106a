//! The `bitnet` binary, called as a user calls it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf-bitnet-tiny")
}

fn bitnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitnet")).args(args).output().expect("the bitnet binary runs")
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("golden/golden.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// Runs and parses stdout as JSON, failing with stderr shown.
fn json_of(args: &[&str]) -> Value {
    let out = bitnet(args);
    assert!(out.status.success(), "bitnet {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs a command that must fail cleanly: exit code 1, a message containing `needle`, no panic.
fn fails_with(args: &[&str], needle: &str) {
    let out = bitnet(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "bitnet {args:?} should exit 1; stderr: {err}");
    assert!(err.contains(needle), "bitnet {args:?}: stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "bitnet {args:?} panicked: {err}");
}

#[test]
fn generate_json_reproduces_transformers_greedy_ids() {
    let g = golden();
    let prompt = g["prompt"].as_str().unwrap();
    for form in ["master", "packed", "packed_bitlinear"] {
        let dir = fixture().join(form);
        let v = json_of(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-tokens",
            "16",
            "--json",
        ]);
        assert_eq!(ids(&v["tokens"]), ids(&g["prompt_ids"]), "{form}: prompt ids");
        assert_eq!(ids(&v["generated"]), ids(&g["forms"][form]["greedy_new_ids"]), "{form}: greedy ids");
        assert_eq!(v["text"].as_str().unwrap(), g["forms"][form]["greedy_new_text"].as_str().unwrap());
    }
}

#[test]
fn logits_json_reproduces_transformers_logits() {
    let g = golden();
    let tokens: Vec<String> = ids(&g["prompt_ids"]).iter().map(u64::to_string).collect();
    let dir = fixture().join("master");
    let v = json_of(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &tokens.join(","),
        "--all-positions",
    ]);
    let rows = v["logits"].as_array().unwrap();
    assert_eq!(rows.len(), tokens.len());
    let golden_path = fixture().join("golden/master_f32.safetensors");
    let bytes = std::fs::read(golden_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let want: Vec<f32> = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let got: Vec<f32> =
        rows.iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32)).collect();
    let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(d <= 1e-3, "logits differ from transformers by {d}");
    // Without --all-positions only the last row comes back.
    let last = json_of(&["logits", "--model", dir.to_str().unwrap(), "--tokens", &tokens.join(",")]);
    assert_eq!(last["logits"].as_array().unwrap().len(), 1);
}

#[test]
fn default_model_runs_with_no_arguments_but_a_prompt() {
    let g = golden();
    let v = json_of(&["generate", "--prompt", g["prompt"].as_str().unwrap(), "--max-tokens", "16", "--json"]);
    let n = v["generated"].as_array().unwrap().len();
    assert!((1..=16).contains(&n), "{n} tokens");
    let out = bitnet(&["generate", "--prompt", "Hello", "--max-tokens", "4"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokens/s"), "speed goes to stderr");
}

#[test]
fn sampling_with_a_seed_repeats() {
    let args = [
        "generate",
        "--tokens",
        "0,53,73",
        "--temperature",
        "0.9",
        "--top-k",
        "40",
        "--top-p",
        "0.95",
        "--min-p",
        "0.01",
        "--repeat-penalty",
        "1.1",
        "--seed",
        "7",
        "--max-tokens",
        "12",
        "--json",
    ];
    assert_eq!(json_of(&args)["generated"], json_of(&args)["generated"]);
}

#[test]
fn stop_string_cuts_the_text() {
    let g = golden();
    let text = g["forms"]["packed"]["greedy_new_text"].as_str().unwrap();
    // Stop at the first " T" of the known greedy continuation.
    let dir = fixture().join("packed");
    let v = json_of(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        g["prompt"].as_str().unwrap(),
        "--max-tokens",
        "16",
        "--stop",
        " T",
        "--json",
    ]);
    assert_eq!(v["text"].as_str().unwrap(), &text[..text.find(" T").unwrap()]);
    assert_eq!(v["stop_reason"], "stopstring");
}

#[test]
fn inspect_describes_the_checkpoint() {
    let dir = fixture().join("packed");
    let out = bitnet(&["inspect", dir.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("BitNet") && text.contains("PackedMultiply"), "{text}");
    assert!(text.contains("model.layers.0.self_attn.q_proj.weight") && text.contains("U8"), "{text}");
    let v = json_of(&["inspect", dir.to_str().unwrap(), "--json"]);
    // 2 layers × (4·128·128 attention + 3·128·384 MLP) ternary + 512·128 embedding + norms.
    let expected = 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 128 * 384 + 2 * 128 + 128 + 384) + 512 * 128 + 128;
    assert_eq!(v["parameters"].as_u64().unwrap(), expected as u64 + 14, "14 scalar weight_scales");
}

#[test]
fn empty_prompt_is_an_error() {
    fails_with(&["generate", "--prompt", ""], "the prompt is empty");
}

#[test]
fn prompt_longer_than_the_context_is_an_error() {
    fails_with(&["generate", "--tokens", "0,1,2,3,4,5", "--ctx", "4"], "the context holds 4");
    fails_with(&["logits", "--tokens", "0,1,2,3,4,5", "--ctx", "4"], "the context holds 4");
    fails_with(&["generate", "--tokens", "0,1,2,3", "--ctx", "4"], "leaving no room for a new token");
}

#[test]
fn token_id_out_of_range_is_an_error() {
    let dir = fixture().join("packed");
    fails_with(
        &["generate", "--model", dir.to_str().unwrap(), "--tokens", "0,512"],
        "token id 512 is out of range",
    );
    fails_with(&["generate", "--tokens", "0,99999999"], "token id 99999999 is out of range");
    fails_with(&["logits", "--tokens", "7,99999"], "token id 99999 is out of range");
    fails_with(&["generate", "--tokens", "0,abc"], "`abc` is not a token id");
}

#[test]
fn missing_model_directory_is_an_error() {
    fails_with(&["generate", "--model", "/nonexistent/model", "--prompt", "hi"], "/nonexistent/model");
    fails_with(&["inspect", "/nonexistent/model"], "config.json");
}

#[test]
fn bad_sampling_flags_are_errors() {
    fails_with(&["generate", "--prompt", "hi", "--top-p", "0"], "--top-p");
    fails_with(&["generate", "--prompt", "hi", "--temperature=-1"], "--temperature");
}

#[test]
fn bench_times_training_steps() {
    let v =
        json_of(&["bench", "--train", "tiny", "-t", "1,2", "-r", "1", "--train-steps", "1", "-o", "json"]);
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2, "one row per thread count: {v}");
    for (row, threads) in rows.iter().zip([1, 2]) {
        assert_eq!(row["test"], "train1");
        assert_eq!(row["threads"], threads);
        assert!(row["tokens_per_s"].as_f64().unwrap() > 0.0, "{row}");
    }
}

#[test]
fn bad_bench_flags_are_errors() {
    fails_with(&["bench", "--train", "tiny", "--fp", "--backward", "int16"], "--backward int16");
    fails_with(&["bench", "--train", "tiny", "--train-steps", "0"], "--train-steps");
    fails_with(&["bench", "--model", "/nonexistent/model", "--fp"], "apply to --train");
    fails_with(&["bench", "--train", "tiny", "-t", "0"], "--threads");
    fails_with(&["bench", "--model", "/nonexistent/model", "--temperature=-1"], "--temperature -1");
}

/// serveN rows with sampling (each stream its own seed): the rows are there and decode.
#[test]
fn bench_serves_sampled_streams() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/default-model");
    let v = json_of(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "-p",
        "8",
        "-n",
        "8",
        "-t",
        "1",
        "-r",
        "1",
        "-c",
        "3",
        "--temperature",
        "1",
        "--no-probe",
        "-o",
        "json",
    ]);
    let rows = v.as_array().unwrap();
    let serve = rows
        .iter()
        .find(|r| r["test"].as_str().is_some_and(|t| t.starts_with("serve3")))
        .expect("a serve3 row");
    assert!(serve["tokens_per_s"].as_f64().unwrap() > 0.0, "{serve}");
}

fn embed_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen3-embed-tiny")
}

/// `bitnet embed` prints transformers' pooled, normalized embedding of each text: as JSON in
/// OpenAI's shape, and as one line of numbers per text from a file.
#[test]
fn embed_prints_transformers_embeddings() {
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(embed_fixture().join("golden/golden.json")).unwrap())
            .unwrap();
    let texts: Vec<&str> =
        golden["forms"]["master"]["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let want = |i: usize| -> Vec<f32> {
        let bytes = std::fs::read(embed_fixture().join("golden/embed_f32.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(&format!("embedding.{i}")).unwrap();
        t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let cos = |a: &[f32], b: &[f32]| -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
        let n = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        dot / (n(a) * n(b))
    };
    let model = embed_fixture().join("master");
    let model = model.to_str().unwrap();
    let v = json_of(&["embed", "--model", model, "--input", texts[0], "--input", texts[1], "--json"]);
    assert_eq!(v["object"], "list");
    for i in 0..2 {
        let got: Vec<f32> = v["data"][i]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(v["data"][i]["index"], i);
        assert!(cos(&got, &want(i)) >= 0.999, "text {i}");
    }
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 2);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("texts.txt");
    std::fs::write(&file, format!("{}\n\n{}\n", texts[2], texts[3])).unwrap();
    let out = bitnet(&["embed", "--model", model, "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Vec<f32>> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split(' ').map(|x| x.parse().unwrap()).collect())
        .collect();
    assert_eq!(lines.len(), 2, "one line per non-empty line of the file");
    for (k, line) in lines.iter().enumerate() {
        assert!(cos(line, &want(k + 2)) >= 0.999, "line {k}");
    }
}

/// A model that declares another pooling, or no text, is refused before anything runs.
#[test]
fn embed_refuses_other_poolings_and_empty_input() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(embed_fixture().join("master").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
    std::fs::write(dir.path().join("1_Pooling/config.json"), r#"{"pooling_mode_mean_tokens": true}"#)
        .unwrap();
    let model = dir.path().to_str().unwrap();
    fails_with(&["embed", "--model", model, "--input", "hello"], "declares mean pooling");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    std::fs::remove_dir_all(dir.path().join("1_Pooling")).unwrap();
    fails_with(&["embed", "--model", model, "-f", empty.to_str().unwrap()], "nothing to embed");
}

/// `inspect` names the architecture the engine runs a checkpoint as, folder or GGUF.
#[test]
fn inspect_names_the_architecture() {
    let qwen3 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen3-tiny");
    let out = bitnet(&["inspect", qwen3.join("dense").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("architecture:  qwen3"), "{text}");
    assert!(text.contains("per-head q/k norms: true") && text.contains("heads of 32"), "{text}");
    let v = json_of(&["inspect", qwen3.join("dense.gguf").to_str().unwrap(), "--json"]);
    assert!(v["runs_as"].as_str().unwrap().starts_with("qwen3"), "{v}");
}
