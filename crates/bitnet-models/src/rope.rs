//! RoPE scaling: how a model stretches its rotary frequencies past the context it was trained at
//! (config.json `rope_scaling` / `rope_parameters`, GGUF `{arch}.rope.scaling.*`), computed as
//! transformers' `modeling_rope_utils` computes it, in f32.
//!
//! transformers applies the scaling always, not only past the original context: a scaled model's
//! every position is rotated by the scaled frequencies, so ignoring the scaling changes every
//! output. YaRN also multiplies cos and sin by an attention factor, which scales q·k by its
//! square; the engine folds it into the per-head q/k norm gains (Qwen3), and refuses it for an
//! architecture without them.

use std::f32::consts::PI;
use std::path::Path;

use serde_json::Value;

use crate::ModelError;

/// A RoPE frequency scaling.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    #[default]
    None,
    /// Every frequency divided by `factor` (position interpolation).
    Linear { factor: f32 },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: f32 },
    /// YaRN: frequencies interpolated by `factor` below the correction range (`beta_fast`,
    /// `beta_slow` rotations over `original_max_position_embeddings`), kept above it, a linear
    /// ramp inside; cos and sin multiplied by `attention_factor`.
    Yarn {
        factor: f32,
        original_max_position_embeddings: f32,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: f32,
        truncate: bool,
    },
}

/// YaRN's default attention factor (`0.1 · mscale · ln(factor) + 1`, 1 for factors ≤ 1).
fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

impl RopeScaling {
    /// The scaling a config.json asks for: `rope_scaling` (transformers 4) or `rope_parameters`
    /// (transformers 5), with transformers' defaults. `path` only names the file in errors.
    pub fn from_config_json(json: &Value, path: &Path) -> Result<Self, ModelError> {
        let get = |v: &Value, k: &str| v.get(k).filter(|x| !x.is_null()).cloned();
        let Some(params) = get(json, "rope_scaling").or_else(|| get(json, "rope_parameters")) else {
            return Ok(RopeScaling::None);
        };
        let kind = get(&params, "rope_type").or_else(|| get(&params, "type"));
        let kind = kind.as_ref().and_then(Value::as_str).unwrap_or("default");
        let num = |k: &str| get(&params, k).and_then(|v| v.as_f64());
        let bad = |m: String| ModelError::config(path, m);
        let max_pos = get(json, "max_position_embeddings").and_then(|v| v.as_f64());
        // transformers falls back to the top-level key, then to max_position_embeddings.
        let original = num("original_max_position_embeddings")
            .or_else(|| get(json, "original_max_position_embeddings").and_then(|v| v.as_f64()))
            .or(max_pos);
        let factor = |required: bool| -> Result<f64, ModelError> {
            match num("factor") {
                Some(f) if f.is_finite() && f > 0.0 => Ok(f),
                Some(f) => Err(bad(format!("RoPE scaling `{kind}`: factor {f} is not a positive number"))),
                None if !required => match (max_pos, original) {
                    (Some(m), Some(o)) if o > 0.0 => Ok(m / o),
                    _ => Err(bad(format!("RoPE scaling `{kind}` has no factor"))),
                },
                None => Err(bad(format!("RoPE scaling `{kind}` has no factor"))),
            }
        };
        let original = |what: &str| -> Result<f64, ModelError> {
            original.filter(|&o| o > 0.0).ok_or_else(|| {
                bad(format!("RoPE scaling `{what}` needs original_max_position_embeddings (or max_position_embeddings)"))
            })
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor(true)? as f32 },
            "llama3" => RopeScaling::Llama3 {
                factor: factor(true)? as f32,
                low_freq_factor: num("low_freq_factor").ok_or_else(|| bad("RoPE scaling `llama3` has no low_freq_factor".into()))? as f32,
                high_freq_factor: num("high_freq_factor").ok_or_else(|| bad("RoPE scaling `llama3` has no high_freq_factor".into()))? as f32,
                original_max_position_embeddings: original("llama3")? as f32,
            },
            "yarn" => {
                let f = factor(false)?;
                let attention_factor = match (num("attention_factor"), num("mscale"), num("mscale_all_dim")) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => yarn_mscale(f, m) / yarn_mscale(f, all),
                    _ => yarn_mscale(f, 1.0),
                };
                RopeScaling::Yarn {
                    factor: f as f32,
                    original_max_position_embeddings: original("yarn")? as f32,
                    // transformers: `or 32` / `or 1`, so a 0 takes the default too.
                    beta_fast: num("beta_fast").filter(|&b| b != 0.0).unwrap_or(32.0) as f32,
                    beta_slow: num("beta_slow").filter(|&b| b != 0.0).unwrap_or(1.0) as f32,
                    attention_factor: attention_factor as f32,
                    truncate: get(&params, "truncate").and_then(|v| v.as_bool()).unwrap_or(true),
                }
            }
            other => {
                return Err(bad(format!(
                    "RoPE scaling `{other}` is not supported (linear, llama3 and yarn are; remove rope_scaling to run the \
                     model at its native context)"
                )))
            }
        };
        Ok(scaling)
    }

    /// The factor cos and sin are multiplied by (YaRN's attention factor; 1 otherwise).
    pub fn attention_factor(&self) -> f32 {
        match *self {
            RopeScaling::Yarn { attention_factor, .. } => attention_factor,
            _ => 1.0,
        }
    }

    /// The inverse frequencies of RoPE over `head_dim` with base `theta`, scaled.
    pub fn inv_freq(&self, theta: f32, head_dim: usize) -> Vec<f32> {
        let plain = bitnet_core::ops::rope_inv_freq(theta, head_dim);
        match *self {
            RopeScaling::None => plain,
            RopeScaling::Linear { factor } => plain.iter().map(|&f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                plain
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        // Frequencies are finite and positive, so these are transformers' `~(<) * ~(>)`.
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth =
                                (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => yarn_inv_freq(
                theta,
                head_dim,
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
            ),
        }
    }
}

/// transformers' `_compute_yarn_parameters` frequencies, step for step in f32 (its correction
/// range in f64, as Python computes it).
fn yarn_inv_freq(
    theta: f32,
    head_dim: usize,
    factor: f32,
    original: f32,
    beta_fast: f32,
    beta_slow: f32,
    truncate: bool,
) -> Vec<f32> {
    let dim = head_dim as f64;
    let base = theta as f64;
    let correction_dim = |rotations: f64| {
        dim * (original as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction_dim(beta_fast as f64), correction_dim(beta_slow as f64));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, high) = (low.max(0.0) as f32, high.min(dim - 1.0) as f32);
    let high = if low == high { high + 0.001 } else { high };
    (0..head_dim / 2)
        .map(|i| {
            let pos_freq = (base.powf(((2 * i) as f32 / head_dim as f32) as f64)) as f32;
            let extrapolation = 1.0 / pos_freq;
            let interpolation = 1.0 / (factor * pos_freq);
            let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation_factor = 1.0 - ramp;
            interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
        })
        .collect()
}
