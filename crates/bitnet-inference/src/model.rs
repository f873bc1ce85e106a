//! The BitNet b1.58 forward pass, one function per layer, over any [`Backend`].

use bitnet_models::weights::LinearWeight;
use bitnet_models::{ModelConfig, ModelError, ModelWeights, Projection};
use bitnet_quant::{DenseLinear, Int8Matrix};

use crate::backend::{AttentionShape, Backend};
use crate::governor::{DecodeGovernor, Mode};
use crate::InferenceError;

/// A BitLinear on the device, with its optional input RMSNorm (`use_rms_norm`).
pub struct Linear<B: Backend> {
    pub weight: B::Linear,
    pub input_norm: Option<B::Vector>,
    /// eps of `input_norm`.
    pub input_norm_eps: f32,
    pub rows: usize,
    pub cols: usize,
}

pub struct Layer<B: Backend> {
    input_norm: B::Vector,
    post_attention_norm: B::Vector,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    o_proj: Linear<B>,
    attn_sub_norm: Option<B::Vector>,
    gate_proj: Linear<B>,
    up_proj: Linear<B>,
    down_proj: Linear<B>,
    ffn_sub_norm: Option<B::Vector>,
}

/// Model weights living on a backend.
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    pub backend: B,
    embed_tokens: B::Dense,
    head: Head<B>,
    final_norm: B::Vector,
    layers: Vec<Layer<B>>,
    rope_inv_freq: B::Vector,
    /// Weight bytes one decoded token reads: every projection, the head, one embedding row.
    pub weight_bytes_per_token: usize,
    /// Chooses the threads of decode steps (`None` when `BITNET_DECODE_GOVERNOR=off`).
    governor: Option<DecodeGovernor>,
}

/// How the lm_head is stored for inference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeadFormat {
    /// As in the checkpoint (bf16/f16/f32): the logits transformers computes.
    #[default]
    Float,
    /// Int8 with one scale per row, activations int8 per token: half the bytes of bf16, the
    /// largest single read of a decoded token, at a small cost in logit accuracy.
    Int8,
    /// 6 bits per weight (values in [-31, 31]) with one scale per row: three quarters of the
    /// int8 head's bytes, at a larger cost in logit accuracy.
    Int6,
}

impl HeadFormat {
    /// Bits per weight of an integer head.
    fn int_bits(self) -> Option<u32> {
        match self {
            HeadFormat::Float => None,
            HeadFormat::Int8 => Some(8),
            HeadFormat::Int6 => Some(6),
        }
    }
}

enum Head<B: Backend> {
    /// `None`: tied to the embeddings.
    Float(Option<B::Dense>),
    /// Int8 or 6-bit weights, one scale per row.
    Integer(B::Int8Linear),
}

/// Which positions get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position of the call (what generation needs).
    Last,
    /// Every position of the call.
    All,
}

/// The activations of one forward call, sized for `max_batch` tokens.
struct Activations<B: Backend> {
    x: B::Buffer,       // residual stream [T, hidden]
    normed: B::Buffer,  // RMSNorm output [T, max(hidden, q_dim, inter)]
    scratch: B::Buffer, // BitLinear input norm output
    q: B::Buffer,       // [T, q_dim]
    k: B::Buffer,       // [T, kv_dim]
    v: B::Buffer,       // [T, kv_dim]
    attn: B::Buffer,    // [T, q_dim]
    proj: B::Buffer,    // BitLinear output [T, hidden]
    gate: B::Buffer,    // [T, inter]
    up: B::Buffer,      // [T, inter]
    /// Int8 inputs of the projections, one buffer per input width.
    quant_hidden: B::QuantBuffer, // q, k, v, gate, up
    quant_attn: B::QuantBuffer, // o
    quant_inter: B::QuantBuffer, // down
    logits: B::Buffer,  // [T, vocab]
}

/// One sequence being decoded: its KV cache, its activations and its position.
pub struct Session<B: Backend> {
    cache: B::KvCache,
    act: Activations<B>,
    max_batch: usize,
    max_tokens: usize,
    /// Tokens already in the cache.
    pub pos: usize,
    /// Logits of the last call, `[rows, vocab]` on the host.
    pub logits: Vec<f32>,
}

