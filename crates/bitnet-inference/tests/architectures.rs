//! The architectures beyond the BitNet layouts, each against transformers
//! (tools/make_arch_fixture.py; tests/fixtures/README.md):
//! * Qwen3 (`qwen3-tiny`): per-head q/k RMSNorm, head_dim from the config; fp16 weights run
//!   dense as stored, PrismML Ternary-Bonsai's ternary × per-group-scale values (untied head)
//!   likewise, and the same model as llama.cpp's qwen3 GGUF.
//! * Falcon3-1.58bit / Falcon-E (`falcon-tiny`): the llama layout with BitLinear (packed codes,
//!   divisor weight_scale), head_dim from the config, rope_theta 1000042, untied float head.
//! * A BitNet-embedding model on a Qwen3 backbone (`qwen3-embed-tiny`): an RMSNorm before every
//!   BitLinear, no `model.` prefix, last-token pooling and L2 normalization.
//! * Gemma3 (`gemma3-tiny`, gemma-3-270m's layout): embeddings times sqrt(hidden), Gemma
//!   RMSNorms (1 + w), four norms per layer, per-head q/k norms, GeGLU, query_pre_attn_scalar,
//!   sliding-window layers with their own RoPE base beside a global layer with linear RoPE
//!   scaling; bf16 weights run dense, and the same layout as ternary BitLinears.

mod common;

use bitnet_inference::{Context, ContextOptions, CpuBackend};
use bitnet_models::{Architecture, ModelConfig, QuantForm};
use common::parity::{run_checkpoint_on, run_fixture_on, LogitCheck};
use common::{cosine, fixtures, Golden};

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

/// YaRN-scaled RoPE (Ternary-Bonsai-8B's longer context, Qwen's model cards): transformers
/// scales every position's frequencies and multiplies cos and sin by 0.1 ln 4 + 1, which the
/// engine folds into the q/k norm gains.
#[test]
fn qwen3_with_yarn_rope_scaling_matches_transformers() {
    let cfg = ModelConfig::from_dir(&fixtures().join("qwen3-tiny/yarn")).unwrap();
    assert!(matches!(cfg.rope_scaling, bitnet_models::RopeScaling::Yarn { factor: 4.0, .. }));
    assert!((cfg.rope_scaling.attention_factor() - (1.0 + 0.1 * 4f32.ln())).abs() < 1e-6);
    run_fixture_on(&CpuBackend::new, "qwen3-tiny", "yarn", LogitCheck::Atol(1e-3));
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

/// Every text's embedding (last-token pooling, L2-normalized) against transformers' pooled,
/// normalized `last_hidden_state`; the tokenizer appends the pooled end-of-text token.
#[test]
fn bitnet_embedding_matches_transformers() {
    let dir = fixtures().join("qwen3-embed-tiny/master");
    let golden = Golden::open(&fixtures().join("qwen3-embed-tiny/golden/embed_f32.safetensors"));
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("qwen3-embed-tiny/golden/golden.json")).unwrap(),
    )
    .unwrap();
    let texts = json["forms"]["master"]["texts"].as_array().unwrap();
    let loaded = common::load(&dir);
    let cfg = &loaded.model.config;
    assert_eq!((cfg.architecture, cfg.quant_form), (Architecture::Qwen3, QuantForm::Online));
    assert_eq!(cfg.bitlinear_input_norm, Some(1e-6));
    let tok = loaded.tokenizer.as_ref().unwrap();
    let mut ctx = Context::new(&loaded.model, CpuBackend::new(), &ContextOptions::new(64)).unwrap();
    for (i, text) in texts.iter().enumerate() {
        let ids = tok.encode(text.as_str().unwrap()).unwrap();
        assert_eq!(ids, golden.u32s(&format!("input_ids.{i}")), "text {i}: token ids");
        let got = loaded.model.embed(&mut ctx, &ids).unwrap();
        let want = golden.f(&format!("embedding.{i}"));
        let c = cosine(&got, want);
        assert!(c >= 0.999, "text {i}: cosine {c} with transformers' embedding");
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "text {i}: norm {norm}");
    }
    // Every embedding gave its blocks back.
    assert_eq!(ctx.kv_stats().used, 0);
}

