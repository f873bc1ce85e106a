//! The `bitnet train` command: [`TrainArgs`] and [`run_train`].

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bitnet_models::tokenizer::parse_tokenizer_json;
use bitnet_models::{Activation, Architecture, ModelConfig, QuantForm};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::checkpoint::{self, TrainState};
use crate::data::{self, Sampler, TokenFile, BOS_ID, EOS_ID};
use crate::export::{export_hf, write_atomic};
use crate::generate::sample_text;
use crate::layers::bitlinear::{Backward, Precision};
use crate::model::{Model, Params};
use crate::optim::{clip_grad_norm, AdamW, Schedule, ScheduleKind};
use crate::rng::Rng;

/// Model and run sizes to start from; every field can be overridden by its flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum Preset {
    /// 0.4 M parameters, 128-token windows: a smoke test (30 steps in seconds).
    Tiny,
    /// 5.0 M parameters (vocab 4096, hidden 256, intermediate 1024, 4 layers: rows of multiples of
    /// 256 columns, which every ternary GGUF type holds): the default model and the speed benchmark.
    Small,
    /// 11 M parameters (vocab 4096, hidden 384, 6 layers).
    Medium,
}

/// The model family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum Arch {
    /// BitNet b1.58 2B-4T: ReLU² gate, sub-norms, tied head.
    Bitnet,
    /// llama-1.58 (HF1BitLLM): SiLU gate, no sub-norms, untied head.
    Llama158,
}

/// `bitnet train`: quantization-aware training of a BitNet b1.58 model from a text file.
///
/// With `--resume` the run's settings come from its checkpoint; of the flags that shape the
/// run only `--steps`, `--schedule-steps`, `--save-every` and `--threads` still apply.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// UTF-8 text to train on; its last 5 % (cut at a line break) is the validation split.
    #[arg(long)]
    pub data: PathBuf,
    /// Model and run sizes.
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// Output folder: the exported HF model, tokenizer.json, train_log.jsonl, checkpoints/.
    #[arg(long)]
    pub out: PathBuf,
    /// Optimizer steps (default: the preset's). With --resume: train on until this step, so a
    /// finished run can be extended.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Length of the learning-rate schedule, in steps (default: --steps). A resumed run keeps
    /// its schedule's length unless this is given.
    #[arg(long)]
    pub schedule_steps: Option<u64>,
    /// Seed of the initial weights and of the order the data is read in.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every N steps (0: only at the end and on Ctrl-C). Kept in the
    /// checkpoint, so a resumed run goes on saving at the same rhythm unless this is given.
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Continue from the newest readable checkpoint in --out (settings come from the
    /// checkpoint).
    #[arg(long)]
    pub resume: bool,
    /// Start a new run in an --out that holds a model or an earlier run's checkpoints,
    /// replacing the model and deleting the checkpoints.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Train the same model in full precision (the baseline) instead of ternary.
    #[arg(long)]
    pub fp: bool,
    /// The BitLinear backward's products: `f32` (exact STE gradients) or `int16` (16-bit
    /// gradients times the integer codes, within about 1e-4 of the exact gradients: faster on
    /// AVX2 CPUs and on many AVX-512 cores; on ARM it has no SIMD kernel yet, so keep f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub backward: Backward,
    /// Worker threads (default: all cores). Results are bit-identical for a given count.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Model family (default: bitnet).
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    /// Sequences per micro-batch.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Tokens per sequence (context length).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[arg(long)]
    pub accum: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Steps of linear warmup to the peak learning rate.
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Shape of the learning-rate curve after warmup (default: bitnet).
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    /// AdamW's decoupled weight decay on the matrices (default: 0.1).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm to this (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Tokenizer size (258 = plain bytes, no merges).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Use this tokenizer.json instead of training one.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Model width (hidden size); a multiple of --heads and of 4.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Transformer layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Width of the MLP's inner layer; a multiple of 4.
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Attention (query) heads; divides --hidden.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (grouped-query attention); divides --heads.
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Measure the validation loss every K steps.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Validation tokens per periodic measurement (the final one uses the whole split).
    #[arg(long, default_value_t = 32768)]
    pub eval_tokens: usize,
    /// Write a log line every N steps.
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Sample generations printed (and saved to samples.txt) at the end.
    #[arg(long, default_value_t = 5)]
    pub samples: usize,
    /// No progress bar and no log lines on stderr (notes and the final line still print).
    #[arg(long)]
    pub quiet: bool,
    /// Act as if Ctrl-C came right after step N (for tests of interrupt and resume).
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
}

