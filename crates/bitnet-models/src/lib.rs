//! bitnet-models
pub mod gguf;
