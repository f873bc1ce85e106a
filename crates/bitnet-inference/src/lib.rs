//! The BitNet b1.58 forward pass over a [`Backend`], KV cache, sampling and generation.

pub mod attention;
pub mod backend;
pub mod cpu;
pub mod generate;
pub mod governor;
pub mod load;
pub mod model;
pub mod sampling;

pub use backend::Backend;
pub use cpu::CpuBackend;
pub use generate::{generate, GenerateOptions, Generation, StopReason};
pub use load::{load_dir, load_dir_with, LoadOptions, LoadedModel};
pub use model::{HeadFormat, Logits, Model, Session};
pub use sampling::{Sampler, SamplingParams};

/// Errors of running a model: bad requests, never internal failures.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("the prompt is empty: give at least one token")]
    EmptyInput,
    #[error("token id {id} is out of range: the vocabulary has {vocab_size} tokens (ids 0..{vocab_size})")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    #[error("{needed} tokens do not fit in the context of {context} tokens")]
    ContextFull { needed: usize, context: usize },
    #[error(transparent)]
    Model(#[from] bitnet_models::ModelError),
}