/// Everything that decides the numbers a run produces; stored in checkpoints and `run.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunSettings {
    pub arch: Arch,
    pub precision: Precision,
    /// Absent from runs written before it existed, which were all f32.
    #[serde(default)]
    pub backward: Backward,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub batch: usize,
    pub accum: usize,
    pub steps: u64,
    pub seed: u64,
    pub schedule: Schedule,
    pub clip: f64,
    pub eval_every: u64,
    pub eval_tokens: usize,
    /// Validation tokens of the final measurement (the whole split for all but `tiny`).
    pub final_eval_tokens: usize,
    pub log_every: u64,
    pub threads: usize,
    /// Checkpoint every this many steps (0: at the end and on Ctrl-C only). Absent from runs
    /// written before it was kept, which resume without periodic checkpoints.
    #[serde(default)]
    pub save_every: u64,
}

impl RunSettings {
    pub(crate) fn from_args(a: &TrainArgs, threads: usize) -> Self {
        // (vocab, hidden, layers, inter, heads, kv, seq, batch, steps, lr, warmup, eval, log)
        let p = match a.preset {
            Preset::Tiny => (512, 128, 2, 384, 4, 2, 128, 8, 300, 4e-3, 20, 50, 1),
            Preset::Small => (4096, 256, 4, 1024, 4, 2, 256, 16, 2000, 3e-3, 100, 200, 10),
            Preset::Medium => (4096, 384, 6, 1152, 6, 2, 256, 32, 3000, 2.5e-3, 150, 250, 10),
        };
        let steps = a.steps.unwrap_or(p.8);
        let schedule_steps = a.schedule_steps.unwrap_or(steps);
        let kind = a.schedule.unwrap_or(ScheduleKind::Bitnet);
        Self {
            arch: a.arch.unwrap_or(Arch::Bitnet),
            precision: if a.fp { Precision::Full } else { Precision::Ternary },
            backward: a.backward,
            vocab: a.vocab.unwrap_or(p.0),
            hidden: a.hidden.unwrap_or(p.1),
            layers: a.layers.unwrap_or(p.2),
            intermediate: a.intermediate.unwrap_or(p.3),
            heads: a.heads.unwrap_or(p.4),
            kv_heads: a.kv_heads.unwrap_or(p.5),
            seq: a.seq.unwrap_or(p.6),
            batch: a.batch.unwrap_or(p.7),
            accum: a.accum.unwrap_or(1),
            steps,
            seed: a.seed,
            schedule: Schedule {
                kind,
                peak_lr: a.lr.unwrap_or(if a.fp { p.9 / 2.0 } else { p.9 }),
                warmup: a.warmup.unwrap_or(p.10).min(schedule_steps),
                total: schedule_steps,
                weight_decay: a.weight_decay.unwrap_or(0.1),
                min_lr_ratio: 0.1,
                stage2_ratio: 0.25,
            },
            clip: a.clip,
            eval_every: a.eval_every.unwrap_or(p.11),
            eval_tokens: a.eval_tokens,
            final_eval_tokens: if a.preset == Preset::Tiny { a.eval_tokens } else { usize::MAX },
            log_every: a.log_every.unwrap_or(p.12).max(1),
            threads,
            save_every: a.save_every.unwrap_or(0),
        }
    }

