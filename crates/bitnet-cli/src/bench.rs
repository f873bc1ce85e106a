//! `bitnet bench`: prompt processing (ppN) and generation (tgN) speed in the spirit of
//! llama-bench, with a memory-bandwidth probe so each generation row says how close it is to
//! the machine's roof; with `--train PRESET`, training steps per second instead.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitnet_inference::load::load_dir_on;
use std::sync::Arc;

use bitnet_inference::scheduler::{Event, EventSink, Request, Scheduler, SchedulerOptions};
use bitnet_inference::{
    Backend, Context as RunContext, ContextOptions, KvType, Logits, Model, SamplingParams, Sequence,
    BLOCK_TOKENS,
};

use crate::commands::single_sequence_context;
use crate::device::{dispatch, DeviceArg, Gpu, OnBackend};
use bitnet_training::bench::{preset_model, time_steps};
use clap::{Args, ValueEnum};
use serde::Serialize;

#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
    Csv,
    Md,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Checkpoint directory (inference rows).
    #[arg(short, long, required_unless_present = "train", conflicts_with = "train")]
    pub model: Option<PathBuf>,
    /// Time training instead: optimizer steps of this `bitnet train --preset` model on random
    /// tokens (forward, backward, AdamW), in tokens per second.
    #[arg(long, value_enum)]
    pub train: Option<bitnet_training::Preset>,
    /// With --train: the full-precision baseline (as `bitnet train --fp`).
    #[arg(long)]
    pub fp: bool,
    /// With --train: the BitLinear backward's products, f32 (the default) or int16 (as
    /// `bitnet train --backward`).
    #[arg(long, value_enum)]
    pub backward: Option<bitnet_training::Backward>,
    /// With --train: timed steps per repetition, after one warm-up step [default: 3].
    #[arg(long)]
    pub train_steps: Option<usize>,
    /// Prompt lengths to time (ppN rows); empty to skip.
    #[arg(short = 'p', long = "prompt", value_delimiter = ',', default_values_t = vec![512])]
    pub prompts: Vec<usize>,
    /// Tokens to generate (tgN row); 0 to skip.
    #[arg(short = 'n', long = "gen", default_value_t = 128)]
    pub generate: usize,
    /// Thread counts to time, comma-separated.
    #[arg(short = 't', long, value_delimiter = ',', default_values_t = vec![std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)])]
    pub threads: Vec<usize>,
    /// Repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 3)]
    pub repetitions: usize,
    /// How the rows are printed: a Markdown table (`table` and `md`, as llama-bench prints), JSON or CSV.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// lm_head storage (see `bitnet generate --help`).
    #[arg(long, value_enum, default_value_t = crate::commands::HeadArg::Float)]
    pub lm_head: crate::commands::HeadArg,
    /// Skip the memory-bandwidth probe.
    #[arg(long)]
    pub no_probe: bool,
    /// Concurrent streams to serve through the continuous-batching scheduler (serveN rows):
    /// N requests of the first -p prompt length and -n new tokens each, submitted at once;
    /// aggregate decode tokens/s once every stream runs, end-to-end tokens/s, time to first
    /// token and inter-token latency.
    #[arg(short = 'c', long, value_delimiter = ',')]
    pub concurrent: Vec<usize>,
    /// KV cache element type of the serveN rows.
    #[arg(long, default_value = "f32", value_parser = parse_kv_type)]
    pub kv_type: KvType,
    /// Sampling temperature of the serveN rows' requests: 0 is greedy; OpenAI's default is 1
    /// (each stream then draws with its own seed, and the sampler's work, on the scheduler's
    /// thread, shows in the rows).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// On a GPU the bandwidth probe is a device-to-device copy, and the thread counts only
    /// size the host's pool.
    #[command(flatten)]
    pub device: DeviceArg,
}

/// The sampling of the serveN rows' requests, checked.
fn serving_sampling(a: &BenchArgs) -> Result<SamplingParams> {
    let sampling = SamplingParams { temperature: a.temperature, ..Default::default() };
    sampling.validate().map_err(|e| anyhow::anyhow!("--temperature {}: {e}", a.temperature))?;
    Ok(sampling)
}

fn parse_kv_type(s: &str) -> Result<KvType, String> {
    s.parse()
}

