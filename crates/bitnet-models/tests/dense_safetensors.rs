//! A plain llama safetensors checkpoint (no `quantization_config`) loads with dense projections
//! in their stored dtype; `WeightOptions::ternarize` ternarizes them instead.

use std::path::Path;

use bitnet_models::safetensors::TensorStore;
use bitnet_models::weights::{LinearWeight, WeightOptions};
use bitnet_models::{Architecture, ModelConfig, ModelWeights, QuantForm};
use bitnet_quant::dense::DenseFormat;
use half::bf16;
use safetensors::tensor::{Dtype, TensorView};

const H: usize = 64;
const I: usize = 96;
const VOCAB: usize = 40;

/// Writes a one-layer llama with bf16 weights (values from a fixed pattern) into `dir`.
fn write_llama(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let config = serde_json::json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": H, "intermediate_size": I, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": true, "hidden_act": "silu"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let kv = H / 2;
    let p = "model.layers.0.";
    let shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![VOCAB, H]),
        ("model.norm.weight".into(), vec![H]),
        (format!("{p}input_layernorm.weight"), vec![H]),
        (format!("{p}post_attention_layernorm.weight"), vec![H]),
        (format!("{p}self_attn.q_proj.weight"), vec![H, H]),
        (format!("{p}self_attn.k_proj.weight"), vec![kv, H]),
        (format!("{p}self_attn.v_proj.weight"), vec![kv, H]),
        (format!("{p}self_attn.o_proj.weight"), vec![H, H]),
        (format!("{p}mlp.gate_proj.weight"), vec![I, H]),
        (format!("{p}mlp.up_proj.weight"), vec![I, H]),
        (format!("{p}mlp.down_proj.weight"), vec![H, I]),
    ];
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = shapes
        .into_iter()
        .enumerate()
        .map(|(t, (name, shape))| {
            let n: usize = shape.iter().product();
            let v = (0..n)
                .map(|i| bf16::from_f32(((i * 7919 + t * 31) % 201) as f32 / 100.0 - 1.0).to_f32())
                .collect();
            (name, shape, v)
        })
        .collect();
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| (n.clone(), TensorView::new(Dtype::BF16, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    tensors
}

#[test]
fn a_plain_llama_checkpoint_loads_dense() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = write_llama(dir.path());
    let cfg = ModelConfig::from_dir(dir.path()).unwrap();
    assert_eq!(
        (cfg.architecture, cfg.quant_form, cfg.sub_norms),
        (Architecture::Llama158, QuantForm::Dense, false)
    );
    let store = TensorStore::open_dir(dir.path()).unwrap();
    let w = ModelWeights::load(&store, cfg.clone()).unwrap();
    for (name, p) in w.projections() {
        let d = p.weight.dense().unwrap_or_else(|| panic!("{name} should be dense"));
        assert_eq!(d.format(), DenseFormat::BF16, "{name}");
    }
    assert_eq!(w.embed_tokens.format(), DenseFormat::BF16);
    // The product is the float one.
    let (_, _, q) = tensors.iter().find(|t| t.0.ends_with("q_proj.weight")).unwrap();
    let x: Vec<f32> = (0..H).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut out = vec![0.0; H];
    w.layers[0].q_proj.weight.dense().unwrap().forward(&x, 1, &mut out).unwrap();
    for r in 0..H {
        let want: f64 = (0..H).map(|c| f64::from(q[r * H + c]) * f64::from(x[c])).sum();
        assert!((f64::from(out[r]) - want).abs() < 1e-4, "row {r}: {} vs {want}", out[r]);
    }
    // The experiment: ternarized on request.
    let t = ModelWeights::load_with(&store, cfg, WeightOptions { ternarize: true }).unwrap();
    assert!(t.projections().all(|(_, p)| matches!(p.weight, LinearWeight::Ternary(_))));
}

#[test]
fn a_llama_with_another_quant_method_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_llama(dir.path());
    let path = dir.path().join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["quantization_config"] = serde_json::json!({ "quant_method": "gptq" });
    std::fs::write(&path, json.to_string()).unwrap();
    let err = ModelConfig::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("gptq"), "{err}");
}
