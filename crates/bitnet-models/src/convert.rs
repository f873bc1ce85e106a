//! Hugging Face BitNet checkpoint → GGUF, one tensor at a time.
//!
//! The ternary projections go to TQ2_0 / TQ1_0 / Q2_0 / Q1_0 (llama.cpp), PQ2_0 / PTQ1_0
//! (PrismML) or I2_S (bitnet.cpp) with their exact codes and one scale (`mean|W|`) per matrix,
//! repeated in every group of the group-scaled types (as f16), or to F16 as dequantized values.
//! Q1_0 holds only `±d`: a matrix with zero codes cannot be written in it. Names and
//! metadata keys are llama.cpp's: `general.architecture` is `bitnet-b1.58` for ReLU² models
//! (bitnet.cpp's 2B-4T), `bitnet` for SiLU models with sub-norms (llama.cpp's 1bitLLM arch),
//! `llama` for HF1BitLLM-style models, `qwen3` for Qwen3 (per-head `attn_q_norm`/`attn_k_norm`,
//! rows in HF order), `gemma3` for Gemma 3 (gains written as the `1 + w` they multiply by,
//! `post_attention_norm`/`post_ffw_norm`, the sliding window, layer pattern and local RoPE base
//! as metadata; a `query_pre_attn_scalar` other than the one llama.cpp assumes is refused, a GGUF
//! has no key for it). A model with an RMSNorm before every projection gets its gains as
//! bitnet.cpp's embedding models name them (`blk.N.attn_q_norm_in.weight`, …). The tokenizer.json vocabulary is written as a `gpt2` BPE
//! vocabulary. Memory stays near the largest tensor: each is read, converted and written
//! before the next, into a temporary file renamed at the end.

use std::path::Path;

use bitnet_quant::absmean_ternary;
use bitnet_quant::formats::{self, GgmlType};
use bitnet_quant::hf_pack::unpack_hf;
use serde_json::Value;

use crate::gguf::{GgufArray, GgufMetadata, GgufValue, GgufWriter, TensorSpec};
use crate::safetensors::TensorStore;
use crate::{Activation, Architecture, ModelConfig, ModelError, QuantForm, RopeScaling};

/// Type of the ternary projections in the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightType {
    Tq2_0,
    Tq1_0,
    I2S,
    F16,
    /// llama.cpp's Q2_0: 2-bit codes, an f16 scale per 64 weights.
    Q2_0,
    /// llama.cpp's Q1_0: signs only (no zero), an f16 scale per 128 weights.
    Q1_0,
    /// PrismML's PQ2_0: Q2_0's codes, an f16 scale per 128 weights.
    Pq2_0,
    /// PrismML's PTQ1_0: TQ1_0's packing, an f16 scale per 128 weights.
    Ptq1_0,
}

/// Type of the embeddings / lm_head in the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadType {
    F16,
    Q8_0,
    Q6K,
    Q4K,
}

impl WeightType {
    /// Every type, in the order the command line lists them.
    pub const ALL: [WeightType; 8] = [
        WeightType::Tq2_0,
        WeightType::Tq1_0,
        WeightType::Q2_0,
        WeightType::Q1_0,
        WeightType::Pq2_0,
        WeightType::Ptq1_0,
        WeightType::I2S,
        WeightType::F16,
    ];

    /// The lower-case name the command line and the Python bindings take.
    pub fn name(self) -> &'static str {
        match self {
            WeightType::Tq2_0 => "tq2_0",
            WeightType::Tq1_0 => "tq1_0",
            WeightType::I2S => "i2_s",
            WeightType::F16 => "f16",
            WeightType::Q2_0 => "q2_0",
            WeightType::Q1_0 => "q1_0",
            WeightType::Pq2_0 => "pq2_0",
            WeightType::Ptq1_0 => "ptq1_0",
        }
    }

    /// The type named `name` ([`WeightType::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Elements per block: rows of a projection must be a multiple of it.
    fn block(self) -> usize {
        match self {
            WeightType::I2S => 128,
            WeightType::F16 => 1,
            other => other.ggml().ternary_group().unwrap_or(1),
        }
    }

    /// The bytes of exact ternary `codes` with one `scale` in this type.
    fn encode(self, codes: &[i8], scale: f32) -> Result<Vec<u8>, formats::FormatError> {
        match self {
            WeightType::I2S => formats::i2_s::pack(codes, scale),
            WeightType::F16 => {
                Ok(formats::float::quantize_f16(&codes.iter().map(|&c| c as f32 * scale).collect::<Vec<_>>()))
            }
            grouped => {
                formats::pack_ternary(grouped.ggml(), codes, &vec![scale; codes.len() / grouped.block()])
            }
        }
    }

    fn ggml(self) -> GgmlType {
        match self {
            WeightType::Tq2_0 => GgmlType::TQ2_0,
            WeightType::Tq1_0 => GgmlType::TQ1_0,
            WeightType::I2S => GgmlType::I2_S,
            WeightType::F16 => GgmlType::F16,
            WeightType::Q2_0 => GgmlType::Q2_0,
            WeightType::Q1_0 => GgmlType::Q1_0,
            WeightType::Pq2_0 => GgmlType::PQ2_0,
            WeightType::Ptq1_0 => GgmlType::PTQ1_0,
        }
    }
}

