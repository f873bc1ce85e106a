//! Where forward calls run: a [`Context`] per worker, [`Sequence`]s in its KV cache, and the
//! [`Segment`]s of a batch.
//!
//! A context owns the backend handle, activation buffers sized for its largest batch, the paged
//! KV store with its block pool, and optionally a thread pool of its own; it also runs the
//! decode governor. A sequence is a block table into the context's KV store, the tokens those
//! blocks hold, and a sampler. Nothing here is process-wide: two contexts on two threads share
//! only the model's weights.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bitnet_models::ModelConfig;

use crate::backend::{AttentionSegment, Backend, BackendError};
use crate::governor::{DecodeGovernor, Mode};
use crate::kv::{BlockPool, KvStats, KvType, BLOCK_TOKENS};
use crate::model::{Logits, Model};
use crate::sampling::{Sampler, SamplingParams};
use crate::InferenceError;

/// How a context is sized and run.
#[derive(Clone, Debug)]
pub struct ContextOptions {
    /// Rows (tokens of all segments) one forward call may hold; longer prompts run in chunks.
    pub max_batch: usize,
    /// Tokens the KV cache holds across all sequences (rounded up to whole blocks).
    pub kv_tokens: usize,
    pub kv_type: KvType,
    /// The most tokens one sequence may hold; `None`: the model's `max_position_embeddings`.
    pub max_seq_tokens: Option<usize>,
    /// Threads of a pool of the context's own; `None` runs on the caller's rayon pool.
    pub threads: Option<usize>,
    /// Let the decode governor run single-sequence decode steps on one thread when that is
    /// faster (another process holds a core).
    pub governor: bool,
    /// Keep full blocks of finished sequences so that later ones with the same prefix reuse them.
    pub prefix_cache: bool,
}

impl ContextOptions {
    /// Room for `kv_tokens` cached tokens, batches of up to 512 rows, f32 cache, the caller's
    /// threads, the governor on, the prefix cache on.
    pub fn new(kv_tokens: usize) -> Self {
        Self {
            max_batch: 512,
            kv_tokens,
            kv_type: KvType::F32,
            max_seq_tokens: None,
            threads: None,
            governor: true,
            prefix_cache: true,
        }
    }
}

/// One sequence: its block table, the tokens whose keys and values those blocks hold, and its
/// sampler. It lives in one context's KV cache; give it back with [`Context::release`].
pub struct Sequence {
    blocks: Vec<u32>,
    tokens: Vec<u32>,
    /// Leading blocks already registered in (or taken from) the prefix cache.
    registered: usize,
    /// The context whose blocks this sequence holds (set at its first forward call).
    owner: Option<u64>,
    pub sampler: Sampler,
}

impl Default for Sequence {
    fn default() -> Self {
        Self::new()
    }
}

impl Sequence {
    /// An empty sequence with a greedy sampler.
    pub fn new() -> Self {
        Self::with_sampling(SamplingParams::default(), 0)
    }

    /// An empty sequence sampling with `params` over a vocabulary of `vocab` tokens.
    pub fn with_sampling(params: SamplingParams, vocab: usize) -> Self {
        Self {
            blocks: Vec::new(),
            tokens: Vec::new(),
            registered: 0,
            owner: None,
            sampler: Sampler::new(params, vocab),
        }
    }

    /// Tokens in the cache: the next token goes at this position.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The tokens whose keys and values are cached, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// KV blocks this sequence holds.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Samples the next token from `logits` (modified in place), with this sequence's tokens as
    /// the repetition penalty's history.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.sampler.sample(logits, &self.tokens)
    }
}