    /// The model config these settings describe.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let bitnet = self.arch == Arch::Bitnet;
        if self.heads == 0 || !self.hidden.is_multiple_of(self.heads) {
            bail!("--hidden {} must be a multiple of --heads {}", self.hidden, self.heads);
        }
        for (name, v) in [("hidden", self.hidden), ("intermediate", self.intermediate)] {
            if v == 0 || !v.is_multiple_of(4) {
                bail!("--{name} {v} must be a positive multiple of 4 (2-bit packing)");
            }
        }
        if self.kv_heads == 0
            || !self.heads.is_multiple_of(self.kv_heads)
            || !(self.hidden / self.heads * self.kv_heads).is_multiple_of(4)
        {
            bail!(
                "--kv-heads {} must divide --heads {} (and kv width must divide by 4)",
                self.kv_heads,
                self.heads
            );
        }
        if self.precision == Precision::Full && self.backward == Backward::Int16 {
            bail!("--backward int16 multiplies by the ternary and int8 codes, which --fp does not have: drop one of them");
        }
        if self.seq < 2 {
            bail!("--seq {} must be at least 2 (a window predicts each next token)", self.seq);
        }
        let counts = [
            ("--batch", self.batch as u64),
            ("--accum", self.accum as u64),
            ("--steps", self.steps),
            ("--layers", self.layers as u64),
        ];
        if let Some((flag, _)) = counts.iter().find(|(_, n)| *n == 0) {
            bail!("{flag} must be positive");
        }
        if self.schedule.total == 0 {
            bail!("--schedule-steps must be positive");
        }
        let cfg = ModelConfig {
            architecture: if bitnet { Architecture::BitNet } else { Architecture::Llama158 },
            vocab_size: self.vocab,
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.hidden / self.heads,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: Default::default(),
            max_position_embeddings: self.seq,
            tie_word_embeddings: bitnet,
            activation: if bitnet { Activation::Relu2 } else { Activation::Silu },
            sub_norms: bitnet,
            quant_form: QuantForm::PackedMultiply,
            bitlinear_input_norm: None,
            bos_token_id: Some(BOS_ID),
            eos_token_ids: vec![EOS_ID],
            query_pre_attn_scalar: None,
            sliding: None,
        };
        cfg.validate(Path::new("<train settings>")).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(cfg)
    }

    fn tokens_per_step(&self) -> u64 {
        (self.batch * self.seq * self.accum) as u64
    }
}

/// Text the tokenizer is trained on (spread over the training split).
const TOKENIZER_SAMPLE_BYTES: usize = 4 << 20;

static STOP: AtomicBool = AtomicBool::new(false);
/// Whether a run is in its step loop, where a stop request is honored.
static STEPPING: AtomicBool = AtomicBool::new(false);

/// Asks a running [`train`] to save a checkpoint and return after its current step: what the
/// program's Ctrl-C handler calls. Returns whether a run is stepping and will do so; before its
/// first step (while the data is being tokenized) there is nothing to save, and the caller
/// should end the process its own way.
pub fn request_stop() -> bool {
    STOP.store(true, Ordering::SeqCst);
    STEPPING.load(Ordering::SeqCst)
}

/// One line of `train_log.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    pub step: u64,
    pub loss: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

/// What a finished (or stopped) run reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub steps_done: u64,
    pub stopped_early: bool,
    pub final_loss: f64,
    pub val_loss: Option<f64>,
    pub parameters: usize,
    pub tokens_per_s: f64,
}

/// What a finished run reported (its `metrics.json`), or what its checkpoint says.
fn finished_summary(out: &Path, state: &TrainState) -> Result<Summary> {
    let path = out.join("metrics.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).with_context(|| format!("reading {}", path.display())),
        Err(_) => Ok(Summary {
            steps_done: state.step,
            stopped_early: false,
            final_loss: f64::NAN,
            val_loss: None,
            parameters: 0,
            tokens_per_s: 0.0,
        }),
    }
}

/// What a run reports after every optimizer step (to [`train_with`]'s callback).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Steps done so far (1 after the first).
    pub step: u64,
    /// Steps the run will do in all.
    pub steps: u64,
    /// Mean training loss of this step's micro-batches.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Training tokens seen so far.
    pub tokens: u64,
    pub tokens_per_s: f64,
}

