//! Loading a Hugging Face BitNet checkpoint into host weights: ternary projections with their
//! scales, float embeddings, norms and head.

use std::path::Path;

use bitnet_core::{DenseData, DenseMatrix};
use bitnet_quant::{absmean_ternary, hf_pack::unpack_hf, TernaryMatrix, WeightScale};
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::Dtype;

use crate::safetensors::{TensorRef, TensorStore};
use crate::{Architecture, ModelConfig, ModelError, QuantForm};

/// One BitLinear: ternary weights, their scale, and the optional input RMSNorm
/// (`quantization_config.use_rms_norm`).
pub struct Projection {
    pub weight: TernaryMatrix,
    pub input_norm: Option<Vec<f32>>,
}

pub struct LayerWeights {
    pub input_norm: Vec<f32>,
    pub post_attention_norm: Vec<f32>,
    pub q_proj: Projection,
    pub k_proj: Projection,
    pub v_proj: Projection,
    pub o_proj: Projection,
    /// RMSNorm over the concatenated head outputs, before o_proj.
    pub attn_sub_norm: Option<Vec<f32>>,
    pub gate_proj: Projection,
    pub up_proj: Projection,
    pub down_proj: Projection,
    /// RMSNorm over the gated MLP activations, before down_proj.
    pub ffn_sub_norm: Option<Vec<f32>>,
}

pub struct ModelWeights {
    pub config: ModelConfig,
    pub embed_tokens: DenseMatrix,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Vec<f32>,
    /// `None` when the head is tied to the embeddings.
    pub lm_head: Option<DenseMatrix>,
}

impl ModelWeights {
    /// The matrix the logits are computed with.
    pub fn lm_head(&self) -> &DenseMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}

/// Tensor names of one layer for each architecture.
struct LayerNames {
    attn_sub_norm: &'static str,
    ffn_sub_norm: &'static str,
}

fn layer_names(arch: Architecture) -> LayerNames {
    match arch {
        Architecture::BitNet1bitLLM => {
            LayerNames { attn_sub_norm: "self_attn.inner_attn_ln", ffn_sub_norm: "mlp.ffn_layernorm" }
        }
        _ => LayerNames { attn_sub_norm: "self_attn.attn_sub_norm", ffn_sub_norm: "mlp.ffn_sub_norm" },
    }
}

/// A float tensor of exactly `shape`, widened to f32.
fn float_tensor(store: &TensorStore, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
    let t = store.get(name)?;
    t.expect_shape(shape)?;
    t.to_f32()
}

/// A float matrix kept in its stored dtype.
fn dense_tensor(
    store: &TensorStore,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<DenseMatrix, ModelError> {
    let t = store.get(name)?;
    t.expect_shape(&[rows, cols])?;
    let d = t.data;
    let data = match t.dtype {
        Dtype::BF16 => {
            DenseData::Bf16(d.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect())
        }
        Dtype::F16 => DenseData::F16(d.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect()),
        _ => DenseData::F32(t.to_f32()?),
    };
    Ok(DenseMatrix { rows, cols, data })
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
    prefix: &str,
    rows: usize,
    cols: usize,
) -> Result<Projection, ModelError> {
    let wname = format!("{prefix}.weight");
    let t = store.get(&wname)?;
    let weight = match cfg.quant_form {
        QuantForm::Online => {
            t.expect_shape(&[rows, cols])?;
            let master = t.to_f32()?;
            let (codes, mean_abs) = absmean_ternary(&master);
            TernaryMatrix::from_ternary(&codes, rows, cols, WeightScale::Multiply(mean_abs))
        }
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
            let codes = unpack_hf(t.as_u8()?, rows, cols)
                .map_err(|e| ModelError::tensor(t.path, format!("tensor `{wname}`: {e}")))?;
            let s = weight_scale(&store.get(&format!("{prefix}.weight_scale"))?)?;
            let scale = match cfg.quant_form {
                QuantForm::PackedMultiply => WeightScale::Multiply(s),
                _ => WeightScale::Divide(s),
            };
            TernaryMatrix::from_ternary(&codes, rows, cols, scale)
        }
    }
    .map_err(|e| ModelError::tensor(t.path, format!("tensor `{wname}`: {e}")))?;
    let input_norm = match cfg.bitlinear_input_norm {
        // transformers' BitLinear input norm is an RMSNorm whose gain may be stored.
        Some(_) => match store.contains(&format!("{prefix}.rms_norm.weight")) {
            true => Some(float_tensor(store, &format!("{prefix}.rms_norm.weight"), &[cols])?),
            false => Some(vec![1.0; cols]),
        },
        None => None,
    };
    Ok(Projection { weight, input_norm })
}