impl HeadType {
    fn ggml(self) -> GgmlType {
        match self {
            HeadType::F16 => GgmlType::F16,
            HeadType::Q8_0 => GgmlType::Q8_0,
            HeadType::Q6K => GgmlType::Q6_K,
            HeadType::Q4K => GgmlType::Q4_K,
        }
    }
}

/// What goes into the GGUF: its name, where it comes from, how it is stored.
enum Source {
    /// A float tensor copied (as F32 for norms, `head` type for embeddings/head).
    Float(String, GgmlType),
    /// A projection `[rows, cols]`: HF prefix.
    Projection(String, usize, usize),
    /// The gain of the RMSNorm before a projection (HF prefix, width): stored, or ones.
    InputNorm(String, usize),
    /// A Gemma RMSNorm's stored `w` (HF name, width), written as the `1 + w` it multiplies by
    /// (llama.cpp's converter does the same: its `norm_shift`).
    GemmaGain(String, usize),
}

fn gguf_arch(cfg: &ModelConfig) -> &'static str {
    match (cfg.architecture, cfg.activation, cfg.sub_norms) {
        (Architecture::Qwen3, _, _) => "qwen3",
        (Architecture::Gemma3, _, _) | (_, Activation::GeluTanh, _) => "gemma3",
        (_, Activation::Relu2, _) => "bitnet-b1.58",
        (_, Activation::Silu, true) => "bitnet",
        (_, Activation::Silu, false) => "llama",
    }
}

/// The `query_pre_attn_scalar` llama.cpp's gemma3 assumes, since a GGUF has no key for it:
/// head_dim, or hidden / heads for the 62-layer 27B (what `gguf_model` reads back).
pub(crate) fn gemma3_implied_query_pre_attn_scalar(cfg: &ModelConfig) -> f32 {
    match cfg.num_layers {
        62 => (cfg.hidden_size / cfg.num_heads.max(1)) as f32,
        _ => cfg.head_dim as f32,
    }
}

fn plan(
    cfg: &ModelConfig,
    weight: WeightType,
    head: HeadType,
    store: &TensorStore,
) -> Vec<(TensorSpec, Source)> {
    let (h, q, kv, i) =
        (cfg.hidden_size as u64, cfg.q_dim() as u64, cfg.kv_dim() as u64, cfg.intermediate_size as u64);
    let v = cfg.vocab_size as u64;
    let untied = !cfg.tie_word_embeddings && store.contains("lm_head.weight");
    // A tied table is the lm_head too, so it takes the head's type; an untied one is only
    // looked up, a row per token, and stays f16.
    let embd = if untied { HeadType::F16 } else { head };
    // A bare decoder (transformers' AutoModel: embedding models) has no `model.` prefix.
    let root = if store.contains("embed_tokens.weight") { "" } else { "model." };
    let mut out = vec![(
        TensorSpec::new("token_embd.weight", embd.ggml(), &[h, v]),
        Source::Float(format!("{root}embed_tokens.weight"), embd.ggml()),
    )];
    let sub = match cfg.architecture {
        Architecture::BitNet1bitLLM => ("self_attn.inner_attn_ln", "mlp.ffn_layernorm"),
        _ => ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"),
    };
    for l in 0..cfg.num_layers {
        let (b, p) = (format!("blk.{l}"), format!("{root}layers.{l}"));
        let norm = |gguf: &str, hf: &str, n: u64| {
            let source = match cfg.gemma_norms() {
                true => Source::GemmaGain(format!("{p}.{hf}.weight"), n as usize),
                false => Source::Float(format!("{p}.{hf}.weight"), GgmlType::F32),
            };
            (TensorSpec::new(format!("{b}.{gguf}.weight"), GgmlType::F32, &[n]), source)
        };
        // A projection, and the gain of the RMSNorm before it where the model has those.
        let proj = |out: &mut Vec<(TensorSpec, Source)>, gguf: &str, hf: &str, rows: u64, cols: u64| {
            out.push((
                TensorSpec::new(format!("{b}.{gguf}.weight"), weight.ggml(), &[cols, rows]),
                Source::Projection(format!("{p}.{hf}"), rows as usize, cols as usize),
            ));
            if cfg.bitlinear_input_norm.is_some() {
                out.push((
                    TensorSpec::new(format!("{b}.{gguf}_norm_in.weight"), GgmlType::F32, &[cols]),
                    Source::InputNorm(format!("{p}.{hf}"), cols as usize),
                ));
            }
        };
        out.push(norm("attn_norm", "input_layernorm", h));
        proj(&mut out, "attn_q", "self_attn.q_proj", q, h);
        proj(&mut out, "attn_k", "self_attn.k_proj", kv, h);
        proj(&mut out, "attn_v", "self_attn.v_proj", kv, h);
        proj(&mut out, "attn_output", "self_attn.o_proj", h, q);
        if cfg.qk_norm() {
            let hd = cfg.head_dim as u64;
            out.push(norm("attn_q_norm", "self_attn.q_norm", hd));
            out.push(norm("attn_k_norm", "self_attn.k_norm", hd));
        }
        if cfg.sub_norms {
            out.push(norm("attn_sub_norm", sub.0, q));
            out.push(norm("ffn_sub_norm", sub.1, i));
        }
        // Gemma: the attention output's norm, then the MLP's input norm under its own name.
        let mlp_norm = match cfg.gemma_norms() {
            true => {
                out.push(norm("post_attention_norm", "post_attention_layernorm", h));
                "pre_feedforward_layernorm"
            }
            false => "post_attention_layernorm",
        };
        out.push(norm("ffn_norm", mlp_norm, h));
        proj(&mut out, "ffn_gate", "mlp.gate_proj", i, h);
        proj(&mut out, "ffn_up", "mlp.up_proj", i, h);
        proj(&mut out, "ffn_down", "mlp.down_proj", h, i);
        if cfg.gemma_norms() {
            out.push(norm("post_ffw_norm", "post_feedforward_layernorm", h));
        }
    }
    let final_norm = match cfg.gemma_norms() {
        true => Source::GemmaGain(format!("{root}norm.weight"), h as usize),
        false => Source::Float(format!("{root}norm.weight"), GgmlType::F32),
    };
    out.push((TensorSpec::new("output_norm.weight", GgmlType::F32, &[h]), final_norm));
    if untied {
        out.push((
            TensorSpec::new("output.weight", head.ggml(), &[h, v]),
            Source::Float("lm_head.weight".into(), head.ggml()),
        ));
    }
    out
}