impl TrainArgs {
    /// The arguments `bitnet train --data <data> --out <out>` would have: every other setting
    /// at its command-line default.
    pub fn new(data: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        use clap::{Args, FromArgMatches};
        let (data, out) = (data.into(), out.into());
        let command = Self::augment_args(clap::Command::new("train").no_binary_name(true));
        let matches = command
            .try_get_matches_from(["--data", "-", "--out", "-"])
            .expect("--data and --out are the only required flags");
        let mut args =
            Self::from_arg_matches(&matches).expect("the matches come from this struct's own flags");
        args.data = data;
        args.out = out;
        args
    }
}

/// Runs `bitnet train` (see [`TrainArgs`]).
pub fn run_train(args: &TrainArgs) -> Result<()> {
    train(args).map(|_| ())
}

/// [`run_train`], returning the run's summary. A [`request_stop`] (the CLI's signal handler
/// calls it) saves a checkpoint and stops the run.
pub fn train(args: &TrainArgs) -> Result<Summary> {
    train_with(args, |_| ControlFlow::Continue(()))
}

/// [`train`] for programs that embed training (the Python bindings): `on_step` hears of every
/// optimizer step, and its `Break` stops the run as Ctrl-C does (a checkpoint is saved, the
/// model exported, the summary says `stopped_early`). Installs no signal handler.
pub fn train_with(
    args: &TrainArgs,
    on_step: impl FnMut(&StepReport) -> ControlFlow<()> + Send,
) -> Result<Summary> {
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let pool =
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("starting the thread pool")?;
    STOP.store(false, Ordering::SeqCst);
    let out_existed = args.out.exists();
    let result = pool.install(|| train_in_pool(args, threads, on_step));
    STEPPING.store(false, Ordering::SeqCst);
    if result.is_err() && !out_existed && checkpoint::list(&args.out).is_ok_and(|c| c.is_empty()) {
        // This run made the folder and saved nothing worth keeping in it: leave no empty or
        // half-prepared folder behind.
        let _ = std::fs::remove_dir_all(&args.out);
    }
    result
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read --data {}", path.display()))?;
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        bail!("--data {} is empty", path.display());
    }
    String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("--data {} is not UTF-8 text: {e}", path.display()))
}

struct Prepared {
    settings: RunSettings,
    tok: Tokenizer,
    train: TokenFile,
    val: TokenFile,
}

