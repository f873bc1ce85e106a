//! The architectures beyond the BitNet layouts, each against transformers
//! (tools/make_arch_fixture.py; tests/fixtures/README.md):
//! * Qwen3 (`qwen3-tiny`): per-head q/k RMSNorm, head_dim from the config; fp16 weights run
//!   dense as stored, PrismML Ternary-Bonsai's ternary × per-group-scale values (untied head)
//!   likewise, and the same model as llama.cpp's qwen3 GGUF.

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
