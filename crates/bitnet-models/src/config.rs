//! `config.json` (and `generation_config.json`) of a Hugging Face BitNet checkpoint.

use std::path::Path;

use serde_json::Value;

pub use crate::rope::RopeScaling;
use crate::ModelError;

/// Which family of checkpoint a config describes; it decides tensor names and layer shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// transformers `bitnet` (microsoft/bitnet-b1.58-2B-4T): ReLU² gate, sub-norms.
    BitNet,
    /// `llama` with `quant_method: bitnet` (HF1BitLLM/Llama3-8B-1.58): SiLU gate, no sub-norms.
    /// Also a plain `llama` (no `quantization_config`), whose weights run dense
    /// ([`QuantForm::Dense`]).
    Llama158,
    /// 1bitLLM `BitnetForCausalLM` (bitnet_b1_58-large/3B): SiLU gate, sub-norms named
    /// `inner_attn_ln` and `ffn_layernorm`, fp16 masters quantized online.
    BitNet1bitLLM,
    /// `qwen3` (Qwen3, PrismML's Ternary-Bonsai, the backbone of BitNet-embedding-0.6B): SiLU
    /// gate, no sub-norms, an RMSNorm over each head of q and of k (`q_norm`, `k_norm`, gains of
    /// `head_dim`) before RoPE, and `head_dim` given by the config rather than hidden / heads.
    /// Without `quantization_config` its projections run dense as stored ([`QuantForm::Dense`]).
    Qwen3,
    /// `gemma3_text` (`Gemma3ForCausalLM`: google/gemma-3-270m and the text stack of the larger
    /// Gemma 3 models): embeddings times sqrt(hidden), Gemma RMSNorms (`x · (1 + w)`, the
    /// loader stores `1 + w`), four norms per layer (the attention and MLP outputs are normed
    /// before their residual adds), per-head q/k norms, a GeGLU MLP (tanh GELU), scores scaled
    /// by `query_pre_attn_scalar^-0.5`, sliding-window attention with its own RoPE base on most
    /// layers ([`SlidingAttention`]), a tied head. Without `quantization_config` its projections
    /// run dense as stored.
    Gemma3,
}

impl Architecture {
    /// What the architecture is, in words (for `bitnet inspect`).
    pub fn describe(self) -> &'static str {
        match self {
            Architecture::BitNet => "bitnet (BitNet b1.58 2B-4T layout: ReLU² gate, sub-norms)",
            Architecture::Llama158 => "llama (Llama-1.58, Falcon3-1.58bit, Falcon-E, or a plain llama)",
            Architecture::BitNet1bitLLM => "bitnet 1bitLLM (bitnet_b1_58-large/3B: SiLU gate, sub-norms)",
            Architecture::Qwen3 => "qwen3 (per-head q/k norms: Qwen3, Ternary-Bonsai, BitNet-embedding)",
            Architecture::Gemma3 => {
                "gemma3 (Gemma 3 text: GeGLU, sliding-window layers, four norms per layer)"
            }
        }
    }
}

/// The gate nonlinearity of the MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `relu(x)²`
    Relu2,
    /// `x · sigmoid(x)`
    Silu,
    /// `0.5 · x · (1 + tanh(sqrt(2/π) · (x + 0.044715 · x³)))`: torch's `gelu(approximate="tanh")`,
    /// transformers' `gelu_pytorch_tanh` (Gemma's GeGLU).
    GeluTanh,
}

/// Attention that differs by layer (Gemma3): most layers see only a window of recent keys and
/// rotate with their own RoPE base; the others attend to the whole context with the model's
/// `rope_theta` and [`RopeScaling`].
#[derive(Clone, Debug, PartialEq)]
pub struct SlidingAttention {
    /// Keys a sliding layer's query sees: its own position and the `window - 1` before it
    /// (transformers' `kv_idx > q_idx - sliding_window`).
    pub window: usize,
    /// Per layer: whether it is a sliding layer (`layer_types`' `sliding_attention`).
    pub sliding_layers: Vec<bool>,
    /// RoPE base of the sliding layers (`rope_local_base_freq`); they are never RoPE-scaled.
    pub rope_theta: f32,
}