/// Tokenizes the data into `out/data/` (fresh run) or opens what a resumed run left there.
fn prepare_data(args: &TrainArgs, settings: RunSettings) -> Result<Prepared> {
    let out = &args.out;
    let data_dir = out.join("data");
    let tok_path = out.join("tokenizer.json");
    let mut settings = settings;
    if !args.resume {
        let t0 = Instant::now();
        let text = read_text(&args.data)?;
        std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let given_tokenizer = match &args.tokenizer {
            Some(p) => {
                Some(std::fs::read(p).with_context(|| format!("reading --tokenizer {}", p.display()))?)
            }
            None => None,
        };
        let key = {
            let mut h = fnv1a(0xcbf2_9ce4_8422_2325, text.as_bytes());
            h = fnv1a(h, &(settings.vocab as u64).to_le_bytes());
            h = fnv1a(h, &(TOKENIZER_SAMPLE_BYTES as u64).to_le_bytes());
            h = fnv1a(h, given_tokenizer.as_deref().unwrap_or(b"trained-v1"));
            h
        };
        let cached = token_cache_dir().map(|d| d.join(format!("tokens-{key:016x}")));
        let files = ["tokenizer.json", "data/train.tokens", "data/val.tokens"];
        let hit = cached
            .as_ref()
            .is_some_and(|c| files.iter().all(|f| c.join(f.rsplit('/').next().unwrap()).exists()));
        if let (true, Some(c)) = (hit, &cached) {
            for f in files {
                std::fs::copy(c.join(f.rsplit('/').next().unwrap()), out.join(f))
                    .with_context(|| format!("copying cached {f} from {}", c.display()))?;
            }
            eprintln!("data: tokenizer and token files from the cache {}", c.display());
        } else {
            let (train_text, val_text) = data::split_train_val(&text);
            let tok = match (&given_tokenizer, &args.tokenizer) {
                (Some(bytes), Some(p)) => {
                    parse_tokenizer_json(bytes, p).map_err(|e| anyhow::anyhow!("--tokenizer: {e}"))?
                }
                _ => data::train_tokenizer(
                    &data::tokenizer_sample(train_text, TOKENIZER_SAMPLE_BYTES),
                    settings.vocab,
                )?,
            };
            let t1 = Instant::now();
            let vocab = tok.get_vocab_size(true);
            tok.save(&tok_path, false).map_err(|e| anyhow::anyhow!("saving {}: {e}", tok_path.display()))?;
            let train_ids = data::encode_text(&tok, train_text)?;
            let val_ids = data::encode_text(&tok, val_text)?;
            data::write_token_file(&data_dir.join("train.tokens"), &train_ids, vocab)?;
            data::write_token_file(&data_dir.join("val.tokens"), &val_ids, vocab)?;
            eprintln!(
                "data: tokenizer of {vocab} tokens trained in {:.1} s; {} bytes tokenized in {:.1} s",
                (t1 - t0).as_secs_f64(),
                text.len(),
                t1.elapsed().as_secs_f64()
            );
            if let Some(c) = &cached {
                // best effort: a cache that cannot be written only costs time
                let _ = std::fs::create_dir_all(c).and_then(|_| {
                    for f in files {
                        let tmp = c.join(format!("{}.tmp", f.rsplit('/').next().unwrap()));
                        std::fs::copy(out.join(f), &tmp)?;
                        std::fs::rename(&tmp, c.join(f.rsplit('/').next().unwrap()))?;
                    }
                    Ok(())
                });
            }
        }
    }
    let tok_bytes = std::fs::read(&tok_path).with_context(|| format!("reading {}", tok_path.display()))?;
    let tok = parse_tokenizer_json(&tok_bytes, &tok_path)?;
    settings.vocab = tok.get_vocab_size(true);
    let train = TokenFile::open(&data_dir.join("train.tokens"))?;
    let val = TokenFile::open(&data_dir.join("val.tokens"))?;
    if train.len() < settings.seq + 2 {
        bail!(
            "the training split has {} tokens, fewer than one window of --seq {} + 1",
            train.len(),
            settings.seq
        );
    }
    if train.max_id() as usize >= settings.vocab {
        bail!("token ids exceed the vocabulary size {}", settings.vocab);
    }
    Ok(Prepared { settings, tok, train, val })
}

/// 64-bit FNV-1a, continuing from `h`.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Where tokenized data is cached between runs: `$BITNET_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/bitnet`, else `~/.cache/bitnet`; `BITNET_CACHE_DIR=off` disables it.
fn token_cache_dir() -> Option<PathBuf> {
    match std::env::var_os("BITNET_CACHE_DIR") {
        Some(v) if v == "off" => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(|x| PathBuf::from(x).join("bitnet"))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("bitnet"))),
    }
}

fn mean_val_loss(
    model: &Model<f32>,
    w: &crate::model::Prepared<f32>,
    windows: &[u32],
    s: &RunSettings,
) -> Option<f64> {
    let per = s.seq + 1;
    let n = windows.len() / per;
    if n == 0 {
        return None;
    }
    let mut total = 0.0;
    for chunk in windows.chunks(per * s.batch) {
        let b = chunk.len() / per;
        total += model.loss(w, chunk, b, s.seq) * b as f64;
    }
    Some(total / n as f64)
}

/// The flags that shape a run, which a resumed run takes from its checkpoint instead.
fn flags_ignored_on_resume(a: &TrainArgs) -> Vec<&'static str> {
    let given = [
        ("--arch", a.arch.is_some()),
        ("--batch", a.batch.is_some()),
        ("--seq", a.seq.is_some()),
        ("--accum", a.accum.is_some()),
        ("--lr", a.lr.is_some()),
        ("--warmup", a.warmup.is_some()),
        ("--schedule", a.schedule.is_some()),
        ("--weight-decay", a.weight_decay.is_some()),
        ("--vocab", a.vocab.is_some()),
        ("--tokenizer", a.tokenizer.is_some()),
        ("--hidden", a.hidden.is_some()),
        ("--layers", a.layers.is_some()),
        ("--intermediate", a.intermediate.is_some()),
        ("--heads", a.heads.is_some()),
        ("--kv-heads", a.kv_heads.is_some()),
        ("--eval-every", a.eval_every.is_some()),
        ("--log-every", a.log_every.is_some()),
    ];
    given.iter().filter(|(_, g)| *g).map(|(f, _)| *f).collect()
}

