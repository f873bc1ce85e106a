//! The model shipped in `assets/default-model/`, embedded in the binary that links this crate, so
//! that `bitnet generate` and `bitnet.Model.load()` work with no download and from any directory.
//!
//! A crate of its own so that only the programs that offer the default model (the CLI, the Python
//! bindings) carry its 3 MB, not every user of `bitnet-inference`.

use bitnet_inference::load::{load_embedded, EmbeddedCheckpoint, LoadOptions, LoadedModel};
use bitnet_inference::InferenceError;

macro_rules! asset {
    ($file:literal) => {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/default-model/", $file)
    };
}

pub const DEFAULT_MODEL: EmbeddedCheckpoint = EmbeddedCheckpoint {
    name: "<embedded default model>",
    config_json: include_str!(asset!("config.json")),
    generation_config_json: Some(include_str!(asset!("generation_config.json"))),
    tokenizer_json: include_bytes!(asset!("tokenizer.json")),
    safetensors: include_bytes!(asset!("model.safetensors")),
};

/// Loads the embedded default model.
pub fn load_default_model(opts: LoadOptions) -> Result<LoadedModel, InferenceError> {
    load_embedded(&DEFAULT_MODEL, opts)
}