/// Batches smaller than the text: the embedding is computed over chunks and equals the one
/// computed in one pass.
#[test]
fn embedding_over_chunks_equals_one_pass() {
    let loaded = common::load(&fixtures().join("qwen3-embed-tiny/master"));
    let golden = Golden::open(&fixtures().join("qwen3-embed-tiny/golden/embed_f32.safetensors"));
    let ids = golden.u32s("input_ids.1");
    let mut whole = Context::new(&loaded.model, CpuBackend::new(), &ContextOptions::new(64)).unwrap();
    let opts = ContextOptions { max_batch: 5, ..ContextOptions::new(64) };
    let mut chunked = Context::new(&loaded.model, CpuBackend::new(), &opts).unwrap();
    let a = loaded.model.embed(&mut whole, &ids).unwrap();
    let b = loaded.model.embed(&mut chunked, &ids).unwrap();
    assert!(ids.len() > 5);
    assert!(common::max_abs_diff(&a, &b) < 1e-5);
    assert!(matches!(loaded.model.embed(&mut whole, &[]), Err(bitnet_inference::InferenceError::EmptyInput)));
}

/// The embeddings of the golden texts from `model`, and their cosines with transformers'.
fn embedding_cosines(model: &bitnet_inference::Model<CpuBackend>) -> Vec<f64> {
    let golden = Golden::open(&fixtures().join("qwen3-embed-tiny/golden/embed_f32.safetensors"));
    let mut ctx = Context::new(model, CpuBackend::new(), &ContextOptions::new(64)).unwrap();
    (0..4)
        .map(|i| {
            let got = model.embed(&mut ctx, &golden.u32s(&format!("input_ids.{i}"))).unwrap();
            cosine(&got, golden.f(&format!("embedding.{i}")))
        })
        .collect()
}

/// Microsoft's BitNet-embedding checkpoints name the gain before each projection
/// `<proj>.norm.weight` and may say nothing of it in config.json: the gains alone make the
/// projections BitLinears with an input norm of the model's eps.
#[test]
fn embedding_checkpoint_with_norm_weight_names_and_no_quantization_config() {
    let src = fixtures().join("qwen3-embed-tiny/master");
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().map(|(n, v)| (n.replace(".rms_norm.weight", ".norm.weight"), v)).collect();
    assert!(renamed.iter().any(|(n, _)| n.ends_with("q_proj.norm.weight")));
    std::fs::write(dir.path().join("model.safetensors"), safetensors::serialize(renamed, None).unwrap())
        .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let loaded = common::load(dir.path());
    let cfg = &loaded.model.config;
    assert_eq!((cfg.quant_form, cfg.bitlinear_input_norm), (QuantForm::Online, Some(cfg.rms_norm_eps)));
    for (i, c) in embedding_cosines(&loaded.model).into_iter().enumerate() {
        assert!(c >= 0.999, "text {i}: cosine {c}");
    }
}

/// The embedding model as a `qwen3` GGUF written by `bitnet convert`: per-head norms, and the
/// gain before every projection as bitnet.cpp's embedding GGUFs name it (`attn_q_norm_in`).
#[test]
fn embedding_model_as_a_gguf_matches_transformers() {
    use bitnet_models::convert::{convert_hf_to_gguf, HeadType, WeightType};
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("embed.gguf");
    let src = fixtures().join("qwen3-embed-tiny/master");
    convert_hf_to_gguf(&src, &gguf, WeightType::F16, HeadType::F16, |_, _| {}).unwrap();
    let file = bitnet_models::gguf::GgufFile::open(&gguf).unwrap();
    assert_eq!(file.metadata().get_str("general.architecture"), Some("qwen3"));
    assert!(
        file.tensor("blk.1.ffn_down_norm_in.weight").is_some()
            && file.tensor("blk.1.attn_k_norm.weight").is_some()
    );
    let loaded = common::load(&gguf);
    assert_eq!(loaded.model.config.bitlinear_input_norm, Some(1e-6));
    for (i, c) in embedding_cosines(&loaded.model).into_iter().enumerate() {
        assert!(c >= 0.999, "text {i}: cosine {c}");
    }
}