/// Where the projections' weights come from and how their stored scale is applied
/// (bitnet-reference.md §2.3 — getting this wrong scales every output by `mean|W|²`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantForm {
    /// Float master weights, absmean-ternarized at load (`autobitlinear` online, 1bitLLM).
    Online,
    /// Packed 2-bit weights, `weight_scale = mean|W|` multiplies (`autobitlinear` offline).
    PackedMultiply,
    /// Packed 2-bit weights, `weight_scale = 1/mean|W|` divides (`bitlinear`, the default).
    PackedDivide,
    /// No quantization: a plain float checkpoint (a `llama` without `quantization_config`),
    /// whose projections run dense as stored (or ternarized, with
    /// [`crate::weights::WeightOptions::ternarize`]).
    Dense,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    /// How the RoPE frequencies are scaled for a longer context.
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub activation: Activation,
    /// `attn_sub_norm` before o_proj and `ffn_sub_norm` before down_proj.
    pub sub_norms: bool,
    pub quant_form: QuantForm,
    /// `quantization_config.use_rms_norm`: a weightless RMSNorm on every BitLinear input,
    /// with this eps.
    pub bitlinear_input_norm: Option<f32>,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (config.json and generation_config.json together).
    pub eos_token_ids: Vec<u32>,
    /// Gemma3's `query_pre_attn_scalar`: scores are scaled by its inverse square root instead of
    /// `head_dim`'s ([`ModelConfig::attention_scale`]).
    pub query_pre_attn_scalar: Option<f32>,
    /// The sliding-window layers, their window and RoPE base (Gemma3); `None`: every layer
    /// attends to the whole context.
    pub sliding: Option<SlidingAttention>,
}

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn usize_field(v: &Value, key: &str, path: &Path) -> Result<usize, ModelError> {
    field(v, key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| ModelError::config(path, format!("`{key}` is missing or not a non-negative integer")))
}

/// Collects token ids from a number or an array of numbers. An id past `u32` names no token
/// any vocabulary holds, so it is left out rather than wrapped onto a real one (2^32 + 1 is
/// not token 1).
fn ids(v: Option<&Value>) -> Vec<u32> {
    let id = |x: &Value| x.as_u64().and_then(|x| u32::try_from(x).ok());
    match v {
        Some(n @ Value::Number(_)) => id(n).into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(id).collect(),
        _ => Vec::new(),
    }
}

/// Refuses config.json features the forward does not implement, rather than running a model
/// that silently computes something else: biases on the projections, RoPE on part of each
/// head, and sliding-window attention. (RoPE scaling types other than linear, llama3 and yarn are refused by
/// [`RopeScaling::from_config_json`].)
fn refuse_unsupported_features(json: &Value, path: &Path) -> Result<(), ModelError> {
    let flag = |key: &str| field(json, key).and_then(Value::as_bool).unwrap_or(false);
    for key in ["attention_bias", "mlp_bias"] {
        if flag(key) {
            return Err(ModelError::config(
                path,
                format!("`{key}: true`: projections with biases are not supported"),
            ));
        }
    }
    if let Some(f) = field(json, "partial_rotary_factor").and_then(Value::as_f64).filter(|&f| f != 1.0) {
        return Err(ModelError::config(
            path,
            format!("`partial_rotary_factor: {f}`: RoPE on part of each head is not supported"),
        ));
    }
    if flag("use_sliding_window") {
        return Err(ModelError::config(
            path,
            "`use_sliding_window: true`: sliding-window attention is not supported (every layer attends to \
             the whole context here)",
        ));
    }
    Ok(())
}

