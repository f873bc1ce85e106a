//! The subcommands of `bitnet`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bitnet_default_model::DEFAULT_MODEL;
use bitnet_inference::chat::ChatFormat;
use bitnet_inference::load::{load_dir_on, load_embedded_on, LoadOptions, LoadedModel};
use bitnet_inference::sampling::GenerationDefaults;
use bitnet_inference::{
    generate as run_generation, Backend, Context as RunContext, ContextOptions, CpuBackend, GenerateOptions,
    HeadFormat, Logits, Model, SamplingParams, Sequence, StopReason,
};
use bitnet_models::chat::ChatMessage;
use bitnet_models::convert::QuantizeTarget;
use bitnet_models::safetensors::TensorStore;
use bitnet_models::ModelConfig;
use clap::Args;
use serde_json::json;

use crate::device::{dispatch, DeviceArg, Gpu, OnBackend};

/// What to feed the model: text or token ids.
#[derive(Args, Clone)]
pub struct InputArgs {
    /// Checkpoint directory (config.json + model.safetensors [+ tokenizer.json]) or a .gguf file.
    /// Without it, the embedded default model runs.
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Prompt text, tokenized with the model's tokenizer (BOS added as its template says);
    /// `-` reads it from standard input.
    #[arg(short, long, conflicts_with_all = ["tokens", "file"], required_unless_present_any = ["tokens", "file"])]
    pub prompt: Option<String>,
    /// Read the prompt text from this file.
    #[arg(short = 'f', long, conflicts_with = "tokens")]
    pub file: Option<PathBuf>,
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
    /// Run a non-ternary checkpoint's projections ternarized (absmean ternary weights, int8
    /// activations) instead of as they are stored: an experiment — a model not trained for it
    /// answers badly.
    #[arg(long)]
    pub ternarize: bool,
    /// How block-format weights (GGUF Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) meet the activations:
    /// `q8` quantizes the activations per block as llama.cpp does (faster, llama.cpp's numbers),
    /// `f32` multiplies the dequantized weights with float activations (transformers' numbers
    /// from the same file).
    #[arg(long, value_enum, default_value_t = DenseActivationsArg::Q8)]
    pub dense_activations: DenseActivationsArg,
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
            ..LoadOptions::default()
        }
    }
}

/// How GGUF block-format weights (Q8_0, Q4_K, ...) meet the activations.
#[derive(Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DenseActivationsArg {
    /// Quantized per block, integer block products, as llama.cpp computes (fast).
    #[default]
    Q8,
    /// Kept in f32 against the dequantized weights, as transformers computes from the same
    /// file (slower).
    F32,
}

#[derive(Args)]
pub struct SynthArgs {
    /// Shapes to copy: 2b4t, large, 3b, 8b, tiny or tiny-llama.
    #[arg(long)]
    pub config: String,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights (the same seed writes the same model).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Replace a model already in --out.
    #[arg(long)]
    pub force: bool,
}

/// Refuses to write a model over one already in `out` unless `force`.
fn refuse_to_replace_a_model(out: &Path, force: bool) -> Result<()> {
    let existing = bitnet_models::model_files_in(out);
    if !force && !existing.is_empty() {
        let names: Vec<String> =
            existing.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
        bail!(
            "{} already holds a model ({}); pass --force to replace it, or choose another --out",
            out.display(),
            names.join(", ")
        );
    }
    Ok(())
}

pub fn synth(a: SynthArgs) -> Result<()> {
    let shape = bitnet_models::synth::shape_by_name(&a.config).with_context(|| {
        let names: Vec<&str> = bitnet_models::synth::SHAPES.iter().map(|s| s.name).collect();
        format!("--config `{}` is not one of {}", a.config, names.join(", "))
    })?;
    refuse_to_replace_a_model(&a.out, a.force)?;
    bitnet_models::synth::write_synthetic(&shape, &a.out, a.seed)?;
    eprintln!("wrote {} (shapes of `{}`, random ternary weights)", a.out.display(), shape.name);
    Ok(())
}

/// Threads per core beyond which more threads only cost: `-t 10000` would spend over a
/// minute starting threads that then wait on each other.
const MAX_THREADS_PER_CORE: usize = 4;