fn upload_projection<B: Backend>(
    backend: &B,
    p: Projection,
    input_norm_eps: f32,
) -> Result<Linear<B>, ModelError> {
    let (rows, cols) = (p.weight.rows(), p.weight.cols());
    let weight = match p.weight {
        LinearWeight::Ternary(t) => backend.upload_linear(t),
        // DENSE-TODO(lead): dense projections (a plain llama GGUF such as SmolLM2's Q4_1) need a
        // `Backend::dense_linear` op over `DenseLinear::forward_quantized`; until then they are
        // refused here rather than run wrong.
        LinearWeight::Dense(d) => {
            return Err(ModelError::Tensor {
                path: Default::default(),
                message: format!(
                    "a dense {} projection [{rows}, {cols}] cannot run on this backend yet (load with \
                     `ternarize` to run it ternarized)",
                    d.format()
                ),
            })
        }
    };
    Ok(Linear {
        weight,
        input_norm: p.input_norm.as_deref().map(|g| backend.upload_vector(g)),
        input_norm_eps,
        rows,
        cols,
    })
}

impl<B: Backend> Model<B> {
    /// Moves host weights onto the backend.
    pub fn new(mut weights: ModelWeights, backend: B, head_format: HeadFormat) -> Result<Self, ModelError> {
        let cfg = weights.config.clone();
        let head_bytes = match head_format.int_bits() {
            None => weights.lm_head().bytes(),
            // The weights and one f32 scale per row.
            Some(bits) => cfg.vocab_size * (cfg.hidden_size * bits as usize / 8 + 4),
        };
        let weight_bytes_per_token = head_bytes
            + weights.embed_tokens.bytes() / cfg.vocab_size.max(1)
            + weights
                .layers
                .iter()
                .flat_map(|l| {
                    [&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj]
                })
                .map(|p| p.weight.bytes())
                .sum::<usize>();
        let norm_eps = cfg.bitlinear_input_norm.unwrap_or(0.0);
        let up = |p| upload_projection(&backend, p, norm_eps);
        let vec_opt = |v: Option<Vec<f32>>| v.map(|v| backend.upload_vector(&v));
        // DENSE-TODO(lead): a head (or tied embedding table) in a GGUF block format (Q8_0, Q6_K…)
        // is widened to f32 here, as before; it should run as a `DenseLinear`.
        let head = match head_format.int_bits() {
            None => Head::Float(weights.lm_head.take().map(|m| backend.upload_dense(m.to_dense_matrix()))),
            Some(bits) => Head::Integer(backend.upload_int8(quantize_head(weights.lm_head(), bits))),
        };
        let mut layers = Vec::with_capacity(weights.layers.len());
        for l in weights.layers {
            layers.push(Layer {
                input_norm: backend.upload_vector(&l.input_norm),
                post_attention_norm: backend.upload_vector(&l.post_attention_norm),
                q_proj: up(l.q_proj)?,
                k_proj: up(l.k_proj)?,
                v_proj: up(l.v_proj)?,
                o_proj: up(l.o_proj)?,
                attn_sub_norm: vec_opt(l.attn_sub_norm),
                gate_proj: up(l.gate_proj)?,
                up_proj: up(l.up_proj)?,
                down_proj: up(l.down_proj)?,
                ffn_sub_norm: vec_opt(l.ffn_sub_norm),
            });
        }
        let rope_inv_freq =
            backend.upload_vector(&bitnet_core::ops::rope_inv_freq(cfg.rope_theta, cfg.head_dim));
        Ok(Self {
            head,
            // DENSE-TODO(lead): embeddings in a block format are widened to f32 here, as before;
            // the embedding op should decode only the rows it looks up
            // (`DenseLinear::dequantize_row`).
            embed_tokens: backend.upload_dense(weights.embed_tokens.to_dense_matrix()),
            final_norm: backend.upload_vector(&weights.final_norm),
            layers,
            rope_inv_freq,
            config: cfg,
            backend,
            weight_bytes_per_token,
            governor: DecodeGovernor::enabled().then(DecodeGovernor::default),
        })
    }

    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    /// A session that holds up to `max_tokens` tokens and runs up to `max_batch` at once.
    pub fn session(&self, max_tokens: usize, max_batch: usize) -> Session<B> {
        let c = &self.config;
        let max_batch = max_batch.clamp(1, max_tokens.max(1));
        let b = &self.backend;
        let wide = c.hidden_size.max(c.q_dim()).max(c.intermediate_size);
        let act = Activations {
            x: b.buffer(max_batch * c.hidden_size),
            normed: b.buffer(max_batch * wide),
            scratch: b.buffer(max_batch * wide),
            q: b.buffer(max_batch * c.q_dim()),
            k: b.buffer(max_batch * c.kv_dim()),
            v: b.buffer(max_batch * c.kv_dim()),
            attn: b.buffer(max_batch * c.q_dim()),
            proj: b.buffer(max_batch * c.hidden_size),
            gate: b.buffer(max_batch * c.intermediate_size),
            up: b.buffer(max_batch * c.intermediate_size),
            quant_hidden: b.quant_buffer(max_batch, c.hidden_size),
            quant_attn: b.quant_buffer(max_batch, c.q_dim()),
            quant_inter: b.quant_buffer(max_batch, c.intermediate_size),
            logits: b.buffer(max_batch * c.vocab_size),
        };
        Session {
            cache: b.kv_cache(c.num_layers, max_tokens, c.kv_dim()),
            act,
            max_batch,
            max_tokens,
            pos: 0,
            logits: Vec::with_capacity(max_batch * c.vocab_size),
        }
    }

