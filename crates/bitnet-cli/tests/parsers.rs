//! A malformed tokenizer.json reaches the `tokenizers` crate through `generate --model` and
//! `train --tokenizer`; both give a clear error naming the file, never a panic (the input is
//! the one `fuzz/fuzz_targets/tokenizer_json.rs` found: invalid UTF-8 inside the decoder).

use std::path::Path;
use std::process::{Command, Output};

fn bitnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .env("BITNET_CACHE_DIR", "off")
        .args(args)
        .output()
        .expect("the bitnet binary runs")
}

fn fails_cleanly(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "should exit 1: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

/// The fuzzer's tokenizer.json (the seed file holds it before a 0x00 byte).
fn damaged_tokenizer() -> Vec<u8> {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds/tokenizer_json/regression-decoder-invalid-utf8.bin");
    let bytes = std::fs::read(seed).unwrap();
    bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())].to_vec()
}

#[test]
fn a_damaged_tokenizer_json_is_an_error_for_generate_and_train() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf-bitnet-tiny/packed");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), model.join(f)).unwrap();
    }
    let tok = model.join("tokenizer.json");
    std::fs::write(&tok, damaged_tokenizer()).unwrap();
    let out = bitnet(&["generate", "--model", model.to_str().unwrap(), "--prompt", "hi", "-n", "2"]);
    fails_cleanly(&out, &["tokenizer.json", "not a valid tokenizer.json"]);

    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, "Once upon a time there was a tokenizer. ".repeat(200)).unwrap();
    let out = bitnet(&[
        "train",
        "--data",
        corpus.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--out",
        tmp.path().join("run").to_str().unwrap(),
    ]);
    fails_cleanly(&out, &["--tokenizer", "tokenizer.json", "not a valid tokenizer.json"]);
}
