//! Model configs and checkpoint loaders (Hugging Face safetensors and GGUF), tokenizers and
//! chat templates.

pub mod chat;
pub mod config;
pub mod convert;
pub mod error;
pub mod gguf;
pub mod gguf_model;
pub mod safetensors;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use config::{Activation, Architecture, ModelConfig, QuantForm};
pub use error::ModelError;
pub use weights::{LayerWeights, ModelWeights, Projection};