#[test]
fn gemma3_config_reads_windows_scales_and_two_rope_bases() {
    let cfg = ModelConfig::from_dir(&fixtures().join("gemma3-tiny/dense")).unwrap();
    assert_eq!(cfg.architecture, Architecture::Gemma3);
    assert!(cfg.qk_norm() && cfg.gemma_norms() && !cfg.sub_norms && cfg.tie_word_embeddings);
    assert_eq!(cfg.activation, bitnet_models::Activation::GeluTanh);
    assert_eq!(cfg.quant_form, QuantForm::Dense);
    // 4 heads of 16 over a hidden size of 48; scores scaled by 24^-0.5, not 16^-0.5.
    assert_eq!((cfg.hidden_size, cfg.num_heads, cfg.head_dim), (48, 4, 16));
    assert_eq!(cfg.attention_scale(), (24f64).powf(-0.5) as f32);
    assert_eq!(cfg.embedding_scale(), Some(48f32.sqrt()));
    // Layers 0, 1 and 3 slide over 6 keys with base 10000; layer 2 is global, base 1e6, linear × 2.
    let windows: Vec<_> = (0..4).map(|l| cfg.sliding_window(l)).collect();
    assert_eq!(windows, [Some(6), Some(6), None, Some(6)]);
    assert_eq!(cfg.sliding.as_ref().unwrap().rope_theta, 10_000.0);
    assert_eq!(
        (cfg.rope_theta, cfg.rope_scaling),
        (1_000_000.0, bitnet_models::RopeScaling::Linear { factor: 2.0 })
    );
    assert_eq!(cfg.bos_token_id, Some(2));
    let master = ModelConfig::from_dir(&fixtures().join("gemma3-tiny/master")).unwrap();
    assert_eq!(master.quant_form, QuantForm::Online);
}

/// bf16 weights as stored: the dense path is float throughout, so the logits agree to float
/// rounding, ten times tighter than the other fixtures' 1e-3 (measured: below 2e-5).
#[test]
fn gemma3_bf16_weights_dense_match_transformers() {
    let golden = Golden::open(&fixtures().join("gemma3-tiny/golden/dense_f32.safetensors"));
    // The prompt is longer than the window: the sliding layers' mask cuts keys off.
    let window =
        ModelConfig::from_dir(&fixtures().join("gemma3-tiny/dense")).unwrap().sliding.unwrap().window;
    assert!(golden.u32s("input_ids").len() > window + 4);
    run_fixture_on(&CpuBackend::new, "gemma3-tiny", "dense", LogitCheck::Atol(1e-4));
}

/// The layout with every projection a BitLinear (autobitlinear, online): int8 activations, the
/// bar of the other ternary fixtures whose greedy path has no int8 flip.
#[test]
fn gemma3_bitlinear_master_weights_match_transformers() {
    run_fixture_on(&CpuBackend::new, "gemma3-tiny", "master", LogitCheck::Atol(1e-3));
}