/// What a Gemma3 config.json says about its attention beyond the llama fields.
struct Gemma3Attention {
    query_pre_attn_scalar: f32,
    sliding: SlidingAttention,
    /// RoPE of the full-attention layers.
    global_rope_theta: f32,
    global_rope_scaling: RopeScaling,
}

/// transformers' defaults for Gemma3's two RoPE bases (`Gemma3TextConfig.default_theta`).
const GEMMA3_GLOBAL_THETA: f64 = 1_000_000.0;
const GEMMA3_LOCAL_THETA: f64 = 10_000.0;
/// transformers' `sliding_window_pattern` when neither it nor `layer_types` is given: every
/// sixth layer attends globally.
const GEMMA3_SLIDING_WINDOW_PATTERN: u64 = 6;

/// Gemma3's attention fields: the score scale, which layers slide and over what window, and the
/// RoPE of each kind of layer, as transformers 4 (`rope_theta`, `rope_local_base_freq`,
/// `rope_scaling`, `sliding_window_pattern`) or 5 (`rope_parameters` per layer type,
/// `layer_types`) writes them. What transformers would fill in silently for the attention
/// scale and the window is required here: a guessed scale or window runs, and answers wrongly.
fn gemma3_attention(json: &Value, path: &Path) -> Result<Gemma3Attention, ModelError> {
    let bad = |m: String| ModelError::config(path, m);
    for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if let Some(v) = field(json, key) {
            return Err(bad(format!(
                "`{key}: {v}`: soft-capping is not supported (Gemma 3 checkpoints set it to null)"
            )));
        }
    }
    if field(json, "use_bidirectional_attention").and_then(Value::as_bool).unwrap_or(false) {
        return Err(bad(
            "`use_bidirectional_attention: true` (EmbeddingGemma): bidirectional attention is not supported"
                .into(),
        ));
    }
    let query_pre_attn_scalar = match field(json, "query_pre_attn_scalar").map(|v| (v, v.as_f64())) {
        Some((_, Some(x))) if x.is_finite() && x > 0.0 => x as f32,
        Some((v, _)) => return Err(bad(format!("`query_pre_attn_scalar` {v} is not a positive number"))),
        None => return Err(bad(
            "`query_pre_attn_scalar` is missing: Gemma3 scales attention scores by its inverse square root \
                 (transformers would assume 256)"
                .into(),
        )),
    };

    let layers = usize_field(json, "num_hidden_layers", path)?;
    let sliding_layers: Vec<bool> = match field(json, "layer_types") {
        Some(Value::Array(types)) => {
            if types.len() != layers {
                return Err(bad(format!(
                    "`layer_types` names {} layers, but num_hidden_layers is {layers}",
                    types.len()
                )));
            }
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(bad(format!(
                        "`layer_types[{i}]` is {t}, not \"sliding_attention\" or \"full_attention\""
                    ))),
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => return Err(bad(format!("`layer_types` {v} is not a list of layer types"))),
        None => {
            // Older configs: every `pattern`-th layer is global.
            let key = ["sliding_window_pattern", "_sliding_window_pattern"]
                .into_iter()
                .find(|k| field(json, k).is_some());
            let pattern = match key {
                Some(k) => field(json, k).and_then(Value::as_u64).filter(|&p| p > 0).ok_or_else(|| {
                    bad(format!("`{k}` {} is not a positive integer", field(json, k).unwrap_or(&Value::Null)))
                })?,
                None => GEMMA3_SLIDING_WINDOW_PATTERN,
            };
            (0..layers as u64).map(|i| (i + 1) % pattern != 0).collect()
        }
    };
    let window = match field(json, "sliding_window").map(|v| (v, v.as_u64())) {
        Some((_, Some(w))) if w > 0 => w as usize,
        Some((v, _)) => {
            return Err(bad(format!(
                "`sliding_window` {v} is not a positive integer: a sliding layer's query sees its own key \
                 and the window - 1 before it"
            )))
        }
        None if sliding_layers.contains(&true) => {
            return Err(bad(
                "`sliding_window` is missing, but layers slide (layer_types / sliding_window_pattern)".into(),
            ))
        }
        None => usize::MAX,
    };

    // RoPE: transformers 5 writes one parameter set per layer type; transformers 4 the global
    // base and scaling at the top level beside `rope_local_base_freq`.
    let num = |v: &Value, k: &str| field(v, k).and_then(Value::as_f64);
    let per_type = field(json, "rope_parameters").filter(|r| field(r, "full_attention").is_some());
    let (global_theta, global_rope_scaling, local_theta) = match per_type {
        Some(params) => {
            let full = field(params, "full_attention").expect("checked above");
            let local = field(params, "sliding_attention");
            if let Some(kind) = local.and_then(|l| field(l, "rope_type")).and_then(Value::as_str) {
                if kind != "default" {
                    return Err(bad(format!(
                        "`rope_parameters.sliding_attention.rope_type` `{kind}`: only the full-attention \
                         layers' RoPE may be scaled"
                    )));
                }
            }
            // The full-attention set, read as a model's only RoPE parameters would be.
            let mut global = serde_json::Map::new();
            global.insert("rope_parameters".into(), full.clone());
            for key in ["max_position_embeddings", "original_max_position_embeddings"] {
                if let Some(v) = field(json, key) {
                    global.insert(key.into(), v.clone());
                }
            }
            (
                num(full, "rope_theta").or_else(|| num(json, "rope_theta")).unwrap_or(GEMMA3_GLOBAL_THETA),
                RopeScaling::from_config_json(&Value::Object(global), path)?,
                local.and_then(|l| num(l, "rope_theta")).or_else(|| num(json, "rope_local_base_freq")),
            )
        }
        None => (
            num(json, "rope_theta").unwrap_or(GEMMA3_GLOBAL_THETA),
            RopeScaling::from_config_json(json, path)?,
            num(json, "rope_local_base_freq"),
        ),
    };
    let local_theta = local_theta.unwrap_or(GEMMA3_LOCAL_THETA);
    if !(local_theta.is_finite() && local_theta > 0.0) {
        return Err(bad(format!("`rope_local_base_freq` {local_theta} is not a positive number")));
    }
    Ok(Gemma3Attention {
        query_pre_attn_scalar,
        sliding: SlidingAttention { window, sliding_layers, rope_theta: local_theta as f32 },
        global_rope_theta: global_theta as f32,
        global_rope_scaling,
    })
}

