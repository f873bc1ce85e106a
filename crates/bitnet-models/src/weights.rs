//! Loading a Hugging Face checkpoint into host weights: projections (ternary, or dense for a
//! plain float checkpoint), embeddings, norms and head.

use std::fmt;
use std::path::Path;

use bitnet_quant::dense::{DenseFormat, DenseLinear};
use bitnet_quant::formats::GgmlType;
use bitnet_quant::{absmean_ternary, hf_pack, TernaryMatrix, WeightScale};
use rayon::prelude::*;
use safetensors::tensor::Dtype;

use crate::safetensors::{TensorRef, TensorStore};
use crate::{Architecture, ModelConfig, ModelError, QuantForm};

/// The weights of one projection, in the form they will run in.
#[derive(Clone, Debug)]
pub enum LinearWeight {
    /// Ternary codes in the kernel layout with their scale: BitLinear on per-token int8
    /// activations.
    Ternary(TernaryMatrix),
    /// Weights kept in their stored format (float, or a llama.cpp block format), run as
    /// llama.cpp runs them ([`bitnet_quant::dense`]).
    Dense(DenseLinear),
}

impl LinearWeight {
    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            LinearWeight::Ternary(t) => t.rows(),
            LinearWeight::Dense(d) => d.rows(),
        }
    }
    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            LinearWeight::Ternary(t) => t.cols(),
            LinearWeight::Dense(d) => d.cols(),
        }
    }
    /// Bytes the weights take in memory (what a decoded token reads).
    pub fn bytes(&self) -> usize {
        match self {
            LinearWeight::Ternary(t) => t.bytes(),
            LinearWeight::Dense(d) => d.bytes(),
        }
    }
    pub fn ternary(&self) -> Option<&TernaryMatrix> {
        match self {
            LinearWeight::Ternary(t) => Some(t),
            LinearWeight::Dense(_) => None,
        }
    }
    pub fn dense(&self) -> Option<&DenseLinear> {
        match self {
            LinearWeight::Dense(d) => Some(d),
            LinearWeight::Ternary(_) => None,
        }
    }
}

/// Choices made when a checkpoint's tensors become weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WeightOptions {
    /// Ternarize projections that would otherwise run dense (a plain llama checkpoint or GGUF):
    /// absmean-ternary weights and int8 activations, as BitNet would run them. An experiment:
    /// a model not trained for it answers badly.
    pub ternarize: bool,
}

/// How one tensor will run: what `bitnet inspect` reports per tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorPlan {
    /// Exact ternary codes from a ternary type (TQ1_0, TQ2_0, Q1_0, Q2_0, PQ2_0, PTQ1_0, I2_S,
    /// or packed HF 2-bit), with one scale per tensor (`group: None`) or one per group of
    /// `group` columns.
    Ternary { stored: GgmlType, group: Option<usize> },
    /// Float values that are exactly `{0, ±a}`: their codes and `a` are kept.
    TernaryExact { stored: GgmlType },
    /// Float (or block) weights absmean-ternarized at load.
    Ternarized { stored: GgmlType },
    /// Kept as stored and run dense.
    Dense { format: DenseFormat },
    /// An embedding table kept as stored; lookups decode the rows they need.
    Embedding { format: DenseFormat },
    /// Small float vectors (norm gains, scales), widened to f32.
    Vector { stored: GgmlType },
}

impl fmt::Display for TensorPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            TensorPlan::Ternary { stored, group: None } => write!(f, "ternary ({stored}, per-tensor scale)"),
            TensorPlan::Ternary { stored, group: Some(g) } => {
                write!(f, "ternary ({stored}, a scale per {g} columns)")
            }
            TensorPlan::TernaryExact { stored } => write!(f, "ternary (exact codes stored as {stored})"),
            TensorPlan::Ternarized { stored } => write!(f, "ternarized from {stored}"),
            TensorPlan::Dense { format } if format.is_float() => write!(f, "dense {format} (f32 dot)"),
            TensorPlan::Dense { format } => write!(f, "dense {format} (int8 dot)"),
            TensorPlan::Embedding { format } => write!(f, "embedding {format} (rows decoded on lookup)"),
            TensorPlan::Vector { stored } => write!(f, "f32 vector (from {stored})"),
        }
    }
}