/// The exact ternary codes and `mean|W|` of one HF projection, whatever its form.
pub fn projection_codes(
    store: &TensorStore,
    cfg: &ModelConfig,
    prefix: &str,
    rows: usize,
    cols: usize,
) -> Result<(Vec<i8>, f32), ModelError> {
    let t = store.get(&format!("{prefix}.weight"))?;
    // Read out into codes: the mapped original is not needed any more.
    let _release = ReleaseOnDrop(&t);
    match cfg.quant_form {
        // BitLinear masters: ternarized, as transformers' online quantization does.
        QuantForm::Online => {
            t.expect_shape(&[rows, cols])?;
            Ok(absmean_ternary(&t.to_f32()?))
        }
        // A plain model's weights run as stored: only values that already are `0, ±a` (a
        // ternary matrix saved as floats) become codes; ternarizing anything else would write
        // another model.
        QuantForm::Dense => {
            t.expect_shape(&[rows, cols])?;
            crate::gguf_model::exact_ternary_floats(&t.to_f32()?).ok_or_else(|| {
                ModelError::tensor(
                    t.path,
                    format!(
                        "tensor `{prefix}.weight` holds a dense model's weights, not ternary values (config.json \
                         has no quantization_config): a ternary GGUF would ternarize them, which changes the \
                         model (a scale per group, as Ternary-Bonsai's unpacked checkpoints hold, is not one \
                         scale per matrix either); the engine runs the checkpoint as it is"
                    ),
                )
            })
        }
        QuantForm::PackedMultiply | QuantForm::PackedDivide => {
            t.expect_shape(&[rows / 4, cols])?;
            let codes = unpack_hf(t.as_u8()?, rows, cols)
                .map_err(|e| ModelError::tensor(t.path, format!("tensor `{prefix}.weight`: {e}")))?;
            // The loader's check: a scale that is not one positive number is a damaged file.
            let s = crate::weights::weight_scale(&store.get(&format!("{prefix}.weight_scale"))?)?;
            let mean = if cfg.quant_form == QuantForm::PackedDivide { 1.0 / s } else { s };
            Ok((codes, mean))
        }
    }
}

/// Releases a tensor's mapped pages when it goes out of scope, on every return path.
struct ReleaseOnDrop<'a, 'b>(&'a crate::safetensors::TensorRef<'b>);

impl Drop for ReleaseOnDrop<'_, '_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

fn fmt_err(path: &Path, name: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::tensor(path, format!("converting `{name}`: {e}"))
}

