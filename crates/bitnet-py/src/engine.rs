//! What a loaded `bitnet.Model` holds on the Rust side: the shared weights, the tokenizer, the
//! chat template, and a small pool of idle contexts.
//!
//! The weights are immutable and shared by every call. Each call works in a [`Context`] of its
//! own (activations, KV cache) taken from the pool, or made when none idle is large enough, and
//! given back afterwards: several Python threads generate at once on one model, each in its own
//! context, and a thread that calls again reuses a warm one.
//!
//! The kernels run on rayon's global pool, sized by the first `Model.load` as the CLI's `-t`
//! sizes it, and the generation loop on a thread outside it, as in the CLI: the Python
//! overhead measurement (docs/python.md) compares like with like. Contexts with a pool of their
//! own, running the loop on one of its workers, decoded 7-13 % slower on the 2-core machine
//! under load. A model that asks for another thread count than the global pool's gets its own.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use bitnet_inference::chat::ChatFormat;
use bitnet_inference::load::{load_dir_with, LoadOptions, LoadedModel};
use bitnet_inference::{
    generate, Context, ContextOptions, CpuBackend, GenerateOptions, Generation, HeadFormat, InferenceError,
    Logits, Model, Sequence,
};
use bitnet_models::tokenizer::Tokenizer;

/// Idle contexts kept for later calls (the largest ones); more are dropped.
const IDLE_CONTEXTS: usize = 4;
/// The smallest KV cache a new context gets, so that short calls share contexts.
const MIN_CONTEXT_TOKENS: usize = 256;

/// Which threads a model's calls compute on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// rayon's global pool (the CLI's).
    Global,
    /// A pool of this many threads per context.
    Own(usize),
}

impl Pool {
    /// The global pool when it has (or can be made to have) `threads` threads, else pools of
    /// their own. `None` takes the global pool as it is (every core, unless set before).
    pub fn for_threads(threads: Option<usize>) -> Self {
        let Some(n) = threads else { return Pool::Global };
        // Succeeds only once per process: the first model sizes the global pool.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        if rayon::current_num_threads() == n {
            Pool::Global
        } else {
            Pool::Own(n)
        }
    }

    /// Threads a call computes with.
    pub fn threads(self) -> usize {
        match self {
            Pool::Global => rayon::current_num_threads(),
            Pool::Own(n) => n,
        }
    }
}

/// Where a model comes from.
pub enum Source {
    /// The model embedded in this library (`assets/default-model/`).
    Embedded,
    /// A checkpoint folder or a `.gguf` file.
    Path(PathBuf),
}

pub struct Engine {
    pub model: Model<CpuBackend>,
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// The checkpoint's conversation format (chat template, stop ids), or why it cannot be used.
    pub chat: Result<ChatFormat, String>,
    /// The folder or file loaded, or the embedded model's name.
    pub source: String,
    pub pool: Pool,
    pub head: HeadFormat,
    governor: bool,
    contexts: Mutex<Vec<Context<CpuBackend>>>,
}