fn layer(store: &TensorStore, cfg: &ModelConfig, l: usize) -> Result<LayerWeights, ModelError> {
    let p = format!("model.layers.{l}");
    let names = layer_names(cfg.architecture);
    let (h, q, kv, i) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    let sub_norm = |name: &str, width: usize| -> Result<Option<Vec<f32>>, ModelError> {
        match cfg.sub_norms {
            true => Ok(Some(float_tensor(store, &format!("{p}.{name}.weight"), &[width])?)),
            false => Ok(None),
        }
    };
    Ok(LayerWeights {
        input_norm: float_tensor(store, &format!("{p}.input_layernorm.weight"), &[h])?,
        post_attention_norm: float_tensor(store, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
        q_proj: projection(store, cfg, &format!("{p}.self_attn.q_proj"), q, h)?,
        k_proj: projection(store, cfg, &format!("{p}.self_attn.k_proj"), kv, h)?,
        v_proj: projection(store, cfg, &format!("{p}.self_attn.v_proj"), kv, h)?,
        o_proj: projection(store, cfg, &format!("{p}.self_attn.o_proj"), h, q)?,
        attn_sub_norm: sub_norm(names.attn_sub_norm, q)?,
        gate_proj: projection(store, cfg, &format!("{p}.mlp.gate_proj"), i, h)?,
        up_proj: projection(store, cfg, &format!("{p}.mlp.up_proj"), i, h)?,
        down_proj: projection(store, cfg, &format!("{p}.mlp.down_proj"), h, i)?,
        ffn_sub_norm: sub_norm(names.ffn_sub_norm, i)?,
    })
}

impl ModelWeights {
    /// Loads every tensor the config calls for, checking names, shapes and dtypes.
    pub fn load(store: &TensorStore, config: ModelConfig) -> Result<Self, ModelError> {
        let cfg = &config;
        let embed_tokens = dense_tensor(store, "model.embed_tokens.weight", cfg.vocab_size, cfg.hidden_size)?;
        // Layers are independent: unpack and repack them in parallel.
        let layers = (0..cfg.num_layers)
            .into_par_iter()
            .map(|l| layer(store, cfg, l))
            .collect::<Result<Vec<_>, _>>()?;
        let final_norm = float_tensor(store, "model.norm.weight", &[cfg.hidden_size])?;
        let lm_head = match (cfg.tie_word_embeddings, store.contains("lm_head.weight")) {
            (true, _) => None,
            (false, true) => Some(dense_tensor(store, "lm_head.weight", cfg.vocab_size, cfg.hidden_size)?),
            (false, false) => {
                return Err(store.get("lm_head.weight").err().unwrap_or_else(|| {
                    ModelError::tensor(Path::new("checkpoint"), "tensor `lm_head.weight` is missing")
                }))
            }
        };
        Ok(Self { config, embed_tokens, layers, final_norm, lm_head })
    }

    /// Parameters, counting each ternary weight as one.
    pub fn parameter_count(&self) -> usize {
        let c = &self.config;
        let per_layer = c.hidden_size * (2 * c.q_dim() + 2 * c.kv_dim())
            + 3 * c.hidden_size * c.intermediate_size
            + 2 * c.hidden_size
            + if c.sub_norms { c.q_dim() + c.intermediate_size } else { 0 };
        c.vocab_size * c.hidden_size * if self.lm_head.is_some() { 2 } else { 1 }
            + c.num_layers * per_layer
            + c.hidden_size
    }
}