/// Metadata of the GGUF: architecture keys and the tokenizer.
fn metadata(cfg: &ModelConfig, tokenizer_json: Option<&Value>, name: &str) -> GgufMetadata {
    let arch = gguf_arch(cfg);
    let mut md = GgufMetadata::new();
    let k = |s: &str| format!("{arch}.{s}");
    md.insert("general.architecture", GgufValue::String(arch.into()));
    md.insert("general.name", GgufValue::String(name.into()));
    md.insert(k("context_length"), GgufValue::U32(cfg.max_position_embeddings as u32));
    md.insert(k("embedding_length"), GgufValue::U32(cfg.hidden_size as u32));
    md.insert(k("feed_forward_length"), GgufValue::U32(cfg.intermediate_size as u32));
    md.insert(k("block_count"), GgufValue::U32(cfg.num_layers as u32));
    md.insert(k("attention.head_count"), GgufValue::U32(cfg.num_heads as u32));
    md.insert(k("attention.head_count_kv"), GgufValue::U32(cfg.num_kv_heads as u32));
    md.insert(k("attention.key_length"), GgufValue::U32(cfg.head_dim as u32));
    md.insert(k("attention.value_length"), GgufValue::U32(cfg.head_dim as u32));
    md.insert(k("rope.dimension_count"), GgufValue::U32(cfg.head_dim as u32));
    md.insert(k("rope.freq_base"), GgufValue::F32(cfg.rope_theta));
    md.insert(k("attention.layer_norm_rms_epsilon"), GgufValue::F32(cfg.rms_norm_eps));
    md.insert(k("vocab_size"), GgufValue::U32(cfg.vocab_size as u32));
    match cfg.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            md.insert(k("rope.scaling.type"), GgufValue::String("linear".into()));
            md.insert(k("rope.scaling.factor"), GgufValue::F32(factor));
        }
        RopeScaling::Yarn { factor, original_max_position_embeddings, beta_fast, beta_slow, .. } => {
            md.insert(k("rope.scaling.type"), GgufValue::String("yarn".into()));
            md.insert(k("rope.scaling.factor"), GgufValue::F32(factor));
            md.insert(
                k("rope.scaling.original_context_length"),
                GgufValue::U32(original_max_position_embeddings as u32),
            );
            md.insert(k("rope.scaling.yarn_beta_fast"), GgufValue::F32(beta_fast));
            md.insert(k("rope.scaling.yarn_beta_slow"), GgufValue::F32(beta_slow));
        }
        // Refused by `convert_hf_to_gguf` before anything is written.
        RopeScaling::Llama3 { .. } => {}
    }
    // Gemma3's sliding layers: the window, and (llama.cpp's keys of other sliding-window
    // families, which gguf_model reads) which layers slide and their RoPE base.
    if let Some(s) = &cfg.sliding {
        md.insert(k("attention.sliding_window"), GgufValue::U32(s.window.min(u32::MAX as usize) as u32));
        md.insert(
            k("attention.sliding_window_pattern"),
            GgufValue::Array(GgufArray::Bool(s.sliding_layers.clone())),
        );
        md.insert(k("rope.freq_base_swa"), GgufValue::F32(s.rope_theta));
    }
    if let Some(tok) = tokenizer_json {
        add_tokenizer(&mut md, cfg, tok);
    }
    md
}

/// tokenizer.json (byte-level BPE) as llama.cpp's `gpt2` vocabulary.
fn add_tokenizer(md: &mut GgufMetadata, cfg: &ModelConfig, tok: &Value) {
    let Some(vocab) = tok.pointer("/model/vocab").and_then(Value::as_object) else { return };
    let mut tokens = vec![String::new(); cfg.vocab_size];
    let mut types = vec![1i32; cfg.vocab_size];
    for (t, id) in vocab {
        if let Some(slot) = id.as_u64().and_then(|i| tokens.get_mut(i as usize)) {
            *slot = t.clone();
        }
    }
    for added in tok.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
        if let (Some(id), Some(content)) =
            (added.get("id").and_then(Value::as_u64), added.get("content").and_then(Value::as_str))
        {
            if let Some(slot) = tokens.get_mut(id as usize) {
                *slot = content.to_string();
                types[id as usize] = 3; // control
            }
        }
    }
    // Ids the tokenizer does not use still need a name: llama.cpp wants every slot.
    for (i, t) in tokens.iter_mut().enumerate() {
        if t.is_empty() {
            *t = format!("[PAD{i}]");
            types[i] = 5; // unused
        }
    }
    let merges: Vec<String> = tok
        .pointer("/model/merges")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(pair) => Some(pair.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ")),
            _ => None,
        })
        .collect();
    md.insert("tokenizer.ggml.model", GgufValue::String("gpt2".into()));
    md.insert(
        "tokenizer.ggml.pre",
        GgufValue::String(if cfg.vocab_size >= 128_000 { "llama-bpe" } else { "gpt-2" }.into()),
    );
    md.insert("tokenizer.ggml.tokens", GgufValue::Array(GgufArray::String(tokens)));
    md.insert("tokenizer.ggml.token_type", GgufValue::Array(GgufArray::I32(types)));
    md.insert("tokenizer.ggml.merges", GgufValue::Array(GgufArray::String(merges)));
    if let Some(b) = cfg.bos_token_id {
        md.insert("tokenizer.ggml.bos_token_id", GgufValue::U32(b));
        md.insert("tokenizer.ggml.add_bos_token", GgufValue::Bool(true));
    }
    if let Some(&e) = cfg.eos_token_ids.first() {
        md.insert("tokenizer.ggml.eos_token_id", GgufValue::U32(e));
    }
}

