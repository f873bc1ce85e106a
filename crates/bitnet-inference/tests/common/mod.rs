//! Golden fixtures made by transformers (tools/make_hf_fixture.py) and helpers to compare with them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bitnet_inference::load::{load_dir, load_dir_on, LoadOptions, LoadedModel};
use bitnet_inference::{Backend, Context, ContextOptions, CpuBackend, Sequence};
use bitnet_inference::{Logits, Model};
use bitnet_models::safetensors::{Bytes, TensorStore};
use bitnet_models::synth::SynthShape;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// One golden safetensors file: f32 tensors widened, i64 tensors as ids.
pub struct Golden {
    pub floats: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub ids: HashMap<String, Vec<i64>>,
}

impl Golden {
    pub fn open(path: &Path) -> Golden {
        let store = TensorStore::from_files(vec![(path.to_path_buf(), Bytes::map(path).unwrap())]).unwrap();
        let mut g = Golden { floats: HashMap::new(), ids: HashMap::new() };
        for name in store.names() {
            let t = store.get(name).unwrap();
            if t.dtype == safetensors::Dtype::I64 {
                let v = t.data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
                g.ids.insert(name.to_string(), v);
            } else {
                g.floats.insert(name.to_string(), (t.shape.to_vec(), t.to_f32().unwrap()));
            }
        }
        g
    }

    pub fn f(&self, name: &str) -> &[f32] {
        &self.floats.get(name).unwrap_or_else(|| panic!("golden tensor {name} missing")).1
    }

    pub fn u32s(&self, name: &str) -> Vec<u32> {
        self.ids[name].iter().map(|&x| x as u32).collect()
    }
}

pub fn load(dir: &Path) -> LoadedModel {
    load_dir(dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

/// Loads `dir` onto the backend `make` builds.
pub fn load_on<B: Backend>(dir: &Path, make: &impl Fn() -> B) -> LoadedModel<B> {
    load_dir_on(dir, &make(), LoadOptions::default())
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

/// A context for one sequence of up to `tokens` tokens, batches of up to `max_batch` rows.
pub fn context(model: &Model<CpuBackend>, tokens: usize, max_batch: usize) -> Context<CpuBackend> {
    context_on(model, &CpuBackend::new, tokens, max_batch)
}

/// [`context`] on the backend `make` builds.
pub fn context_on<B: Backend>(
    model: &Model<B>,
    make: &impl Fn() -> B,
    tokens: usize,
    max_batch: usize,
) -> Context<B> {
    let opts = ContextOptions { max_batch, max_seq_tokens: Some(tokens), ..ContextOptions::new(tokens) };
    Context::new(model, make(), &opts).unwrap()
}

/// Logits of every position of `ids`, from one prefill.
pub fn prefill_logits(model: &Model<CpuBackend>, ids: &[u32]) -> Vec<f32> {
    prefill_logits_on(model, &CpuBackend::new, ids)
}

/// [`prefill_logits`] on the backend `make` builds.
pub fn prefill_logits_on<B: Backend>(model: &Model<B>, make: &impl Fn() -> B, ids: &[u32]) -> Vec<f32> {
    let mut ctx = context_on(model, make, ids.len(), 512);
    model.forward(&mut ctx, &mut Sequence::new(), ids, Logits::All).unwrap();
    ctx.logits().to_vec()
}

/// Greedy decoding with the KV cache; returns the new ids and the logits of every step.
pub fn greedy_with_cache(model: &Model<CpuBackend>, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    greedy_with_cache_on(model, &CpuBackend::new, prompt, n)
}

/// [`greedy_with_cache`] on the backend `make` builds.
pub fn greedy_with_cache_on<B: Backend>(
    model: &Model<B>,
    make: &impl Fn() -> B,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let vocab = model.config.vocab_size;
    let mut ctx = context_on(model, make, prompt.len() + n, 512);
    let mut seq = Sequence::new();
    model.forward(&mut ctx, &mut seq, prompt, Logits::Last).unwrap();
    let (mut out, mut steps) = (Vec::new(), Vec::new());
    for i in 0..n {
        let l = ctx.logits()[..vocab].to_vec();
        let next = bitnet_inference::sampling::argmax(&l);
        steps.push(l);
        out.push(next);
        if i + 1 < n {
            model.forward(&mut ctx, &mut seq, &[next], Logits::Last).unwrap();
        }
    }
    (out, steps)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Indices of the `k` largest values, best first.
pub fn top_k(x: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub mod parity;

/// The factor by which [`rescale_blocks`] multiplies the scale of block `b` of a tensor (the
/// file stores the product rounded to f16, like any TQ scale).
pub fn block_factor(b: usize) -> f32 {
    [1.0, 1.25, 0.75, 2.0, 0.5][b % 5]
}

/// Copies `src` to `dst`, multiplying the scale of block `b` of every group-scaled ternary
/// tensor (TQ1_0, TQ2_0, Q1_0, Q2_0, PQ2_0, PTQ1_0) by [`block_factor`]`(b)`; codes and every
/// other byte stay as they are.
pub fn rescale_blocks(src: &Path, dst: &Path) {
    rewrite_ternary(src, dst, |_codes, scales| {
        for (b, s) in scales.iter_mut().enumerate() {
            *s *= block_factor(b);
        }
    })
}

/// Copies `src` to `dst` with the codes and scales of every group-scaled ternary tensor passed
/// through `edit` (the tensor keeps its type); every other tensor as it is.
pub fn rewrite_ternary(src: &Path, dst: &Path, mut edit: impl FnMut(&mut Vec<i8>, &mut Vec<f32>)) {
    use bitnet_models::gguf::{GgufFile, GgufWriter, TensorSpec};
    use bitnet_quant::formats;
    let file = GgufFile::open(src).unwrap();
    let specs: Vec<TensorSpec> =
        file.tensors().iter().map(|t| TensorSpec::new(t.name(), t.ggml_type(), t.shape())).collect();
    let mut md = file.metadata().clone();
    md.remove("general.alignment");
    let mut w = GgufWriter::create(dst, &md, specs.clone()).unwrap();
    for spec in &specs {
        match spec.ggml_type.ternary_group() {
            Some(_) => {
                let mut t = file.ternary_codes(&spec.name).unwrap();
                edit(&mut t.codes, &mut t.scales);
                let bytes = formats::pack_ternary(spec.ggml_type, &t.codes, &t.scales).unwrap();
                w.write_tensor(&spec.name, &bytes).unwrap();
            }
            None => w.write_tensor(&spec.name, file.tensor_data(&spec.name).unwrap()).unwrap(),
        }
    }
    w.finish().unwrap();
}

/// A small synthetic model 256 wide, so that the TQ types (rows of 256) can carry it.
pub fn w256_shape(llama: bool) -> SynthShape {
    SynthShape {
        name: "w256",
        vocab_size: 300,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        llama,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
    }
}
