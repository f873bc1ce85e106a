//! Export to a Hugging Face checkpoint in the packed 2B-4T form, and loading it back.
//!
//! `config.json` carries `quantization_config = {"quant_method": "bitnet", "linear_class":
//! "autobitlinear", "quantization_mode": "offline"}`; `model.safetensors` holds every projection
//! as U8 `[out/4, in]` (bitnet_quant::hf_pack) with a BF16 `weight_scale` `[1]` = `mean|W|` (a
//! multiplier), and the embedding and norms in BF16; the head is tied (no `lm_head.weight`).
//! A full-precision model (`--fp`) is written with BF16 projections and no quantization_config.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use bitnet_models::temp_file::TempFile;
use bitnet_models::{Activation, Architecture, ModelConfig, QuantForm};
use bitnet_quant::hf_pack::{pack_hf, unpack_hf};
use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use crate::data::{BOS_ID, EOS_ID};
use crate::layers::bitlinear::{Precision, WeightGroup};
use crate::model::{Model, Params, Prepared, PreparedLayer, Tensor};

/// The `config.json` of a model.
pub fn config_json(c: &ModelConfig, precision: Precision) -> Value {
    let (model_type, arch, act) = match c.architecture {
        Architecture::Llama158 => ("llama", "LlamaForCausalLM", "silu"),
        _ => {
            ("bitnet", "BitNetForCausalLM", if c.activation == Activation::Relu2 { "relu2" } else { "silu" })
        }
    };
    let mut v = json!({
        "architectures": [arch],
        "model_type": model_type,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "dtype": "bfloat16",
        "hidden_act": act,
        "hidden_size": c.hidden_size,
        "head_dim": c.head_dim,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "num_attention_heads": c.num_heads,
        "num_hidden_layers": c.num_layers,
        "num_key_value_heads": c.num_kv_heads,
        "pad_token_id": null,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings,
        "use_cache": true,
        "vocab_size": c.vocab_size,
    });
    if precision == Precision::Ternary {
        v["quantization_config"] = json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"});
    }
    if c.architecture == Architecture::Llama158 {
        v["mlp_bias"] = json!(false);
    }
    v
}

fn bf16_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect()
}

/// Whether a tensor name is a quantized projection.
fn is_projection(name: &str) -> bool {
    name.ends_with("_proj.weight")
}

/// Writes `config.json`, `generation_config.json` and `model.safetensors` into `dir`
/// (each through a temporary file and a rename). The tokenizer is copied by the caller.
pub fn export_hf(model: &Model<f32>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut blobs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in &model.params.tensors {
        if is_projection(&t.name) && model.precision == Precision::Ternary {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let (codes, mean) = bitnet_quant::absmean_ternary(&t.data);
            let packed = pack_hf(&codes, rows, cols).map_err(|e| anyhow::anyhow!("{}: {e}", t.name))?;
            blobs.push((t.name.clone(), Dtype::U8, vec![rows / 4, cols], packed));
            let scale_name = format!("{}_scale", t.name);
            blobs.push((scale_name, Dtype::BF16, vec![1], bf16_bytes(&[mean])));
        } else {
            blobs.push((t.name.clone(), Dtype::BF16, t.shape.clone(), bf16_bytes(&t.data)));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = blobs
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta))?;
    write_atomic(&dir.join("model.safetensors"), &bytes)?;
    let cfg = config_json(&model.config, model.precision);
    write_atomic(&dir.join("config.json"), (serde_json::to_string_pretty(&cfg)? + "\n").as_bytes())?;
    let gen = json!({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": true,
                     "temperature": 0.8, "top_k": 40});
    write_atomic(
        &dir.join("generation_config.json"),
        (serde_json::to_string_pretty(&gen)? + "\n").as_bytes(),
    )?;
    Ok(())
}

/// Writes `bytes` to `path` through `path.tmp` and a rename, so a reader never sees half a file;
/// on failure (a full disk, say) the temporary file is removed and the error names it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp_path = bitnet_models::temp_file::beside(path);
    let (tmp, mut f) = TempFile::create(tmp_path.clone(), |p| std::fs::File::create(p))
        .with_context(|| format!("creating {}", tmp_path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp_path.display()))?;
    drop(f);
    tmp.persist(path).with_context(|| format!("renaming {} to {}", tmp_path.display(), path.display()))?;
    Ok(())
}

