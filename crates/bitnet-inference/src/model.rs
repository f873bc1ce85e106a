//! The BitNet b1.58 forward pass, one function per layer, over any [`Backend`].
//!
//! A [`Model`] holds only weights: it is immutable and shared (`Arc<Model<B>>` is `Sync`). The
//! work of a forward call happens in a [`Context`] (activations, KV store, threads) on a batch of
//! [`Segment`]s, each some tokens of one [`Sequence`]: decode steps of many sequences and
//! prefill chunks in one call. Projections, norms, quantization and the gate run over all rows
//! of the batch at once, so every weight is read once per step for all sequences; RoPE, the KV
//! store and attention follow each row's sequence.

use bitnet_models::weights::LinearWeight;
use bitnet_models::{ModelConfig, ModelWeights, Projection};
use bitnet_quant::{DenseLinear, Int8Matrix};

use crate::backend::{Backend, BackendError, HeadShape};
use crate::context::{Context, Segment};
use crate::InferenceError;

/// A projection's weights on the device: ternary (a BitLinear), or dense in their stored format
/// (a checkpoint that is not ternary: llama.cpp's Q4/Q8/K-quants, f16).
pub enum Weight<B: Backend> {
    Ternary(B::Linear),
    Dense(B::DenseLinear),
}

impl<B: Backend> Weight<B> {
    fn ternary(&self) -> Option<&B::Linear> {
        match self {
            Weight::Ternary(w) => Some(w),
            Weight::Dense(_) => None,
        }
    }
}

/// A projection on the device, with its optional input RMSNorm (`use_rms_norm`).
pub struct Linear<B: Backend> {
    pub weight: Weight<B>,
    pub input_norm: Option<B::Vector>,
    /// eps of `input_norm`.
    pub input_norm_eps: f32,
    pub rows: usize,
    pub cols: usize,
}

pub struct Layer<B: Backend> {
    input_norm: B::Vector,
    /// The MLP's input norm (Gemma's `pre_feedforward_layernorm`).
    post_attention_norm: B::Vector,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    o_proj: Linear<B>,
    /// Per-head RMSNorm gains of q and k (Qwen3), applied before RoPE.
    q_norm: Option<B::Vector>,
    k_norm: Option<B::Vector>,
    attn_sub_norm: Option<B::Vector>,
    gate_proj: Linear<B>,
    up_proj: Linear<B>,
    down_proj: Linear<B>,
    ffn_sub_norm: Option<B::Vector>,
    /// Gemma's norms of the attention and MLP outputs, before their residual adds.
    attn_output_norm: Option<B::Vector>,
    mlp_output_norm: Option<B::Vector>,
}

/// Model weights living on a backend. Immutable once built: share it through `Arc`.
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    embed_tokens: Embedding<B>,
    head: Head<B>,
    final_norm: B::Vector,
    layers: Vec<Layer<B>>,
    rope_inv_freq: B::Vector,
    /// The sliding-window layers' own RoPE frequencies (Gemma3's `rope_local_base_freq`).
    rope_local_inv_freq: Option<B::Vector>,
    /// Weight bytes one decoded token reads: every projection, the head, one embedding row.
    pub weight_bytes_per_token: usize,
    backend_name: String,
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

/// The embedding table: a float matrix (shared with a tied float head), or a table kept as
/// stored whose rows are decoded on lookup (a block format, or any table the head does not
/// read).
enum Embedding<B: Backend> {
    Float(B::Dense),
    Block(B::DenseLinear),
}

enum Head<B: Backend> {
    /// A float head; `None`: tied to a float embedding table.
    Float(Option<B::Dense>),
    /// A head in a GGUF block format, run in it as llama.cpp does; `None`: tied to a block-format
    /// embedding table.
    Block(Option<B::DenseLinear>),
    /// Int8 or 6-bit weights, one scale per row.
    Integer(B::Int8Linear),
    /// A head (or tied table) stored in a group-scaled ternary format, on the ternary kernels.
    Ternary(B::Linear),
}

/// Which rows of a segment get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk before the last).
    None,
    /// Only the last row (what generation needs).
    Last,
    /// Every row.
    All,
    /// Only the last row's greedy choice ([`crate::sampling::argmax`]), for a sequence decoded
    /// greedily without penalties or log-probabilities: the logits stay where the backend
    /// computed them and only the id crosses to the host ([`Context::greedy_of`]). In a call
    /// that appends logits (a prompt run in chunks) it is [`Logits::Last`].
    Greedy,
}

