//! The subcommands of `bitnet`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bitnet_inference::load::{load_dir_on, load_embedded_on, LoadOptions, LoadedModel};
use bitnet_inference::{
    generate as run_generation, Backend, Context as RunContext, ContextOptions, GenerateOptions, HeadFormat,
    Logits, Model, SamplingParams, Sequence,
};
use bitnet_models::safetensors::TensorStore;
use bitnet_models::ModelConfig;
use clap::Args;
use serde_json::json;

use crate::default_model::DEFAULT_MODEL;
use crate::device::{dispatch, DeviceArg, Gpu, OnBackend};

/// What to feed the model: text or token ids.
#[derive(Args, Clone)]
pub struct InputArgs {
    /// Checkpoint directory (config.json + model.safetensors [+ tokenizer.json]) or a .gguf file.
    /// Without it, the embedded default model runs.
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Prompt text, tokenized with the model's tokenizer (BOS added as its template says).
    #[arg(short, long, conflicts_with = "tokens", required_unless_present = "tokens")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. `0,53,73`.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub tokens: Option<Vec<String>>,
    /// Context length (default: the model's max_position_embeddings).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// lm_head storage: `float` as in the checkpoint (exact), `int8` (half the bytes of bf16,
    /// faster decoding, logits within about 1 % of the float ones) or `int6` (6 bits a weight,
    /// three quarters of int8's bytes, a coarser approximation).
    #[arg(long, value_enum, default_value_t = HeadArg::Float)]
    pub lm_head: HeadArg,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum HeadArg {
    Float,
    Int8,
    Int6,
}

impl HeadArg {
    pub fn options(self) -> LoadOptions {
        LoadOptions {
            head: match self {
                HeadArg::Float => HeadFormat::Float,
                HeadArg::Int8 => HeadFormat::Int8,
                HeadArg::Int6 => HeadFormat::Int6,
            },
        }
    }
}

#[derive(Args)]
pub struct SynthArgs {
    /// Shapes to copy: 2b4t, large, 3b, 8b, tiny or tiny-llama.
    #[arg(long)]
    pub config: String,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn synth(a: SynthArgs) -> Result<()> {
    let shape = bitnet_models::synth::shape_by_name(&a.config).with_context(|| {
        let names: Vec<&str> = bitnet_models::synth::SHAPES.iter().map(|s| s.name).collect();
        format!("--config `{}` is not one of {}", a.config, names.join(", "))
    })?;
    bitnet_models::synth::write_synthetic(&shape, &a.out, a.seed)?;
    eprintln!("wrote {} (shapes of `{}`, random ternary weights)", a.out.display(), shape.name);
    Ok(())
}

/// Sizes the process's one thread pool.
fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting the thread count")?;
    }
    Ok(())
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// New tokens at most.
    #[arg(short = 'n', long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens below this fraction of the best one's probability (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Repetition penalty as in transformers (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this text appears (may be repeated).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Logits of every position, not only the last.
    #[arg(long)]
    pub all_positions: bool,
    /// Accepted for symmetry with `generate`: the output is always JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct InspectArgs {
    /// Checkpoint directory.
    pub path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Loads the model onto the backend `make` builds.
fn load<B: Backend>(input: &InputArgs, make: &(dyn Fn() -> B + Sync)) -> Result<LoadedModel<B>> {
    let opts = input.lm_head.options();
    Ok(match &input.model {
        Some(dir) => load_dir_on(dir, &make(), opts)?,
        None => load_embedded_on(&DEFAULT_MODEL, &make(), opts)?,
    })
}

/// Prompt ids from `--prompt` or `--tokens`, checked against the vocabulary.
fn prompt_ids<B: Backend>(input: &InputArgs, loaded: &LoadedModel<B>) -> Result<Vec<u32>> {
    let ids: Vec<u32> = match (&input.prompt, &input.tokens) {
        (Some(text), _) => {
            if text.is_empty() {
                bail!("the prompt is empty: give some text with --prompt or ids with --tokens");
            }
            let tok = loaded.tokenizer.as_ref().with_context(|| {
                format!("{} has no tokenizer.json: give token ids with --tokens", loaded.source.display())
            })?;
            tok.encode(text)?
        }
        (None, Some(list)) => list
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().parse::<u32>().with_context(|| format!("--tokens: `{s}` is not a token id")))
            .collect::<Result<_>>()?,
        (None, None) => bail!("give a prompt with --prompt or token ids with --tokens"),
    };
    if ids.is_empty() {
        bail!("the prompt is empty: it encodes to no tokens");
    }
    let vocab = loaded.model.config.vocab_size;
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("token id {bad} is out of range: the model's vocabulary has {vocab} tokens (ids 0..{vocab})");
    }
    Ok(ids)
}

fn context_len(input: &InputArgs, cfg: &ModelConfig) -> usize {
    input.ctx.unwrap_or(cfg.max_position_embeddings)
}