/// The settings of a resumed run: the checkpoint's, with the flags that may change between
/// invocations (`--threads`, `--save-every`, `--steps`, `--schedule-steps`) applied, each
/// change said on stderr.
fn resumed_settings(args: &TrainArgs, threads: usize, loaded: &checkpoint::Loaded) -> Result<RunSettings> {
    let mut s: RunSettings =
        serde_json::from_value(loaded.settings.clone()).context("the checkpoint's settings")?;
    let ignored = flags_ignored_on_resume(args);
    if !ignored.is_empty() {
        eprintln!("note: {} ignored: a resumed run keeps the settings of its checkpoint", ignored.join(", "));
    }
    if s.threads != threads {
        eprintln!(
            "note: resuming with {threads} threads; the run used {} (losses may differ in the last bits)",
            s.threads
        );
        s.threads = threads;
    }
    if let Some(n) = args.save_every.filter(|&n| n != s.save_every) {
        eprintln!("note: --save-every {n} replaces the run's {}", s.save_every);
        s.save_every = n;
    }
    let step = loaded.state.step;
    if let Some(steps) = args.steps {
        if steps < step {
            bail!("--steps {steps} is below the checkpoint's step {step}: a run cannot go back");
        }
        if steps != s.steps {
            eprintln!(
                "note: --steps {steps}: the run goes on to step {steps} (it was to stop at {})",
                s.steps
            );
            s.steps = steps;
        }
    }
    if let Some(n) = args.schedule_steps.filter(|&n| n != s.schedule.total) {
        eprintln!(
            "note: --schedule-steps {n}: the learning-rate schedule now spans {n} steps (it spanned {})",
            s.schedule.total
        );
        s.schedule.total = n;
    }
    if s.steps > s.schedule.total && step < s.steps {
        eprintln!(
            "note: the learning-rate schedule keeps its length of {} steps; steps after it use its final rate {} \
             (--schedule-steps N stretches it)",
            s.schedule.total,
            s.schedule.lr(s.schedule.total)
        );
    }
    Ok(s)
}