/// Some tokens of one sequence in a batch.
pub struct Segment<'a> {
    pub seq: &'a mut Sequence,
    /// Tokens to append to the sequence.
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// The activations of one forward call, sized for `max_batch` rows.
pub(crate) struct Activations<B: Backend> {
    pub x: B::Buffer,       // residual stream [T, hidden]
    pub normed: B::Buffer,  // RMSNorm output [T, max(hidden, q_dim, inter)]
    pub scratch: B::Buffer, // BitLinear input norm output
    pub q: B::Buffer,       // [T, q_dim]
    pub k: B::Buffer,       // [T, kv_dim]
    pub v: B::Buffer,       // [T, kv_dim]
    pub attn: B::Buffer,    // [T, q_dim]
    pub proj: B::Buffer,    // BitLinear output [T, hidden]
    pub gate: B::Buffer,    // [T, inter]
    pub up: B::Buffer,      // [T, inter]
    /// Int8 inputs of the projections, one buffer per input width.
    pub quant_hidden: B::QuantBuffer, // q, k, v, gate, up
    pub quant_attn: B::QuantBuffer, // o
    pub quant_inter: B::QuantBuffer, // down
    pub logits: B::Buffer,  // [logit_rows, vocab]
    /// The quantized input of dense projections (and of a block-format head).
    pub dense_in: B::DenseInput,
    /// Rows the lm_head computes per pass (the logits buffer's rows).
    pub logit_rows: usize,
}

/// What a forward call needs to know of its rows, rebuilt for every call (the vectors keep
/// their allocations).
#[derive(Default)]
pub(crate) struct BatchMeta {
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// Cache slot (block × BLOCK_TOKENS + offset) of each row's key and value.
    pub slots: Vec<u32>,
    /// Block tables of every segment, one after another.
    pub tables: Vec<u32>,
    pub segments: Vec<AttentionSegment>,
    /// Batch rows that go through the head: those whose logits are read back (the first
    /// `full_logit_rows`, in segment order), then those that want only their argmax
    /// ([`crate::Logits::Greedy`]).
    pub logit_rows: Vec<u32>,
    pub full_logit_rows: usize,
    /// The argmax-only rows while a batch is laid out.
    greedy_rows: Vec<u32>,
}

static NEXT_CONTEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A worker's state for running a model: backend handle, activations, KV cache, threads.
pub struct Context<B: Backend> {
    pub(crate) backend: B,
    pub(crate) act: Activations<B>,
    pub(crate) kv: B::KvStore,
    pool: BlockPool,
    pub(crate) batch: BatchMeta,
    /// Logits of the last call's rows that asked for them, `[rows, vocab]` on the host.
    pub(crate) logits: Vec<f32>,
    /// Each segment's rows in `logits` (first row, count).
    logit_spans: Vec<(usize, usize)>,
    /// The greedy choices of the last call's [`crate::Logits::Greedy`] segments, and each
    /// segment's index among them.
    pub(crate) greedy_ids: Vec<u32>,
    greedy_spans: Vec<Option<usize>>,
    max_batch: usize,
    max_seq_tokens: usize,
    vocab: usize,
    kv_type: KvType,
    prefix_cache: bool,
    threads: Option<Arc<rayon::ThreadPool>>,
    governor: Option<DecodeGovernor>,
    id: u64,
}