fn to_f32(view: &TensorView<'_>, name: &str) -> Result<Vec<f32>> {
    let d = view.data();
    Ok(match view.dtype() {
        Dtype::BF16 => d.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => d.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        other => bail!("tensor {name} has dtype {other:?}, expected a float"),
    })
}

/// Loads an exported (or any HF BitNet safetensors) checkpoint for evaluation: the float
/// tensors become parameters and the packed projections become the prepared ternary weights.
pub fn load_hf(dir: &Path) -> Result<(Model<f32>, Prepared<f32>)> {
    let config = ModelConfig::from_dir(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The trainer's layer has no per-head q/k norms (nor Gemma's output norms, GeGLU or
    // sliding windows): a Qwen3 or Gemma3 checkpoint would lose them.
    if matches!(config.architecture, Architecture::Qwen3 | Architecture::Gemma3) {
        bail!(
            "{}: training and evaluation take the bitnet and llama layouts, not {:?}",
            dir.display(),
            config.architecture
        );
    }
    // Nor does it scale RoPE.
    if config.rope_scaling != bitnet_models::RopeScaling::None {
        bail!("{}: training and evaluation run plain RoPE, not {:?}", dir.display(), config.rope_scaling);
    }
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let full_precision = raw.get("quantization_config").is_none();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("parsing {}", path.display()))?;
    let layout = crate::model::Layout::new(&config);
    let mut tensors = Vec::new();
    for (name, shape) in &layout.entries {
        let n: usize = shape.iter().product();
        let data = if is_projection(name) {
            vec![0.0; n] // latent weights are not in a packed checkpoint; the prepared ones are
        } else {
            let v = st.tensor(name).with_context(|| format!("{} has no tensor {name}", path.display()))?;
            let d = to_f32(&v, name)?;
            if d.len() != n {
                bail!("tensor {name} has {} values, expected shape {shape:?}", d.len());
            }
            d
        };
        tensors.push(Tensor { name: name.clone(), shape: shape.clone(), data });
    }
    let precision = if full_precision { Precision::Full } else { Precision::Ternary };
    let projection = |name: &str, rows: usize, cols: usize| -> Result<(Vec<f32>, f32)> {
        let v = st.tensor(name).with_context(|| format!("{} has no tensor {name}", path.display()))?;
        if full_precision || config.quant_form == QuantForm::Online {
            let w = to_f32(&v, name)?;
            if full_precision {
                return Ok((w, 1.0));
            }
            let (codes, mean) = bitnet_quant::absmean_ternary(&w);
            return Ok((codes.iter().map(|&c| c as f32).collect(), mean));
        }
        if v.dtype() != Dtype::U8 {
            bail!("projection {name} is {:?}, expected packed U8", v.dtype());
        }
        let codes = unpack_hf(v.data(), rows, cols).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let s = to_f32(&st.tensor(&format!("{name}_scale"))?, name)?;
        let scale = match config.quant_form {
            QuantForm::PackedDivide => 1.0 / s[0],
            _ => s[0],
        };
        Ok((codes.iter().map(|&c| c as f32).collect(), scale))
    };
    let (h, i, q, kv) = (config.hidden_size, config.intermediate_size, config.q_dim(), config.kv_dim());
    let mut layers = Vec::new();
    for l in 0..config.num_layers {
        let p = format!("model.layers.{l}.");
        let group = |names: &[(&str, usize)], cols: usize| -> Result<WeightGroup<f32>> {
            let mut codes = Vec::new();
            let mut scales = Vec::new();
            for (n, rows) in names {
                let (c, s) = projection(&format!("{p}{n}.weight"), *rows, cols)?;
                codes.extend(c);
                scales.push(s);
            }
            let sizes: Vec<usize> = names.iter().map(|x| x.1).collect();
            Ok(WeightGroup::from_codes(codes, scales, &sizes, cols))
        };
        layers.push(PreparedLayer {
            qkv: group(&[("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)], h)?,
            o: group(&[("self_attn.o_proj", h)], q)?,
            gate_up: group(&[("mlp.gate_proj", i), ("mlp.up_proj", i)], h)?,
            down: group(&[("mlp.down_proj", h)], i)?,
        });
    }
    let model = Model::from_params(config, precision, Params { tensors });
    Ok((model, Prepared { layers }))
}