#[derive(Serialize)]
struct Row {
    test: String,
    threads: usize,
    tokens_per_s: f64,
    stddev: f64,
    /// Median of the repetitions: robust to a run slowed by other processes.
    median: f64,
    /// 1-minute load average when the test started (Linux only).
    #[serde(skip_serializing_if = "Option::is_none")]
    load: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_per_token: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bandwidth_gbs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    roof_pct: Option<f64>,
    /// serveN rows: time to first token and inter-token latency percentiles, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<Latency>,
}

#[derive(Serialize, Clone, Copy)]
struct Latency {
    /// Generated tokens per second from the first submit to the last token (prefill included).
    end_to_end_tokens_per_s: f64,
    ttft_p50: f64,
    ttft_p99: f64,
    itl_p50: f64,
    itl_p99: f64,
}

impl Row {
    /// A row of `runs` (tokens/s of each repetition), with no bandwidth columns.
    fn of_runs(test: String, threads: usize, runs: &[f64], load: Option<f64>) -> Self {
        let (mean, std) = mean_std(runs);
        Row {
            test,
            threads,
            tokens_per_s: mean,
            stddev: std,
            median: median(runs),
            load,
            bytes_per_token: None,
            bandwidth_gbs: None,
            roof_pct: None,
            latency_ms: None,
        }
    }
}

/// The `q` quantile (0..=1) of `xs` (nearest rank).
fn percentile(xs: &[f64], q: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n => v[((q * n as f64).ceil() as usize).clamp(1, n) - 1],
    }
}

/// Forwards a stream's events, tagged and timed, into one channel.
struct TimedSink {
    stream: usize,
    tx: std::sync::mpsc::Sender<(usize, Instant, bool)>,
}

impl EventSink for TimedSink {
    fn send(&mut self, event: Event) -> std::ops::ControlFlow<()> {
        let token = match event {
            Event::Token { .. } => true,
            Event::Done(_) => false,
            Event::Error(e) => {
                eprintln!("stream {}: {e}", self.stream);
                false
            }
            Event::Text(_) => return std::ops::ControlFlow::Continue(()),
        };
        let _ = self.tx.send((self.stream, Instant::now(), token));
        std::ops::ControlFlow::Continue(())
    }
}

/// One serveN run: `streams` requests submitted at once to a scheduler on `threads` threads.
/// Returns the aggregate decode rate — tokens generated after every stream has its first one,
/// over the time from then to the last token: the batched steady state — and the latencies.
#[allow(clippy::too_many_arguments)]
fn time_serving<B: Backend + 'static>(
    model: &Arc<Model<B>>,
    make: &(dyn Fn() -> B + Sync),
    streams: usize,
    prompt: usize,
    gen: usize,
    threads: usize,
    kv_type: KvType,
    sampling: &SamplingParams,
) -> Result<(f64, Latency)> {
    let per_stream = prompt + gen + 1;
    let opts = ContextOptions {
        kv_type,
        threads: Some(threads),
        max_seq_tokens: Some(per_stream),
        // Distinct prompts share nothing; keeping their blocks would only cost lookups.
        prefix_cache: false,
        governor: crate::commands::governor_enabled(),
        ..ContextOptions::new(streams * (per_stream + BLOCK_TOKENS))
    };
    let ctx = RunContext::new(model, make(), &opts)?;
    let sched = SchedulerOptions { max_seqs: streams, max_queue: streams, prefill_chunk: 256 };
    let scheduler = Scheduler::start(model.clone(), ctx, None, sched)?;
    let vocab = model.config.vocab_size;
    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    for k in 0..streams {
        let ids = bench_ids(prompt + k, vocab)[k..].to_vec();
        let sampling = SamplingParams { seed: k as u64, ..sampling.clone() };
        let req = Request { prompt_ids: ids, max_tokens: gen, sampling, ..Default::default() };
        scheduler.submit(req, Box::new(TimedSink { stream: k, tx: tx.clone() }))?;
    }
    drop(tx);
    let mut last_token: Vec<Option<Instant>> = vec![None; streams];
    let mut arrivals = Vec::with_capacity(streams * gen);
    let (mut ttft, mut itl, mut end) = (Vec::new(), Vec::new(), start);
    for (k, at, token) in rx {
        if !token {
            continue;
        }
        arrivals.push(at);
        end = end.max(at);
        match last_token[k] {
            None => ttft.push(at.duration_since(start).as_secs_f64() * 1e3),
            Some(prev) => itl.push(at.duration_since(prev).as_secs_f64() * 1e3),
        }
        last_token[k] = Some(at);
    }
    scheduler.shutdown(false);
    // The steady state starts when the last stream has its first token.
    let all_started =
        last_token.iter().zip(&ttft).map(|(_, &ms)| start + Duration::from_secs_f64(ms / 1e3)).max();
    let all_started = all_started.unwrap_or(start);
    let decoded = arrivals.iter().filter(|&&t| t > all_started).count();
    let decode_rate = decoded as f64 / end.duration_since(all_started).as_secs_f64().max(1e-9);
    let latency = Latency {
        end_to_end_tokens_per_s: arrivals.len() as f64 / end.duration_since(start).as_secs_f64().max(1e-9),
        ttft_p50: percentile(&ttft, 0.5),
        ttft_p99: percentile(&ttft, 0.99),
        itl_p50: percentile(&itl, 0.5),
        itl_p99: percentile(&itl, 0.99),
    };
    Ok((decode_rate, latency))
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// The probe's buffer: far larger than any cache.
const PROBE_BYTES: usize = 1 << 30;
/// Each pass over the buffer is timed in windows of this many bytes (8 × a 32 MiB L3).
const PROBE_WINDOW: usize = 256 << 20;
/// Passes over the buffer; the fastest window counts (other processes only ever slow one down,
/// and a short window has a chance to run while they are off the cores).
const PROBE_PASSES: usize = 5;

/// Sums a slice with eight independent accumulators, so that the loop vectorizes and no add
/// chain limits the read rate.
#[inline(always)]
fn sum_words_generic(c: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = c.chunks_exact(8);
    for w in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(w) {
            *a = a.wrapping_add(v);
        }
    }
    let tail = chunks.remainder().iter().fold(0u64, |a, &b| a.wrapping_add(b));
    acc.iter().fold(tail, |a, &b| a.wrapping_add(b))
}

