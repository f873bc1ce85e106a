//! Running a GGUF file: the model config from its metadata and its tensors as [`ModelWeights`].
//!
//! Architectures, under the names their writers use:
//! * `bitnet-b1.58` (bitnet.cpp's 2B-4T): ReLU² gate, sub-norms, tied head.
//! * `bitnet` (llama.cpp's 1bitLLM arch): SiLU gate, sub-norms, optional per-tensor `.scale`
//!   multipliers, tied unless `output.weight` is present.
//! * `llama` with ternary tensors (Llama3-8B-1.58, Falcon3-1.58): SiLU gate, no sub-norms.
//! * `qwen3` (Qwen3, Ternary-Bonsai, BitNet-embedding): SiLU gate, per-head q/k norms
//!   (`attn_q_norm`, `attn_k_norm`), q/k rows in their HF order (NeoX RoPE); bitnet.cpp's
//!   embedding models add an RMSNorm gain before every projection (`attn_q_norm_in`, …).
//!
//! Ternary tensors (TQ1_0, TQ2_0, Q1_0, Q2_0, PrismML's PQ2_0 and PTQ1_0, I2_S) are read out as
//! exact codes and repacked into the kernel layout. Activations stay per-token int8 as BitNet
//! defines them, whatever the weight format: these files are not run with llama.cpp's per-block
//! Q8_0/Q8_K activations. When every non-zero group of a tensor has the same scale (what BitNet
//! converters write: one `mean|W|` per matrix), the matrix runs on the one-scale kernels.
//! Otherwise its group scales are kept, one per (row, group) — of the coarsest size, among the
//! format's group and its multiples up to 256, whose groups still agree — and honoured exactly
//! by the group-scaled product ([`TernaryMatrix::from_ternary_group_scaled`]).
//!
//! `gemma3` (llama.cpp's Gemma 3 text model) adds the sliding-window keys and Gemma's output
//! norms (`gemma3_from_gguf` and `layer`).
//!
//! Files whose weights are stored in a rotated basis (PrismML's `prism.hadamard.*` metadata,
//! Ternary-Bonsai-2) are refused: running them needs the matching activation transform.
//!
//! Other projection tensors (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) are read as stored.
//! Values that are exactly `{0, ±a}` (a ternary matrix written as floats) keep their codes. Else,
//! under a BitNet architecture (`bitnet-b1.58`, `bitnet`), they are master weights and are
//! absmean-ternarized, as BitLinear defines; under `llama`, `qwen3` and `gemma3` they are a plain
//! model's weights and run dense ([`bitnet_quant::dense`], llama.cpp's numerics), unless
//! [`WeightOptions::ternarize`] asks to ternarize them. The embeddings and an untied head stay in
//! their stored format too. [`tensor_plans`] says how each tensor will run.

use std::path::Path;

use bitnet_quant::dense::{DenseFormat, DenseLinear};
use bitnet_quant::formats::GgmlType;
use bitnet_quant::{absmean_ternary, TernaryMatrix, WeightScale};
use rayon::prelude::*;

use crate::gguf::{GgufError, GgufFile};
use crate::weights::{LayerWeights, LinearWeight, Projection, TensorPlan, WeightOptions};
use crate::{
    Activation, Architecture, ModelConfig, ModelError, ModelWeights, QuantForm, RopeScaling, SlidingAttention,
};

fn gguf_err(e: GgufError) -> ModelError {
    ModelError::Gguf(e)
}