/// Converts the HF checkpoint in `src` to `dst`; `progress(done, total)` after each tensor.
pub fn convert_hf_to_gguf(
    src: &Path,
    dst: &Path,
    weight: WeightType,
    head: HeadType,
    mut progress: impl FnMut(usize, usize),
) -> Result<(), ModelError> {
    let mut cfg = ModelConfig::from_dir(src)?;
    let store = TensorStore::open_dir(src)?;
    let root = if store.contains("embed_tokens.weight") { "" } else { "model." };
    crate::weights::apply_projection_norm_evidence(&mut cfg, &store, root);
    let cfg = cfg;
    // llama.cpp's gemma3 has no key for the attention scale: a scalar other than the one it
    // assumes cannot be written.
    if let Some(s) = cfg.query_pre_attn_scalar {
        let implied = gemma3_implied_query_pre_attn_scalar(&cfg);
        if s != implied {
            return Err(ModelError::config(
                &src.join("config.json"),
                format!(
                    "query_pre_attn_scalar {s} is not the {implied} llama.cpp's gemma3 assumes (head_dim, or hidden / \
                     heads for the 27B): a GGUF has no key for it"
                ),
            ));
        }
    }
    let block = weight.block();
    for (what, n) in [
        ("hidden_size", cfg.hidden_size),
        ("intermediate_size", cfg.intermediate_size),
        ("q_dim", cfg.q_dim()),
    ] {
        if n % block != 0 {
            return Err(ModelError::config(
                &src.join("config.json"),
                format!(
                    "{what} {n} is not a multiple of {block}: {weight:?} stores rows in blocks of {block}"
                ),
            ));
        }
    }
    // The head (or tied table) rows are hidden_size values: a K-quant head needs whole
    // 256-value super-blocks.
    let head_block = head.ggml().block_geometry().0 as usize;
    if cfg.hidden_size % head_block != 0 {
        return Err(ModelError::config(
            &src.join("config.json"),
            format!(
                "hidden_size {} is not a multiple of {head_block}: a {} lm_head stores its rows in blocks of \
                 {head_block} (f16 or q8_0 take any multiple of 32)",
                cfg.hidden_size,
                head.ggml().name()
            ),
        ));
    }
    // llama.cpp keeps llama3's scaling as a tensor of frequency factors, and YaRN's attention
    // factor only as its default: what a GGUF cannot say is refused, not dropped.
    let yarn_default = |f: f32| if f <= 1.0 { 1.0 } else { 0.1 * f.ln() + 1.0 };
    let writable = match cfg.rope_scaling {
        RopeScaling::Llama3 { .. } => false,
        RopeScaling::Yarn { factor, attention_factor, truncate, .. } => {
            truncate && (attention_factor - yarn_default(factor)).abs() <= 1e-6 * attention_factor
        }
        _ => true,
    };
    if !writable {
        return Err(ModelError::config(
            &src.join("config.json"),
            format!("its RoPE scaling {:?} cannot be written to GGUF here", cfg.rope_scaling),
        ));
    }
    // GGUF has one RMSNorm eps, which the norms before the projections take too.
    if let Some(eps) = cfg.bitlinear_input_norm.filter(|&e| e != cfg.rms_norm_eps) {
        return Err(ModelError::config(
            &src.join("config.json"),
            format!(
                "the RMSNorm before every projection has eps {eps:e}, the model's norms {:e}: a GGUF file holds \
                 one eps for both",
                cfg.rms_norm_eps
            ),
        ));
    }
    let tok_json: Option<Value> =
        std::fs::read_to_string(src.join("tokenizer.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
    let name = src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let md = metadata(&cfg, tok_json.as_ref(), &name);
    let plan = plan(&cfg, weight, head, &store);
    let total = plan.len();
    let gerr = ModelError::Gguf;
    let mut w = GgufWriter::create(dst, &md, plan.iter().map(|(s, _)| s.clone()).collect()).map_err(gerr)?;
    for (done, (spec, source)) in plan.iter().enumerate() {
        let bytes = match source {
            Source::Float(hf, ty) => {
                // Embeddings and head are the largest tensors: convert them a block of rows at
                // a time so that memory stays near one block, not the f32 copy of the matrix.
                let t = store.get(hf)?;
                let row = t.shape.last().copied().unwrap_or(1).max(1);
                let rows_per_chunk = (1 << 20) / row + 1;
                let chunk_bytes = rows_per_chunk * row * (t.dtype.bitsize() / 8);
                let mut error = None;
                let chunks = t.data.chunks(chunk_bytes).enumerate().map_while(|(i, raw)| {
                    let part = crate::safetensors::TensorRef { data: raw, ..t };
                    let converted = part.to_f32().and_then(|x| match ty {
                        GgmlType::F32 => Ok(x.iter().flat_map(|v| v.to_le_bytes()).collect()),
                        _ => formats::quantize(*ty, &x).map_err(|e| fmt_err(dst, hf, e)),
                    });
                    // Converted: its mapped pages can go (loading's rule, docs/architecture.md).
                    t.release_range(i * chunk_bytes..i * chunk_bytes + raw.len());
                    converted.map_err(|e| error = Some(e)).ok()
                });
                let written = w.write_tensor_from(&spec.name, &mut ChunkReader::new(chunks)).map_err(gerr);
                if let Some(e) = error {
                    return Err(e);
                }
                written?;
                progress(done + 1, total);
                continue;
            }
            Source::GemmaGain(hf, n) => {
                let t = store.get(hf)?;
                t.expect_shape(&[*n])?;
                t.to_f32()?.iter().flat_map(|w| (1.0 + w).to_le_bytes()).collect()
            }
            Source::InputNorm(prefix, n) => {
                let stored = ["rms_norm.weight", "norm.weight"]
                    .iter()
                    .map(|k| format!("{prefix}.{k}"))
                    .find(|k| store.contains(k));
                let gain = match stored {
                    Some(name) => {
                        let t = store.get(&name)?;
                        t.expect_shape(&[*n])?;
                        t.to_f32()?
                    }
                    None => vec![1.0; *n],
                };
                gain.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            Source::Projection(prefix, rows, cols) => {
                let (mut codes, scale) = projection_codes(&store, &cfg, prefix, *rows, *cols)?;
                if gguf_arch(&cfg) == "llama" {
                    codes = llama_rope_rows(&codes, *cols, &spec.name, &cfg, false);
                }
                weight.encode(&codes, scale).map_err(|e| fmt_err(dst, prefix, e))?
            }
        };
        w.write_tensor(&spec.name, &bytes).map_err(gerr)?;
        progress(done + 1, total);
    }
    w.finish().map_err(gerr)?;
    Ok(())
}

/// Whether a GGUF tensor name is one of the ternary projections.
fn is_projection(name: &str) -> bool {
    name.starts_with("blk.")
        && ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
            .iter()
            .any(|p| name.ends_with(&format!(".{p}.weight")))
}

/// `bitnet quantize`: re-encodes the ternary projections of a GGUF file as `weight`, copying
/// every other tensor and the metadata unchanged. Exact where the target holds the source:
/// codes are kept, and group scales are repeated into smaller groups or merged into larger ones
/// where the merged parts agree. A target that cannot hold a tensor is an error naming it: a
/// per-tensor type (I2_S, F16) for groups that differ, larger groups whose parts differ, Q1_0
/// for codes with zeros. (A per-tensor f32 scale written into an f16-scaled type is rounded to
/// f16, as every such converter does.)
pub fn requantize_gguf(
    src: &Path,
    dst: &Path,
    weight: WeightType,
    mut progress: impl FnMut(usize, usize),
) -> Result<(), ModelError> {
    use crate::gguf::GgufFile;
    let file = GgufFile::open(src)?;
    let gerr = ModelError::Gguf;
    let block = weight.block();
    // A plain model (llama, qwen3) runs float projections as they are; only values that are
    // already ternary may become a ternary type (a BitNet architecture's floats are masters,
    // ternarized as its forward does).
    let plain = crate::gguf_model::config_from_gguf(&file)
        .is_ok_and(|c| matches!(c.architecture, crate::Architecture::Llama158 | crate::Architecture::Qwen3));
    let mut specs = Vec::new();
    for t in file.tensors() {
        let ty = if is_projection(t.name()) { weight.ggml() } else { t.ggml_type() };
        if is_projection(t.name()) {
            let cols = t.shape().first().copied().unwrap_or(0);
            check_row_width(src, t.name(), cols, weight.ggml(), block)?;
        }
        if plain && is_projection(t.name()) && !t.ggml_type().is_ternary() {
            let values = file.dequantize(t.name()).map_err(gerr)?;
            if crate::gguf_model::exact_ternary_floats(&values).is_none() {
                return Err(ModelError::tensor(
                    src,
                    format!(
                        "tensor `{}` ({}) holds a dense model's weights, not ternary values: as {} they \
                         would be ternarized, which changes the model; `bitnet quantize --type \
                         f16|bf16|q8_0|q6_k|q4_k` re-encodes a dense model",
                        t.name(),
                        t.ggml_type().name(),
                        weight.ggml().name()
                    ),
                ));
            }
        }
        specs.push(TensorSpec::new(t.name(), ty, t.shape()));
    }
    let mut md = file.metadata().clone();
    md.remove("general.alignment");
    let mut w = GgufWriter::create(dst, &md, specs.clone()).map_err(gerr)?;
    let total = specs.len();
    for (done, spec) in specs.iter().enumerate() {
        if is_projection(&spec.name) {
            use crate::gguf_model::{projection_codes, Scales};
            let n = spec.shape.iter().product::<u64>() as usize;
            let cols = spec.shape.first().copied().unwrap_or(1).max(1) as usize;
            let fail = |why: String| ModelError::tensor(src, format!("tensor `{}`: {why}", spec.name));
            let bytes = match projection_codes(&file, &spec.name, n / cols, cols)? {
                (codes, Scales::One(scale)) => weight.encode(&codes, scale),
                (codes, Scales::Groups { group, scales }) => {
                    let target = weight.ggml().ternary_group().ok_or_else(|| {
                        fail(format!(
                            "its groups of {group} carry different scales, which {weight:?} cannot hold (one \
                             scale per matrix)"
                        ))
                    })?;
                    let d = regroup(&codes, &scales, group, target).ok_or_else(|| {
                        fail(format!(
                            "its groups of {group} carry different scales within groups of {target}, which \
                             {weight:?} would have to merge"
                        ))
                    })?;
                    formats::pack_ternary(weight.ggml(), &codes, &d)
                }
            }
            .map_err(|e| fmt_err(dst, &spec.name, e))?;
            w.write_tensor(&spec.name, &bytes).map_err(gerr)?;
        } else {
            let data = file.tensor_data(&spec.name).map_err(gerr)?;
            w.write_tensor(&spec.name, data).map_err(gerr)?;
        }
        progress(done + 1, total);
    }
    w.finish().map_err(gerr)?;
    Ok(())
}

/// Float and block types a GGUF's weight matrices can be re-encoded to (`bitnet quantize --type
/// f16|bf16|q8_0|q6_k|q4_k`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseType {
    F16,
    Bf16,
    Q8_0,
    Q6K,
    Q4K,
}

impl DenseType {
    pub fn ggml(self) -> GgmlType {
        match self {
            DenseType::F16 => GgmlType::F16,
            DenseType::Bf16 => GgmlType::BF16,
            DenseType::Q8_0 => GgmlType::Q8_0,
            DenseType::Q6K => GgmlType::Q6_K,
            DenseType::Q4K => GgmlType::Q4_K,
        }
    }
}

/// What `bitnet quantize` (and the Python `bitnet.quantize`) re-encodes a GGUF file as: the
/// ternary projections in a ternary type ([`requantize_gguf`]), or every weight matrix in a
/// dense type ([`reencode_gguf_dense`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizeTarget {
    Ternary(WeightType),
    Dense(DenseType),
}

impl QuantizeTarget {
    /// The names the command line and the Python bindings take.
    pub const NAMES: [&'static str; 12] =
        ["tq2_0", "tq1_0", "q2_0", "q1_0", "pq2_0", "ptq1_0", "i2_s", "f16", "bf16", "q8_0", "q6_k", "q4_k"];

    /// The target named `name` (one of [`QuantizeTarget::NAMES`]); `f16` is the dense one.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "f16" => QuantizeTarget::Dense(DenseType::F16),
            "bf16" => QuantizeTarget::Dense(DenseType::Bf16),
            "q8_0" => QuantizeTarget::Dense(DenseType::Q8_0),
            "q6_k" => QuantizeTarget::Dense(DenseType::Q6K),
            "q4_k" => QuantizeTarget::Dense(DenseType::Q4K),
            other => QuantizeTarget::Ternary(WeightType::from_name(other).filter(|&t| t != WeightType::F16)?),
        })
    }
}