/// The parity above can fail: the same checkpoint with the window widened past the prompt (every
/// layer global) gives other logits, so the sliding mask is what makes it match. (Likewise the
/// sliding layers' RoPE base: with theta 1e6 everywhere the logits move too.)
#[test]
fn gemma3_without_its_sliding_window_does_not_match() {
    let src = fixtures().join("gemma3-tiny/dense");
    let golden = Golden::open(&fixtures().join("gemma3-tiny/golden/dense_f32.safetensors"));
    let ids = golden.u32s("input_ids");
    for (key, value) in
        [("sliding_window", serde_json::json!(1000)), ("rope_local_base_freq", serde_json::json!(1e6))]
    {
        let dir = tempfile::tempdir().unwrap();
        for f in ["model.safetensors", "tokenizer.json", "generation_config.json"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
        match key {
            "sliding_window" => config[key] = value,
            _ => config["rope_parameters"]["sliding_attention"]["rope_theta"] = value,
        }
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let loaded = common::load(dir.path());
        let got = common::prefill_logits(&loaded.model, &ids);
        let d = common::max_abs_diff(&got, golden.f("logits"));
        assert!(d > 0.1, "with {key} changed the logits still match transformers' (max diff {d})");
    }
}

/// The dense checkpoint as llama.cpp's converter writes a Gemma3 model (`Gemma3Model` in
/// convert_hf_to_gguf.py): arch `gemma3`, every norm gain with Gemma's 1 added, BF16 matrices as
/// stored, `attention.sliding_window`, and the keys llama.cpp reads for other sliding-window
/// families (`attention.sliding_window_pattern`, one bool per layer, and `rope.freq_base_swa`),
/// without which it assumes every sixth layer global and a local base of 10000. `keys`: `all`,
/// `gemma3` (only the keys llama.cpp's gemma3 converter writes) or `no-window`.
fn write_gemma3_gguf(src: &std::path::Path, dst: &std::path::Path, keys: &str) {
    use bitnet_models::gguf::{write_gguf, GgufArray, GgufMetadata, GgufValue, TensorSpec};
    use bitnet_quant::formats::GgmlType;
    let cfg = ModelConfig::from_dir(src).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "post_attention_norm"),
        ("pre_feedforward_layernorm", "ffn_norm"),
        ("post_feedforward_layernorm", "post_ffw_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    let mut tensors: Vec<(TensorSpec, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let gguf_name = match name.as_str() {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".to_string(),
            other => {
                let rest = other.strip_prefix("model.layers.").unwrap();
                let (l, module) = rest.split_once('.').unwrap();
                let module = module.strip_suffix(".weight").unwrap();
                format!("blk.{l}.{}.weight", names.iter().find(|n| n.0 == module).unwrap().1)
            }
        };
        let shape: Vec<u64> = view.shape().iter().rev().map(|&d| d as u64).collect();
        assert_eq!(view.dtype(), safetensors::Dtype::BF16);
        if shape.len() == 2 {
            tensors.push((TensorSpec::new(gguf_name, GgmlType::BF16, &shape), view.data().to_vec()));
        } else {
            // Norm gains: F32 with the 1 added, as the converter's norm_shift does.
            let gains: Vec<u8> = view
                .data()
                .chunks_exact(2)
                .flat_map(|b| (half::bf16::from_le_bytes([b[0], b[1]]).to_f32() + 1.0).to_le_bytes())
                .collect();
            tensors.push((TensorSpec::new(gguf_name, GgmlType::F32, &shape), gains));
        }
    }
    let sliding = cfg.sliding.as_ref().unwrap();
    let mut md = GgufMetadata::new();
    let u32v = |v: usize| GgufValue::U32(v as u32);
    md.insert("general.architecture", GgufValue::String("gemma3".into()));
    md.insert("gemma3.context_length", u32v(cfg.max_position_embeddings));
    md.insert("gemma3.embedding_length", u32v(cfg.hidden_size));
    md.insert("gemma3.feed_forward_length", u32v(cfg.intermediate_size));
    md.insert("gemma3.block_count", u32v(cfg.num_layers));
    md.insert("gemma3.attention.head_count", u32v(cfg.num_heads));
    md.insert("gemma3.attention.head_count_kv", u32v(cfg.num_kv_heads));
    md.insert("gemma3.attention.key_length", u32v(cfg.head_dim));
    md.insert("gemma3.attention.value_length", u32v(cfg.head_dim));
    md.insert("gemma3.attention.layer_norm_rms_epsilon", GgufValue::F32(cfg.rms_norm_eps));
    md.insert("gemma3.rope.freq_base", GgufValue::F32(cfg.rope_theta));
    md.insert("gemma3.rope.scaling.type", GgufValue::String("linear".into()));
    md.insert("gemma3.rope.scaling.factor", GgufValue::F32(2.0));
    if keys != "no-window" {
        md.insert("gemma3.attention.sliding_window", u32v(sliding.window));
    }
    if keys == "all" {
        md.insert(
            "gemma3.attention.sliding_window_pattern",
            GgufValue::Array(GgufArray::Bool(sliding.sliding_layers.clone())),
        );
        md.insert("gemma3.rope.freq_base_swa", GgufValue::F32(sliding.rope_theta));
    }
    md.insert("tokenizer.ggml.bos_token_id", u32v(2));
    md.insert("tokenizer.ggml.eos_token_id", u32v(1));
    let refs: Vec<(TensorSpec, &[u8])> = tensors.iter().map(|(s, b)| (s.clone(), &b[..])).collect();
    write_gguf(dst, &md, &refs).unwrap();
}

/// llama.cpp's gemma3 GGUF of the dense weights (gains with 1 added, BF16 matrices, the window
/// and the layer pattern as metadata) gives transformers' outputs too; without the pattern key
/// the reader takes llama.cpp's gemma3 rule (every sixth layer global, local base 10000).
#[test]
fn gemma3_gguf_matches_transformers() {
    let root = fixtures().join("gemma3-tiny");
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("dense.gguf");
    write_gemma3_gguf(&root.join("dense"), &gguf, "all");
    let file = bitnet_models::gguf::GgufFile::open(&gguf).unwrap();
    let cfg = bitnet_models::gguf_model::config_from_gguf(&file).unwrap();
    let hf = ModelConfig::from_dir(&root.join("dense")).unwrap();
    assert_eq!((cfg.architecture, cfg.activation, cfg.head_dim), (Architecture::Gemma3, hf.activation, 16));
    assert_eq!((cfg.sliding.as_ref(), cfg.rope_scaling), (hf.sliding.as_ref(), hf.rope_scaling));
    // llama.cpp's score scale is head_dim^-0.5 (the file holds no query_pre_attn_scalar): the
    // fixture's 24 is a transformers-only case, so the logits are compared with the scalar
    // transformers used put back.
    assert_eq!(cfg.attention_scale(), 16f32.powf(-0.5));
    let mut weights = bitnet_models::ModelWeights::from_gguf(&file).unwrap();
    weights.config.query_pre_attn_scalar = hf.query_pre_attn_scalar;
    let model = bitnet_inference::Model::new(weights, &CpuBackend::new(), Default::default()).unwrap();
    let golden = Golden::open(&root.join("golden/dense_f32.safetensors"));
    common::parity::check_prompt_logits(&model, &golden, LogitCheck::Atol(1e-4));
    common::parity::check_greedy_and_cache(&model, &golden);

    let config_of = |keys: &str| {
        write_gemma3_gguf(&root.join("dense"), &gguf, keys);
        bitnet_models::gguf_model::config_from_gguf(&bitnet_models::gguf::GgufFile::open(&gguf).unwrap())
    };
    let s = config_of("gemma3").unwrap().sliding.unwrap();
    assert_eq!((s.window, s.sliding_layers, s.rope_theta), (6, vec![true; 4], 10_000.0));
    let err = config_of("no-window").unwrap_err().to_string();
    assert!(err.contains("`gemma3.attention.sliding_window` is missing"), "{err}");
}