/// Whether the decode governor runs (`BITNET_DECODE_GOVERNOR=off` turns it off).
pub fn governor_enabled() -> bool {
    std::env::var("BITNET_DECODE_GOVERNOR").map_or(true, |v| v != "off")
}

/// A context on `backend` for one sequence of up to `tokens` tokens, on the process's thread pool.
pub fn single_sequence_context<B: Backend>(
    model: &Model<B>,
    backend: B,
    tokens: usize,
) -> Result<RunContext<B>> {
    let opts = ContextOptions {
        max_seq_tokens: Some(tokens),
        governor: governor_enabled(),
        ..ContextOptions::new(tokens)
    };
    Ok(RunContext::new(model, backend, &opts)?)
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        seed: a.seed,
        ..SamplingParams::default()
    };
    sampling.validate().map_err(|e| anyhow::anyhow!("--{}: {e}", e.param.replace('_', "-")))?;
    set_threads(a.input.threads)?;
    dispatch(a.input.device.device, Generate { a, sampling })
}

struct Generate {
    a: GenerateArgs,
    sampling: SamplingParams,
}

impl OnBackend for Generate {
    type Output = ();
    fn run<B: Backend + 'static>(self, make: &(dyn Fn() -> B + Sync), _: Option<&Gpu>) -> Result<()> {
        generate_on(self.a, self.sampling, make)
    }
}

fn generate_on<B: Backend>(
    a: GenerateArgs,
    sampling: SamplingParams,
    make: &(dyn Fn() -> B + Sync),
) -> Result<()> {
    let mut loaded = load(&a.input, make)?;
    let ids = prompt_ids(&a.input, &loaded)?;
    let ctx = context_len(&a.input, &loaded.model.config);
    if ids.len() >= ctx {
        bail!("the prompt has {} tokens, but the context holds {ctx}: shorten it or raise --ctx", ids.len());
    }
    let tokenizer = loaded.tokenizer.take().with_context(|| {
        format!("{} has no tokenizer.json, so generated ids cannot be decoded", loaded.source.display())
    })?;
    let max_new = a.max_tokens.min(ctx - ids.len());
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        sampling,
        eos_ids: loaded.model.config.eos_token_ids.clone(),
        stop_strings: a.stop.clone(),
    };
    let mut run = single_sequence_context(&loaded.model, make(), ids.len() + max_new)?;
    let mut seq = Sequence::new();
    let stdout = std::io::stdout();
    let json = a.json;
    let g = run_generation(&loaded.model, &mut run, &mut seq, &tokenizer, &ids, &opts, |piece| {
        if !json {
            let mut out = stdout.lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
        std::ops::ControlFlow::Continue(())
    })?;
    if json {
        let v = json!({
            "tokens": g.prompt_ids,
            "generated": g.generated,
            "text": g.text,
            "stop_reason": format!("{:?}", g.stop_reason).to_lowercase(),
            "prompt_tokens_per_s": g.prompt_tokens_per_s(),
            "decode_tokens_per_s": g.decode_tokens_per_s(),
        });
        println!("{v}");
    } else {
        println!();
    }
    eprintln!(
        "prompt: {} tokens in {:.3} s ({:.1} tokens/s); generation: {} tokens in {:.3} s ({:.1} tokens/s); {}",
        g.prompt_ids.len(),
        g.prompt_time.as_secs_f64(),
        g.prompt_tokens_per_s(),
        g.generated.len(),
        g.decode_time.as_secs_f64(),
        g.decode_tokens_per_s(),
        loaded.model.backend_name(),
    );
    Ok(())
}

pub fn logits(a: LogitsArgs) -> Result<()> {
    set_threads(a.input.threads)?;
    dispatch(a.input.device.device, a)
}

impl OnBackend for LogitsArgs {
    type Output = ();
    fn run<B: Backend + 'static>(self, make: &(dyn Fn() -> B + Sync), _: Option<&Gpu>) -> Result<()> {
        logits_on(self, make)
    }
}