/// `requested` threads, or [`MAX_THREADS_PER_CORE`] × the available cores if that is fewer,
/// with a note naming `flag` when it cuts. 0 passes through for the caller's own check.
pub fn capped_threads(requested: usize, flag: &str) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cap = MAX_THREADS_PER_CORE * cores;
    if requested > cap {
        eprintln!(
            "note: {flag} {requested} is more than {MAX_THREADS_PER_CORE} threads for each of the {cores} cores: using {cap}"
        );
        return cap;
    }
    requested
}

/// Sizes the process's one thread pool.
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        let n = capped_threads(n, "--threads");
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting the thread count")?;
    }
    Ok(())
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// New tokens at most (0: only read the prompt).
    #[arg(short = 'n', long, default_value_t = 128)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print the prompt before the generated text (by default only the generated text is
    /// printed).
    #[arg(long)]
    pub echo: bool,
    /// Send the prompt as a user message through the checkpoint's chat template, and stop at
    /// its end of turn.
    #[arg(long, conflicts_with = "tokens")]
    pub chat: bool,
    /// With --chat: a system message before the prompt.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Stop when this text appears (may be repeated).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// Sampling flags. Each one left out takes the checkpoint's generation_config.json value
/// (`do_sample`, `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty`), else greedy.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Softmax temperature; 0 is greedy [default: the checkpoint's, else 0].
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens (0: off) [default: the checkpoint's, else 0].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold (1: off) [default: the checkpoint's, else 1].
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Drop tokens below this fraction of the best one's probability (0: off).
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Repetition penalty as in transformers (1: off).
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    /// Seed of the sampler's random numbers (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The flags over the checkpoint's defaults, checked; also says where they came from.
    pub fn resolve(&self, defaults: &GenerationDefaults) -> Result<(SamplingParams, Option<String>)> {
        let base = defaults.params();
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(base.temperature),
            top_k: self.top_k.unwrap_or(base.top_k),
            top_p: self.top_p.unwrap_or(base.top_p),
            min_p: self.min_p.unwrap_or(base.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(base.repeat_penalty),
            seed: self.seed,
            ..SamplingParams::default()
        };
        p.validate().map_err(|e| anyhow::anyhow!("--{}: {e}", e.param.replace('_', "-")))?;
        let from_checkpoint = self.temperature.is_none() && defaults.samples();
        let notice = from_checkpoint.then(|| {
            format!(
                "sampling as generation_config.json asks: temperature {}, top-k {}, top-p {} \
                 (--temperature 0 for greedy decoding)",
                p.temperature, p.top_k, p.top_p
            )
        });
        Ok((p, notice))
    }
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
    /// A checkpoint folder (config.json + model.safetensors) or a .gguf file.
    pub path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl InputArgs {
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            ternarize: self.ternarize,
            float_activations: self.dense_activations == DenseActivationsArg::F32,
            ..self.lm_head.options()
        }
    }
}

/// A checkpoint folder or GGUF file, or the embedded default model when `model` is `None`, on
/// the backend `backend`.
fn load<B: Backend>(model: Option<&Path>, opts: LoadOptions, backend: &B) -> Result<LoadedModel<B>> {
    Ok(match model {
        Some(given) => load_dir_on(&model_path(given)?, backend, opts)?,
        None => load_embedded_on(&DEFAULT_MODEL, backend, opts)?,
    })
}

/// A `--model` path as given, or for `ORG/NAME` the snapshot `bitnet pull` left in the Hub
/// cache; a missing path that reads as a repository id says how to download it.
pub fn model_path(given: &Path) -> Result<PathBuf> {
    let path = crate::pull::cached_model(given);
    if let Some(hint) = crate::pull::missing_model_hint(&path) {
        bail!("{}: {hint}", path.display());
    }
    Ok(path)
}

/// The prompt text of `--prompt TEXT`, `--prompt -` (standard input) or `--file FILE`.
pub fn prompt_text(input: &InputArgs) -> Result<Option<String>> {
    let text = match (&input.prompt, &input.file) {
        (Some(p), _) if p == "-" => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .context("reading the prompt from standard input (--prompt -)")?;
            s
        }
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the prompt from {} (--file)", f.display()))?,
        (None, None) => return Ok(None),
    };
    Ok(Some(text))
}