/// The whole greedy sequence (32 tokens) prefilled in chunks of 5, so that every sliding
/// window straddles chunks and the cache, against transformers' one forward over it.
#[test]
fn gemma3_chunked_prefill_matches_transformers_over_the_whole_sequence() {
    let root = fixtures().join("gemma3-tiny");
    let golden = Golden::open(&root.join("golden/dense_f32.safetensors"));
    let loaded = common::load(&root.join("dense"));
    let ids = golden.u32s("greedy_ids");
    let mut ctx = common::context(&loaded.model, ids.len(), 5);
    let mut seq = bitnet_inference::Sequence::new();
    loaded.model.forward(&mut ctx, &mut seq, &ids, bitnet_inference::Logits::All).unwrap();
    let d = common::max_abs_diff(ctx.logits(), golden.f("greedy_full_logits"));
    assert!(d <= 1e-4, "chunked prefill differs from transformers by {d}");
}

/// `bitnet convert` of the BitLinear form: a `gemma3` GGUF (ternary projections, gains written
/// as 1 + w, the window and layer pattern as metadata) that runs as the checkpoint does. The
/// fixture's query_pre_attn_scalar (24, not head_dim 16) has no GGUF key and is refused by
/// name; with the scalar llama.cpp assumes the conversion goes through.
#[test]
fn gemma3_bitlinear_checkpoint_converts_to_a_gemma3_gguf() {
    use bitnet_models::convert::{convert_hf_to_gguf, HeadType, WeightType};
    let src = fixtures().join("gemma3-tiny/master");
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("gemma3.gguf");
    let err =
        convert_hf_to_gguf(&src, &gguf, WeightType::F16, HeadType::F16, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("query_pre_attn_scalar 24"), "{err}");

    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    for f in ["model.safetensors", "tokenizer.json", "generation_config.json"] {
        std::fs::copy(src.join(f), hf.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["query_pre_attn_scalar"] = serde_json::json!(16);
    std::fs::write(hf.join("config.json"), config.to_string()).unwrap();
    convert_hf_to_gguf(&hf, &gguf, WeightType::F16, HeadType::F16, |_, _| {}).unwrap();
    let file = bitnet_models::gguf::GgufFile::open(&gguf).unwrap();
    assert_eq!(file.metadata().get_str("general.architecture"), Some("gemma3"));
    let from_gguf = bitnet_models::gguf_model::config_from_gguf(&file).unwrap();
    let from_hf = ModelConfig::from_dir(&hf).unwrap();
    assert_eq!(from_gguf.sliding, from_hf.sliding);
    assert_eq!(from_gguf.attention_scale(), from_hf.attention_scale());

    // The same model either way: F16 rounds each matrix's scale, and int8 activations may flip
    // where that moves a value across a rounding tie.
    let ids = Golden::open(&fixtures().join("gemma3-tiny/golden/master_f32.safetensors")).u32s("greedy_ids");
    let a = common::prefill_logits(&common::load(&hf).model, &ids);
    let b = common::prefill_logits(&common::load(&gguf).model, &ids);
    let vocab = from_hf.vocab_size;
    for (pos, (x, y)) in a.chunks(vocab).zip(b.chunks(vocab)).enumerate() {
        let c = cosine(x, y);
        assert!(c >= 0.999, "position {pos}: cosine {c} between the checkpoint and its GGUF");
    }
}