fn logits_on<B: Backend>(a: LogitsArgs, make: &(dyn Fn() -> B + Sync)) -> Result<()> {
    let loaded = load(&a.input, make)?;
    let ids = prompt_ids(&a.input, &loaded)?;
    let ctx = context_len(&a.input, &loaded.model.config);
    if ids.len() > ctx {
        bail!("the prompt has {} tokens, but the context holds {ctx}: shorten it or raise --ctx", ids.len());
    }
    let mut run = single_sequence_context(&loaded.model, make(), ids.len())?;
    let mut seq = Sequence::new();
    let mode = if a.all_positions { Logits::All } else { Logits::Last };
    loaded.model.forward(&mut run, &mut seq, &ids, mode)?;
    let vocab = loaded.model.config.vocab_size;
    let rows: Vec<&[f32]> = run.logits().chunks_exact(vocab).collect();
    let v = json!({ "tokens": ids, "logits": rows });
    println!("{v}");
    Ok(())
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let dir: &Path = &a.path;
    if dir.is_file() {
        let file = bitnet_models::gguf::GgufFile::open(dir)?;
        print!("{}", file.inspect());
        return Ok(());
    }
    let cfg = ModelConfig::from_dir(dir)?;
    let store = TensorStore::open_dir(dir)?;
    let mut tensors = Vec::new();
    let mut params = 0usize;
    for name in store.names() {
        let t = store.get(name)?;
        // Packed U8 projections hold four ternary weights per byte.
        let n = if name.ends_with("_proj.weight") && t.dtype == safetensors::Dtype::U8 { 4 } else { 1 }
            * t.numel();
        params += n;
        tensors.push((name.to_string(), format!("{:?}", t.dtype), t.shape.to_vec(), t.data.len()));
    }
    let bytes = store.data_bytes();
    if a.json {
        let v = json!({
            "architecture": format!("{:?}", cfg.architecture),
            "quantization": format!("{:?}", cfg.quant_form),
            "config": format!("{cfg:?}"),
            "parameters": params,
            "bytes": bytes,
            "tensors": tensors.iter().map(|(n, d, s, b)| json!({"name": n, "dtype": d, "shape": s, "bytes": b})).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(());
    }
    println!("checkpoint:    {}", dir.display());
    println!(
        "architecture:  {:?} ({:?} gate, sub-norms: {})",
        cfg.architecture, cfg.activation, cfg.sub_norms
    );
    println!("quantization:  {:?}", cfg.quant_form);
    println!(
        "shape:         vocab {}, hidden {}, intermediate {}, {} layers, {} heads / {} kv heads of {}",
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim
    );
    println!(
        "rope theta {}, rms eps {}, context {}, tied head: {}",
        cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings, cfg.tie_word_embeddings
    );
    println!("bos {:?}, eos {:?}", cfg.bos_token_id, cfg.eos_token_ids);
    println!("parameters:    {params} ({:.3} B)", params as f64 / 1e9);
    println!("tensor bytes:  {bytes} ({:.1} MiB)", bytes as f64 / (1 << 20) as f64);
    println!(
        "files:         {}",
        store.paths().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    println!("tensors ({}):", tensors.len());
    for (n, d, s, b) in &tensors {
        println!("  {n:<60} {d:<5} {s:?} {b} B");
    }
    Ok(())
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ConvertType {
    #[value(name = "tq2_0")]
    Tq2_0,
    #[value(name = "tq1_0")]
    Tq1_0,
    #[value(name = "i2_s")]
    I2S,
    F16,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LmHeadType {
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q6_k")]
    Q6K,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// HF checkpoint directory (any BitNet form `bitnet generate` runs).
    #[arg(long)]
    pub model: PathBuf,
    /// Output .gguf file (written to a temporary file and renamed when complete).
    #[arg(long)]
    pub out: PathBuf,
    /// Type of the ternary projections: tq2_0 / tq1_0 (llama.cpp), i2_s (bitnet.cpp), f16.
    #[arg(long = "type", value_enum)]
    pub weight_type: ConvertType,
    /// Type of the lm_head: the tied embedding table, or `output.weight` of an untied model
    /// (whose embedding table stays f16).
    #[arg(long, value_enum, default_value_t = LmHeadType::F16)]
    pub lm_head_type: LmHeadType,
}

impl ConvertType {
    fn weight_type(self) -> bitnet_models::convert::WeightType {
        use bitnet_models::convert::WeightType;
        match self {
            ConvertType::Tq2_0 => WeightType::Tq2_0,
            ConvertType::Tq1_0 => WeightType::Tq1_0,
            ConvertType::I2S => WeightType::I2S,
            ConvertType::F16 => WeightType::F16,
        }
    }
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {elapsed_precise}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// Source .gguf file.
    pub src: PathBuf,
    /// Output .gguf file.
    pub dst: PathBuf,
    /// New type of the ternary projections.
    #[arg(long = "type", value_enum)]
    pub weight_type: ConvertType,
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let bar = progress_bar();
    bitnet_models::convert::requantize_gguf(&a.src, &a.dst, a.weight_type.weight_type(), |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    eprintln!("wrote {}", a.dst.display());
    Ok(())
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    use bitnet_models::convert::{convert_hf_to_gguf, HeadType};
    let weight = a.weight_type.weight_type();
    let head = match a.lm_head_type {
        LmHeadType::F16 => HeadType::F16,
        LmHeadType::Q8_0 => HeadType::Q8_0,
        LmHeadType::Q6K => HeadType::Q6K,
    };
    let bar = progress_bar();
    convert_hf_to_gguf(&a.model, &a.out, weight, head, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