/// The config a GGUF file's metadata describes.
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig, ModelError> {
    let path = Path::new(file.file());
    let md = file.metadata();
    let arch_name = md
        .get_str("general.architecture")
        .ok_or_else(|| ModelError::config(path, "metadata has no `general.architecture`"))?
        .to_string();
    let (architecture, activation, sub_norms) = match arch_name.as_str() {
        "bitnet-b1.58" | "bitnet-25" => (Architecture::BitNet, Activation::Relu2, true),
        "bitnet" => (Architecture::BitNet1bitLLM, Activation::Silu, true),
        "llama" => (Architecture::Llama158, Activation::Silu, false),
        "qwen3" => (Architecture::Qwen3, Activation::Silu, false),
        "gemma3" => (Architecture::Gemma3, Activation::GeluTanh, false),
        other => {
            return Err(ModelError::config(
                path,
                format!(
                "general.architecture `{other}` is not one this engine runs (bitnet-b1.58, bitnet, llama, \
                     qwen3, gemma3)"
            ),
            ))
        }
    };
    if let Some((key, _)) = md.iter().find(|(k, _)| k.starts_with("prism.hadamard.")) {
        return Err(ModelError::config(
            path,
            format!(
                "metadata `{key}`: the weights are stored in a Hadamard-rotated basis (PrismML), which \
                 needs an activation transform this engine does not apply; the model would load and \
                 produce garbage"
            ),
        ));
    }
    let key = |k: &str| format!("{arch_name}.{k}");
    let int = |k: &str| -> Result<usize, ModelError> {
        md.get_u64(&key(k)).map(|v| v as usize).ok_or_else(|| {
            ModelError::config(path, format!("metadata key `{}` is missing or not an integer", key(k)))
        })
    };
    let float = |k: &str| md.get(&key(k)).and_then(|v| v.as_f64());
    let rope_scaling = rope_scaling(file, &arch_name)?;
    let hidden_size = int("embedding_length")?;
    let num_heads = int("attention.head_count")?;
    let num_kv_heads = int("attention.head_count_kv").unwrap_or(num_heads);
    let embd = file
        .tensor("token_embd.weight")
        .ok_or_else(|| ModelError::tensor(path, "tensor `token_embd.weight` is missing"))?;
    let vocab_size = embd.shape().get(1).copied().unwrap_or(0) as usize;
    let head_dim = match md.get_u64(&key("attention.key_length")) {
        Some(d) => d as usize,
        None if num_heads > 0 => hidden_size / num_heads,
        None => 0,
    };
    let eos: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|k| md.get_u64(k))
        .map(|v| v as u32)
        .collect();
    let cfg = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: int("feed_forward_length")?,
        num_layers: int("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
        rope_theta: float("rope.freq_base").unwrap_or(match architecture {
            Architecture::BitNet1bitLLM => 10_000.0,
            Architecture::Qwen3 | Architecture::Gemma3 => 1_000_000.0,
            _ => 500_000.0,
        }) as f32,
        rope_scaling,
        max_position_embeddings: int("context_length").unwrap_or(2048),
        tie_word_embeddings: file.tensor("output.weight").is_none(),
        activation,
        sub_norms,
        // Each projection's form is decided per tensor at load (ternary codes whose scale
        // multiplies, or dense weights); see `projection`.
        quant_form: QuantForm::PackedMultiply,
        // bitnet.cpp's embedding models: an RMSNorm (the model's eps) before every projection.
        bitlinear_input_norm: file
            .tensor("blk.0.attn_q_norm_in.weight")
            .map(|_| float("attention.layer_norm_rms_epsilon").unwrap_or(1e-6) as f32),
        bos_token_id: md.get_u64("tokenizer.ggml.bos_token_id").map(|v| v as u32),
        eos_token_ids: eos,
        query_pre_attn_scalar: None,
        sliding: None,
    };
    let cfg = match architecture {
        Architecture::Gemma3 => gemma3_from_gguf(file, cfg)?,
        _ => cfg,
    };
    cfg.validate(path)?;
    Ok(cfg)
}

/// llama.cpp's gemma3 keys beyond the llama ones: the window (`gemma3.attention.sliding_window`,
/// required), which layers slide (`gemma3.attention.sliding_window_pattern`, one bool per layer,
/// else llama.cpp's gemma3 rule: every sixth layer is global), the sliding layers' base
/// (`gemma3.rope.freq_base_swa`, else llama.cpp's 10000). The file stores no
/// `query_pre_attn_scalar`: llama.cpp scales scores by head_dim^-0.5, except for the 27B (62
/// layers), whose scalar is hidden / heads; the same rule here. Norm gains are stored with
/// Gemma's 1 already added (llama.cpp's converter), so they are read as they are.
fn gemma3_from_gguf(file: &GgufFile, mut cfg: ModelConfig) -> Result<ModelConfig, ModelError> {
    let path = Path::new(file.file());
    let md = file.metadata();
    let bad = |m: String| ModelError::config(path, m);
    let key = "gemma3.attention.sliding_window";
    let window = md
        .get_u64(key)
        .filter(|&w| w > 0)
        .ok_or_else(|| bad(format!("metadata key `{key}` is missing or not a positive integer")))?;
    let key = "gemma3.attention.sliding_window_pattern";
    let sliding_layers: Vec<bool> = match md.get(key) {
        Some(v) => {
            let flags = v
                .as_array()
                .and_then(|a| (0..a.len()).map(|i| a.get(i)?.as_bool()).collect::<Option<Vec<_>>>());
            match flags {
                Some(f) if f.len() == cfg.num_layers => f,
                _ => {
                    return Err(bad(format!(
                        "metadata key `{key}` is not one bool per layer ({})",
                        cfg.num_layers
                    )))
                }
            }
        }
        None => (0..cfg.num_layers).map(|l| (l + 1) % 6 != 0).collect(),
    };
    let key = "gemma3.rope.freq_base_swa";
    let local_theta = match md.get(key) {
        Some(v) => v.as_f64().ok_or_else(|| bad(format!("metadata key `{key}` is not a number")))?,
        None => 10_000.0,
    };
    cfg.sliding =
        Some(SlidingAttention { window: window as usize, sliding_layers, rope_theta: local_theta as f32 });
    cfg.query_pre_attn_scalar = Some(crate::convert::gemma3_implied_query_pre_attn_scalar(&cfg));
    for key in ["gemma3.final_logit_softcapping", "gemma3.attn_logit_softcapping"] {
        if let Some(v) = md.get(key).and_then(|v| v.as_f64()) {
            return Err(bad(format!("metadata `{key}` {v}: soft-capping is not supported")));
        }
    }
    cfg.validate(path)?;
    Ok(cfg)
}