/// One projection: its weights and the optional input RMSNorm of a BitLinear
/// (`quantization_config.use_rms_norm`).
pub struct Projection {
    pub weight: LinearWeight,
    pub input_norm: Option<Vec<f32>>,
}

/// One decoder layer. Norm gains are stored as they multiply: Gemma's `w` as `1 + w`.
pub struct LayerWeights {
    pub input_norm: Vec<f32>,
    /// The MLP's input norm: llama's `post_attention_layernorm`, Gemma's
    /// `pre_feedforward_layernorm`.
    pub post_attention_norm: Vec<f32>,
    pub q_proj: Projection,
    pub k_proj: Projection,
    pub v_proj: Projection,
    pub o_proj: Projection,
    /// RMSNorm over each head of q, before RoPE (Qwen3's `q_norm`, `head_dim` gains).
    pub q_norm: Option<Vec<f32>>,
    /// RMSNorm over each head of k, before RoPE (Qwen3's `k_norm`).
    pub k_norm: Option<Vec<f32>>,
    /// RMSNorm over the concatenated head outputs, before o_proj.
    pub attn_sub_norm: Option<Vec<f32>>,
    pub gate_proj: Projection,
    pub up_proj: Projection,
    pub down_proj: Projection,
    /// RMSNorm over the gated MLP activations, before down_proj.
    pub ffn_sub_norm: Option<Vec<f32>>,
    /// RMSNorm of the attention block's output (after o_proj), before the residual add
    /// (Gemma's `post_attention_layernorm`).
    pub attn_output_norm: Option<Vec<f32>>,
    /// RMSNorm of the MLP's output (after down_proj), before the residual add (Gemma's
    /// `post_feedforward_layernorm`).
    pub mlp_output_norm: Option<Vec<f32>>,
}

pub struct ModelWeights {
    pub config: ModelConfig,
    /// `[vocab, hidden]`, kept as stored (float, or a GGUF block format).
    pub embed_tokens: DenseLinear,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Vec<f32>,
    /// `None` when the head is tied to the embeddings.
    pub lm_head: Option<DenseLinear>,
    /// The head (or the tied table) as ternary codes and scales, when it is stored in a
    /// group-scaled ternary format (TQ1_0, TQ2_0, Q1_0, Q2_0, PQ2_0, PTQ1_0): the model runs the
    /// logits on the ternary kernels (int8 activations per token) rather than on a widened table.
    pub ternary_head: Option<TernaryMatrix>,
}

impl ModelWeights {
    /// Every dense matrix in a block format (projections, embeddings, head) set to run on f32
    /// activations ([`DenseLinear::with_float_activations`]): a GGUF model's numbers as
    /// transformers computes them from the dequantized file, instead of llama.cpp's.
    pub fn with_float_activations(mut self) -> Self {
        for layer in &mut self.layers {
            for p in [
                &mut layer.q_proj,
                &mut layer.k_proj,
                &mut layer.v_proj,
                &mut layer.o_proj,
                &mut layer.gate_proj,
                &mut layer.up_proj,
                &mut layer.down_proj,
            ] {
                if let LinearWeight::Dense(w) = &mut p.weight {
                    w.set_float_activations(true);
                }
            }
        }
        self.embed_tokens.set_float_activations(true);
        if let Some(head) = &mut self.lm_head {
            head.set_float_activations(true);
        }
        self
    }

