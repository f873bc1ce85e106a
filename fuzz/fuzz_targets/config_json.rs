//! Any bytes as config.json (and generation_config.json) give a validated `ModelConfig` or a
//! typed error naming the file, never a panic; what is accepted holds the relations the
//! forward pass and the allocations rely on.
//!
//! Input layout: config.json, a 0x00 byte, generation_config.json. Without a 0x00 byte the
//! whole input is config.json and there is no generation config.
#![no_main]

use std::path::Path;

use bitnet_inference::sampling::{GenerationDefaults, Sampler};
use bitnet_models::ModelConfig;
use libfuzzer_sys::fuzz_target;

/// What loading and the forward pass assume of a config that passed validation.
fn check_config(cfg: &ModelConfig) {
    assert!(cfg.vocab_size > 0 && cfg.hidden_size > 0 && cfg.intermediate_size > 0 && cfg.num_layers > 0);
    assert!(cfg.num_kv_heads > 0 && cfg.num_heads.is_multiple_of(cfg.num_kv_heads));
    assert!(cfg.head_dim > 0 && cfg.head_dim.is_multiple_of(2));
    assert!(cfg.rope_theta.is_finite() && cfg.rope_theta > 0.0);
    assert!(cfg.rms_norm_eps.is_finite() && cfg.rms_norm_eps >= 0.0);
    // Derived widths are computed with plain usize arithmetic everywhere: they must not overflow.
    let _ = (cfg.q_dim(), cfg.kv_dim());
    assert!(cfg.q_dim().checked_mul(cfg.hidden_size).is_some());
}

fuzz_target!(|data: &[u8]| {
    let (config, generation) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let path = Path::new("fuzz/config.json");
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(config) else {
        return;
    };
    let Ok(mut cfg) = ModelConfig::from_json(&json, path) else {
        return;
    };
    check_config(&cfg);
    let Some(gen) = generation.and_then(|g| serde_json::from_slice::<serde_json::Value>(g).ok()) else {
        return;
    };
    cfg.merge_generation_config(&gen);
    check_config(&cfg);
    // The checkpoint's sampling defaults: either refused by validation or usable for sampling.
    let params = GenerationDefaults::from_json(&gen).params();
    if params.validate().is_ok() {
        let vocab = 16;
        let mut sampler = Sampler::new(params, vocab);
        let mut logits: Vec<f32> = (0..vocab).map(|i| (i as f32 * 0.37).sin()).collect();
        let id = sampler.sample(&mut logits, &[1, 2, 3]);
        assert!((id as usize) < vocab);
    }
});