impl Engine {
    /// Loads the model and its tokenizer and chat template; its calls compute on `pool`.
    pub fn load(
        source: &Source,
        head: HeadFormat,
        pool: Pool,
        governor: bool,
    ) -> Result<Self, InferenceError> {
        let opts = LoadOptions { head, ..LoadOptions::default() };
        let loaded = match source {
            Source::Embedded => bitnet_default_model::load_default_model(opts)?,
            Source::Path(path) => load_dir_with(path, opts)?,
        };
        let chat = ChatFormat::for_model(&loaded).map_err(|e| e.to_string());
        let LoadedModel { model, tokenizer, source: loaded_from, .. } = loaded;
        Ok(Self {
            model,
            tokenizer: tokenizer.map(Arc::new),
            chat,
            source: loaded_from.display().to_string(),
            pool,
            head,
            governor,
            contexts: Mutex::new(Vec::new()),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    /// The most tokens a sequence may hold (prompt and generated).
    pub fn context_length(&self) -> usize {
        self.model.config.max_position_embeddings
    }

    /// An idle context whose cache holds `tokens`, or a new one.
    fn take_context(&self, tokens: usize) -> Result<Context<CpuBackend>, InferenceError> {
        let mut idle = self.contexts.lock().unwrap_or_else(PoisonError::into_inner);
        let fitting = (0..idle.len())
            .filter(|&i| idle[i].max_seq_tokens() >= tokens)
            .min_by_key(|&i| idle[i].max_seq_tokens());
        if let Some(i) = fitting {
            let mut ctx = idle.swap_remove(i);
            // Each call decodes as a fresh CLI run does: the governor's timings of earlier
            // calls (made under another load) would mislead it.
            ctx.reset_governor();
            return Ok(ctx);
        }
        drop(idle);
        let capacity = tokens.next_power_of_two().max(MIN_CONTEXT_TOKENS);
        let opts = ContextOptions {
            max_seq_tokens: Some(capacity),
            threads: match self.pool {
                Pool::Global => None,
                Pool::Own(n) => Some(n),
            },
            governor: self.governor,
            // Every call starts from an empty cache, so that its results never depend on what
            // ran before (the same bits as the CLI's single run).
            prefix_cache: false,
            ..ContextOptions::new(capacity)
        };
        Context::new(&self.model, CpuBackend::new(), &opts)
    }

    /// Puts a context back in the pool, keeping the largest [`IDLE_CONTEXTS`].
    fn give_back(&self, ctx: Context<CpuBackend>) {
        let mut idle = self.contexts.lock().unwrap_or_else(PoisonError::into_inner);
        idle.push(ctx);
        if idle.len() > IDLE_CONTEXTS {
            let smallest = (0..idle.len()).min_by_key(|&i| idle[i].max_seq_tokens()).unwrap_or(0);
            idle.swap_remove(smallest);
        }
    }

    /// Runs `work` on a context with room for `tokens` and one fresh sequence, then empties the
    /// sequence and gives the context back.
    fn with_sequence<R>(
        &self,
        tokens: usize,
        work: impl FnOnce(&mut Context<CpuBackend>, &mut Sequence) -> Result<R, InferenceError>,
    ) -> Result<R, InferenceError> {
        let mut ctx = self.take_context(tokens)?;
        let mut seq = Sequence::new();
        let out = work(&mut ctx, &mut seq);
        ctx.release(&mut seq);
        self.give_back(ctx);
        out
    }

    /// Generates after `ids` (checked by the caller: see [`Engine::check_prompt`]).
    pub fn generate(
        &self,
        tokenizer: &Tokenizer,
        ids: &[u32],
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> ControlFlow<()> + Send,
    ) -> Result<Generation, InferenceError> {
        self.with_sequence(ids.len() + opts.max_new_tokens, |ctx, seq| {
            generate(&self.model, ctx, seq, tokenizer, ids, opts, on_text)
        })
    }

    /// The logits of the last position (`all_positions` false) or of every position of `ids`,
    /// row after row.
    pub fn logits(&self, ids: &[u32], all_positions: bool) -> Result<Vec<f32>, InferenceError> {
        let which = if all_positions { Logits::All } else { Logits::Last };
        self.with_sequence(ids.len(), |ctx, seq| {
            self.model.forward(ctx, seq, ids, which)?;
            Ok(ctx.logits().to_vec())
        })
    }

    /// The embedding of each of `texts` (token ids, each checked by the caller): the model's
    /// last-token pooling, L2-normalized ([`Model::embed`]), one context for all of them.
    pub fn embed(&self, texts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, InferenceError> {
        let longest = texts.iter().map(Vec::len).max().unwrap_or(1);
        let mut ctx = self.take_context(longest)?;
        let vectors = texts.iter().map(|ids| self.model.embed(&mut ctx, ids)).collect();
        self.give_back(ctx);
        vectors
    }

    /// Checks that `ids` can be a prompt: not empty, every id in the vocabulary, shorter than
    /// the context (`room` more tokens must fit after it).
    pub fn check_prompt(&self, ids: &[u32], room: usize) -> Result<(), String> {
        if ids.is_empty() {
            return Err("the prompt is empty: give some text or at least one token id".into());
        }
        let vocab = self.vocab_size();
        if let Some((at, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(format!(
                "token id {id} (position {at}) is out of range: the vocabulary has {vocab} tokens (ids 0..{vocab})"
            ));
        }
        let context = self.context_length();
        if ids.len() + room > context {
            return Err(format!(
                "the prompt has {} tokens, but the model's context holds {context}",
                ids.len()
            ));
        }
        Ok(())
    }
}