/// [`sum_words_generic`] compiled for AVX2 (32-byte loads).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(c: &[u64]) -> u64 {
    sum_words_generic(c)
}

fn sum_words(c: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected just above.
        return unsafe { sum_words_avx2(c) };
    }
    sum_words_generic(c)
}

/// Read bandwidth in GB/s: every thread of `pool` sums 4 MiB pieces of a 1 GiB buffer (written
/// first, so that no page is the shared zero page); each 256 MiB window of each of five passes
/// is timed, and the fastest counts.
fn bandwidth_probe(pool: &rayon::ThreadPool) -> f64 {
    use rayon::prelude::*;
    let buf: Vec<u64> = (0..(PROBE_BYTES / 8) as u64).collect();
    let mut best = 0.0f64;
    for _ in 0..PROBE_PASSES {
        for window in buf.chunks(PROBE_WINDOW / 8) {
            let start = Instant::now();
            let sum: u64 = pool
                .install(|| window.par_chunks((4 << 20) / 8).map(sum_words).reduce(|| 0, u64::wrapping_add));
            let secs = start.elapsed().as_secs_f64();
            std::hint::black_box(sum);
            best = best.max(std::mem::size_of_val(window) as f64 / secs / 1e9);
        }
    }
    best
}

/// The 1-minute load average (Linux), to print beside the timings: on a shared machine it
/// says how much of the CPU the run had.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// Token ids for timing: spread over the vocabulary, deterministic.
fn bench_ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