/// The RoPE scaling of llama.cpp's `{arch}.rope.scaling.*` keys: `linear` and `yarn` (with
/// YaRN's defaults for the keys a file leaves out); `none` or no type is plain RoPE.
fn rope_scaling(file: &GgufFile, arch: &str) -> Result<RopeScaling, ModelError> {
    let path = Path::new(file.file());
    let md = file.metadata();
    let key = |k: &str| format!("{arch}.rope.scaling.{k}");
    let num = |k: &str| md.get(&key(k)).and_then(|v| v.as_f64());
    let Some(kind) = md.get_str(&key("type")).filter(|&k| k != "none") else {
        return Ok(RopeScaling::None);
    };
    let factor = num("factor").filter(|f| f.is_finite() && *f > 0.0).ok_or_else(|| {
        ModelError::config(
            path,
            format!("`{}` is `{kind}` but `{}` is missing or not positive", key("type"), key("factor")),
        )
    })?;
    match kind {
        "linear" => Ok(RopeScaling::Linear { factor: factor as f32 }),
        "yarn" => {
            let original = num("original_context_length")
                .or_else(|| md.get_u64(&format!("{arch}.context_length")).map(|v| v as f64))
                .unwrap_or(0.0);
            if original <= 0.0 {
                return Err(ModelError::config(
                    path,
                    format!("YaRN scaling without `{}`", key("original_context_length")),
                ));
            }
            // llama.cpp multiplies cos and sin by attn_factor · (1 + 0.1 ln factor); only its
            // default attn_factor of 1 is taken here.
            if let Some(a) = num("attn_factor").filter(|&a| a != 1.0) {
                return Err(ModelError::config(
                    path,
                    format!("`{}` {a} is not supported (only 1)", key("attn_factor")),
                ));
            }
            let mscale = if factor <= 1.0 { 1.0 } else { 0.1 * factor.ln() + 1.0 };
            Ok(RopeScaling::Yarn {
                factor: factor as f32,
                original_max_position_embeddings: original as f32,
                beta_fast: num("yarn_beta_fast").filter(|&b| b != 0.0).unwrap_or(32.0) as f32,
                beta_slow: num("yarn_beta_slow").filter(|&b| b != 0.0).unwrap_or(1.0) as f32,
                attention_factor: mscale as f32,
                truncate: true,
            })
        }
        other => Err(ModelError::config(
            path,
            format!("RoPE scaling `{other}` ({}) is not supported (linear and yarn are)", key("type")),
        )),
    }
}

/// A float tensor of `n` values (any type the reader dequantizes).
fn floats(file: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
    let info = file
        .tensor(name)
        .ok_or_else(|| ModelError::tensor(Path::new(file.file()), format!("tensor `{name}` is missing")))?;
    if info.n_elements() != n as u64 {
        return Err(ModelError::tensor(
            Path::new(file.file()),
            format!(
                "tensor `{name}` has shape {:?} ({} values), expected {n}",
                info.shape(),
                info.n_elements()
            ),
        ));
    }
    file.dequantize(name).map_err(gguf_err)
}