impl<B: Backend> Context<B> {
    /// A context for `model` on `backend` (the backend the model was uploaded with, or another
    /// handle to the same device).
    pub fn new(model: &Model<B>, backend: B, opts: &ContextOptions) -> Result<Self, InferenceError> {
        let c = &model.config;
        let max_seq_tokens = opts.max_seq_tokens.unwrap_or(c.max_position_embeddings).max(1);
        let max_batch = opts.max_batch.max(1);
        let blocks = opts.kv_tokens.div_ceil(BLOCK_TOKENS).max(1);
        let threads = match opts.threads {
            Some(n) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n.max(1))
                    .build()
                    .map_err(|e| InferenceError::Threads(e.to_string()))?,
            )),
            None => None,
        };
        let b = &backend;
        let wide = c.hidden_size.max(c.q_dim()).max(c.intermediate_size);
        let logit_rows = max_batch.min(32);
        let act = Activations {
            x: b.buffer(max_batch * c.hidden_size)?,
            normed: b.buffer(max_batch * wide)?,
            scratch: b.buffer(max_batch * wide)?,
            q: b.buffer(max_batch * c.q_dim())?,
            k: b.buffer(max_batch * c.kv_dim())?,
            v: b.buffer(max_batch * c.kv_dim())?,
            attn: b.buffer(max_batch * c.q_dim())?,
            proj: b.buffer(max_batch * c.hidden_size)?,
            gate: b.buffer(max_batch * c.intermediate_size)?,
            up: b.buffer(max_batch * c.intermediate_size)?,
            quant_hidden: b.quant_buffer(max_batch, c.hidden_size)?,
            quant_attn: b.quant_buffer(max_batch, c.q_dim())?,
            quant_inter: b.quant_buffer(max_batch, c.intermediate_size)?,
            logits: b.buffer(logit_rows * c.vocab_size)?,
            dense_in: b.dense_input(max_batch, wide)?,
            logit_rows,
        };
        let kv = b.kv_store(c.num_layers, blocks, c.kv_dim(), opts.kv_type)?;
        let batch = BatchMeta {
            ids: Vec::with_capacity(max_batch),
            positions: Vec::with_capacity(max_batch),
            slots: Vec::with_capacity(max_batch),
            tables: Vec::with_capacity(blocks),
            segments: Vec::with_capacity(max_batch),
            logit_rows: Vec::with_capacity(max_batch),
            full_logit_rows: 0,
            greedy_rows: Vec::with_capacity(max_batch),
        };
        Ok(Self {
            backend,
            act,
            kv,
            pool: BlockPool::new(blocks),
            batch,
            logits: Vec::with_capacity(logit_rows * c.vocab_size),
            logit_spans: Vec::with_capacity(max_batch),
            greedy_ids: Vec::with_capacity(max_batch),
            greedy_spans: Vec::with_capacity(max_batch),
            max_batch,
            max_seq_tokens,
            vocab: c.vocab_size,
            kv_type: opts.kv_type,
            prefix_cache: opts.prefix_cache,
            threads,
            governor: opts.governor.then(DecodeGovernor::default),
            id: NEXT_CONTEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The most tokens one sequence may hold.
    pub fn max_seq_tokens(&self) -> usize {
        self.max_seq_tokens
    }

    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    pub fn kv_stats(&self) -> KvStats {
        self.pool.stats()
    }

    /// Starts the decode governor afresh, as in a new context: a context reused for a new
    /// request (the Python bindings keep a pool of them) then judges the machine as it is now,
    /// not by the fastest step of an earlier request made when it was quieter.
    pub fn reset_governor(&mut self) {
        if let Some(g) = &mut self.governor {
            *g = DecodeGovernor::default();
        }
    }

    /// Blocks a sequence of `tokens` tokens holds.
    pub fn blocks_for(tokens: usize) -> usize {
        tokens.div_ceil(BLOCK_TOKENS)
    }

    /// Blocks that new tokens could take now (free or reclaimable from the prefix cache).
    pub fn available_blocks(&self) -> usize {
        self.pool.available()
    }

    /// Every requested row of the last forward call, `[rows, vocab]`.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// The requested rows of segment `i` of the last forward call.
    pub fn logits_of(&self, i: usize) -> &[f32] {
        let (first, n) = self.logit_spans.get(i).copied().unwrap_or((0, 0));
        &self.logits[first * self.vocab..(first + n) * self.vocab]
    }

    /// The greedy choice of segment `i` of the last forward call, if it asked for only that
    /// ([`crate::Logits::Greedy`]); its [`Self::logits_of`] is then empty.
    pub fn greedy_of(&self, i: usize) -> Option<u32> {
        let at = self.greedy_spans.get(i).copied().flatten()?;
        self.greedy_ids.get(at).copied()
    }

    /// As [`Self::logits_of`], to sample from (samplers modify logits in place).
    pub fn logits_of_mut(&mut self, i: usize) -> &mut [f32] {
        let (first, n) = self.logit_spans.get(i).copied().unwrap_or((0, 0));
        &mut self.logits[first * self.vocab..(first + n) * self.vocab]
    }

    /// Samples `seq`'s next token from the last row of segment `i`'s logits (or takes its
    /// greedy choice, for a [`crate::Logits::Greedy`] segment).
    pub fn sample(&mut self, i: usize, seq: &mut Sequence) -> Option<u32> {
        if let Some(id) = self.greedy_of(i) {
            return Some(id);
        }
        let vocab = self.vocab;
        let rows = self.logits_of_mut(i);
        let last = rows.len().checked_sub(vocab)?;
        Some(seq.sample(&mut rows[last..]))
    }

    /// Gives every block of `seq` back to the pool and empties it (its sampler stays).
    pub fn release(&mut self, seq: &mut Sequence) {
        for &b in &seq.blocks {
            self.pool.release(b);
        }
        seq.blocks.clear();
        seq.tokens.clear();
        seq.registered = 0;
        seq.owner = None;
    }

    /// Forgets `seq`'s tokens from position `len` on and returns how many it keeps: `len`, or
    /// fewer when position `len` falls inside a block shared with other sequences (that block is
    /// dropped rather than overwritten, and its tokens must be fed again).
    pub fn truncate(&mut self, seq: &mut Sequence, len: usize) -> usize {
        let mut keep = len.min(seq.tokens.len());
        if !keep.is_multiple_of(BLOCK_TOKENS) && keep / BLOCK_TOKENS < seq.registered {
            keep -= keep % BLOCK_TOKENS;
        }
        let keep_blocks = keep.div_ceil(BLOCK_TOKENS);
        for &b in &seq.blocks[keep_blocks.min(seq.blocks.len())..] {
            self.pool.release(b);
        }
        seq.blocks.truncate(keep_blocks);
        seq.tokens.truncate(keep);
        seq.registered = seq.registered.min(keep / BLOCK_TOKENS);
        keep
    }

    /// Starts an empty `seq` with the cached blocks that hold the longest whole-block prefix of
    /// `prompt` short of its last token (whose logits the caller needs computed). Returns the
    /// tokens taken; the caller feeds `prompt[taken..]`.
    pub fn share_prefix(&mut self, seq: &mut Sequence, prompt: &[u32]) -> usize {
        if !self.prefix_cache || !seq.is_empty() || prompt.len() < 2 {
            return 0;
        }
        self.release(seq);
        let blocks = self.pool.take_prefix(&prompt[..prompt.len() - 1]);
        let taken = blocks.len() * BLOCK_TOKENS;
        seq.blocks.extend(&blocks);
        seq.tokens.extend_from_slice(&prompt[..taken]);
        seq.registered = blocks.len();
        seq.owner = (taken > 0).then_some(self.id);
        taken
    }

    /// Checks that `n` more tokens fit in `seq` (its context limit; not the free blocks).
    pub fn check_fits(&self, seq: &Sequence, n: usize) -> Result<(), InferenceError> {
        if seq.len() + n > self.max_seq_tokens {
            return Err(InferenceError::ContextFull { needed: seq.len() + n, context: self.max_seq_tokens });
        }
        Ok(())
    }

    /// Runs `f` on this context's thread pool (or the caller's, for a context without one). A
    /// generation loop run this way makes its kernels' fork-joins go through a pool worker's own
    /// deque instead of the pool's injector, which allocates.
    pub fn run<R: Send>(&mut self, f: impl FnOnce(&mut Self) -> R + Send) -> R {
        match self.threads.clone() {
            Some(pool) if pool.current_thread_index().is_none() => pool.install(|| f(self)),
            _ => f(self),
        }
    }

    /// Runs a forward step, under the decode governor when `governed` (a single decoded row).
    pub(crate) fn run_governed<R: Send>(
        &mut self,
        governed: bool,
        f: impl FnOnce(&mut Self) -> R + Send,
    ) -> R {
        self.run(|ctx| {
            let governed = governed && ctx.governor.is_some() && rayon::current_num_threads() > 1;
            if !governed {
                return f(ctx);
            }
            let solo = ctx.governor.as_ref().is_some_and(|g| g.mode() == Mode::Solo);
            let started = std::time::Instant::now();
            let cap = solo.then(bitnet_core::threads::SoloGuard::new);
            let out = f(ctx);
            drop(cap);
            if let Some(g) = &mut ctx.governor {
                g.record(started.elapsed());
            }
            out
        })
    }

    /// Validates a batch, gives each sequence the blocks its new tokens need, and lays out the
    /// rows' ids, positions, cache slots, block tables and logit rows. Fails before changing
    /// anything when the batch is malformed or the pool is short of blocks. Returns the rows.
    pub(crate) fn prepare(
        &mut self,
        cfg: &ModelConfig,
        batch: &mut [Segment<'_>],
        append_logits: bool,
    ) -> Result<usize, InferenceError> {
        let rows: usize = batch.iter().map(|s| s.tokens.len()).sum();
        if batch.is_empty() || batch.iter().any(|s| s.tokens.is_empty()) {
            return Err(InferenceError::EmptyInput);
        }
        if rows > self.max_batch {
            return Err(InferenceError::BatchTooLarge { rows, max_batch: self.max_batch });
        }
        let mut needed = 0;
        for s in batch.iter() {
            if let Some(&bad) = s.tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                return Err(InferenceError::TokenOutOfRange { id: bad, vocab_size: cfg.vocab_size });
            }
            if s.seq.owner.is_some_and(|o| o != self.id) {
                return Err(InferenceError::ForeignSequence);
            }
            self.check_fits(s.seq, s.tokens.len())?;
            needed += Self::blocks_for(s.seq.len() + s.tokens.len()) - s.seq.blocks.len();
        }
        if needed > self.pool.available() {
            return Err(InferenceError::OutOfKvBlocks { needed, available: self.pool.available() });
        }
        let max_blocks = Self::blocks_for(self.max_seq_tokens);
        let m = &mut self.batch;
        m.ids.clear();
        m.positions.clear();
        m.slots.clear();
        m.tables.clear();
        m.segments.clear();
        m.logit_rows.clear();
        m.greedy_rows.clear();
        if !append_logits {
            self.logits.clear();
            self.logit_spans.clear();
            self.greedy_ids.clear();
            self.greedy_spans.clear();
        }
        let mut logit_row = self.logits.len() / self.vocab.max(1);
        for s in batch.iter_mut() {
            let seq = &mut *s.seq;
            if seq.owner.is_none() {
                seq.owner = Some(self.id);
                // Sized once, so that decode steps never grow them.
                seq.blocks.reserve(max_blocks.saturating_sub(seq.blocks.len()));
                seq.tokens.reserve(self.max_seq_tokens.saturating_sub(seq.tokens.len()));
            }
            while seq.blocks.len() < Self::blocks_for(seq.len() + s.tokens.len()) {
                let b = self.pool.allocate().expect("blocks counted above");
                seq.blocks.push(b);
            }
            let (pos0, first_row) = (seq.len(), m.ids.len());
            m.segments.push(AttentionSegment {
                first_row,
                rows: s.tokens.len(),
                pos0,
                table_start: m.tables.len(),
            });
            m.tables.extend_from_slice(&seq.blocks);
            for (t, &id) in s.tokens.iter().enumerate() {
                let p = pos0 + t;
                m.ids.push(id);
                m.positions.push(p as u32);
                m.slots
                    .push((seq.blocks[p / BLOCK_TOKENS] as usize * BLOCK_TOKENS + p % BLOCK_TOKENS) as u32);
            }
            let want = s.logits.rows(s.tokens.len());
            if s.logits == Logits::Greedy && !append_logits {
                self.greedy_spans.push(Some(m.greedy_rows.len()));
                self.logit_spans.push((logit_row, 0));
                m.greedy_rows.extend(want.map(|t| (first_row + t) as u32));
                continue;
            }
            m.logit_rows.extend(want.clone().map(|t| (first_row + t) as u32));
            if !append_logits {
                self.greedy_spans.push(None);
                self.logit_spans.push((logit_row, want.len()));
            } else if let Some(span) = self.logit_spans.last_mut() {
                span.1 += want.len();
            }
            logit_row += want.len();
        }
        m.full_logit_rows = m.logit_rows.len();
        m.logit_rows.extend_from_slice(&m.greedy_rows);
        Ok(rows)
    }

    /// After a forward call: the segments' tokens are in their sequences' caches; full blocks
    /// are registered for prefix sharing.
    pub(crate) fn commit(&mut self, batch: &mut [Segment<'_>]) {
        for s in batch.iter_mut() {
            let seq = &mut *s.seq;
            seq.tokens.extend_from_slice(s.tokens);
            if !self.prefix_cache {
                continue;
            }
            let full = seq.tokens.len() / BLOCK_TOKENS;
            for i in seq.registered..full {
                let parent = i.checked_sub(1).map(|p| seq.blocks[p]);
                self.pool.register(
                    seq.blocks[i],
                    parent,
                    &seq.tokens[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS],
                );
            }
            seq.registered = seq.registered.max(full);
        }
    }
}

impl From<BackendError> for InferenceError {
    fn from(e: BackendError) -> Self {
        InferenceError::Backend(e)
    }
}
