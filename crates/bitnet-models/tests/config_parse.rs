//! config.json inputs found by reading the parser with the fuzz target's eyes
//! (`fuzz/fuzz_targets/config_json.rs`): each was a panic or a wrong success before its fix.

use std::path::Path;

use bitnet_models::ModelConfig;
use serde_json::{json, Value};

/// A valid small config (the tiny fixture's shapes) to edit.
fn base() -> Value {
    json!({
        "model_type": "bitnet",
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
        "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 256,
        "bos_token_id": 0, "eos_token_id": 1
    })
}

fn parse(v: &Value) -> Result<ModelConfig, String> {
    ModelConfig::from_json(v, Path::new("m/config.json")).map_err(|e| e.to_string())
}

#[test]
fn the_base_config_parses() {
    let cfg = parse(&base()).unwrap();
    assert_eq!((cfg.q_dim(), cfg.kv_dim()), (64, 32));
}

/// `num_attention_heads` 2^33 × `head_dim` 2^31 is 2^64: the parameter bound multiplied them in
/// `usize` first, which panicked (debug) or wrapped to 0 and accepted the config (release).
#[test]
fn heads_times_head_dim_past_usize_is_refused() {
    for (heads, head_dim) in [(1u64 << 33, 1u64 << 31), (1 << 32, 1 << 32), (u64::MAX - 1, u64::MAX - 1)] {
        let mut v = base();
        v["num_attention_heads"] = heads.into();
        v["num_key_value_heads"] = heads.into();
        v["head_dim"] = head_dim.into();
        let err = parse(&v).expect_err("absurd shapes must be refused");
        assert!(err.contains("m/config.json") && err.contains("parameters"), "{err}");
    }
    // Every factor at its largest saturates instead of overflowing u128.
    let mut v = base();
    for key in ["hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"] {
        v[key] = u64::MAX.into();
    }
    let err = parse(&v).expect_err("absurd shapes must be refused");
    assert!(err.contains("more than 10^38 parameters"), "{err}");
}

/// An EOS id of 2^32 + 1 was cast to u32 and became token 1, stopping generation at a real
/// token; ids no vocabulary can hold are left out, in config.json and generation_config.json.
#[test]
fn token_ids_past_u32_are_left_out_not_wrapped() {
    let mut v = base();
    v["eos_token_id"] = json!([(1u64 << 32) + 1, 7]);
    v["bos_token_id"] = json!(1u64 << 32);
    let mut cfg = parse(&v).unwrap();
    assert_eq!(cfg.eos_token_ids, vec![7]);
    assert_eq!(cfg.bos_token_id, None);
    cfg.merge_generation_config(
        &json!({"eos_token_id": (1u64 << 33) + 2, "bos_token_id": [4294967297u64, 3]}),
    );
    assert_eq!(cfg.eos_token_ids, vec![7]);
    assert_eq!(cfg.bos_token_id, Some(3));
}