    /// The matrix the logits are computed with.
    pub fn lm_head(&self) -> &DenseLinear {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Every projection of every layer with its name (`layers.{l}.{q_proj…}`).
    pub fn projections(&self) -> impl Iterator<Item = (String, &Projection)> {
        self.layers.iter().enumerate().flat_map(|(l, w)| {
            [
                ("q_proj", &w.q_proj),
                ("k_proj", &w.k_proj),
                ("v_proj", &w.v_proj),
                ("o_proj", &w.o_proj),
                ("gate_proj", &w.gate_proj),
                ("up_proj", &w.up_proj),
                ("down_proj", &w.down_proj),
            ]
            .into_iter()
            .map(move |(n, p)| (format!("layers.{l}.{n}"), p))
        })
    }
}

/// Tensor names of one layer for each architecture.
struct LayerNames {
    attn_sub_norm: &'static str,
    ffn_sub_norm: &'static str,
    /// The MLP's input norm.
    mlp_norm: &'static str,
}

fn layer_names(arch: Architecture) -> LayerNames {
    let (attn_sub_norm, ffn_sub_norm) = match arch {
        Architecture::BitNet1bitLLM => ("self_attn.inner_attn_ln", "mlp.ffn_layernorm"),
        _ => ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"),
    };
    // Gemma's `post_attention_layernorm` norms the attention output; its MLP input norm is
    // `pre_feedforward_layernorm`.
    let mlp_norm = match arch {
        Architecture::Gemma3 => "pre_feedforward_layernorm",
        _ => "post_attention_layernorm",
    };
    LayerNames { attn_sub_norm, ffn_sub_norm, mlp_norm }
}

/// A norm gain as it multiplies: Gemma's RMSNorm computes `x · (1 + w)` from a stored `w`
/// (in f32, as transformers' `1.0 + weight.float()`).
pub(crate) fn norm_gain(cfg: &ModelConfig, mut stored: Vec<f32>) -> Vec<f32> {
    if cfg.gemma_norms() {
        stored.iter_mut().for_each(|w| *w += 1.0);
    }
    stored
}

/// A float tensor of exactly `shape`, widened to f32.
fn float_tensor(store: &TensorStore, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
    let t = store.get(name)?;
    t.expect_shape(shape)?;
    t.to_f32()
}

/// A float matrix kept in its stored dtype (bf16, f16, f32) where it lies in the checkpoint, not
/// copied: a table that only serves lookups stays there, and whoever needs a copy makes it
/// ([`DenseLinear::into_owned`]). Other float dtypes are widened to an f32 copy.
fn dense_tensor(
    store: &TensorStore,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<DenseLinear, ModelError> {
    let t = store.get(name)?;
    t.expect_shape(&[rows, cols])?;
    let stored = match t.dtype {
        Dtype::BF16 => DenseLinear::from_shared(GgmlType::BF16, rows, cols, t.shared()),
        Dtype::F16 => DenseLinear::from_shared(GgmlType::F16, rows, cols, t.shared()),
        Dtype::F32 => DenseLinear::from_shared(GgmlType::F32, rows, cols, t.shared()),
        _ => {
            let widened = DenseLinear::from_f32(&t.to_f32()?, rows, cols);
            t.release();
            widened
        }
    };
    stored.map_err(|e| ModelError::tensor(t.path, format!("tensor `{name}`: {e}")))
}

/// The scalar `weight_scale` of a packed projection.
pub(crate) fn weight_scale(t: &TensorRef) -> Result<f32, ModelError> {
    if t.numel() != 1 {
        return Err(ModelError::tensor(
            t.path,
            format!("tensor `{}` has shape {:?}, expected one scale per matrix", t.name, t.shape),
        ));
    }
    let v = t.to_f32()?[0];
    if !v.is_finite() || v <= 0.0 {
        return Err(ModelError::tensor(
            t.path,
            format!("tensor `{}` holds {v}, not a positive scale", t.name),
        ));
    }
    Ok(v)
}

/// Loads one projection `[rows, cols]` in whichever form the config says.
fn projection(
    store: &TensorStore,
    cfg: &ModelConfig,
    opts: WeightOptions,
    prefix: &str,
    rows: usize,
    cols: usize,
) -> Result<Projection, ModelError> {
    let wname = format!("{prefix}.weight");
    let t = store.get(&wname)?;
    let online = |t: &TensorRef| -> Result<_, ModelError> {
        t.expect_shape(&[rows, cols])?;
        let master = t.to_f32()?;
        let (codes, mean_abs) = absmean_ternary(&master);
        TernaryMatrix::from_ternary(&codes, rows, cols, WeightScale::Multiply(mean_abs))
            .map(LinearWeight::Ternary)
            .map_err(|e| ModelError::tensor(t.path, format!("tensor `{wname}`: {e}")))
    };
    let weight = match cfg.quant_form {
        QuantForm::Online => online(&t),
        QuantForm::Dense if opts.ternarize => online(&t),
        // Read every token: a copy of its own (aligned, on huge pages), the mapping released.
        QuantForm::Dense => Ok(LinearWeight::Dense(dense_tensor(store, &wname, rows, cols)?.into_owned())),
        QuantForm::PackedMultiply | QuantForm::PackedDivide => {
            if t.dtype != Dtype::U8 {
                return Err(ModelError::tensor(
                    t.path,
                    format!(
                        "tensor `{wname}` has dtype {:?}, but quantization_config says the weights are packed \
                         (U8 [out/4, in])",
                        t.dtype
                    ),
                ));
            }
            t.expect_shape(&[rows / 4, cols])?;
            let packed = t.as_u8()?;
            hf_pack::check_packed(packed, rows, cols)
                .map_err(|e| ModelError::tensor(t.path, format!("tensor `{wname}`: {e}")))?;
            let s = weight_scale(&store.get(&format!("{prefix}.weight_scale"))?)?;
            let scale = match cfg.quant_form {
                QuantForm::PackedMultiply => WeightScale::Multiply(s),
                _ => WeightScale::Divide(s),
            };
            // A block of rows at a time: the unpacked codes (four times the packed bytes) never
            // exist whole.
            TernaryMatrix::from_row_blocks(rows, cols, scale, |first, codes| {
                hf_pack::unpack_rows(packed, rows, cols, first, codes);
                Ok::<(), bitnet_quant::QuantError>(())
            })
            .map(LinearWeight::Ternary)
            .map_err(|e| ModelError::tensor(t.path, format!("tensor `{wname}`: {e}")))
        }
    }?;
    // Repacked or copied: the mapped original is not needed any more.
    t.release();
    let input_norm = match cfg.bitlinear_input_norm {
        // transformers' BitLinear input norm is an RMSNorm whose gain may be stored (as
        // `rms_norm.weight`; Microsoft's BitNet-embedding checkpoints name it `norm.weight`).
        Some(_) => match projection_norm_name(store, prefix) {
            Some(name) => Some(float_tensor(store, &name, &[cols])?),
            None => Some(vec![1.0; cols]),
        },
        None => None,
    };
    Ok(Projection { weight, input_norm })
}

/// The stored gain of a projection's input RMSNorm, under either name it is written with.
/// Microsoft's BitNet-embedding checkpoints carry an RMSNorm gain in front of every projection
/// (`<proj>.norm.weight`) without saying so in quantization_config: the gains are the evidence
/// of BitLinears, whose norms take the model's eps and whose float weights are masters,
/// ternarized as bitnet.cpp's converter for them does. `root` is the decoder's prefix
/// (`model.` or none).
pub(crate) fn apply_projection_norm_evidence(config: &mut ModelConfig, store: &TensorStore, root: &str) {
    if config.bitlinear_input_norm.is_none()
        && projection_norm_name(store, &format!("{root}layers.0.self_attn.q_proj")).is_some()
    {
        config.bitlinear_input_norm = Some(config.rms_norm_eps);
        if config.quant_form == QuantForm::Dense {
            config.quant_form = QuantForm::Online;
        }
    }
}

fn projection_norm_name(store: &TensorStore, prefix: &str) -> Option<String> {
    ["rms_norm.weight", "norm.weight"].iter().map(|n| format!("{prefix}.{n}")).find(|n| store.contains(n))
}

fn layer(
    store: &TensorStore,
    cfg: &ModelConfig,
    opts: WeightOptions,
    root: &str,
    l: usize,
) -> Result<LayerWeights, ModelError> {
    let p = format!("{root}layers.{l}");
    let names = layer_names(cfg.architecture);
    let (h, q, kv, i) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    let norm = |name: &str, width: usize| -> Result<Vec<f32>, ModelError> {
        Ok(norm_gain(cfg, float_tensor(store, &format!("{p}.{name}.weight"), &[width])?))
    };
    let output_norm = |name: &str| -> Result<Option<Vec<f32>>, ModelError> {
        cfg.gemma_norms().then(|| norm(name, h)).transpose()
    };
    let sub_norm = |name: &str, width: usize| -> Result<Option<Vec<f32>>, ModelError> {
        match cfg.sub_norms {
            true => Ok(Some(float_tensor(store, &format!("{p}.{name}.weight"), &[width])?)),
            false => Ok(None),
        }
    };
    let head_norm = |name: &str| -> Result<Option<Vec<f32>>, ModelError> {
        match cfg.qk_norm() {
            true => Ok(Some(norm(&format!("self_attn.{name}"), cfg.head_dim)?)),
            false => Ok(None),
        }
    };
    Ok(LayerWeights {
        input_norm: norm("input_layernorm", h)?,
        post_attention_norm: norm(names.mlp_norm, h)?,
        q_proj: projection(store, cfg, opts, &format!("{p}.self_attn.q_proj"), q, h)?,
        k_proj: projection(store, cfg, opts, &format!("{p}.self_attn.k_proj"), kv, h)?,
        v_proj: projection(store, cfg, opts, &format!("{p}.self_attn.v_proj"), kv, h)?,
        o_proj: projection(store, cfg, opts, &format!("{p}.self_attn.o_proj"), h, q)?,
        q_norm: head_norm("q_norm")?,
        k_norm: head_norm("k_norm")?,
        attn_sub_norm: sub_norm(names.attn_sub_norm, q)?,
        gate_proj: projection(store, cfg, opts, &format!("{p}.mlp.gate_proj"), i, h)?,
        up_proj: projection(store, cfg, opts, &format!("{p}.mlp.up_proj"), i, h)?,
        down_proj: projection(store, cfg, opts, &format!("{p}.mlp.down_proj"), h, i)?,
        ffn_sub_norm: sub_norm(names.ffn_sub_norm, i)?,
        attn_output_norm: output_norm("post_attention_layernorm")?,
        mlp_output_norm: output_norm("post_feedforward_layernorm")?,
    })
}

impl ModelWeights {
    /// Loads every tensor the config calls for, checking names, shapes and dtypes.
    ///
    /// Projections are repacked (or copied) tensor by tensor, each one's mapped pages handed
    /// back as soon as it is done ([`TensorRef::release`]), so that the process never holds a
    /// layer twice. The embedding table and an untied head are not copied: they point into the
    /// checkpoint ([`DenseLinear::is_shared`]), and the model decides what copy, if any, it
    /// needs (`bitnet-inference`'s `Model::new`).
    pub fn load(store: &TensorStore, config: ModelConfig) -> Result<Self, ModelError> {
        Self::load_with(store, config, WeightOptions::default())
    }

    /// [`ModelWeights::load`] with explicit [`WeightOptions`].
    pub fn load_with(
        store: &TensorStore,
        mut config: ModelConfig,
        opts: WeightOptions,
    ) -> Result<Self, ModelError> {
        // A causal LM's decoder lives under `model.`; a bare decoder (what transformers'
        // AutoModel saves: embedding models) has no prefix.
        let root = match store.contains("model.embed_tokens.weight") || !store.contains("embed_tokens.weight")
        {
            true => "model.",
            false => "",
        };
        apply_projection_norm_evidence(&mut config, store, root);
        let cfg = &config;
        let embed_tokens =
            dense_tensor(store, &format!("{root}embed_tokens.weight"), cfg.vocab_size, cfg.hidden_size)?;
        // Layers are independent: unpack and repack them in parallel.
        let layers = (0..cfg.num_layers)
            .into_par_iter()
            .map(|l| layer(store, cfg, opts, root, l))
            .collect::<Result<Vec<_>, _>>()?;
        let final_norm =
            norm_gain(cfg, float_tensor(store, &format!("{root}norm.weight"), &[cfg.hidden_size])?);
        let lm_head = match (cfg.tie_word_embeddings, store.contains("lm_head.weight")) {
            (true, _) => None,
            (false, true) => Some(dense_tensor(store, "lm_head.weight", cfg.vocab_size, cfg.hidden_size)?),
            (false, false) => {
                return Err(store.get("lm_head.weight").err().unwrap_or_else(|| {
                    ModelError::tensor(Path::new("checkpoint"), "tensor `lm_head.weight` is missing")
                }))
            }
        };
        Ok(Self { config, embed_tokens, layers, final_norm, lm_head, ternary_head: None })
    }

    /// Parameters, counting each ternary weight as one.
    pub fn parameter_count(&self) -> usize {
        let c = &self.config;
        let per_layer = c.hidden_size * (2 * c.q_dim() + 2 * c.kv_dim())
            + 3 * c.hidden_size * c.intermediate_size
            + 2 * c.hidden_size
            + if c.sub_norms { c.q_dim() + c.intermediate_size } else { 0 }
            + if c.qk_norm() { 2 * c.head_dim } else { 0 }
            + if c.gemma_norms() { 2 * c.hidden_size } else { 0 };
        c.vocab_size * c.hidden_size * if self.lm_head.is_some() { 2 } else { 1 }
            + c.num_layers * per_layer
            + c.hidden_size
    }
}