fn time_prompt<B: Backend>(model: &Model<B>, make: &(dyn Fn() -> B + Sync), n: usize) -> Result<f64> {
    let ids = bench_ids(n, model.config.vocab_size);
    let mut ctx = single_sequence_context(model, make(), n)?;
    let mut seq = Sequence::new();
    let start = Instant::now();
    model.forward(&mut ctx, &mut seq, &ids, Logits::Last)?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn time_generation<B: Backend>(model: &Model<B>, make: &(dyn Fn() -> B + Sync), n: usize) -> Result<f64> {
    let ids = bench_ids(n, model.config.vocab_size);
    let mut ctx = single_sequence_context(model, make(), n)?;
    let mut seq = Sequence::new();
    let start = Instant::now();
    // Each step ends as greedy generation's does: the argmax of the logits read back.
    for &id in &ids {
        model.forward(&mut ctx, &mut seq, &[id], Logits::Greedy)?;
        ctx.greedy_of(0).context("the step asked for its greedy choice")?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.threads.contains(&0) || a.repetitions == 0 {
        bail!("--threads and --repetitions must be at least 1");
    }
    serving_sampling(&a)?;
    let Some(model_dir) = &a.model else {
        return bench_training(&a);
    };
    if a.fp || a.backward.is_some() || a.train_steps.is_some() {
        bail!("--fp, --backward and --train-steps apply to --train, not to --model");
    }
    let model_dir = model_dir.clone();
    let model_dir = crate::commands::model_path(&model_dir)?;
    dispatch(a.device.device, Bench { a, model_dir })
}

struct Bench {
    a: BenchArgs,
    model_dir: PathBuf,
}

impl OnBackend for Bench {
    type Output = ();
    fn run<B: Backend + 'static>(self, make: &(dyn Fn() -> B + Sync), gpu: Option<&Gpu>) -> Result<()> {
        bench_on(self.a, &self.model_dir, make, gpu)
    }
}

fn bench_on<B: Backend + 'static>(
    a: BenchArgs,
    model_dir: &std::path::Path,
    make: &(dyn Fn() -> B + Sync),
    gpu: Option<&Gpu>,
) -> Result<()> {
    let loaded = load_dir_on(model_dir, &make(), a.lm_head.options())?;
    let source = format!("{} on {}", loaded.source.display(), loaded.model.backend_name());
    let model = &Arc::new(loaded.model);
    if a.concurrent.contains(&0) {
        bail!("--concurrent: stream counts must be at least 1");
    }
    let serve_prompt = a.prompts.first().copied().unwrap_or(64);
    if !a.concurrent.is_empty() && (a.generate == 0 || serve_prompt + a.generate >= max_ctx_of(model)) {
        bail!("--concurrent needs -n > 0 and a first -p length that leaves room for -n in the context");
    }
    let max_ctx = model.config.max_position_embeddings;
    if let Some(&p) = a.prompts.iter().find(|&&p| p == 0 || p > max_ctx) {
        bail!("-p {p}: prompt lengths must be between 1 and the model's context ({max_ctx})");
    }
    if a.generate > max_ctx {
        bail!("-n {}: more than the model's context ({max_ctx})", a.generate);
    }
    let bytes_per_token = model.weight_bytes_per_token;
    let mut rows = Vec::new();
    for &t in &a.threads {
        let pool =
            rayon::ThreadPoolBuilder::new().num_threads(t).build().context("building the thread pool")?;
        let bandwidth = match gpu {
            _ if a.no_probe || a.generate == 0 => None,
            Some(g) => Some(g.bandwidth_gbs()?),
            None => Some(bandwidth_probe(&pool)),
        };
        for &p in &a.prompts {
            pool.install(|| time_prompt(model, make, p.min(8)))?; // warm-up
            let load = load_average();
            let runs = (0..a.repetitions)
                .map(|_| pool.install(|| time_prompt(model, make, p)))
                .collect::<Result<Vec<_>>>()?;
            rows.push(Row::of_runs(format!("pp{p}"), t, &runs, load));
        }
        if a.generate > 0 {
            pool.install(|| time_generation(model, make, 4))?;
            let load = load_average();
            let runs = (0..a.repetitions)
                .map(|_| pool.install(|| time_generation(model, make, a.generate)))
                .collect::<Result<Vec<_>>>()?;
            // Weight bytes per second at the median speed, against the probe's read rate.
            let roof = bandwidth.map(|bw| 100.0 * median(&runs) * bytes_per_token as f64 / (bw * 1e9));
            rows.push(Row {
                bytes_per_token: Some(bytes_per_token),
                bandwidth_gbs: bandwidth,
                roof_pct: roof,
                ..Row::of_runs(format!("tg{}", a.generate), t, &runs, load)
            });
        }
        let sampling = serving_sampling(&a)?;
        for &c in &a.concurrent {
            time_serving(model, make, c.min(4), 8, 4, t, a.kv_type, &sampling)?; // warm-up
            let load = load_average();
            let mut lat = Vec::new();
            let runs = (0..a.repetitions)
                .map(|_| {
                    let (tps, l) =
                        time_serving(model, make, c, serve_prompt, a.generate, t, a.kv_type, &sampling)?;
                    lat.push(l);
                    Ok(tps)
                })
                .collect::<Result<Vec<_>>>()?;
            // The latencies of the median run.
            let mid = (0..runs.len())
                .min_by(|&i, &j| (runs[i] - median(&runs)).abs().total_cmp(&(runs[j] - median(&runs)).abs()));
            rows.push(Row {
                latency_ms: mid.map(|i| lat[i]),
                ..Row::of_runs(format!("serve{c} (p{serve_prompt}+n{})", a.generate), t, &runs, load)
            });
        }
    }
    print_rows(&rows, a.output, &source);
    Ok(())
}

