//! Bad checkpoints give a clear error that names the file and the problem, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bitnet_models::safetensors::TensorStore;
use bitnet_models::{ModelConfig, ModelError, ModelWeights};
use safetensors::tensor::{Dtype, TensorView};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf-bitnet-tiny/packed")
}

/// A copy of the packed fixture in a temporary directory.
fn copy_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn load(dir: &Path) -> Result<ModelWeights, ModelError> {
    let cfg = ModelConfig::from_dir(dir)?;
    let store = TensorStore::open_dir(dir)?;
    ModelWeights::load(&store, cfg)
}

fn error_of(dir: &Path) -> String {
    match load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites model.safetensors through `edit`, which sees (dtype, shape, bytes) by name.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn the_fixture_itself_loads() {
    let dir = copy_fixture();
    load(dir.path()).unwrap();
}

#[test]
fn missing_config_json() {
    let dir = copy_fixture();
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = error_of(dir.path());
    assert!(e.contains("config.json") && e.contains("No such file"), "{e}");
}

#[test]
fn unknown_model_type() {
    let dir = copy_fixture();
    let p = dir.path().join("config.json");
    let text = std::fs::read_to_string(&p).unwrap().replace("\"bitnet\"", "\"gpt2\"");
    std::fs::write(&p, text).unwrap();
    let e = error_of(dir.path());
    assert!(e.contains("config.json") && e.contains("unknown model_type `gpt2`"), "{e}");
}

#[test]
fn config_that_is_not_json() {
    let dir = copy_fixture();
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let e = error_of(dir.path());
    assert!(e.contains("config.json") && e.contains("not valid JSON"), "{e}");
}

#[test]
fn heads_that_do_not_divide() {
    let dir = copy_fixture();
    let p = dir.path().join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");
    std::fs::write(&p, text).unwrap();
    let e = error_of(dir.path());
    assert!(e.contains("num_key_value_heads (3)"), "{e}");
}

#[test]
fn missing_tensor() {
    let dir = copy_fixture();
    rewrite(dir.path(), |t| {
        t.remove("model.layers.1.mlp.down_proj.weight");
    });
    let e = error_of(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("`model.layers.1.mlp.down_proj.weight` is missing"),
        "{e}"
    );
}

#[test]
fn wrong_shape() {
    let dir = copy_fixture();
    rewrite(dir.path(), |t| {
        let e = t.get_mut("model.layers.0.input_layernorm.weight").unwrap();
        e.1 = vec![64];
        e.2.truncate(128);
    });
    let e = error_of(dir.path());
    assert!(
        e.contains("model.layers.0.input_layernorm.weight") && e.contains("shape [64], expected [128]"),
        "{e}"
    );
}

#[test]
fn wrong_dtype() {
    let dir = copy_fixture();
    rewrite(dir.path(), |t| {
        let e = t.get_mut("model.layers.0.self_attn.q_proj.weight").unwrap();
        // Same bytes viewed as I8: a dtype the packed form does not allow.
        e.0 = Dtype::I8;
    });
    let e = error_of(dir.path());
    assert!(e.contains("q_proj.weight") && e.contains("dtype I8") && e.contains("packed"), "{e}");
}

#[test]
fn truncated_safetensors() {
    let dir = copy_fixture();
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let e = error_of(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
}

#[test]
fn header_longer_than_the_file() {
    let dir = copy_fixture();
    let p = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let too_long = bytes.len() as u64 * 2;
    bytes[..8].copy_from_slice(&too_long.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let e = error_of(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("runs past the end"), "{e}");
}

#[test]
fn file_shorter_than_the_header_length() {
    let dir = copy_fixture();
    std::fs::write(dir.path().join("model.safetensors"), [1u8, 2, 3]).unwrap();
    let e = error_of(dir.path());
    assert!(e.contains("too short"), "{e}");
}

#[test]
fn packed_code_three_is_rejected() {
    let dir = copy_fixture();
    rewrite(dir.path(), |t| {
        t.get_mut("model.layers.0.mlp.up_proj.weight").unwrap().2[5] = 0xff;
    });
    let e = error_of(dir.path());
    assert!(e.contains("up_proj.weight") && e.contains("unused code 3"), "{e}");
}

#[test]
fn sharded_checkpoint_loads_and_a_missing_shard_is_named() {
    let dir = copy_fixture();
    // Split the tensors over two shards with an index, as large checkpoints are stored.
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut shards: [Vec<(String, TensorView)>; 2] = [Vec::new(), Vec::new()];
    let mut map = serde_json::Map::new();
    for (i, (name, view)) in st.tensors().into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        map.insert(name.clone(), serde_json::Value::String(file));
        shards[i % 2].push((name, view));
    }
    for (i, s) in shards.into_iter().enumerate() {
        let f = dir.path().join(format!("model-0000{}-of-00002.safetensors", i + 1));
        std::fs::write(f, safetensors::serialize(s, None).unwrap()).unwrap();
    }
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    load(dir.path()).unwrap();
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = error_of(dir.path());
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

/// config.json with `edit` applied to its JSON.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

/// Features the forward does not implement are refused by name, not run as something else.
#[test]
fn biases_sliding_windows_and_unsupported_rope_are_refused() {
    let cases: [(&str, serde_json::Value, &str); 6] = [
        ("attention_bias", serde_json::json!(true), "`attention_bias: true`"),
        ("mlp_bias", serde_json::json!(true), "`mlp_bias: true`"),
        ("use_sliding_window", serde_json::json!(true), "sliding-window attention"),
        ("partial_rotary_factor", serde_json::json!(0.5), "partial_rotary_factor"),
        // YaRN's attention factor goes into per-head q/k norms, which this layout lacks.
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            "only with per-head q/k norms",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "dynamic", "factor": 2.0}),
            "RoPE scaling `dynamic`",
        ),
    ];
    for (key, value, want) in cases {
        let dir = copy_fixture();
        edit_config(dir.path(), |v| v[key] = value.clone());
        let e = error_of(dir.path());
        assert!(e.contains("config.json") && e.contains(want), "{key}: {e}");
    }
    // A scaling this layout can take: llama3's changes only the frequencies.
    let dir = copy_fixture();
    edit_config(dir.path(), |v| {
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    });
    let w = load(dir.path()).unwrap();
    assert!(matches!(w.config.rope_scaling, bitnet_models::RopeScaling::Llama3 { .. }));
    // The values that mean "none of it" load.
    let dir = copy_fixture();
    edit_config(dir.path(), |v| {
        v["attention_bias"] = serde_json::json!(false);
        v["partial_rotary_factor"] = serde_json::json!(1.0);
        v["rope_scaling"] = serde_json::Value::Null;
        v["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 5e5});
    });
    load(dir.path()).unwrap();
}

/// A Qwen3 checkpoint without its per-head k norm names the missing tensor.
#[test]
fn qwen3_without_k_norm_names_the_tensor() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen3-tiny/dense");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    load(dir.path()).unwrap();
    rewrite(dir.path(), |t| {
        t.remove("model.layers.1.self_attn.k_norm.weight");
    });
    let e = error_of(dir.path());
    assert!(e.contains("model.layers.1.self_attn.k_norm.weight"), "{e}");
}
