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

/// google/gemma-3-270m's config.json as transformers 4 writes it: `rope_theta` and
/// `rope_local_base_freq` at the top level, `layer_types` spelled out, null soft-capping.
fn gemma3() -> Value {
    json!({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "_sliding_window_pattern": 6, "attention_bias": false, "attn_logit_softcapping": null,
        "final_logit_softcapping": null, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640,
        "intermediate_size": 2048, "max_position_embeddings": 32768, "num_attention_heads": 4,
        "num_hidden_layers": 18, "num_key_value_heads": 1, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-6, "rope_local_base_freq": 10000.0, "rope_scaling": null,
        "rope_theta": 1000000.0, "sliding_window": 512, "use_bidirectional_attention": false,
        "vocab_size": 262144,
        "layer_types": (0..18).map(|i| if (i + 1) % 6 == 0 { "full_attention" } else { "sliding_attention" })
            .collect::<Vec<_>>()
    })
}

#[test]
fn gemma3_270m_config_parses() {
    let cfg = parse(&gemma3()).unwrap();
    assert_eq!(cfg.architecture, bitnet_models::Architecture::Gemma3);
    assert_eq!((cfg.q_dim(), cfg.kv_dim(), cfg.head_dim), (1024, 256, 256));
    assert_eq!(cfg.attention_scale(), 1.0 / 16.0);
    assert_eq!(cfg.embedding_scale(), Some(640f32.sqrt()));
    let globals: Vec<usize> = (0..18).filter(|&l| cfg.sliding_window(l).is_none()).collect();
    assert_eq!(globals, [5, 11, 17]);
    assert_eq!(cfg.sliding_window(0), Some(512));
    assert_eq!((cfg.rope_theta, cfg.sliding.as_ref().unwrap().rope_theta), (1e6, 1e4));
    assert!(cfg.tie_word_embeddings);
    // Older configs give the pattern instead of the list: the same layers.
    let mut v = gemma3();
    v.as_object_mut().unwrap().remove("layer_types");
    v["sliding_window_pattern"] = json!(6);
    assert_eq!(parse(&v).unwrap().sliding, cfg.sliding);
    // The 4B's linear RoPE scaling applies to the global layers only.
    let mut v = gemma3();
    v["rope_scaling"] = json!({"rope_type": "linear", "factor": 8.0});
    let scaled = parse(&v).unwrap();
    assert_eq!(scaled.rope_scaling, bitnet_models::RopeScaling::Linear { factor: 8.0 });
    assert_eq!(scaled.sliding.unwrap().rope_theta, 1e4);
}

/// Missing or inconsistent Gemma3 fields are errors that name the field, never a panic nor a
/// guess (transformers would assume a window of 4096 and a scalar of 256, which a checkpoint
/// trained otherwise runs wrongly with).
#[test]
fn gemma3_bad_fields_are_named() {
    let cases: Vec<(&str, Value, &str)> = vec![
        ("sliding_window", json!(0), "`sliding_window` 0 is not a positive integer"),
        ("sliding_window", json!(-3), "`sliding_window` -3"),
        ("sliding_window", json!("512"), "`sliding_window` \"512\""),
        ("sliding_window", Value::Null, "`sliding_window` is missing"),
        ("query_pre_attn_scalar", Value::Null, "`query_pre_attn_scalar` is missing"),
        ("query_pre_attn_scalar", json!(0), "`query_pre_attn_scalar` 0 is not a positive number"),
        ("query_pre_attn_scalar", json!(-256.0), "`query_pre_attn_scalar` -256.0"),
        (
            "layer_types",
            json!(["sliding_attention"]),
            "`layer_types` names 1 layers, but num_hidden_layers is 18",
        ),
        ("layer_types", json!("sliding_attention"), "`layer_types` \"sliding_attention\" is not a list"),
        ("layer_types", json!(vec!["chunked_attention"; 18]), "`layer_types[0]` is \"chunked_attention\""),
        ("final_logit_softcapping", json!(30.0), "`final_logit_softcapping: 30.0`: soft-capping"),
        ("attn_logit_softcapping", json!(50.0), "`attn_logit_softcapping: 50.0`: soft-capping"),
        ("use_bidirectional_attention", json!(true), "`use_bidirectional_attention: true`"),
        ("hidden_activation", json!("gelu"), "unsupported hidden_activation `gelu`"),
        ("rope_local_base_freq", json!(-1.0), "`rope_local_base_freq` -1"),
        ("model_type", json!("gemma3"), "only its text model (`gemma3_text`"),
        (
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 4.0}),
            "sliding-window layers is not supported",
        ),
    ];
    for (key, value, want) in cases {
        let mut v = gemma3();
        match value {
            Value::Null => {
                v.as_object_mut().unwrap().remove(key);
            }
            value => v[key] = value,
        }
        let err = parse(&v).expect_err(key);
        assert!(err.contains("m/config.json") && err.contains(want), "{key}: {err}");
    }
    // Without layer_types, a pattern of 0 is named too.
    let mut v = gemma3();
    v.as_object_mut().unwrap().remove("layer_types");
    v["_sliding_window_pattern"] = json!(0);
    let err = parse(&v).unwrap_err();
    assert!(err.contains("`_sliding_window_pattern` 0 is not a positive integer"), "{err}");
    // transformers 5's per-layer-type RoPE: only the global layers may be scaled.
    let mut v = gemma3();
    v["rope_parameters"] = json!({
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
    });
    let err = parse(&v).unwrap_err();
    assert!(err.contains("`rope_parameters.sliding_attention.rope_type` `linear`"), "{err}");
}
