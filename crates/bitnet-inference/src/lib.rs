//! The BitNet b1.58 forward pass over a [`Backend`]: weights in a shared [`Model`], work in a
//! [`Context`] per worker, [`Sequence`]s in a paged KV cache, batches of [`Segment`]s from many
//! sequences; sampling, generation and a continuous-batching [`scheduler`].

pub mod attention;
pub mod backend;
pub mod chat;
pub mod conformance;
pub mod context;
pub mod cpu;
pub mod generate;
pub mod governor;
pub mod kv;
pub mod load;
pub mod model;
pub mod sampling;
pub mod scheduler;

pub use backend::{Backend, BackendError};
pub use context::{Context, ContextOptions, Segment, Sequence};
pub use cpu::CpuBackend;
pub use generate::{generate, GenerateOptions, Generation, StopReason};
pub use kv::{KvStats, KvType, BLOCK_TOKENS};
pub use load::{load_dir, load_dir_on, load_dir_with, LoadOptions, LoadedModel};
pub use model::{HeadFormat, Logits, Model};
pub use sampling::{Sampler, SamplingError, SamplingParams};

/// Errors of running a model: bad requests and exhausted resources, typed so that callers (the
/// CLI, the server, the Python bindings) can word them for their users.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("the prompt is empty: give at least one token")]
    EmptyInput,
    #[error("token id {id} is out of range: the vocabulary has {vocab_size} tokens (ids 0..{vocab_size})")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    #[error("{needed} tokens do not fit in the context of {context} tokens")]
    ContextFull { needed: usize, context: usize },
    #[error("a batch of {rows} rows is larger than the context's batch of {max_batch}")]
    BatchTooLarge { rows: usize, max_batch: usize },
    #[error("the KV cache is full: {needed} more blocks are needed and {available} are free")]
    OutOfKvBlocks { needed: usize, available: usize },
    #[error("the sequence holds blocks of another context: release it there first")]
    ForeignSequence,
    #[error("could not start the context's threads: {0}")]
    Threads(String),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Chat(#[from] bitnet_models::chat::ChatError),
    #[error(transparent)]
    Backend(BackendError),
    #[error(transparent)]
    Model(#[from] bitnet_models::ModelError),
}