/// Prompt ids from `--prompt`, `--file` or `--tokens`, checked against the vocabulary.
fn prompt_ids<B: Backend>(input: &InputArgs, loaded: &LoadedModel<B>) -> Result<Vec<u32>> {
    let ids: Vec<u32> = match (prompt_text(input)?, &input.tokens) {
        (Some(text), _) => {
            if text.is_empty() {
                bail!("the prompt is empty: give some text with --prompt or --file, or ids with --tokens");
            }
            let tok = loaded.tokenizer.as_ref().with_context(|| {
                format!("{} has no tokenizer.json: give token ids with --tokens", loaded.source.display())
            })?;
            tok.encode(&text)?
        }
        (None, Some(list)) => list
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().parse::<u32>().with_context(|| format!("--tokens: `{s}` is not a token id")))
            .collect::<Result<_>>()?,
        (None, None) => bail!("give a prompt with --prompt, --file or token ids with --tokens"),
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

/// `--ctx`, at most the model's context (positions past it were never trained and the KV
/// cache for them could exhaust memory).
fn context_len(input: &InputArgs, cfg: &ModelConfig) -> Result<usize> {
    let max = cfg.max_position_embeddings;
    match input.ctx {
        Some(0) => bail!("--ctx must be at least 1"),
        Some(n) if n > max => {
            bail!("--ctx {n} is more than the model's context of {max} tokens (max_position_embeddings)")
        }
        Some(n) => Ok(n),
        None => Ok(max),
    }
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
    // Flags are checked before the model loads: a typo costs no loading time.
    if let Some(t) = a.sampling.temperature {
        if !(t >= 0.0 && t.is_finite()) {
            bail!("--temperature must be a finite number >= 0, got {t}");
        }
    }
    set_threads(a.input.threads)?;
    dispatch(a.input.device.device, Generate(a))
}

/// `generate` on the backend `--device` picks.
struct Generate(GenerateArgs);

impl OnBackend for Generate {
    type Output = ();
    fn run<B: Backend + 'static>(self, make: &(dyn Fn() -> B + Sync), _: Option<&Gpu>) -> Result<()> {
        generate_on(self.0, make)
    }
}