fn train_in_pool(
    args: &TrainArgs,
    threads: usize,
    mut on_step: impl FnMut(&StepReport) -> ControlFlow<()>,
) -> Result<Summary> {
    let out = &args.out;
    let (settings, resume_from) = if args.resume {
        let checkpoint::Newest { loaded, path, skipped } = checkpoint::load_newest(out)?;
        for (bad, why) in &skipped {
            // The reason names the file already where it comes from reading it.
            let why = format!("{why:#}");
            match why.contains(&bad.display().to_string()) {
                true => eprintln!("warning: skipping a checkpoint: {why}"),
                false => eprintln!("warning: skipping {}: {why}", bad.display()),
            }
        }
        if !skipped.is_empty() {
            eprintln!("warning: resuming from the older {}", path.display());
        }
        let s = resumed_settings(args, threads, &loaded)?;
        if loaded.state.step >= s.steps {
            // Finished: its model, log and metrics stay as they are.
            eprintln!(
                "{}: the run is finished ({} of {} steps); nothing to do (--steps N above {} trains it further)",
                out.display(),
                loaded.state.step,
                s.steps,
                loaded.state.step
            );
            return finished_summary(out, &loaded.state);
        }
        (s, Some(loaded))
    } else {
        let settings = RunSettings::from_args(args, threads);
        // The flags are checked before the data is read and tokenized, which can take long.
        settings.model_config()?;
        let checkpoints = checkpoint::list(out)?;
        let model = bitnet_models::model_files_in(out);
        if !args.force {
            if !checkpoints.is_empty() {
                bail!(
                    "{} already holds checkpoints; pass --resume to continue, --force to start over \
                     (deleting them), or choose another --out",
                    out.display()
                );
            }
            if !model.is_empty() {
                let names: Vec<String> = model
                    .iter()
                    .filter_map(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .collect();
                bail!(
                    "{} already holds a model ({}); pass --force to replace it, or choose another --out",
                    out.display(),
                    names.join(", ")
                );
            }
        } else if !checkpoints.is_empty() {
            let dir = checkpoint::checkpoint_dir(out);
            eprintln!("--force: deleting the earlier run's checkpoints in {}", dir.display());
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        (settings, None)
    };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let Prepared { settings: s, tok, train: train_data, val: val_data } = prepare_data(args, settings)?;
    let config = s.model_config()?;
    write_atomic(&out.join("run.json"), serde_json::to_string_pretty(&s)?.as_bytes())?;
    let settings_json = serde_json::to_value(&s)?;

    let mut model = Model::<f32>::init(config, s.precision, s.seed);
    model.backward = s.backward;
    let mut opt = AdamW::new(&model.params, &model.layout);
    let mut sampler = Sampler::new(s.seed);
    let mut state = TrainState { step: 0, tokens_seen: 0, sampler: sampler.rng.state, adam_step: 0 };
    let log_path = out.join("train_log.jsonl");
    let mut log_lines: Vec<String> = Vec::new();
    if let Some(loaded) = resume_from {
        checkpoint::fill(&mut model.params, &loaded.params, "parameter")?;
        checkpoint::fill(&mut opt.m, &loaded.adam_m, "adam_m")?;
        checkpoint::fill(&mut opt.v, &loaded.adam_v, "adam_v")?;
        opt.step = loaded.state.adam_step;
        sampler.rng.state = loaded.state.sampler;
        state = loaded.state;
        // keep the log lines up to the checkpoint; later ones will be written again
        if let Ok(text) = std::fs::read_to_string(&log_path) {
            for line in text.lines() {
                if let Ok(l) = serde_json::from_str::<LogLine>(line) {
                    if l.step <= state.step {
                        log_lines.push(line.to_string());
                    }
                }
            }
        }
    }
    let mut log =
        std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    for l in &log_lines {
        writeln!(log, "{l}")?;
    }

    let val_windows = data::validation_windows(&val_data, s.seq, s.eval_tokens);
    let n_params = model.params.count();
    eprintln!(
        "bitnet train: {} {:?} model, {n_params} parameters, {} train / {} val tokens, {} steps of {} tokens, {threads} threads",
        match s.arch {
            Arch::Bitnet => "bitnet",
            Arch::Llama158 => "llama-1.58",
        },
        s.precision,
        train_data.len(),
        val_data.len(),
        s.steps,
        s.tokens_per_step()
    );

    let pb = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(s.steps), ProgressDrawTarget::stderr())
    };
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_position(state.step);
    let mut grads = Params::<f32>::zeros_like(&model.params);
    let started = Instant::now();
    let tokens_at_start = state.tokens_seen;
    let mut last_loss = f64::NAN;
    let mut stopped_early = false;
    STEPPING.store(true, Ordering::SeqCst);
    while state.step < s.steps {
        let step = state.step;
        let weights = model.prepare();
        grads.fill_zero();
        let mut loss = 0.0;
        for _ in 0..s.accum {
            let batch = sampler.next_batch(&train_data, s.batch, s.seq);
            loss += model.loss_and_grads(&weights, &batch, s.batch, s.seq, &mut grads, 1.0 / s.accum as f64);
        }
        loss /= s.accum as f64;
        if !loss.is_finite() {
            bail!("the loss became {loss} at step {}; try a lower --lr", step + 1);
        }
        let grad_norm = clip_grad_norm(&mut grads, s.clip);
        let lr = s.schedule.lr(step);
        opt.update(&mut model.params, &grads, lr as f32, s.schedule.weight_decay(step) as f32);
        state.step += 1;
        state.tokens_seen += s.tokens_per_step();
        state.sampler = sampler.rng.state;
        state.adam_step = opt.step;
        last_loss = loss;

        let done = state.step == s.steps;
        let eval_now = s.eval_every > 0 && (state.step.is_multiple_of(s.eval_every) || done);
        let elapsed = started.elapsed().as_secs_f64();
        let tps = (state.tokens_seen - tokens_at_start) as f64 / elapsed.max(1e-9);
        if state.step.is_multiple_of(s.log_every) || done || eval_now || state.step == 1 {
            let val_loss =
                if eval_now { mean_val_loss(&model, &model.prepare(), &val_windows, &s) } else { None };
            let line = LogLine {
                step: state.step,
                loss,
                val_loss,
                lr,
                grad_norm,
                tokens: state.tokens_seen,
                tokens_per_s: tps,
                elapsed_s: elapsed,
            };
            let text = serde_json::to_string(&line)?;
            writeln!(log, "{text}")?;
            if pb.is_hidden() && !args.quiet {
                eprintln!("{text}");
            }
        }
        pb.set_position(state.step);
        pb.set_message(format!("loss {loss:.4} {tps:.0} tok/s"));
        let report = StepReport {
            step: state.step,
            steps: s.steps,
            loss,
            lr,
            grad_norm,
            tokens: state.tokens_seen,
            tokens_per_s: tps,
        };
        let caller_stops = on_step(&report).is_break();
        let stop = caller_stops || STOP.load(Ordering::SeqCst) || args.stop_after == Some(state.step);
        if (s.save_every > 0 && state.step.is_multiple_of(s.save_every)) || done || stop {
            checkpoint::save(out, &model.params, &opt, &state, &settings_json, 2)?;
        }
        if stop && !done {
            stopped_early = true;
            // Said even with --quiet: the run did not finish.
            pb.suspend(|| {
                eprintln!("interrupted: checkpoint saved at step {}; continue with --resume", state.step)
            });
            break;
        }
    }
    STEPPING.store(false, Ordering::SeqCst);
    pb.finish_and_clear();
    log.flush()?;
    let elapsed = started.elapsed().as_secs_f64();
    // BITNET_TRAIN_PROFILE=1: where this run's time went, by layer function (validation included).
    let profile = crate::profile::take();
    if !profile.is_empty() {
        eprintln!("time per layer function over {elapsed:.1} s of training (inclusive):");
        for (name, secs, calls) in profile {
            eprintln!("  {name:<28} {secs:>8.2} s {calls:>8} calls");
        }
    }
    let tokens_per_s = (state.tokens_seen - tokens_at_start) as f64 / elapsed.max(1e-9);

    export_hf(&model, out)?;
    let full_val = data::validation_windows(&val_data, s.seq, s.final_eval_tokens);
    let weights = model.prepare();
    let val_loss = if stopped_early {
        None
    } else {
        let t_val = Instant::now();
        let v = mean_val_loss(&model, &weights, &full_val, &s);
        eprintln!(
            "final validation over {} tokens took {:.1} s",
            full_val.len() / (s.seq + 1) * s.seq,
            t_val.elapsed().as_secs_f64()
        );
        v
    };
    let summary = Summary {
        steps_done: state.step,
        stopped_early,
        final_loss: last_loss,
        val_loss,
        parameters: n_params,
        tokens_per_s,
    };
    write_atomic(&out.join("metrics.json"), (serde_json::to_string_pretty(&summary)? + "\n").as_bytes())?;
    eprintln!(
        "{}: {} steps, last train loss {last_loss:.4}, validation loss {}, {tokens_per_s:.0} tokens/s; model in {}",
        if stopped_early { "stopped" } else { "done" },
        state.step,
        val_loss.map_or("-".into(), |v| format!("{v:.4}")),
        out.display()
    );
    if args.samples > 0 && !stopped_early {
        let prompts = [
            "The king said",
            "It is a truth universally acknowledged",
            "And God said",
            "My lord, I",
            "She was",
        ];
        let mut rng = Rng::new(s.seed, 0x5A4D);
        let mut text = String::new();
        for p in prompts.iter().cycle().take(args.samples) {
            let t = sample_text(&model, &weights, &tok, p, 60, 0.8, 40, &mut rng)?;
            text.push_str(&t);
            text.push_str("\n---\n");
        }
        print!("{text}");
        write_atomic(&out.join("samples.txt"), text.as_bytes())?;
    }
    Ok(summary)
}