/// A `[rows, cols]` tensor (GGUF shape `[cols, rows]`) kept in its stored format where it lies
/// in the file, not copied (whoever needs a copy makes it: [`DenseLinear::into_owned`]); a type
/// a dense layer cannot run from is widened to an F32 copy if it can be dequantized.
fn dense(file: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<DenseLinear, ModelError> {
    let path = Path::new(file.file());
    let info =
        file.tensor(name).ok_or_else(|| ModelError::tensor(path, format!("tensor `{name}` is missing")))?;
    if info.shape() != [cols as u64, rows as u64] {
        return Err(ModelError::tensor(
            path,
            format!("tensor `{name}` has shape {:?}, expected [{cols}, {rows}]", info.shape()),
        ));
    }
    let stored = match DenseFormat::from_ggml(info.ggml_type()) {
        Some(_) => DenseLinear::from_shared(
            info.ggml_type(),
            rows,
            cols,
            file.tensor_shared(name).map_err(gguf_err)?,
        ),
        None => {
            let widened = DenseLinear::from_f32(&floats(file, name, rows * cols)?, rows, cols);
            file.release_tensor(name);
            widened
        }
    };
    stored.map_err(|e| ModelError::tensor(path, format!("tensor `{name}`: {e}")))
}

/// One projection `[rows, cols]` and how it runs: exact ternary codes where the type is
/// ternary or the values are; else ternarized (BitNet architectures, or `opts.ternarize`) or
/// kept dense (`llama`); times the optional `.scale` tensor of llama.cpp's bitnet arch.
fn projection(
    file: &GgufFile,
    cfg: &ModelConfig,
    opts: WeightOptions,
    base: &str,
    rows: usize,
    cols: usize,
) -> Result<(Projection, TensorPlan), ModelError> {
    let path = Path::new(file.file());
    let name = format!("{base}.weight");
    let info =
        file.tensor(&name).ok_or_else(|| ModelError::tensor(path, format!("tensor `{name}` is missing")))?;
    // GGUF lists dimensions fastest-first: [in, out].
    if info.shape() != [cols as u64, rows as u64] {
        return Err(ModelError::tensor(
            path,
            format!("tensor `{name}` has shape {:?}, expected [{cols}, {rows}]", info.shape()),
        ));
    }
    let stored = info.ggml_type();
    let extra = match file.tensor(&format!("{base}.scale")) {
        Some(_) => floats(file, &format!("{base}.scale"), 1)?[0],
        None => 1.0,
    };
    // llama.cpp's llama arch stores q/k rows in interleaved-RoPE order.
    let llama = cfg.architecture == Architecture::Llama158;
    // A plain model's float weights run as they are; a BitNet architecture's are masters.
    let plain =
        matches!(cfg.architecture, Architecture::Llama158 | Architecture::Qwen3 | Architecture::Gemma3);
    if let Some(src) = TernaryRows::of(file, &name, rows, cols) {
        let (weight, per_block) = src.repack(cfg, extra)?;
        // Repacked: the mapped original is not needed any more.
        file.release_tensor(&name);
        let projection = Projection {
            weight: LinearWeight::Ternary(weight),
            input_norm: input_norm(file, cfg, base, cols)?,
        };
        return Ok((projection, TensorPlan::Ternary { stored, group: per_block.then_some(TQ_BLOCK) }));
    }
    let (mut codes, scales, plan) = if stored.is_ternary() {
        let (codes, scales) = projection_codes(file, &name, rows, cols)?;
        let group = match &scales {
            Scales::One(_) => None,
            Scales::Groups { group, .. } => Some(*group),
        };
        (codes, scales, TensorPlan::Ternary { stored, group })
    } else {
        let format = DenseFormat::from_ggml(stored).ok_or_else(|| {
            ModelError::tensor(
                path,
                format!(
                    "tensor `{name}` has type {stored}, which this engine cannot run (projections: TQ1_0, TQ2_0, \
                     Q1_0, Q2_0, PQ2_0, PTQ1_0, I2_S, F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)"
                ),
            )
        })?;
        let w = dense(file, &name, rows, cols)?;
        match exact_ternary(&w) {
            Some((codes, a)) => (codes, Scales::One(a), TensorPlan::TernaryExact { stored }),
            None if !plain || opts.ternarize => {
                let (codes, a) = absmean_ternary(&w.to_f32());
                (codes, Scales::One(a), TensorPlan::Ternarized { stored })
            }
            None => {
                if extra != 1.0 {
                    return Err(ModelError::tensor(
                        path,
                        format!("tensor `{base}.scale`: a dense projection takes no separate scale"),
                    ));
                }
                // Left in the mapping: the backend lays it out as it runs it (the CPU copies it
                // as stored or re-lays it, releasing the mapped rows behind the copy), so that
                // no second copy is ever resident. llama.cpp's llama arch stores q/k rows in
                // interleaved-RoPE order; rows are whole blocks, so they move as bytes, in one
                // copy made here.
                let order: Vec<usize> = (0..rows).collect();
                let order =
                    if llama { crate::convert::llama_rope_rows(&order, 1, &name, cfg, true) } else { order };
                let w = match order.iter().enumerate().all(|(i, &r)| i == r) {
                    true => w,
                    false => {
                        let permuted = w
                            .permute_rows(&order)
                            .map_err(|e| ModelError::tensor(path, format!("tensor `{name}`: {e}")))?;
                        // Copied: the mapped original is not needed any more.
                        file.release_tensor(&name);
                        permuted
                    }
                };
                let projection = Projection {
                    weight: LinearWeight::Dense(w),
                    input_norm: input_norm(file, cfg, base, cols)?,
                };
                return Ok((projection, TensorPlan::Dense { format }));
            }
        }
    };
    if llama {
        // llama.cpp's llama arch stores q/k rows in interleaved-RoPE order.
        codes = crate::convert::llama_rope_rows(&codes, cols, &name, cfg, true);
    }
    let weight = match scales {
        Scales::One(scale) => {
            TernaryMatrix::from_ternary(&codes, rows, cols, WeightScale::Multiply(scale * extra))
        }
        Scales::Groups { group, scales: mut d } => {
            if llama {
                d = crate::convert::llama_rope_rows(&d, cols / group, &name, cfg, true);
            }
            TernaryMatrix::from_ternary_group_scaled(
                &codes,
                rows,
                cols,
                group,
                &d,
                WeightScale::Multiply(extra),
            )
        }
    }
    .map_err(|e| ModelError::tensor(path, format!("tensor `{name}`: {e}")))?;
    // Repacked: the mapped original is not needed any more.
    file.release_tensor(&name);
    let projection =
        Projection { weight: LinearWeight::Ternary(weight), input_norm: input_norm(file, cfg, base, cols)? };
    Ok((projection, plan))
}

/// The gain of the RMSNorm before projection `base` (`blk.N.attn_q` → `blk.N.attn_q_norm_in`),
/// when the model has such norms.
fn input_norm(
    file: &GgufFile,
    cfg: &ModelConfig,
    base: &str,
    cols: usize,
) -> Result<Option<Vec<f32>>, ModelError> {
    match cfg.bitlinear_input_norm {
        Some(_) => Ok(Some(floats(file, &format!("{base}_norm_in.weight"), cols)?)),
        None => Ok(None),
    }
}

/// The block of TQ1_0 and TQ2_0, whose scales [`TernaryRows::repack`] keeps per row and block.
const TQ_BLOCK: usize = 256;

/// A ternary projection (TQ1_0, TQ2_0, I2_S) whose rows are whole blocks of its type, so that
/// it can be decoded a few rows at a time and repacked without the whole tensor's codes (four
/// times its bytes) ever existing at once.
struct TernaryRows<'a> {
    file: &'a GgufFile,
    name: &'a str,
    ty: GgmlType,
    /// The packed codes (for I2_S without the scale after them).
    bytes: &'a [u8],
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

/// Why a block of rows could not be repacked.
enum RepackError {
    Format(bitnet_quant::formats::FormatError),
    Codes(bitnet_quant::QuantError),
}

impl From<bitnet_quant::QuantError> for RepackError {
    fn from(e: bitnet_quant::QuantError) -> Self {
        RepackError::Codes(e)
    }
}

impl<'a> TernaryRows<'a> {
    /// The tensor, if it is ternary and its rows are whole blocks (else the whole-tensor path
    /// decodes it, or says what is wrong with it).
    fn of(file: &'a GgufFile, name: &'a str, rows: usize, cols: usize) -> Option<Self> {
        use bitnet_quant::formats::{i2_s, tq1_0, tq2_0};
        let ty = file.tensor(name)?.ggml_type();
        let (block, block_bytes) = match ty {
            GgmlType::TQ1_0 => (tq1_0::BLOCK, tq1_0::BLOCK_BYTES),
            GgmlType::TQ2_0 => (tq2_0::BLOCK, tq2_0::BLOCK_BYTES),
            GgmlType::I2_S => (i2_s::CHUNK, i2_s::CHUNK_BYTES),
            _ => return None,
        };
        if cols == 0 || !cols.is_multiple_of(block) {
            return None;
        }
        let row_bytes = cols / block * block_bytes;
        let data = file.tensor_data(name).ok()?;
        let tail = if ty == GgmlType::I2_S { i2_s::TAIL_BYTES } else { 0 };
        if data.len() != rows.checked_mul(row_bytes)?.checked_add(tail)? {
            return None;
        }
        Some(Self { file, name, ty, bytes: &data[..rows * row_bytes], rows, cols, row_bytes })
    }

    /// Decodes source row `row` into `out` (`cols` codes) and pushes its block scales (none for
    /// I2_S, whose scale is the tensor's).
    fn decode_row(&self, row: usize, out: &mut [i8], scales: &mut Vec<f32>) -> Result<(), RepackError> {
        use bitnet_quant::formats::{self, i2_s, FormatError};
        let bytes = &self.bytes[row * self.row_bytes..(row + 1) * self.row_bytes];
        let at_row = |e: FormatError| match e {
            FormatError::NotTernary { format, index, code } => {
                RepackError::Format(FormatError::NotTernary { format, index: row * self.cols + index, code })
            }
            other => RepackError::Format(other),
        };
        match self.ty {
            GgmlType::I2_S => i2_s::extract_codes(bytes, out).map_err(at_row),
            ty => {
                let t = formats::ternary_codes(ty, bytes, self.cols).map_err(at_row)?;
                out.copy_from_slice(&t.codes);
                scales.extend_from_slice(&t.scales);
                Ok(())
            }
        }
    }

    /// The kernel-layout matrix, a block of rows at a time (in llama.cpp's q/k row order for
    /// `llama`), with its scale times `extra`: one scale if every non-zero block agrees (or the
    /// type has one), else one per (row, 256-column block) with all-zero blocks at 0, as
    /// [`projection_codes`] decides. Also says whether the scales are per block.
    fn repack(&self, cfg: &ModelConfig, extra: f32) -> Result<(TernaryMatrix, bool), ModelError> {
        let (rows, cols) = (self.rows, self.cols);
        let path = Path::new(self.file.file());
        // Output row r is source row order[r].
        let order: Vec<usize> = match cfg.architecture {
            Architecture::Llama158 => {
                crate::convert::llama_rope_rows(&(0..rows).collect::<Vec<_>>(), 1, self.name, cfg, true)
            }
            _ => (0..rows).collect(),
        };
        let blocks_per_row = cols / TQ_BLOCK;
        let block_scales = std::sync::Mutex::new(match self.ty {
            GgmlType::I2_S => Vec::new(),
            _ => vec![0f32; rows * blocks_per_row],
        });
        let matrix =
            TernaryMatrix::from_row_blocks(rows, cols, WeightScale::Multiply(extra), |first, codes| {
                let mut scales = Vec::new();
                for (k, out) in codes.chunks_exact_mut(cols).enumerate() {
                    self.decode_row(order[first + k], out, &mut scales)?;
                }
                if !scales.is_empty() {
                    let mut all = block_scales.lock().unwrap_or_else(|p| p.into_inner());
                    all[first * blocks_per_row..][..scales.len()].copy_from_slice(&scales);
                }
                Ok(())
            })
            .map_err(|e| match e {
                RepackError::Format(error) => self.format_error(error),
                RepackError::Codes(e) => ModelError::tensor(path, format!("tensor `{}`: {e}", self.name)),
            })?;
        if self.ty == GgmlType::I2_S {
            let data = self.file.tensor_data(self.name).map_err(gguf_err)?;
            let s =
                bitnet_quant::formats::i2_s::scale(data, rows * cols).map_err(|e| self.format_error(e))?;
            // An all-zero matrix gets scale 0, as in `one_scale`: a NaN scale must not turn its
            // zeros into NaN.
            let s = if matrix.zero_blocks().iter().all(|&z| z) { 0.0 } else { s };
            return Ok((matrix.with_scale(WeightScale::Multiply(s * extra)), false));
        }
        // The scales of the blocks that hold a non-zero code decide: one scale, or one per block.
        let mut d = block_scales.into_inner().unwrap_or_else(|p| p.into_inner());
        let zero = matrix.zero_blocks();
        let mut nonzero = d.iter().zip(&zero).filter(|(_, &z)| !z).map(|(&s, _)| s);
        let first = nonzero.next().unwrap_or(0.0);
        if nonzero.all(|s| s.to_bits() == first.to_bits()) {
            return Ok((matrix.with_scale(WeightScale::Multiply(first * extra)), false));
        }
        // A stray infinite or NaN scale on an all-zero block must not reach the output.
        d.iter_mut().zip(&zero).filter(|(_, &z)| z).for_each(|(s, _)| *s = 0.0);
        let blocks = matrix.with_group_scales(TQ_BLOCK, &d);
        Ok((blocks.map_err(|e| ModelError::tensor(path, format!("tensor `{}`: {e}", self.name)))?, true))
    }

    fn format_error(&self, error: bitnet_quant::formats::FormatError) -> ModelError {
        ModelError::Gguf(GgufError::Format {
            file: self.file.file().to_owned(),
            tensor: self.name.to_owned(),
            error,
        })
    }
}

/// The codes and `a` of a matrix whose values are all `0` or `±a` (a ternary matrix stored as
/// floats), read row by row and given up at the first other value; `None` otherwise.
fn exact_ternary(w: &DenseLinear) -> Option<(Vec<i8>, f32)> {
    let mut row = vec![0.0f32; w.cols()];
    let mut codes = Vec::with_capacity(w.rows() * w.cols());
    let mut a = 0.0f32;
    for r in 0..w.rows() {
        w.dequantize_row(r, &mut row).ok()?;
        for &v in &row {
            if a == 0.0 && v != 0.0 {
                a = v.abs();
            }
            codes.push(match v {
                0.0 => 0,
                v if v == a => 1,
                v if v == -a => -1,
                _ => return None,
            });
        }
    }
    Some((codes, a))
}

/// The scales of a projection's codes.
#[derive(Clone, Debug, PartialEq)]
pub enum Scales {
    /// One multiplier for the whole matrix.
    One(f32),
    /// One multiplier per (row, group of `group` columns), `[rows, cols / group]` row-major.
    Groups { group: usize, scales: Vec<f32> },
}

/// The exact codes of a projection `[rows, cols]` and its scales: one if every non-zero group
/// agrees (or the type has one), else those of the file's groups, which lie along rows because
/// GGUF requires `cols` to be a multiple of the block — merged into larger groups (up to 256)
/// where neighbours agree, so that the product sums fewer terms. Groups that are all zero get
/// scale 0, so that a stray infinite or NaN scale there cannot reach the output.
pub fn projection_codes(
    file: &GgufFile,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<(Vec<i8>, Scales), ModelError> {
    let path = Path::new(file.file());
    let info =
        file.tensor(name).ok_or_else(|| ModelError::tensor(path, format!("tensor `{name}` is missing")))?;
    match info.ggml_type().ternary_group() {
        Some(group) => {
            let t = file.ternary_codes(name).map_err(gguf_err)?;
            match one_scale(&t) {
                Some(s) => Ok((t.codes, Scales::One(s))),
                None => {
                    if t.block_len != group || !cols.is_multiple_of(group) || t.codes.len() != rows * cols {
                        return Err(ModelError::tensor(
                            path,
                            format!("tensor `{name}`: {} blocks do not tile rows of {cols}", t.block_len),
                        ));
                    }
                    let d: Vec<f32> = t
                        .scales
                        .iter()
                        .zip(t.codes.chunks(group))
                        .map(|(&s, c)| if c.iter().all(|&v| v == 0) { 0.0 } else { s })
                        .collect();
                    let (group, scales) = coarsest_groups(&t.codes, d, group, cols);
                    Ok((t.codes, Scales::Groups { group, scales }))
                }
            }
        }
        None => ternary_codes_of(file, name, rows * cols).map(|(c, s)| (c, Scales::One(s))),
    }
}

/// The largest group size `2^k · group` (at most 256, dividing `cols`) whose groups each hold one
/// scale among their non-zero parts, and those scales: the same products in fewer terms.
/// `scales` has one entry per `group` columns, 0 for a part whose codes are all zero.
pub fn coarsest_groups(codes: &[i8], scales: Vec<f32>, group: usize, cols: usize) -> (usize, Vec<f32>) {
    let mut best = (group, scales);
    let mut g = group * 2;
    while g <= 256 && cols.is_multiple_of(g) {
        match merge_groups(codes, &best.1, best.0, g) {
            Some(merged) => best = (g, merged),
            None => break,
        }
        g *= 2;
    }
    best
}

/// The scales of groups of `to` columns made of groups of `from` (one scale each, 0 for an
/// all-zero part), or `None` if the non-zero parts of some group disagree.
pub fn merge_groups(codes: &[i8], scales: &[f32], from: usize, to: usize) -> Option<Vec<f32>> {
    let per = to / from;
    scales
        .chunks(per)
        .enumerate()
        .map(|(i, parts)| {
            let nonzero =
                |j: usize| codes[(i * per + j) * from..(i * per + j + 1) * from].iter().any(|&c| c != 0);
            let mut live = parts.iter().enumerate().filter(|&(j, _)| nonzero(j)).map(|(_, &s)| s);
            let first = live.next().unwrap_or(0.0);
            live.all(|s| s.to_bits() == first.to_bits()).then_some(first)
        })
        .collect()
}

/// The scale shared by every block with a non-zero code (0 if there is none), or `None` if they
/// differ.
fn one_scale(t: &bitnet_quant::formats::TernaryCodes) -> Option<f32> {
    let mut nonzero = t
        .scales
        .iter()
        .enumerate()
        .filter(|&(b, _)| {
            t.codes[b * t.block_len..((b + 1) * t.block_len).min(t.codes.len())].iter().any(|&c| c != 0)
        })
        .map(|(_, &s)| s);
    let first = nonzero.next().unwrap_or(0.0);
    match nonzero.all(|s| s.to_bits() == first.to_bits()) {
        true => Some(first),
        false => None,
    }
}

/// The exact ternary codes and single scale of a projection tensor of `n` values, whatever
/// its GGUF type. A tensor whose non-zero groups carry different scales is an error here
/// (re-encoding to one scale would change it); the model loader keeps such scales
/// ([`projection_codes`]).
pub fn ternary_codes_of(file: &GgufFile, name: &str, n: usize) -> Result<(Vec<i8>, f32), ModelError> {
    let path = Path::new(file.file());
    let info =
        file.tensor(name).ok_or_else(|| ModelError::tensor(path, format!("tensor `{name}` is missing")))?;
    match info.ggml_type() {
        t if t.is_ternary() => {
            let t = file.ternary_codes(name).map_err(gguf_err)?;
            match one_scale(&t) {
                Some(first) => Ok((t.codes, first)),
                None => Err(ModelError::tensor(
                    path,
                    format!(
                        "tensor `{name}`: its {} groups carry different scales, which this operation \
                         cannot keep (it writes one scale per matrix)",
                        info.ggml_type()
                    ),
                )),
            }
        }
        _ => Ok(ternarize_floats(&floats(file, name, n)?)),
    }
}

/// Float projection weights: values already of the form `t · a` (a dequantized ternary matrix,
/// as `bitnet convert --type f16` and other converters write) keep their codes and `a`;
/// anything else is a master weight, absmean-ternarized as transformers does online.
pub fn ternarize_floats(w: &[f32]) -> (Vec<i8>, f32) {
    exact_ternary_floats(w).unwrap_or_else(|| absmean_ternary(w))
}

/// The codes and `a` of values that are all `0` or `±a` (a ternary matrix stored as floats),
/// `None` otherwise.
pub fn exact_ternary_floats(w: &[f32]) -> Option<(Vec<i8>, f32)> {
    DenseLinear::from_f32(w, 1, w.len()).ok().and_then(|m| exact_ternary(&m))
}

/// The GGUF name (`blk.{l}.{name}`) and the `[rows, cols]` shape of each projection of a layer.
fn projection_shapes(cfg: &ModelConfig) -> [(&'static str, usize, usize); 7] {
    let (h, q, kv, i) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    [
        ("attn_q", q, h),
        ("attn_k", kv, h),
        ("attn_v", kv, h),
        ("attn_output", h, q),
        ("ffn_gate", i, h),
        ("ffn_up", i, h),
        ("ffn_down", h, i),
    ]
}

fn layer(
    file: &GgufFile,
    cfg: &ModelConfig,
    opts: WeightOptions,
    l: usize,
) -> Result<LayerWeights, ModelError> {
    let p = format!("blk.{l}");
    let (h, q, kv, i) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    let sub = |name: &str, n: usize| -> Result<Option<Vec<f32>>, ModelError> {
        if cfg.sub_norms {
            Ok(Some(floats(file, &format!("{p}.{name}.weight"), n)?))
        } else {
            Ok(None)
        }
    };
    let proj = |name: &str, rows: usize, cols: usize| -> Result<Projection, ModelError> {
        Ok(projection(file, cfg, opts, &format!("{p}.{name}"), rows, cols)?.0)
    };
    let head_norm = |name: &str| -> Result<Option<Vec<f32>>, ModelError> {
        match cfg.qk_norm() {
            true => Ok(Some(floats(file, &format!("{p}.{name}.weight"), cfg.head_dim)?)),
            false => Ok(None),
        }
    };
    // Gemma's norms of the attention and MLP outputs (gains with the 1 already added).
    let output_norm = |name: &str| -> Result<Option<Vec<f32>>, ModelError> {
        cfg.gemma_norms().then(|| floats(file, &format!("{p}.{name}.weight"), h)).transpose()
    };
    Ok(LayerWeights {
        input_norm: floats(file, &format!("{p}.attn_norm.weight"), h)?,
        post_attention_norm: floats(file, &format!("{p}.ffn_norm.weight"), h)?,
        q_proj: proj("attn_q", q, h)?,
        k_proj: proj("attn_k", kv, h)?,
        v_proj: proj("attn_v", kv, h)?,
        o_proj: proj("attn_output", h, q)?,
        q_norm: head_norm("attn_q_norm")?,
        k_norm: head_norm("attn_k_norm")?,
        attn_sub_norm: sub("attn_sub_norm", q)?,
        gate_proj: proj("ffn_gate", i, h)?,
        up_proj: proj("ffn_up", i, h)?,
        down_proj: proj("ffn_down", h, i)?,
        ffn_sub_norm: sub("ffn_sub_norm", i)?,
        attn_output_norm: output_norm("post_attention_norm")?,
        mlp_output_norm: output_norm("post_ffw_norm")?,
    })
}

/// How every tensor of a GGUF model will run under `opts`, in file order: what `bitnet inspect`
/// prints. Projections are read (and their codes checked) as the loader reads them.
pub fn tensor_plans(file: &GgufFile, opts: WeightOptions) -> Result<Vec<(String, TensorPlan)>, ModelError> {
    let cfg = config_from_gguf(file)?;
    let shapes = projection_shapes(&cfg);
    file.tensors()
        .par_iter()
        .map(|info| {
            let name = info.name();
            let stored = info.ggml_type();
            let kept = || DenseFormat::from_ggml(stored).unwrap_or(DenseFormat::F32);
            let projection_of = name
                .strip_prefix("blk.")
                .and_then(|rest| rest.split_once('.'))
                .and_then(|(_, rest)| rest.strip_suffix(".weight"))
                .and_then(|kind| shapes.iter().find(|s| s.0 == kind));
            let plan = match (name, projection_of) {
                ("token_embd.weight", _) => TensorPlan::Embedding { format: kept() },
                ("output.weight", _) if stored.ternary_group().is_some() => {
                    let rows = info.shape().get(1).copied().unwrap_or(0) as usize;
                    let (codes, scales) = projection_codes(file, name, rows, cfg.hidden_size)?;
                    drop(codes);
                    let group = match scales {
                        Scales::One(_) => None,
                        Scales::Groups { group, .. } => Some(group),
                    };
                    TensorPlan::Ternary { stored, group }
                }
                ("output.weight", _) => TensorPlan::Dense { format: kept() },
                (_, Some(&(_, rows, cols))) => {
                    let base = &name[..name.len() - ".weight".len()];
                    projection(file, &cfg, opts, base, rows, cols)?.1
                }
                _ => TensorPlan::Vector { stored },
            };
            Ok((name.to_string(), plan))
        })
        .collect()
}

/// The head `[vocab, hidden]` as a ternary matrix when it is stored in a group-scaled ternary
/// format: its exact codes with one scale, or its group scales (as for projections).
fn ternary_head(
    file: &GgufFile,
    name: &str,
    vocab: usize,
    hidden: usize,
) -> Result<Option<TernaryMatrix>, ModelError> {
    let Some(info) = file.tensor(name) else { return Ok(None) };
    if info.ggml_type().ternary_group().is_none() {
        return Ok(None);
    }
    let (codes, scales) = projection_codes(file, name, vocab, hidden)?;
    let head = match scales {
        Scales::One(a) => TernaryMatrix::from_ternary(&codes, vocab, hidden, WeightScale::Multiply(a)),
        Scales::Groups { group, scales } => TernaryMatrix::from_ternary_group_scaled(
            &codes,
            vocab,
            hidden,
            group,
            &scales,
            WeightScale::Multiply(1.0),
        ),
    };
    head.map(Some).map_err(|e| ModelError::tensor(Path::new(file.file()), format!("tensor `{name}`: {e}")))
}

impl ModelWeights {
    /// Loads every tensor of a GGUF model, checking names, shapes and types. As for a
    /// safetensors checkpoint ([`ModelWeights::load`]), projections are repacked tensor by
    /// tensor with each one's mapped pages handed back when done, and the embedding table and
    /// an untied head point into the file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        Self::from_gguf_with(file, WeightOptions::default())
    }

    /// [`ModelWeights::from_gguf`] with explicit [`WeightOptions`].
    pub fn from_gguf_with(file: &GgufFile, opts: WeightOptions) -> Result<Self, ModelError> {
        let config = config_from_gguf(file)?;
        let cfg = &config;
        let embed_tokens = dense(file, "token_embd.weight", cfg.vocab_size, cfg.hidden_size)?;
        let layers = (0..cfg.num_layers)
            .into_par_iter()
            .map(|l| layer(file, cfg, opts, l))
            .collect::<Result<Vec<_>, _>>()?;
        let final_norm = floats(file, "output_norm.weight", cfg.hidden_size)?;
        let lm_head = match cfg.tie_word_embeddings {
            true => None,
            false => Some(dense(file, "output.weight", cfg.vocab_size, cfg.hidden_size)?),
        };
        let head_name = if cfg.tie_word_embeddings { "token_embd.weight" } else { "output.weight" };
        let ternary_head = ternary_head(file, head_name, cfg.vocab_size, cfg.hidden_size)?;
        Ok(Self { config, embed_tokens, layers, final_norm, lm_head, ternary_head })
    }
}
