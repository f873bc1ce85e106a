//! The model shipped in `assets/default-model/`, embedded in the binary so that
//! `bitnet generate` works with no download and from any directory.

use bitnet_inference::load::EmbeddedCheckpoint;

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