/// The largest `rms_norm_eps` accepted: far above any model's (1e-5, 1e-6), far below the
/// mean square of activations.
pub const MAX_RMS_NORM_EPS: f64 = 0.1;

/// What is wrong with an RMSNorm epsilon named `field`, if anything. RMSNorm divides by
/// sqrt(mean(x²) + eps): an eps near the activations' mean square flattens them (1e50 turns
/// every one into 0, and the model into silence).
fn eps_problem(field: &str, eps: f64) -> Option<String> {
    (!(0.0..=MAX_RMS_NORM_EPS).contains(&eps)).then(|| {
        // As a config would write it: 1e50 and 1e-9 in exponent form, -1 and 0.5 plainly.
        let shown = match eps.abs() {
            a if a != 0.0 && !(1e-4..1e6).contains(&a) => format!("{eps:e}"),
            _ => format!("{eps}"),
        };
        format!("{field} {shown} is not a small non-negative number (0 to {MAX_RMS_NORM_EPS}; models use about 1e-5)")
    })
}

impl ModelConfig {
    /// Reads `dir/config.json` and, if present, `dir/generation_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::config(&path, format!("not valid JSON: {e}")))?;
        let mut cfg = Self::from_json(&json, &path)?;
        let gen_path = dir.join("generation_config.json");
        if let Ok(gen_text) = std::fs::read_to_string(&gen_path) {
            let gen: Value = serde_json::from_str(&gen_text)
                .map_err(|e| ModelError::config(&gen_path, format!("not valid JSON: {e}")))?;
            cfg.merge_generation_config(&gen);
        }
        Ok(cfg)
    }

    /// Adds the end-of-sequence ids (and a missing BOS) of a generation_config.json.
    pub fn merge_generation_config(&mut self, gen: &Value) {
        for id in ids(field(gen, "eos_token_id")) {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        if self.bos_token_id.is_none() {
            self.bos_token_id = ids(field(gen, "bos_token_id")).first().copied();
        }
    }

    /// Parses a config.json value; `path` only names the file in errors.
    pub fn from_json(json: &Value, path: &Path) -> Result<Self, ModelError> {
        let model_type = field(json, "model_type").and_then(Value::as_str).unwrap_or("");
        let archs: Vec<&str> = field(json, "architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let qc = field(json, "quantization_config");
        let quant_method = qc.and_then(|q| field(q, "quant_method")).and_then(Value::as_str);

        let architecture = match model_type {
            "bitnet" => Architecture::BitNet,
            "llama" if archs.contains(&"BitnetForCausalLM") => Architecture::BitNet1bitLLM,
            // With `quant_method: bitnet` a ternary model; without `quantization_config` a plain
            // llama, run dense (a quant_method other than bitnet is refused below).
            "llama" => Architecture::Llama158,
            "qwen3" => Architecture::Qwen3,
            "gemma3_text" => Architecture::Gemma3,
            "gemma3" => {
                return Err(ModelError::config(
                    path,
                    "model_type `gemma3` is the multimodal Gemma 3 (Gemma3ForConditionalGeneration): only its text \
                     model (`gemma3_text`, Gemma3ForCausalLM, such as gemma-3-270m) is supported",
                ))
            }
            other => {
                return Err(ModelError::config(
                    path,
                    format!("unknown model_type `{other}` (expected `bitnet`, `llama`, `qwen3` or `gemma3_text`)"),
                ))
            }
        };
        refuse_unsupported_features(json, path)?;

        let hidden_size = usize_field(json, "hidden_size", path)?;
        let num_heads = usize_field(json, "num_attention_heads", path)?;
        let num_kv_heads = match field(json, "num_key_value_heads") {
            Some(_) => usize_field(json, "num_key_value_heads", path)?,
            None => num_heads,
        };
        let head_dim = match field(json, "head_dim") {
            Some(_) => usize_field(json, "head_dim", path)?,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        // Gemma names the MLP's activation `hidden_activation`.
        let act_key = match architecture {
            Architecture::Gemma3 => "hidden_activation",
            _ => "hidden_act",
        };
        let act_name = field(json, act_key).and_then(Value::as_str).unwrap_or(match architecture {
            Architecture::BitNet => "relu2",
            Architecture::Gemma3 => "gelu_pytorch_tanh",
            _ => "silu",
        });
        let activation = match act_name {
            "relu2" => Activation::Relu2,
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => {
                return Err(ModelError::config(
                    path,
                    format!("unsupported {act_key} `{other}` (expected relu2, silu or gelu_pytorch_tanh)"),
                ))
            }
        };
        let gemma = match architecture {
            Architecture::Gemma3 => Some(gemma3_attention(json, path)?),
            _ => None,
        };
        let rope_theta = field(json, "rope_theta")
            .or_else(|| field(json, "rope_parameters").and_then(|r| field(r, "rope_theta")))
            .and_then(Value::as_f64)
            .unwrap_or(match architecture {
                Architecture::BitNet1bitLLM => 10_000.0,
                _ => 500_000.0,
            }) as f32;
        let (rope_theta, rope_scaling) = match &gemma {
            Some(g) => (g.global_rope_theta, g.global_rope_scaling),
            None => (rope_theta, RopeScaling::from_config_json(json, path)?),
        };

        let str_of = |key: &str| qc.and_then(|q| field(q, key)).and_then(Value::as_str);
        let quant_form = match architecture {
            Architecture::BitNet1bitLLM => QuantForm::Online,
            Architecture::Llama158 | Architecture::Qwen3 | Architecture::Gemma3 if qc.is_none() => {
                QuantForm::Dense
            }
            _ => {
                if quant_method.is_some_and(|m| m != "bitnet") {
                    return Err(ModelError::config(
                        path,
                        format!(
                            "quantization_config.quant_method `{}` is not `bitnet`",
                            quant_method.unwrap_or("")
                        ),
                    ));
                }
                match (str_of("linear_class").unwrap_or("bitlinear"), str_of("quantization_mode").unwrap_or("offline")) {
                    (_, "online") => QuantForm::Online,
                    ("autobitlinear", "offline") => QuantForm::PackedMultiply,
                    ("bitlinear", "offline") => QuantForm::PackedDivide,
                    (class, mode) => {
                        return Err(ModelError::config(
                            path,
                            format!("unsupported quantization_config linear_class `{class}` / quantization_mode `{mode}`"),
                        ))
                    }
                }
            }
        };
        // Without quantization_config transformers runs a bitnet model's linears in full
        // precision (a `--fp` training baseline, say): not a ternary model.
        if qc.is_none() && architecture == Architecture::BitNet {
            return Err(ModelError::config(
                path,
                "has no quantization_config, so transformers runs it in full precision; this engine runs \
                 ternary models (add {\"quant_method\": \"bitnet\", \"linear_class\": \"autobitlinear\", \
                 \"quantization_mode\": \"online\"} to ternarize its weights)",
            ));
        }
        let bitlinear_input_norm =
            qc.and_then(|q| field(q, "use_rms_norm")).and_then(Value::as_bool).unwrap_or(false).then(|| {
                qc.and_then(|q| field(q, "rms_norm_eps")).and_then(Value::as_f64).unwrap_or(1e-6) as f32
            });

        let rms_norm_eps = field(json, "rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-5);
        // Checked here too, where the value is still the file's (1e50 would become f32 inf).
        if let Some(why) = eps_problem("rms_norm_eps", rms_norm_eps) {
            return Err(ModelError::config(path, why));
        }
        let cfg = Self {
            architecture,
            vocab_size: usize_field(json, "vocab_size", path)?,
            hidden_size,
            intermediate_size: usize_field(json, "intermediate_size", path)?,
            num_layers: usize_field(json, "num_hidden_layers", path)?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: field(json, "max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(2048) as usize,
            tie_word_embeddings: field(json, "tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(matches!(architecture, Architecture::BitNet | Architecture::Gemma3)),
            activation,
            sub_norms: matches!(architecture, Architecture::BitNet | Architecture::BitNet1bitLLM),
            quant_form,
            bitlinear_input_norm,
            bos_token_id: ids(field(json, "bos_token_id")).first().copied(),
            eos_token_ids: ids(field(json, "eos_token_id")),
            query_pre_attn_scalar: gemma.as_ref().map(|g| g.query_pre_attn_scalar),
            sliding: gemma.map(|g| g.sliding),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the shape relations the forward relies on, and that the numbers are sane.
    pub fn validate(&self, path: &Path) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::config(path, m));
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_layers == 0
        {
            return bad(
                "vocab_size, hidden_size, intermediate_size and num_hidden_layers must be positive".into()
            );
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be positive and even for RoPE", self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} must be a positive number", self.rope_theta));
        }
        if let Some(why) = eps_problem("rms_norm_eps", self.rms_norm_eps.into()) {
            return bad(why);
        }
        // YaRN's attention factor scales cos and sin, which the engine folds into the per-head
        // q/k norm gains: a model without them has nowhere to put it.
        let attention = self.rope_scaling.attention_factor();
        if !(attention.is_finite() && attention > 0.0) || (attention != 1.0 && !self.qk_norm()) {
            return bad(format!(
                "RoPE scaling with attention factor {attention} is supported only with per-head q/k norms (qwen3), \
                 not for {:?}",
                self.architecture
            ));
        }
        if let Some(s) = self.query_pre_attn_scalar.filter(|s| !(s.is_finite() && *s > 0.0)) {
            return bad(format!("query_pre_attn_scalar {s} must be a positive number"));
        }
        if let Some(s) = &self.sliding {
            if s.window == 0 || s.sliding_layers.len() != self.num_layers {
                return bad(format!(
                    "sliding window {} over {} of {} layers: the window must be positive and every layer \
                     typed",
                    s.window,
                    s.sliding_layers.len(),
                    self.num_layers
                ));
            }
            if !(s.rope_theta.is_finite() && s.rope_theta > 0.0) {
                return bad(format!(
                    "the sliding layers' RoPE base {} must be a positive number",
                    s.rope_theta
                ));
            }
            // The attention factor would be folded into the q/k norm gains of every layer, but
            // transformers scales only the global layers' cos and sin.
            if attention != 1.0 {
                return bad(format!(
                    "RoPE scaling with attention factor {attention} on the global layers of a model with \
                     sliding-window layers is not supported"
                ));
            }
        }
        if let Some(why) =
            self.bitlinear_input_norm.and_then(|e| eps_problem("quantization_config.rms_norm_eps", e.into()))
        {
            return bad(why);
        }
        // Guard against absurd sizes before anything is allocated from them, in arithmetic that
        // cannot overflow (heads × head_dim alone can pass 2^64: `q_dim` is only safe after this).
        let wide = |x: usize| x as u128;
        let q_dim = wide(self.num_heads).saturating_mul(wide(self.head_dim));
        let per_layer =
            wide(self.hidden_size).saturating_mul(wide(self.intermediate_size).saturating_add(q_dim));
        let params = wide(self.vocab_size)
            .saturating_mul(wide(self.hidden_size))
            .saturating_add(wide(self.num_layers).saturating_mul(per_layer));
        if params > (1u128 << 40) {
            let count = if params == u128::MAX { "more than 10^38".to_owned() } else { params.to_string() };
            return bad(format!("the shapes describe {count} parameters, beyond what this engine loads"));
        }
        Ok(())
    }

    /// Whether each head of q and of k goes through its own RMSNorm before RoPE (Qwen3, Gemma3).
    pub fn qk_norm(&self) -> bool {
        matches!(self.architecture, Architecture::Qwen3 | Architecture::Gemma3)
    }

    /// Gemma's layer: RMSNorm gains stored as `w` that multiply by `1 + w` (the loaders store
    /// `1 + w`), and the attention and MLP outputs each normed before their residual add
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`; the MLP's input norm is
    /// `pre_feedforward_layernorm`).
    pub fn gemma_norms(&self) -> bool {
        self.architecture == Architecture::Gemma3
    }

    /// What the embedding rows are multiplied by before the first layer: sqrt(hidden) as an f32
    /// for Gemma (transformers' f32 forward and llama.cpp; a bf16 transformers run would round
    /// it to bf16 first), none for the others.
    pub fn embedding_scale(&self) -> Option<f32> {
        self.gemma_norms().then(|| (self.hidden_size as f64).sqrt() as f32)
    }

    /// The factor on `q · k`: `query_pre_attn_scalar^-0.5` where the config gives one (Gemma3),
    /// else `head_dim^-0.5`.
    pub fn attention_scale(&self) -> f32 {
        match self.query_pre_attn_scalar {
            Some(s) => (s as f64).powf(-0.5) as f32,
            None => (self.head_dim as f32).powf(-0.5),
        }
    }

    /// The window of layer `layer` if it is a sliding-window layer.
    pub fn sliding_window(&self, layer: usize) -> Option<usize> {
        self.sliding.as_ref().filter(|s| s.sliding_layers.get(layer) == Some(&true)).map(|s| s.window)
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}