fn generate_on<B: Backend>(a: GenerateArgs, make: &(dyn Fn() -> B + Sync)) -> Result<()> {
    let mut loaded = load_reporting(a.input.model.as_deref(), a.input.load_options(), &make())?;
    let (sampling, notice) = a.sampling.resolve(&loaded.generation)?;
    let mut eos_ids = loaded.model.config.eos_token_ids.clone();
    let mut stop_strings = a.stop.clone();
    let ids = if a.chat {
        let format = ChatFormat::for_model(&loaded)?;
        if format.is_fallback() {
            eprintln!("note: {} has no chat template; using the plain fallback", loaded.source.display());
        }
        let text = prompt_text(&a.input)?.context("--chat needs the prompt as text (--prompt or --file)")?;
        let mut messages: Vec<ChatMessage> =
            a.system.iter().map(|s| ChatMessage::system(s.clone())).collect();
        messages.push(ChatMessage::user(text));
        let tok = loaded.tokenizer.as_ref().context("--chat needs the model's tokenizer")?;
        eos_ids = format.stop_ids.clone();
        stop_strings.extend(format.stop_strings.iter().cloned());
        format.encode(tok, &messages, true)?
    } else {
        prompt_ids(&a.input, &loaded)?
    };
    // Said once the prompt is read: a prompt that cannot be read is the only thing to say then.
    if let Some(n) = notice {
        eprintln!("{n}");
    }
    let ctx = context_len(&a.input, &loaded.model.config)?;
    if ids.len() > ctx {
        bail!("the prompt has {} tokens, but the context holds {ctx}: shorten it or raise --ctx", ids.len());
    }
    if ids.len() == ctx && a.max_tokens > 0 {
        bail!(
            "the prompt's {} tokens fill the context of {ctx}, leaving no room for a new token: shorten it or raise --ctx",
            ids.len()
        );
    }
    let tokenizer = loaded.tokenizer.take().with_context(|| {
        format!("{} has no tokenizer.json, so generated ids cannot be decoded", loaded.source.display())
    })?;
    let max_new = a.max_tokens.min(ctx - ids.len());
    if max_new < a.max_tokens {
        eprintln!(
            "note: the context holds {ctx} tokens, so at most {max_new} of the {} asked for fit after the prompt",
            a.max_tokens
        );
    }
    let opts = GenerateOptions { max_new_tokens: max_new, sampling, eos_ids, stop_strings };
    let mut run = single_sequence_context(&loaded.model, make(), ids.len() + max_new + 1)?;
    let mut seq = Sequence::new();
    let stdout = std::io::stdout();
    let json = a.json;
    if a.echo && !json {
        let mut out = stdout.lock();
        let _ = out.write_all(tokenizer.decode(&ids)?.as_bytes());
        let _ = out.flush();
    }
    if ids.len() > 512 {
        eprintln!("reading the prompt: {} tokens…", ids.len());
    }
    let g = if max_new == 0 {
        // Only the prompt: its logits are computed, nothing is generated.
        let start = std::time::Instant::now();
        loaded.model.forward(&mut run, &mut seq, &ids, Logits::Last)?;
        bitnet_inference::Generation {
            prompt_ids: ids.clone(),
            cached_prompt_tokens: 0,
            generated: Vec::new(),
            text: String::new(),
            stop_reason: StopReason::MaxTokens,
            prompt_time: start.elapsed(),
            decode_time: std::time::Duration::ZERO,
        }
    } else {
        crate::interrupt::set_mode(crate::interrupt::Mode::Streaming);
        run_generation(&loaded.model, &mut run, &mut seq, &tokenizer, &ids, &opts, |piece| {
            if !json {
                let mut out = stdout.lock();
                if out.write_all(piece.as_bytes()).and_then(|_| out.flush()).is_err() {
                    // stdout closed (a pipe's reader left): stop quietly.
                    return std::ops::ControlFlow::Break(());
                }
            }
            match crate::interrupt::take() {
                true => std::ops::ControlFlow::Break(()),
                false => std::ops::ControlFlow::Continue(()),
            }
        })?
    };
    crate::interrupt::set_mode(crate::interrupt::Mode::Other);
    // The request was cut to what fits the context: running out of it is what stopped it.
    let mut g = g;
    if g.stop_reason == StopReason::MaxTokens && max_new < a.max_tokens && g.generated.len() == max_new {
        g.stop_reason = StopReason::ContextFull;
    }
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
    if g.stop_reason == StopReason::ContextFull {
        eprintln!("stopped: the context of {ctx} tokens is full (--ctx raises it)");
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
    if g.stop_reason == StopReason::Cancelled {
        eprintln!("interrupted");
        std::process::exit(crate::interrupt::EXIT_INTERRUPTED);
    }
    Ok(())
}

/// A model, its tokenizer and its conversation format, for `chat`, `generate --chat` and
/// `serve`; says so when the checkpoint has no chat template.
pub fn load_for_chat(
    model: Option<&Path>,
    threads: Option<usize>,
    head: HeadArg,
) -> Result<(LoadedModel, bitnet_models::tokenizer::Tokenizer, ChatFormat)> {
    set_threads(threads)?;
    let mut loaded = load_reporting(model, head.options(), &CpuBackend::new())?;
    let format = ChatFormat::for_model(&loaded)?;
    if format.is_fallback() {
        eprintln!(
            "note: {} has no chat template; using the plain fallback (System:/User:/Assistant: lines)",
            loaded.source.display()
        );
    }
    let tokenizer = loaded.tokenizer.take().with_context(|| {
        format!("{} has no tokenizer, so a conversation cannot be encoded", loaded.source.display())
    })?;
    Ok((loaded, tokenizer, format))
}

/// Loads the model, saying so on stderr when it takes more than a moment.
fn load_reporting<B: Backend>(
    model: Option<&Path>,
    opts: LoadOptions,
    backend: &B,
) -> Result<LoadedModel<B>> {
    let start = std::time::Instant::now();
    let model = model.map(model_path).transpose()?;
    let model = model.as_deref();
    let large = model.and_then(model_bytes).is_some_and(|b| b > 256 << 20);
    if let (true, Some(path)) = (large, model) {
        eprintln!("loading {}…", path.display());
    }
    let loaded = load(model, opts, backend)?;
    if large {
        eprintln!("loaded in {:.1} s", start.elapsed().as_secs_f64());
    }
    Ok(loaded)
}

/// Bytes of a model file, or of the files in a checkpoint folder.
fn model_bytes(path: &Path) -> Option<u64> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return Some(meta.len());
    }
    let entries = std::fs::read_dir(path).ok()?;
    Some(entries.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
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
    let loaded = load(a.input.model.as_deref(), a.input.load_options(), &make())?;
    let ids = prompt_ids(&a.input, &loaded)?;
    let ctx = context_len(&a.input, &loaded.model.config)?;
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
    let resolved = model_path(&a.path)?;
    let dir: &Path = &resolved;
    if !dir.exists() {
        bail!(
            "{}: no such file or folder (inspect takes a checkpoint folder with config.json, or a .gguf file)",
            dir.display()
        );
    }
    if dir.is_file() {
        let file = bitnet_models::gguf::GgufFile::open(dir)?;
        // How the engine reads the file, when it can run it at all.
        let runs_as = bitnet_models::gguf_model::config_from_gguf(&file).map(|c| c.architecture.describe());
        if a.json {
            let mut v = file.inspect_json();
            if let (Some(obj), Ok(arch)) = (v.as_object_mut(), &runs_as) {
                obj.insert("runs_as".into(), json!(arch));
            }
            println!("{v}");
        } else {
            match &runs_as {
                Ok(arch) => println!("runs as:       {arch}"),
                Err(e) => println!("runs as:       nothing: {e}"),
            }
            print!("{}", file.inspect());
        }
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
            "architecture_description": cfg.architecture.describe(),
            "head_dim": cfg.head_dim,
            "qk_norm": cfg.qk_norm(),
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
    println!("architecture:  {}", cfg.architecture.describe());
    println!(
        "layer:         {:?} gate, sub-norms: {}, per-head q/k norms: {}, norm before every projection: {}",
        cfg.activation,
        cfg.sub_norms,
        cfg.qk_norm(),
        cfg.bitlinear_input_norm.is_some()
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
    if let Some(s) = &cfg.sliding {
        let global: Vec<usize> = (0..cfg.num_layers).filter(|&l| cfg.sliding_window(l).is_none()).collect();
        println!(
            "attention:     window {} (rope theta {}) except global layers {global:?}; scores × {}",
            s.window,
            s.rope_theta,
            cfg.attention_scale()
        );
    }
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
    #[value(name = "q2_0")]
    Q2_0,
    #[value(name = "q1_0")]
    Q1_0,
    #[value(name = "pq2_0")]
    Pq2_0,
    #[value(name = "ptq1_0")]
    Ptq1_0,
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
    #[value(name = "q4_k")]
    Q4K,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// HF checkpoint directory (any BitNet form `bitnet generate` runs).
    #[arg(long)]
    pub model: PathBuf,
    /// Output .gguf file (written to a temporary file and renamed when complete).
    #[arg(long)]
    pub out: PathBuf,
    /// Type of the ternary projections: tq2_0 / tq1_0 / q2_0 / q1_0 (llama.cpp; q1_0 holds no
    /// zeros), pq2_0 / ptq1_0 (PrismML), i2_s (bitnet.cpp), f16.
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
            ConvertType::Q2_0 => WeightType::Q2_0,
            ConvertType::Q1_0 => WeightType::Q1_0,
            ConvertType::Pq2_0 => WeightType::Pq2_0,
            ConvertType::Ptq1_0 => WeightType::Ptq1_0,
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
    /// New type: tq2_0 / tq1_0 / q2_0 / q1_0 (llama.cpp), pq2_0 / ptq1_0 (PrismML), i2_s
    /// (bitnet.cpp) re-encode the ternary projections (exact codes, group scales kept where the
    /// target holds them); f16 /
    /// bf16 / q8_0 / q6_k / q4_k re-encode every weight matrix (projections, embeddings, head) from its
    /// decoded values.
    #[arg(long = "type", value_parser = quantize_target_parser())]
    pub weight_type: QuantizeTarget,
}

/// `--type` of `quantize`: one of the names bitnet-models takes, listed by `--help` and in the
/// error for any other.
fn quantize_target_parser() -> impl clap::builder::TypedValueParser<Value = QuantizeTarget> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(QuantizeTarget::NAMES)
        .map(|name| QuantizeTarget::from_name(&name).expect("a listed name"))
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let bar = progress_bar();
    bitnet_models::convert::quantize_gguf(&a.src, &a.dst, a.weight_type, |done, total| {
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
        LmHeadType::Q4K => HeadType::Q4K,
    };
    let bar = progress_bar();
    convert_hf_to_gguf(&model_path(&a.model)?, &a.out, weight, head, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
