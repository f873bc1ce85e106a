//! Model configs and checkpoint loaders (Hugging Face safetensors and GGUF), tokenizers and
//! chat templates.

pub mod bytes;
pub mod chat;
pub mod config;
pub mod convert;
pub mod error;
pub mod gguf;
pub mod gguf_model;
pub mod pooling;
pub mod rope;
pub mod safetensors;
pub mod synth;
pub mod temp_file;
pub mod tokenizer;
pub mod weights;

pub use config::{Activation, Architecture, ModelConfig, QuantForm, RopeScaling, SlidingAttention};
pub use error::ModelError;
pub use weights::{LayerWeights, ModelWeights, Projection};

/// The files of a model already in `dir` that writing a model there would replace:
/// `config.json`, the safetensors weights and their shard index. Empty when `dir` does not
/// exist or holds none of them.
pub fn model_files_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<std::path::PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name == "config.json"
                || name.ends_with(".safetensors")
                || name.ends_with(".safetensors.index.json")
        })
        .collect();
    found.sort();
    found
}
