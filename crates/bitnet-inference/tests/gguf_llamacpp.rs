//! A trained llama-1.58 model converted to TQ2_0 / TQ1_0 gives llama.cpp's greedy ids.
//!
//! `tests/data/gguf/llamacpp-greedy.json` holds the ids that upstream llama.cpp generated from
//! the files `bitnet convert` makes of `tests/fixtures/trained-llama158` (and from a TQ2_0 copy
//! whose block scales differ, see `rescale_blocks`); `docs/gguf.md` has the procedure. The test
//! converts the fixture again and decodes the same prompts.

mod common;

use std::path::Path;

use bitnet_inference::load::{load_gguf, LoadOptions};
use bitnet_models::convert::{convert_hf_to_gguf, HeadType, WeightType};
use common::*;
use serde_json::Value;

fn data() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/gguf/llamacpp-greedy.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn trained_model_gives_llama_cpp_greedy_ids() {
    let data = data();
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("trained-llama158");
    let mut checked = 0;
    for file in data["files"].as_array().unwrap() {
        let name = file["name"].as_str().unwrap();
        let weight = match file["type"].as_str().unwrap() {
            "tq2_0" => WeightType::Tq2_0,
            "tq1_0" => WeightType::Tq1_0,
            t => panic!("unknown type {t}"),
        };
        let converted = dir.path().join(format!("{name}-converted.gguf"));
        convert_hf_to_gguf(&src, &converted, weight, HeadType::F16, |_, _| {}).unwrap();
        let path = if file["rescale_blocks"].as_bool().unwrap_or(false) {
            let p = dir.path().join(format!("{name}.gguf"));
            rescale_blocks(&converted, &p);
            p
        } else {
            converted
        };
        let mut m = load_gguf(&path, LoadOptions::default()).unwrap();
        let eos = m.model.config.eos_token_ids.clone();
        let n_predict = data["n_predict"].as_u64().unwrap() as usize;
        for case in file["cases"].as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            let prompt_ids = ids(&case["prompt_ids"]);
            let want = ids(&case["ids"]);
            let tok = m.tokenizer.as_ref().unwrap();
            assert_eq!(tok.encode(prompt).unwrap(), prompt_ids, "{name}: prompt ids of {prompt:?}");
            let (got, _) = greedy_with_cache(&m.model, &prompt_ids, n_predict);
            // Where the two engines part at a near-tie (see the case's note), the ids agree up
            // to that token and differ there.
            let agree =
                case.get("bitnet_agrees_for").and_then(Value::as_u64).map_or(want.len(), |n| n as usize);
            assert_eq!(got[..agree], want[..agree], "{name}: greedy ids after {prompt:?}");
            if agree < want.len() {
                assert_ne!(got[agree], want[agree], "{name}: {prompt:?} now agrees further: update the data");
            } else if want.len() < n_predict {
                // llama.cpp stopped at an end-of-generation token.
                assert!(eos.contains(&got[want.len()]), "{name}: {prompt:?} should stop");
            }
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} cases");
}

/// Writes the GGUF files the ids were made from into `$BITNET_XCHECK_DIR`, for re-running
/// llama.cpp on them (`cargo test --release -p bitnet-inference --test gguf_llamacpp --
/// --ignored`; docs/gguf.md).
#[test]
#[ignore = "writes llama.cpp's input files; run by hand"]
fn write_llamacpp_inputs() {
    let out = std::path::PathBuf::from(std::env::var("BITNET_XCHECK_DIR").expect("set BITNET_XCHECK_DIR"));
    std::fs::create_dir_all(&out).unwrap();
    let src = fixtures().join("trained-llama158");
    for (name, weight) in [("tq2_0", WeightType::Tq2_0), ("tq1_0", WeightType::Tq1_0)] {
        convert_hf_to_gguf(&src, &out.join(format!("{name}.gguf")), weight, HeadType::F16, |_, _| {})
            .unwrap();
    }
    rescale_blocks(&out.join("tq2_0.gguf"), &out.join("tq2_0-blocks.gguf"));
    rescale_blocks(&out.join("tq1_0.gguf"), &out.join("tq1_0-blocks.gguf"));
}
