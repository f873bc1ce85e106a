//! Opening a checkpoint directory (or embedded files) as a runnable model with its tokenizer.

use std::path::{Path, PathBuf};

use bitnet_models::gguf::tokenizer::GgufTokenizer;
use bitnet_models::gguf::GgufFile;
use bitnet_models::safetensors::{Bytes, TensorStore};
use bitnet_models::tokenizer::Tokenizer;
use bitnet_models::weights::WeightOptions;
use bitnet_models::{ModelConfig, ModelError, ModelWeights};

use crate::model::HeadFormat;
use crate::sampling::GenerationDefaults;
use crate::{Backend, CpuBackend, InferenceError, Model};

/// Choices made when a checkpoint becomes a runnable model.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    pub head: HeadFormat,
    /// Ternarize projections that would run dense (an experiment: see `WeightOptions`).
    pub ternarize: bool,
    /// Run GGUF block-format weights on f32 activations (transformers' numbers from the
    /// dequantized file) instead of llama.cpp's int8 block products (the default: faster).
    pub float_activations: bool,
}

impl LoadOptions {
    fn weights(&self) -> WeightOptions {
        WeightOptions { ternarize: self.ternarize }
    }

    /// The weights as these options run them.
    fn finish(&self, weights: ModelWeights) -> ModelWeights {
        if self.float_activations {
            weights.with_float_activations()
        } else {
            weights
        }
    }
}

/// A model on a backend (the CPU unless named) with what came with it.
pub struct LoadedModel<B: Backend = CpuBackend> {
    pub model: Model<B>,
    pub tokenizer: Option<Tokenizer>,
    pub source: PathBuf,
    /// The sampling generation_config.json asks for.
    pub generation: GenerationDefaults,
}

/// generation_config.json of a checkpoint folder, if it has one that parses.
fn generation_defaults(dir: &Path) -> GenerationDefaults {
    std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .map(|v| GenerationDefaults::from_json(&v))
        .unwrap_or_default()
}

/// Loads `dir` (config.json, model.safetensors or shards, tokenizer.json if present).
pub fn load_dir(dir: &Path) -> Result<LoadedModel, InferenceError> {
    load_dir_with(dir, LoadOptions::default())
}

/// Loads a checkpoint directory or a `.gguf` file onto the CPU.
pub fn load_dir_with(dir: &Path, opts: LoadOptions) -> Result<LoadedModel, InferenceError> {
    load_dir_on(dir, &CpuBackend::new(), opts)
}

/// Loads a checkpoint directory or a `.gguf` file onto `backend`, which lays the weights out
/// for its own kernels.
pub fn load_dir_on<B: Backend>(
    dir: &Path,
    backend: &B,
    opts: LoadOptions,
) -> Result<LoadedModel<B>, InferenceError> {
    if dir.is_file() {
        return load_gguf_on(dir, backend, opts);
    }
    if !dir.is_dir() {
        let why = if dir.exists() {
            "is not a directory holding config.json and model.safetensors, nor a .gguf file"
        } else {
            "no such file or folder (a model is a folder holding config.json and model.safetensors, or a .gguf file)"
        };
        return Err(ModelError::config(dir, why).into());
    }
    let config = ModelConfig::from_dir(dir)?;
    // The tokenizer first: parsing its JSON takes memory for a moment (tens of MB for a large
    // vocabulary), better spent before the weights arrive than on top of them; and a broken
    // tokenizer fails before the long part.
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() { Some(Tokenizer::from_file(&tok_path)?) } else { None };
    let store = TensorStore::open_dir(dir)?;
    let weights = opts.finish(ModelWeights::load_with(&store, config, opts.weights())?);
    let model = Model::new(weights, backend, opts.head)?;
    // Every weight now has the copy it runs from, or reads the mapping in place (a lookup
    // table): what is still mapped in (headers, norms) goes back to the kernel.
    store.release_all();
    Ok(LoadedModel { model, tokenizer, source: dir.to_path_buf(), generation: generation_defaults(dir) })
}

/// The files of a checkpoint held in memory (the model embedded in the binary).
pub struct EmbeddedCheckpoint {
    pub name: &'static str,
    pub config_json: &'static str,
    pub generation_config_json: Option<&'static str>,
    pub tokenizer_json: &'static [u8],
    pub safetensors: &'static [u8],
}

/// Loads an embedded checkpoint onto the CPU.
pub fn load_embedded(e: &EmbeddedCheckpoint, opts: LoadOptions) -> Result<LoadedModel, InferenceError> {
    load_embedded_on(e, &CpuBackend::new(), opts)
}

/// Loads an embedded checkpoint onto `backend`.
pub fn load_embedded_on<B: Backend>(
    e: &EmbeddedCheckpoint,
    backend: &B,
    opts: LoadOptions,
) -> Result<LoadedModel<B>, InferenceError> {
    let source = PathBuf::from(e.name);
    let json = serde_json::from_str(e.config_json)
        .map_err(|err| ModelError::config(&source.join("config.json"), format!("not valid JSON: {err}")))?;
    let mut config = ModelConfig::from_json(&json, &source.join("config.json"))?;
    let mut generation = GenerationDefaults::default();
    if let Some(gen) = e.generation_config_json {
        let gen: serde_json::Value = serde_json::from_str(gen).map_err(|err| {
            ModelError::config(&source.join("generation_config.json"), format!("not valid JSON: {err}"))
        })?;
        config.merge_generation_config(&gen);
        generation = GenerationDefaults::from_json(&gen);
    }
    let store =
        TensorStore::from_files(vec![(source.join("model.safetensors"), Bytes::Static(e.safetensors))])?;
    let weights = opts.finish(ModelWeights::load_with(&store, config, opts.weights())?);
    let tokenizer = Tokenizer::from_bytes(e.tokenizer_json, &source.join("tokenizer.json"))?;
    Ok(LoadedModel {
        model: Model::new(weights, backend, opts.head)?,
        tokenizer: Some(tokenizer),
        source,
        generation,
    })
}

/// Loads a GGUF file onto the CPU.
pub fn load_gguf(path: &Path, opts: LoadOptions) -> Result<LoadedModel, InferenceError> {
    load_gguf_on(path, &CpuBackend::new(), opts)
}

/// Loads a GGUF file: config from its metadata, tensors repacked, tokenizer from its vocabulary.
pub fn load_gguf_on<B: Backend>(
    path: &Path,
    backend: &B,
    opts: LoadOptions,
) -> Result<LoadedModel<B>, InferenceError> {
    let file = GgufFile::open(path).map_err(ModelError::from)?;
    // The tokenizer first, as for a checkpoint folder (its transient memory comes before the
    // weights'), then the vocabulary's mapped pages go back to the kernel.
    let tokenizer = match file.metadata().contains_key("tokenizer.ggml.model") {
        true => {
            let t =
                GgufTokenizer::from_gguf(&file).map_err(|e| ModelError::tokenizer(path, e.to_string()))?;
            Some(Tokenizer::from_tokenizer(t.into_tokenizer(), path))
        }
        false => None,
    };
    file.release_all();
    let weights = opts.finish(ModelWeights::from_gguf_with(&file, opts.weights())?);
    let model = Model::new(weights, backend, opts.head)?;
    // Whatever is still mapped in (norms, a lookup table's touched rows) goes back too.
    file.release_all();
    Ok(LoadedModel {
        model,
        tokenizer,
        source: path.to_path_buf(),
        generation: GenerationDefaults::default(),
    })
}