impl Logits {
    /// Rows of a segment of `rows` that get logits.
    pub(crate) fn rows(self, rows: usize) -> std::ops::Range<usize> {
        match self {
            Logits::None => rows..rows,
            Logits::Last | Logits::Greedy => rows.saturating_sub(1)..rows,
            Logits::All => 0..rows,
        }
    }
}

fn upload_projection<B: Backend>(
    backend: &B,
    p: Projection,
    input_norm_eps: f32,
) -> Result<Linear<B>, BackendError> {
    let (rows, cols) = (p.weight.rows(), p.weight.cols());
    let weight = match p.weight {
        LinearWeight::Ternary(t) => Weight::Ternary(backend.upload_linear(t)?),
        LinearWeight::Dense(d) => Weight::Dense(backend.upload_dense_linear(d)?),
    };
    Ok(Linear {
        weight,
        input_norm: p.input_norm.as_deref().map(|g| backend.upload_vector(g)).transpose()?,
        input_norm_eps,
        rows,
        cols,
    })
}

impl<B: Backend> Model<B> {
    /// Moves host weights onto `backend`, which packs them in its own layout.
    pub fn new(
        mut weights: ModelWeights,
        backend: &B,
        head_format: HeadFormat,
    ) -> Result<Self, BackendError> {
        let cfg = weights.config.clone();
        let ternary_head = weights.ternary_head.take();
        let head_bytes = match (head_format.int_bits(), &ternary_head) {
            (None, Some(t)) => t.bytes(),
            (None, None) => weights.lm_head().bytes(),
            // The weights and one f32 scale per row.
            (Some(bits), _) => cfg.vocab_size * (cfg.hidden_size * bits as usize / 8 + 4),
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
        let up = |p| upload_projection(backend, p, norm_eps);
        let vec_opt = |v: Option<Vec<f32>>| v.map(|v| backend.upload_vector(&v)).transpose();
        // YaRN multiplies RoPE's cos and sin by an attention factor; RoPE is linear, so the
        // factor can scale q and k before it instead: folded into their per-head norm gains
        // (`ModelConfig::validate` refuses it for a model without them).
        let attention = cfg.rope_scaling.attention_factor();
        let rope_attention = |gain: Vec<f32>| gain.into_iter().map(|g| g * attention).collect::<Vec<f32>>();
        // Float tables keep their dtype and run the float kernels transformers' numerics were
        // matched with; block formats run as they are stored, a ternary head as its codes and
        // scales. The loader left the embedding
        // table and an untied head in the checkpoint's mapping: a matrix the head reads every
        // token gets a copy of its own here (the mapping's pages released as the copy grows),
        // while a table that only serves lookups (beside an integer or untied head) stays as
        // it is, and only the rows looked up are ever read in.
        let table = weights.embed_tokens;
        let (head, embed_tokens) = match (head_format.int_bits(), weights.lm_head.take(), ternary_head) {
            (Some(bits), head, _) => {
                let q = quantize_head(head.as_ref().unwrap_or(&table), bits);
                (Head::Integer(backend.upload_int8(q)?), lookup_table(backend, table)?)
            }
            // A ternary head runs as stored (its codes and scales), not widened.
            (None, _, Some(t)) => (Head::Ternary(backend.upload_linear(t)?), lookup_table(backend, table)?),
            (None, Some(h), None) if h.format().is_float() => {
                let head = Head::Float(Some(backend.upload_dense(h.into_dense_matrix())?));
                (head, lookup_table(backend, table)?)
            }
            (None, Some(h), None) => {
                let head = Head::Block(Some(backend.upload_dense_linear(h)?));
                (head, lookup_table(backend, table)?)
            }
            (None, None, None) if table.format().is_float() => {
                (Head::Float(None), Embedding::Float(backend.upload_dense(table.into_dense_matrix())?))
            }
            (None, None, None) => (Head::Block(None), Embedding::Block(backend.upload_dense_linear(table)?)),
        };
        let mut layers = Vec::with_capacity(weights.layers.len());
        for l in weights.layers {
            layers.push(Layer {
                input_norm: backend.upload_vector(&l.input_norm)?,
                post_attention_norm: backend.upload_vector(&l.post_attention_norm)?,
                q_proj: up(l.q_proj)?,
                k_proj: up(l.k_proj)?,
                v_proj: up(l.v_proj)?,
                o_proj: up(l.o_proj)?,
                q_norm: vec_opt(l.q_norm.map(rope_attention))?,
                k_norm: vec_opt(l.k_norm.map(rope_attention))?,
                attn_sub_norm: vec_opt(l.attn_sub_norm)?,
                gate_proj: up(l.gate_proj)?,
                up_proj: up(l.up_proj)?,
                down_proj: up(l.down_proj)?,
                ffn_sub_norm: vec_opt(l.ffn_sub_norm)?,
                attn_output_norm: vec_opt(l.attn_output_norm)?,
                mlp_output_norm: vec_opt(l.mlp_output_norm)?,
            });
        }
        let rope_inv_freq =
            backend.upload_vector(&cfg.rope_scaling.inv_freq(cfg.rope_theta, cfg.head_dim))?;
        let rope_local_inv_freq = cfg
            .sliding
            .as_ref()
            .map(|s| backend.upload_vector(&bitnet_core::ops::rope_inv_freq(s.rope_theta, cfg.head_dim)))
            .transpose()?;
        Ok(Self {
            head,
            embed_tokens,
            final_norm: backend.upload_vector(&weights.final_norm)?,
            layers,
            rope_inv_freq,
            rope_local_inv_freq,
            config: cfg,
            weight_bytes_per_token,
            backend_name: backend.name(),
        })
    }

    /// The backend the weights were uploaded to, as it named itself.
    pub fn backend_name(&self) -> &str {
        &self.backend_name
    }

    /// Runs `ids` through the model after the tokens already in `seq`, appending them to its
    /// cache. Afterwards [`Context::logits`] holds the requested rows. Long inputs run in chunks
    /// of the context's batch size.
    pub fn forward(
        &self,
        ctx: &mut Context<B>,
        seq: &mut crate::Sequence,
        ids: &[u32],
        logits: Logits,
    ) -> Result<(), InferenceError> {
        if ids.is_empty() {
            return Err(InferenceError::EmptyInput);
        }
        ctx.check_fits(seq, ids.len())?;
        let n_chunks = ids.len().div_ceil(ctx.max_batch());
        for (ci, chunk) in ids.chunks(ctx.max_batch()).enumerate() {
            let last = ci + 1 == n_chunks;
            let want = match logits {
                Logits::Last | Logits::Greedy if !last => Logits::None,
                other => other,
            };
            let mut batch = [Segment { seq: &mut *seq, tokens: chunk, logits: want }];
            self.forward_segments(ctx, &mut batch, ci > 0)?;
        }
        Ok(())
    }

    /// The embedding of `ids` as BitNet-embedding models define it: the final-normed hidden
    /// state of the last token (last-token pooling; the tokenizer appends the end-of-text token
    /// these models pool), L2-normalized. `ids` run as one sequence of their own in `ctx`, whose
    /// blocks are given back afterwards; no logits are computed.
    pub fn embed(&self, ctx: &mut Context<B>, ids: &[u32]) -> Result<Vec<f32>, InferenceError> {
        if ids.is_empty() {
            return Err(InferenceError::EmptyInput);
        }
        let mut seq = crate::Sequence::new();
        ctx.check_fits(&seq, ids.len())?;
        let pooled = self.last_hidden(ctx, &mut seq, ids);
        ctx.release(&mut seq);
        let mut v = pooled?;
        l2_normalize(&mut v);
        Ok(v)
    }

    /// Runs `ids` into `seq` in chunks of the batch size and reads back the final-normed hidden
    /// state of the last one.
    fn last_hidden(
        &self,
        ctx: &mut Context<B>,
        seq: &mut crate::Sequence,
        ids: &[u32],
    ) -> Result<Vec<f32>, InferenceError> {
        let n_chunks = ids.len().div_ceil(ctx.max_batch());
        for (ci, chunk) in ids.chunks(ctx.max_batch()).enumerate() {
            // The last row of the last chunk is the one pooled: mark it as the row that wants
            // output, so that it is gathered like a logits row.
            let want = if ci + 1 == n_chunks { Logits::Last } else { Logits::None };
            let mut batch = [Segment { seq: &mut *seq, tokens: chunk, logits: want }];
            ctx.prepare(&self.config, &mut batch, false)?;
            ctx.run_governed(false, |ctx| self.embed_and_layers(ctx));
            ctx.commit(&mut batch);
        }
        Ok(ctx.run(|ctx| self.final_hidden(ctx))?)
    }

    /// The final RMSNorm of the one row that wants output, read back to the host.
    fn final_hidden(&self, ctx: &mut Context<B>) -> Result<Vec<f32>, BackendError> {
        let c = &self.config;
        let (b, a, meta) = (&mut ctx.backend, &mut ctx.act, &ctx.batch);
        b.gather_rows(&a.x, &meta.logit_rows, c.hidden_size, &mut a.proj);
        b.rmsnorm(&a.proj, Some(&self.final_norm), 1, c.hidden_size, c.rms_norm_eps, &mut a.normed);
        let mut out = vec![0.0; c.hidden_size];
        b.read(&a.normed, 0, &mut out)?;
        Ok(out)
    }

    /// One forward call over a batch of segments (at most the context's batch size in rows in
    /// all). Each segment's tokens are appended to its sequence's cache; afterwards
    /// [`Context::logits_of`] holds the requested rows of segment `i`. A segment whose
    /// sequence has no room left fails the whole call before any work, leaving every sequence
    /// as it was.
    pub fn forward_batch(
        &self,
        ctx: &mut Context<B>,
        batch: &mut [Segment<'_>],
    ) -> Result<(), InferenceError> {
        self.forward_segments(ctx, batch, false)
    }

    fn forward_segments(
        &self,
        ctx: &mut Context<B>,
        batch: &mut [Segment<'_>],
        append_logits: bool,
    ) -> Result<(), InferenceError> {
        let rows = ctx.prepare(&self.config, batch, append_logits)?;
        let governed = rows == 1;
        ctx.run_governed(governed, |ctx| {
            self.embed_and_layers(ctx);
            self.logits(ctx)
        })?;
        ctx.commit(batch);
        Ok(())
    }

    /// Embeddings and every layer for the prepared rows.
    fn embed_and_layers(&self, ctx: &mut Context<B>) {
        let (b, a) = (&mut ctx.backend, &mut ctx.act);
        match &self.embed_tokens {
            Embedding::Float(table) => b.embedding(table, &ctx.batch.ids, &mut a.x),
            Embedding::Block(table) => b.dense_embedding(table, &ctx.batch.ids, &mut a.x),
        }
        // Gemma: the rows times sqrt(hidden). The table itself is not scaled: the tied head
        // reads it as stored.
        if let Some(s) = self.config.embedding_scale() {
            b.scale(&mut a.x, ctx.batch.ids.len() * self.config.hidden_size, s);
        }
        // Each block leaves its output in `proj` for the next block to add into the residual
        // stream together with its input norm (one pass over `x` instead of two); the last
        // one is added here.
        let mut pending = false;
        for l in 0..self.layers.len() {
            pending = self.attention_block(ctx, l, pending);
            pending = self.mlp_block(ctx, l, pending);
        }
        if pending {
            let rows = ctx.batch.ids.len();
            ctx.backend.add(&mut ctx.act.x, &ctx.act.proj, rows * self.config.hidden_size);
        }
    }

    /// Final norm and lm_head for the rows that want logits, a block of rows at a time, read
    /// back to the host.
    fn logits(&self, ctx: &mut Context<B>) -> Result<(), BackendError> {
        let c = &self.config;
        let (h, vocab) = (c.hidden_size, c.vocab_size);
        let (b, a, meta) = (&mut ctx.backend, &mut ctx.act, &ctx.batch);
        // Rows that want their logits on the host first, then rows that want only their argmax.
        let (n, full) = (meta.logit_rows.len(), meta.full_logit_rows);
        if n == 0 {
            return Ok(());
        }
        // The residual stream's rows that want logits, packed; `proj` is free at this point.
        b.gather_rows(&a.x, &meta.logit_rows, h, &mut a.proj);
        b.rmsnorm(&a.proj, Some(&self.final_norm), n, h, c.rms_norm_eps, &mut a.normed);
        let start = ctx.logits.len();
        ctx.logits.resize(start + full * vocab, 0.0);
        ctx.greedy_ids.resize(n - full, 0);
        let mut first = 0;
        while first < n {
            // A pass stops where the rows that read their logits end.
            let end = if first < full { full } else { n };
            let count = (end - first).min(a.logit_rows);
            match (&self.head, &self.embed_tokens) {
                (Head::Float(Some(head)), _) | (Head::Float(None), Embedding::Float(head)) => {
                    b.lm_head(head, &a.normed, first, count, &mut a.logits)
                }
                (Head::Block(Some(head)), _) | (Head::Block(None), Embedding::Block(head)) => {
                    b.dense_linear(head, &a.normed, first, count, &mut a.dense_in, &mut a.logits)
                }
                (Head::Float(None), Embedding::Block(_)) | (Head::Block(None), Embedding::Float(_)) => {
                    unreachable!("a tied head takes the embedding table's kind at load")
                }
                (Head::Integer(head), _) => {
                    b.quantize(&a.normed, first, count, h, &mut a.quant_hidden);
                    b.int8_linear(head, &a.quant_hidden, &mut a.logits);
                }
                (Head::Ternary(head), _) => {
                    b.quantize(&a.normed, first, count, h, &mut a.quant_hidden);
                    b.bitlinear(head, &a.quant_hidden, &mut a.logits);
                }
            }
            if first < full {
                let dst = &mut ctx.logits[start + first * vocab..start + (first + count) * vocab];
                b.read(&a.logits, 0, dst)?;
            } else {
                b.argmax_rows(&a.logits, vocab, &mut ctx.greedy_ids[first - full..first - full + count])?;
            }
            first += count;
        }
        Ok(())
    }

    /// `x += o_proj(attn_sub_norm(Attention(RoPE(q), RoPE(k), v)))` on `RMSNorm_in(x)`, with q and
    /// k normed per head first where the model has q/k norms. Gemma3: the output is normed
    /// (`post_attention_layernorm`) before the add, and a sliding layer attends to its window
    /// with its own RoPE base.
    /// `pending`: the previous block's output, in `proj`, is still to be added to `x`. Returns
    /// whether this block's output is (so the next block adds it).
    fn attention_block(&self, ctx: &mut Context<B>, l: usize, pending: bool) -> bool {
        let c = &self.config;
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        let layer = &self.layers[l];
        let (b, a, meta) = (&mut ctx.backend, &mut ctx.act, &ctx.batch);
        let rows = meta.ids.len();
        // q, k and v read the same input: normed and quantized once, in one pass, unless each
        // projection has its own norm (1bitLLM) or is dense.
        let qkv = [&layer.q_proj, &layer.k_proj, &layer.v_proj];
        if let (Some(q), Some(k), Some(v), None) = (
            qkv[0].weight.ternary(),
            qkv[1].weight.ternary(),
            qkv[2].weight.ternary(),
            &layer.q_proj.input_norm,
        ) {
            let norm = Some(&layer.input_norm);
            input_norm_quantize(b, &mut a.x, &a.proj, pending, norm, rows, h, eps, &mut a.quant_hidden);
            b.bitlinear_many([q, k, v], &a.quant_hidden, [&mut a.q, &mut a.k, &mut a.v]);
        } else {
            if pending {
                b.add(&mut a.x, &a.proj, rows * h);
            }
            b.rmsnorm(&a.x, Some(&layer.input_norm), rows, h, eps, &mut a.normed);
            for (proj, out) in [(qkv[0], &mut a.q), (qkv[1], &mut a.k), (qkv[2], &mut a.v)] {
                project(b, proj, &a.normed, rows, &mut a.scratch, &mut a.quant_hidden, &mut a.dense_in, out);
            }
        }

        // Qwen3 normalizes every head of q and k on its own: rows × heads rows of head_dim. The
        // normed q goes to `attn` (free until attention writes it) and takes q's place; the
        // normed keys go to `scratch`, read by the cache store below.
        let keys = match (&layer.q_norm, &layer.k_norm) {
            (Some(qn), Some(kn)) => {
                b.rmsnorm(&a.q, Some(qn), rows * c.num_heads, c.head_dim, eps, &mut a.attn);
                std::mem::swap(&mut a.q, &mut a.attn);
                b.rmsnorm(&a.k, Some(kn), rows * c.num_kv_heads, c.head_dim, eps, &mut a.scratch);
                &a.scratch
            }
            _ => &a.k,
        };
        let window = c.sliding_window(l);
        let inv_freq = match (window, &self.rope_local_inv_freq) {
            (Some(_), Some(local)) => local,
            _ => &self.rope_inv_freq,
        };
        b.rope_qk_store(
            &mut a.q,
            c.num_heads,
            &mut ctx.kv,
            l,
            keys,
            &a.v,
            &meta.positions,
            &meta.slots,
            inv_freq,
            c.head_dim,
        );
        let shape = HeadShape {
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            scale: c.attention_scale(),
            window,
        };
        b.attention(&a.q, &ctx.kv, l, &meta.tables, &meta.segments, shape, &mut a.attn);

        let o = &layer.o_proj;
        match (&layer.attn_sub_norm, o.weight.ternary(), o.input_norm.is_some()) {
            (Some(g), Some(w), false) => {
                b.norm_quantize(&a.attn, Some(g), rows, c.q_dim(), eps, &mut a.quant_attn);
                b.bitlinear(w, &a.quant_attn, &mut a.proj);
            }
            (Some(g), _, _) => {
                b.rmsnorm(&a.attn, Some(g), rows, c.q_dim(), eps, &mut a.normed);
                project(
                    b,
                    o,
                    &a.normed,
                    rows,
                    &mut a.scratch,
                    &mut a.quant_attn,
                    &mut a.dense_in,
                    &mut a.proj,
                );
            }
            (None, _, _) => {
                project(b, o, &a.attn, rows, &mut a.scratch, &mut a.quant_attn, &mut a.dense_in, &mut a.proj)
            }
        }
        add_residual(b, &mut a.x, &a.proj, layer.attn_output_norm.as_ref(), rows, h, eps, &mut a.normed)
    }

    /// `x += down(ffn_sub_norm(act(gate(n)) · up(n)))` with `n = RMSNorm_post(x)` (Gemma3: GeGLU,
    /// `n` from `pre_feedforward_layernorm`, the output normed by `post_feedforward_layernorm`
    /// before the add).
    /// `pending` and the result: as for [`Self::attention_block`].
    fn mlp_block(&self, ctx: &mut Context<B>, l: usize, pending: bool) -> bool {
        let c = &self.config;
        let (h, i, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
        let layer = &self.layers[l];
        let (b, a) = (&mut ctx.backend, &mut ctx.act);
        let rows = ctx.batch.ids.len();
        let (gate, up, down) = (&layer.gate_proj, &layer.up_proj, &layer.down_proj);
        if let (Some(g), Some(u), None) = (gate.weight.ternary(), up.weight.ternary(), &gate.input_norm) {
            let norm = Some(&layer.post_attention_norm);
            input_norm_quantize(b, &mut a.x, &a.proj, pending, norm, rows, h, eps, &mut a.quant_hidden);
            b.bitlinear_many([g, u], &a.quant_hidden, [&mut a.gate, &mut a.up]);
        } else {
            if pending {
                b.add(&mut a.x, &a.proj, rows * h);
            }
            b.rmsnorm(&a.x, Some(&layer.post_attention_norm), rows, h, eps, &mut a.normed);
            for (proj, out) in [(gate, &mut a.gate), (up, &mut a.up)] {
                project(b, proj, &a.normed, rows, &mut a.scratch, &mut a.quant_hidden, &mut a.dense_in, out);
            }
        }
        match (down.weight.ternary(), down.input_norm.is_none()) {
            (Some(w), true) => {
                // Gate, sub-norm and quantization in one pass over each row.
                let sub_norm = layer.ffn_sub_norm.as_ref();
                b.gate_quantize(c.activation, &a.gate, &a.up, sub_norm, rows, i, eps, &mut a.quant_inter);
                b.bitlinear(w, &a.quant_inter, &mut a.proj);
            }
            _ => {
                // The gated product overwrites the norm output, which is no longer needed.
                b.gate(c.activation, &a.gate, &a.up, rows * i, &mut a.normed);
                let down_in = match &layer.ffn_sub_norm {
                    Some(g) => {
                        b.rmsnorm(&a.normed, Some(g), rows, i, eps, &mut a.gate);
                        &a.gate
                    }
                    None => &a.normed,
                };
                project(
                    b,
                    down,
                    down_in,
                    rows,
                    &mut a.scratch,
                    &mut a.quant_inter,
                    &mut a.dense_in,
                    &mut a.proj,
                );
            }
        }
        add_residual(b, &mut a.x, &a.proj, layer.mlp_output_norm.as_ref(), rows, h, eps, &mut a.normed)
    }
}

/// A block's input norm quantized into `out`, adding the previous block's output `proj` to the
/// residual stream `x` first (in the same pass) when that add is `pending`.
#[allow(clippy::too_many_arguments)]
fn input_norm_quantize<B: Backend>(
    b: &mut B,
    x: &mut B::Buffer,
    proj: &B::Buffer,
    pending: bool,
    gain: Option<&B::Vector>,
    rows: usize,
    width: usize,
    eps: f32,
    out: &mut B::QuantBuffer,
) {
    match pending {
        true => b.add_norm_quantize(x, proj, gain, rows, width, eps, out),
        false => b.norm_quantize(x, gain, rows, width, eps, out),
    }
}

/// `x += RMSNorm(y)` where the block's output has a norm of its own (Gemma's post-attention and
/// post-feedforward norms; `normed` is the free buffer the norm writes), returning `false`;
/// otherwise nothing yet: `true`, the next block adds `y` (which is `proj`) with its input norm.
#[allow(clippy::too_many_arguments)]
fn add_residual<B: Backend>(
    b: &mut B,
    x: &mut B::Buffer,
    y: &B::Buffer,
    output_norm: Option<&B::Vector>,
    rows: usize,
    width: usize,
    eps: f32,
    normed: &mut B::Buffer,
) -> bool {
    match output_norm {
        Some(g) => {
            b.rmsnorm(y, Some(g), rows, width, eps, normed);
            b.add(x, normed, rows * width);
            false
        }
        None => true,
    }
}

/// Scales `v` to unit Euclidean length (a zero vector stays zero), summing in f64 as
/// `torch.nn.functional.normalize` is matched to within float rounding.
fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    if norm > 0.0 {
        let inv = (1.0 / norm) as f32;
        v.iter_mut().for_each(|x| *x *= inv);
    }
}

/// Per-row symmetric quantization of the (float) head to `bits` (8 or 6), a block of rows at
/// a time, packed as it goes: neither a float copy nor an unpacked integer copy of the matrix
/// ever exists whole. A head read from the checkpoint's mapping has each block's pages
/// released once quantized (a tied table read again for lookups maps its rows in again).
fn quantize_head(m: &DenseLinear, bits: u32) -> Int8Matrix {
    let max_q = ((1 << (bits - 1)) - 1) as f32;
    let cols = m.cols();
    let head = Int8Matrix::from_row_blocks(bits, m.rows(), cols, |first, q, scales| {
        let mut row = vec![0f32; cols];
        for (i, (qr, s)) in q.chunks_exact_mut(cols).zip(scales.iter_mut()).enumerate() {
            m.dequantize_row(first + i, &mut row).expect("a row inside the matrix");
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
        m.release_rows(first..first + scales.len());
    });
    head.expect("shapes and ranges agree by construction")
}

/// The embedding table of a model whose head does not read it: uploaded as stored (on the CPU,
/// left in the checkpoint's mapping), since a lookup reads only the rows of its tokens.
fn lookup_table<B: Backend>(backend: &B, table: DenseLinear) -> Result<Embedding<B>, BackendError> {
    Ok(Embedding::Block(backend.upload_dense_table(table)?))
}

/// `out = W · x` for one projection: a BitLinear quantizes its input per token (through its own
/// RMSNorm first when the checkpoint has one); a dense matrix quantizes it as its format asks.
#[allow(clippy::too_many_arguments)]
fn project<B: Backend>(
    b: &mut B,
    lin: &Linear<B>,
    x: &B::Buffer,
    rows: usize,
    scratch: &mut B::Buffer,
    quant: &mut B::QuantBuffer,
    dense_in: &mut B::DenseInput,
    out: &mut B::Buffer,
) {
    match (&lin.weight, &lin.input_norm) {
        (Weight::Ternary(w), Some(g)) => {
            b.rmsnorm(x, Some(g), rows, lin.cols, lin.input_norm_eps, scratch);
            b.quantize(scratch, 0, rows, lin.cols, quant);
            b.bitlinear(w, quant, out);
        }
        (Weight::Ternary(w), None) => {
            b.quantize(x, 0, rows, lin.cols, quant);
            b.bitlinear(w, quant, out);
        }
        (Weight::Dense(w), Some(g)) => {
            b.rmsnorm(x, Some(g), rows, lin.cols, lin.input_norm_eps, scratch);
            b.dense_linear(w, scratch, 0, rows, dense_in, out);
        }
        (Weight::Dense(w), None) => b.dense_linear(w, x, 0, rows, dense_in, out),
    }
}