    /// Runs `ids` through the model after the tokens already in `session`, appending them to its
    /// cache, and leaves the requested logits in `session.logits`. Long inputs run in chunks
    /// of the session's batch size.
    pub fn forward(
        &mut self,
        session: &mut Session<B>,
        ids: &[u32],
        logits: Logits,
    ) -> Result<(), InferenceError> {
        if ids.is_empty() {
            return Err(InferenceError::EmptyInput);
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(InferenceError::TokenOutOfRange { id: bad, vocab_size: self.config.vocab_size });
        }
        if session.pos + ids.len() > session.max_tokens {
            return Err(InferenceError::ContextFull {
                needed: session.pos + ids.len(),
                context: session.max_tokens,
            });
        }
        session.logits.clear();
        // One decoded token: the governor picks all threads or the calling one.
        let governed = ids.len() == 1 && rayon::current_num_threads() > 1 && self.governor.is_some();
        let started = std::time::Instant::now();
        let solo = governed && self.governor.as_ref().is_some_and(|g| g.mode() == Mode::Solo);
        let cap = solo.then(bitnet_core::threads::SoloGuard::new);
        let n_chunks = ids.len().div_ceil(session.max_batch);
        for (ci, chunk) in ids.chunks(session.max_batch).enumerate() {
            self.forward_chunk(session, chunk);
            let last = ci + 1 == n_chunks;
            match logits {
                Logits::All => self.logits(session, 0, chunk.len()),
                Logits::Last if last => self.logits(session, chunk.len() - 1, 1),
                Logits::Last => {}
            }
            session.pos += chunk.len();
        }
        drop(cap);
        if governed {
            if let Some(g) = &mut self.governor {
                g.record(started.elapsed());
            }
        }
        Ok(())
    }

    /// Final norm and lm_head for rows `first..first+count` of the chunk just run.
    fn logits(&mut self, s: &mut Session<B>, first: usize, count: usize) {
        let c = &self.config;
        let (h, vocab) = (c.hidden_size, c.vocab_size);
        let b = &mut self.backend;
        let a = &mut s.act;
        b.rmsnorm(&a.x, Some(&self.final_norm), first + count, h, c.rms_norm_eps, &mut a.normed);
        match &self.head {
            Head::Float(head) => {
                b.lm_head(head.as_ref().unwrap_or(&self.embed_tokens), &a.normed, first, count, &mut a.logits)
            }
            Head::Integer(head) => {
                b.quantize(&a.normed, first, count, h, &mut a.quant_hidden);
                b.int8_linear(head, &a.quant_hidden, &mut a.logits);
            }
        }
        let start = s.logits.len();
        s.logits.resize(start + count * vocab, 0.0);
        b.read(&a.logits, 0, &mut s.logits[start..]);
    }