/// `bitnet quantize`: `src` re-encoded as `target` into `dst`.
pub fn quantize_gguf(
    src: &Path,
    dst: &Path,
    target: QuantizeTarget,
    progress: impl FnMut(usize, usize),
) -> Result<(), ModelError> {
    match target {
        QuantizeTarget::Ternary(t) => requantize_gguf(src, dst, t, progress),
        QuantizeTarget::Dense(d) => reencode_gguf_dense(src, dst, d, progress),
    }
}

/// The error for a weight matrix whose rows of `cols` values are not whole blocks of `ty`.
fn check_row_width(src: &Path, name: &str, cols: u64, ty: GgmlType, block: usize) -> Result<(), ModelError> {
    if cols.is_multiple_of(block as u64) {
        return Ok(());
    }
    Err(ModelError::tensor(
        src,
        format!("tensor `{name}` has rows of {cols} values: {} needs a multiple of {block}", ty.name()),
    ))
}

/// Whether a GGUF tensor is a weight matrix (a projection, the embeddings or the head), as
/// opposed to a norm's gain or another vector.
fn is_weight_matrix(name: &str, shape: &[u64]) -> bool {
    shape.len() == 2 && (is_projection(name) || name == "token_embd.weight" || name == "output.weight")
}

/// `bitnet quantize --type f16|bf16|q8_0|q6_k|q4_k`: every weight matrix (projections, embeddings,
/// head) decoded from whatever type it is stored in and encoded as `target`; norms, other
/// tensors and the metadata are copied unchanged. Encoding the decoded values is exact where
/// the target holds them (ternary or f16 values in f16, say) and llama.cpp's rounding
/// otherwise; a matrix whose rows are not a whole number of the target's blocks is an error
/// that names it.
pub fn reencode_gguf_dense(
    src: &Path,
    dst: &Path,
    target: DenseType,
    mut progress: impl FnMut(usize, usize),
) -> Result<(), ModelError> {
    use crate::gguf::GgufFile;
    let file = GgufFile::open(src)?;
    let gerr = ModelError::Gguf;
    let ty = target.ggml();
    let mut specs = Vec::new();
    for t in file.tensors() {
        let reencode = is_weight_matrix(t.name(), t.shape());
        if reencode {
            let cols = t.shape().first().copied().unwrap_or(1);
            check_row_width(src, t.name(), cols, ty, ty.block_geometry().0 as usize)?;
        }
        specs.push(TensorSpec::new(t.name(), if reencode { ty } else { t.ggml_type() }, t.shape()));
    }
    let mut md = file.metadata().clone();
    md.remove("general.alignment");
    let mut w = GgufWriter::create(dst, &md, specs.clone()).map_err(gerr)?;
    let total = specs.len();
    for (done, spec) in specs.iter().enumerate() {
        if is_weight_matrix(&spec.name, &spec.shape) {
            let values = file.dequantize(&spec.name).map_err(gerr)?;
            let bytes = formats::quantize(ty, &values).map_err(|e| fmt_err(dst, &spec.name, e))?;
            w.write_tensor(&spec.name, &bytes).map_err(gerr)?;
        } else {
            let data = file.tensor_data(&spec.name).map_err(gerr)?;
            w.write_tensor(&spec.name, data).map_err(gerr)?;
        }
        progress(done + 1, total);
    }
    w.finish().map_err(gerr)?;
    Ok(())
}

