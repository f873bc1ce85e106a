//! Model configs and checkpoint loaders: Hugging Face safetensors and GGUF.

pub mod config;
pub mod error;

pub use config::{Activation, Architecture, ModelConfig, QuantForm};
pub use error::ModelError;
