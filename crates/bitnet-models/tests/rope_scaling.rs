//! RoPE scaling against transformers' `ROPE_INIT_FUNCTIONS` (tests/data/rope-scaling/cases.json,
//! tools/make_rope_scaling_fixture.py): the inverse frequencies within a few f32 ulps and the
//! attention factor, for linear, llama3 and yarn configurations written as config.json writes
//! them.

use std::path::Path;

use bitnet_models::RopeScaling;
use serde_json::Value;

#[test]
fn scaled_frequencies_match_transformers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/rope-scaling/cases.json");
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let config = &case["config"];
        let scaling = RopeScaling::from_config_json(config, &path).unwrap();
        assert_ne!(scaling, RopeScaling::None, "{config}");
        let theta = config["rope_theta"].as_f64().unwrap() as f32;
        let head_dim = config["head_dim"].as_u64().unwrap() as usize;
        let got = scaling.inv_freq(theta, head_dim);
        let want: Vec<f32> =
            case["inv_freq"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 4.0 * f32::EPSILON * w.abs(), "{config}: inv_freq[{i}] {g} vs {w}");
        }
        let a = case["attention_factor"].as_f64().unwrap() as f32;
        assert!((scaling.attention_factor() - a).abs() <= 1e-6, "{config}: attention factor");
    }
}

#[test]
fn unsupported_or_incomplete_scalings_are_refused() {
    let path = Path::new("config.json");
    let refused = |scaling: Value, want: &str| {
        let config = serde_json::json!({"max_position_embeddings": 4096, "rope_scaling": scaling});
        let e = RopeScaling::from_config_json(&config, path).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    };
    refused(serde_json::json!({"rope_type": "dynamic", "factor": 2.0}), "`dynamic` is not supported");
    refused(serde_json::json!({"rope_type": "longrope", "factor": 2.0}), "`longrope` is not supported");
    refused(serde_json::json!({"rope_type": "linear"}), "has no factor");
    refused(serde_json::json!({"rope_type": "yarn", "factor": -1.0}), "not a positive number");
    refused(serde_json::json!({"rope_type": "llama3", "factor": 8.0}), "low_freq_factor");
    let plain = serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}});
    assert_eq!(RopeScaling::from_config_json(&plain, path).unwrap(), RopeScaling::None);
    // transformers 4's `type` key and the top-level original context.
    let old = serde_json::json!({"max_position_embeddings": 8192, "original_max_position_embeddings": 2048,
                                 "rope_scaling": {"type": "yarn", "factor": 4.0}});
    match RopeScaling::from_config_json(&old, path).unwrap() {
        RopeScaling::Yarn { original_max_position_embeddings, .. } => {
            assert_eq!(original_max_position_embeddings, 2048.0)
        }
        other => panic!("{other:?}"),
    }
}