/// Group scales of `from` columns as scales of `to` columns along the same rows: each repeated
/// when `to` is smaller, merged when larger (`None` if the non-zero parts of a merged group
/// differ). Both sizes divide 256, so one always divides the other.
pub fn regroup(codes: &[i8], scales: &[f32], from: usize, to: usize) -> Option<Vec<f32>> {
    if to <= from {
        Some(scales.iter().flat_map(|&d| std::iter::repeat_n(d, from / to)).collect())
    } else {
        crate::gguf_model::merge_groups(codes, scales, from, to)
    }
}

/// A `Read` over byte chunks produced one at a time.
struct ChunkReader<I: Iterator<Item = Vec<u8>>> {
    chunks: I,
    current: Vec<u8>,
    pos: usize,
}

impl<I: Iterator<Item = Vec<u8>>> ChunkReader<I> {
    fn new(chunks: I) -> Self {
        Self { chunks, current: Vec::new(), pos: 0 }
    }
}

impl<I: Iterator<Item = Vec<u8>>> std::io::Read for ChunkReader<I> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.current.len() {
            match self.chunks.next() {
                Some(c) => {
                    self.current = c;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// llama.cpp runs the `llama` architecture with interleaved RoPE pairs (x0, x1), while HF
/// checkpoints rotate half-split pairs (x0, x_{d/2}); its converter therefore reorders the rows of
/// q and k inside each head, and so do we: row `2i` of a head takes row `i`, row `2i+1` takes row
/// `i + d/2` (`inverse` undoes it when reading such a file). Other tensors pass unchanged.
pub fn llama_rope_rows<T: Copy + Default>(
    codes: &[T],
    cols: usize,
    gguf_name: &str,
    cfg: &ModelConfig,
    inverse: bool,
) -> Vec<T> {
    let heads = if gguf_name.ends_with(".attn_q.weight") {
        cfg.num_heads
    } else if gguf_name.ends_with(".attn_k.weight") {
        cfg.num_kv_heads
    } else {
        return codes.to_vec();
    };
    let d = cfg.head_dim;
    let mut out = vec![T::default(); codes.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for (interleaved, half_split) in [(2 * i, i), (2 * i + 1, i + d / 2)] {
                let (to, from) = if inverse { (half_split, interleaved) } else { (interleaved, half_split) };
                let (t, f) = ((h * d + to) * cols, (h * d + from) * cols);
                out[t..t + cols].copy_from_slice(&codes[f..f + cols]);
            }
        }
    }
    out
}
