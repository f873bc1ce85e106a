//! The architectures beyond the BitNet layouts, each against transformers
//! (tools/make_arch_fixture.py; tests/fixtures/README.md):
//! * Qwen3 (`qwen3-tiny`): per-head q/k RMSNorm, head_dim from the config; fp16 weights run
//!   dense as stored, PrismML Ternary-Bonsai's ternary × per-group-scale values (untied head)
//!   likewise, and the same model as llama.cpp's qwen3 GGUF.
//! * Falcon3-1.58bit / Falcon-E (`falcon-tiny`): the llama layout with BitLinear (packed codes,
//!   divisor weight_scale), head_dim from the config, rope_theta 1000042, untied float head.

mod common;

use bitnet_inference::CpuBackend;
use bitnet_models::{Architecture, ModelConfig, QuantForm};
use common::fixtures;
use common::parity::{run_checkpoint_on, run_fixture_on, LogitCheck};

#[test]
fn qwen3_config_takes_head_dim_and_runs_dense_without_quantization_config() {
    let cfg = ModelConfig::from_dir(&fixtures().join("qwen3-tiny/dense")).unwrap();
    assert_eq!(cfg.architecture, Architecture::Qwen3);
    assert!(cfg.qk_norm() && !cfg.sub_norms);
    // 4 heads of 32 over a hidden size of 64: q is twice as wide as the residual stream.
    assert_eq!((cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.q_dim()), (64, 4, 32, 128));
    assert_eq!(cfg.quant_form, QuantForm::Dense);
    assert_eq!(cfg.rope_theta, 1_000_000.0);
    assert!(cfg.tie_word_embeddings);
    assert!(!ModelConfig::from_dir(&fixtures().join("qwen3-tiny/bonsai")).unwrap().tie_word_embeddings);
}

#[test]
fn qwen3_fp16_weights_dense_match_transformers() {
    run_fixture_on(&CpuBackend::new, "qwen3-tiny", "dense", LogitCheck::Atol(1e-3));
}

/// Ternary-Bonsai's unpacked checkpoints: every matrix, embeddings and head included, holds
/// ternary codes times one fp16 scale per group; they run dense, exactly as stored.
#[test]
fn qwen3_bonsai_group_scaled_ternary_values_match_transformers() {
    run_fixture_on(&CpuBackend::new, "qwen3-tiny", "bonsai", LogitCheck::Atol(1e-3));
}

/// llama.cpp's qwen3 GGUF of the same weights (F16 matrices, attn_q_norm / attn_k_norm, rows in
/// HF order) gives transformers' outputs too.
#[test]
fn qwen3_gguf_matches_transformers() {
    let root = fixtures().join("qwen3-tiny");
    let file = bitnet_models::gguf::GgufFile::open(root.join("dense.gguf")).unwrap();
    let cfg = bitnet_models::gguf_model::config_from_gguf(&file).unwrap();
    assert_eq!((cfg.architecture, cfg.head_dim, cfg.num_kv_heads), (Architecture::Qwen3, 32, 2));
    run_checkpoint_on(
        &CpuBackend::new,
        &root.join("dense.gguf"),
        &root.join("golden/dense_f32.safetensors"),
        LogitCheck::Atol(1e-3),
    );
}

#[test]
fn falcon_config_is_the_llama_layout_with_bitlinear() {
    let cfg = ModelConfig::from_dir(&fixtures().join("falcon-tiny/packed_bitlinear")).unwrap();
    assert_eq!(cfg.architecture, Architecture::Llama158);
    assert_eq!(cfg.quant_form, QuantForm::PackedDivide);
    assert!(!cfg.qk_norm() && !cfg.sub_norms && !cfg.tie_word_embeddings);
    // head_dim from the config: 2 heads of 128 over a hidden size of 128.
    assert_eq!((cfg.head_dim, cfg.q_dim(), cfg.hidden_size), (128, 256, 128));
    assert_eq!(cfg.rope_theta, 1_000_042.0);
}

#[test]
fn falcon_1_58bit_layout_matches_transformers() {
    run_fixture_on(&CpuBackend::new, "falcon-tiny", "packed_bitlinear", LogitCheck::Atol(1e-3));
}

/// The form bitnet.cpp runs Falcon 1.58-bit models in: a `llama` GGUF with I2_S projections
/// (q/k rows in llama's interleaved-RoPE order), here written by `bitnet convert`.
#[test]
fn falcon_as_an_i2_s_gguf_matches_transformers() {
    use bitnet_models::convert::{convert_hf_to_gguf, HeadType, WeightType};
    let root = fixtures().join("falcon-tiny");
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("falcon-i2_s.gguf");
    convert_hf_to_gguf(&root.join("packed_bitlinear"), &gguf, WeightType::I2S, HeadType::F16, |_, _| {})
        .unwrap();
    let file = bitnet_models::gguf::GgufFile::open(&gguf).unwrap();
    assert_eq!(file.metadata().get_str("general.architecture"), Some("llama"));
    run_checkpoint_on(
        &CpuBackend::new,
        &gguf,
        &root.join("golden/packed_bitlinear_f32.safetensors"),
        LogitCheck::Atol(1e-3),
    );
}