    /// All layers for one chunk of at most `max_batch` tokens.
    fn forward_chunk(&mut self, s: &mut Session<B>, ids: &[u32]) {
        let rows = ids.len();
        self.backend.embedding(&self.embed_tokens, ids, &mut s.act.x);
        for l in 0..self.layers.len() {
            self.attention_block(s, l, rows);
            self.mlp_block(s, l, rows);
        }
    }

    /// `x += o_proj(attn_sub_norm(Attention(RoPE(q), RoPE(k), v)))` on `RMSNorm_in(x)`.
    fn attention_block(&mut self, s: &mut Session<B>, l: usize, rows: usize) {
        let c = &self.config;
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        let layer = &self.layers[l];
        let b = &mut self.backend;
        let a = &mut s.act;
        // q, k and v read the same input: normed and quantized once, in one pass, unless each
        // projection has its own norm (1bitLLM).
        let shared = layer.q_proj.input_norm.is_none();
        if shared {
            b.norm_quantize(&a.x, Some(&layer.input_norm), rows, h, eps, &mut a.quant_hidden);
            let qkv = [&layer.q_proj.weight, &layer.k_proj.weight, &layer.v_proj.weight];
            b.bitlinear_many(qkv, &a.quant_hidden, [&mut a.q, &mut a.k, &mut a.v]);
        } else {
            b.rmsnorm(&a.x, Some(&layer.input_norm), rows, h, eps, &mut a.normed);
            for (proj, out) in
                [(&layer.q_proj, &mut a.q), (&layer.k_proj, &mut a.k), (&layer.v_proj, &mut a.v)]
            {
                quantize_for(b, proj, &a.normed, rows, &mut a.scratch, &mut a.quant_hidden);
                b.bitlinear(&proj.weight, &a.quant_hidden, out);
            }
        }

        b.rope(&mut a.q, &self.rope_inv_freq, rows, s.pos, c.num_heads, c.head_dim);
        b.rope_kv_store(&mut s.cache, l, s.pos, rows, &a.k, &a.v, &self.rope_inv_freq, c.head_dim);
        let shape = AttentionShape {
            rows,
            pos0: s.pos,
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        b.attention(&a.q, &s.cache, l, shape, &mut a.attn);

        match (&layer.attn_sub_norm, layer.o_proj.input_norm.is_some()) {
            (Some(g), false) => b.norm_quantize(&a.attn, Some(g), rows, c.q_dim(), eps, &mut a.quant_attn),
            (Some(g), true) => {
                b.rmsnorm(&a.attn, Some(g), rows, c.q_dim(), eps, &mut a.normed);
                quantize_for(b, &layer.o_proj, &a.normed, rows, &mut a.scratch, &mut a.quant_attn);
            }
            (None, _) => quantize_for(b, &layer.o_proj, &a.attn, rows, &mut a.scratch, &mut a.quant_attn),
        }
        b.bitlinear(&layer.o_proj.weight, &a.quant_attn, &mut a.proj);
        b.add(&mut a.x, &a.proj, rows * h);
    }

    /// `x += down(ffn_sub_norm(act(gate(n)) · up(n)))` with `n = RMSNorm_post(x)`.
    fn mlp_block(&mut self, s: &mut Session<B>, l: usize, rows: usize) {
        let c = &self.config;
        let (h, i, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
        let layer = &self.layers[l];
        let b = &mut self.backend;
        let a = &mut s.act;
        let shared = layer.gate_proj.input_norm.is_none();
        if shared {
            b.norm_quantize(&a.x, Some(&layer.post_attention_norm), rows, h, eps, &mut a.quant_hidden);
            let gate_up = [&layer.gate_proj.weight, &layer.up_proj.weight];
            b.bitlinear_many(gate_up, &a.quant_hidden, [&mut a.gate, &mut a.up]);
        } else {
            b.rmsnorm(&a.x, Some(&layer.post_attention_norm), rows, h, eps, &mut a.normed);
            for (proj, out) in [(&layer.gate_proj, &mut a.gate), (&layer.up_proj, &mut a.up)] {
                quantize_for(b, proj, &a.normed, rows, &mut a.scratch, &mut a.quant_hidden);
                b.bitlinear(&proj.weight, &a.quant_hidden, out);
            }
        }
        if layer.down_proj.input_norm.is_none() {
            // Gate, sub-norm and quantization in one pass over each row.
            let sub_norm = layer.ffn_sub_norm.as_ref();
            b.gate_quantize(c.activation, &a.gate, &a.up, sub_norm, rows, i, eps, &mut a.quant_inter);
        } else {
            // The gated product overwrites the norm output, which is no longer needed.
            b.gate(c.activation, &a.gate, &a.up, rows * i, &mut a.normed);
            let down_in = match &layer.ffn_sub_norm {
                Some(g) => {
                    b.rmsnorm(&a.normed, Some(g), rows, i, eps, &mut a.gate);
                    &a.gate
                }
                None => &a.normed,
            };
            quantize_for(b, &layer.down_proj, down_in, rows, &mut a.scratch, &mut a.quant_inter);
        }
        b.bitlinear(&layer.down_proj.weight, &a.quant_inter, &mut a.proj);
        b.add(&mut a.x, &a.proj, rows * h);
    }
}

/// Per-row symmetric quantization of the (float) head to `bits` (8 or 6), a block of rows at
/// a time so that the float copy never exists whole.
fn quantize_head(m: &DenseLinear, bits: u32) -> Int8Matrix {
    let max_q = ((1 << (bits - 1)) - 1) as f32;
    use rayon::prelude::*;
    const BLOCK: usize = 1024;
    let (rows, cols) = (m.rows(), m.cols());
    let mut q = vec![0i8; rows * cols];
    let mut scales = vec![0f32; rows];
    q.par_chunks_mut(BLOCK * cols).zip(scales.par_chunks_mut(BLOCK)).enumerate().for_each(|(b, (qb, sb))| {
        let mut row = vec![0f32; cols];
        for (i, (qr, s)) in qb.chunks_exact_mut(cols).zip(sb.iter_mut()).enumerate() {
            // In range by construction: rows `b·BLOCK + i` of `rows`.
            let _ = m.dequantize_row(b * BLOCK + i, &mut row);
            let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
            *s = if amax > 0.0 { amax / max_q } else { 1.0 };
            for (o, &v) in qr.iter_mut().zip(&row) {
                // Adding and removing 1.5·2²³ rounds half to even in f32 for |x| ≤ 2²²
                // (here |x| ≤ 127), without a libm call per weight on CPUs without SSE4.1.
                const MAGIC: f32 = 12_582_912.0;
                let r = std::hint::black_box((v / *s).clamp(-max_q, max_q) + MAGIC) - MAGIC;
                *o = r as i8;
            }
        }
    });
    let head = match bits {
        8 => Int8Matrix::from_int8(&q, &scales, rows, cols),
        _ => Int8Matrix::from_int6(&q, &scales, rows, cols),
    };
    head.expect("shapes and ranges agree by construction")
}

/// Quantizes a BitLinear's input, through its own RMSNorm first when the checkpoint has one.
fn quantize_for<B: Backend>(
    b: &mut B,
    lin: &Linear<B>,
    x: &B::Buffer,
    rows: usize,
    scratch: &mut B::Buffer,
    out: &mut B::QuantBuffer,
) {
    match &lin.input_norm {
        Some(g) => {
            b.rmsnorm(x, Some(g), rows, lin.cols, lin.input_norm_eps, scratch);
            b.quantize(scratch, 0, rows, lin.cols, out);
        }
        None => b.quantize(x, 0, rows, lin.cols, out),
    }
}

impl<B: Backend> Session<B> {
    /// Forgets every token, keeping the allocations.
    pub fn reset(&mut self) {
        self.pos = 0;
        self.logits.clear();
    }
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }
}