fn max_ctx_of<B: Backend>(model: &Model<B>) -> usize {
    model.config.max_position_embeddings
}

/// `bitnet bench --train PRESET`: one row per thread count; each repetition times
/// `--train-steps` steps of a fresh model (the same seed, so the same work every time).
fn bench_training(a: &BenchArgs) -> Result<()> {
    let preset = a.train.context("--model or --train is required")?;
    let (steps, backward) = (a.train_steps.unwrap_or(3), a.backward.unwrap_or_default());
    if steps == 0 {
        bail!("--train-steps must be at least 1");
    }
    let mut rows = Vec::new();
    let mut described = String::new();
    for &t in &a.threads {
        let pool =
            rayon::ThreadPoolBuilder::new().num_threads(t).build().context("building the thread pool")?;
        let load = load_average();
        let runs = (0..a.repetitions)
            .map(|_| {
                pool.install(|| {
                    let (mut model, batch, seq) = preset_model(preset, a.fp, backward)?;
                    described = format!(
                        "train --preset {} ({} parameters, {:?}, backward {:?}, batch {batch} x {seq})",
                        format!("{preset:?}").to_lowercase(),
                        model.params.count(),
                        model.precision,
                        backward
                    );
                    Ok(time_steps(&mut model, batch, seq, steps, 1)?.tokens_per_s())
                })
            })
            .collect::<Result<Vec<_>>>()?;
        rows.push(Row::of_runs(format!("train{steps}"), t, &runs, load));
    }
    print_rows(&rows, a.output, &described);
    Ok(())
}

fn print_rows(rows: &[Row], format: OutputFormat, model: &str) {
    print_table(rows, format, model);
    let served: Vec<&Row> = rows.iter().filter(|r| r.latency_ms.is_some()).collect();
    if served.is_empty() || matches!(format, OutputFormat::Json | OutputFormat::Csv) {
        return;
    }
    println!();
    println!("serveN tokens/s: decode steady state (after every stream's first token); end to end: first submit to last token");
    println!(
        "| test | threads | end-to-end tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in served {
        let l = r.latency_ms.expect("filtered");
        println!(
            "| {} | {} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2} |",
            r.test, r.threads, l.end_to_end_tokens_per_s, l.ttft_p50, l.ttft_p99, l.itl_p50, l.itl_p99
        );
    }
}

fn print_table(rows: &[Row], format: OutputFormat, model: &str) {
    let opt = |v: Option<f64>, digits: usize| v.map(|x| format!("{x:.digits$}")).unwrap_or_default();
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(rows).unwrap_or_default()),
        OutputFormat::Csv => {
            println!("test,threads,tokens_per_s,stddev,median,load,bytes_per_token,bandwidth_gbs,roof_pct");
            for r in rows {
                println!(
                    "{},{},{:.3},{:.3},{:.3},{},{},{},{}",
                    r.test,
                    r.threads,
                    r.tokens_per_s,
                    r.stddev,
                    r.median,
                    opt(r.load, 2),
                    r.bytes_per_token.map(|b| b.to_string()).unwrap_or_default(),
                    opt(r.bandwidth_gbs, 2),
                    opt(r.roof_pct, 1)
                );
            }
        }
        OutputFormat::Md | OutputFormat::Table => {
            println!("model: {model}");
            println!(
                "| test | threads | tokens/s | ± | median | load | bytes/token | probe GB/s | % of roof |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
            for r in rows {
                println!(
                    "| {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |",
                    r.test,
                    r.threads,
                    r.tokens_per_s,
                    r.stddev,
                    r.median,
                    opt(r.load, 2),
                    r.bytes_per_token.map(|b| b.to_string()).unwrap_or_default(),
                    opt(r.bandwidth_gbs, 1),
                    opt(r.roof_pct, 1)
                );
            }
        }
    }
}
