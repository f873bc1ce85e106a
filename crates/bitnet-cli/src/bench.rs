//! `bitnet bench`: prompt processing (ppN) and generation (tgN) speed in the spirit of
//! llama-bench, with a memory-bandwidth probe so each generation row says how close it is to
//! the machine's roof.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bitnet_inference::load::load_dir_with;
use bitnet_inference::{CpuBackend, Logits, Model};
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
    /// Checkpoint directory.
    #[arg(short, long)]
    pub model: PathBuf,
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
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// lm_head storage (see `bitnet generate --help`).
    #[arg(long, value_enum, default_value_t = crate::commands::HeadArg::Float)]
    pub lm_head: crate::commands::HeadArg,
    /// Skip the memory-bandwidth probe.
    #[arg(long)]
    pub no_probe: bool,
}

#[derive(Serialize)]
struct Row {
    test: String,
    threads: usize,
    tokens_per_s: f64,
    stddev: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_per_token: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bandwidth_gbs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    roof_pct: Option<f64>,
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// Read bandwidth in GB/s: the threads sum a 1 GiB buffer, best of three passes.
fn bandwidth_probe(pool: &rayon::ThreadPool) -> f64 {
    use rayon::prelude::*;
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = 0.0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let sum: u64 = pool.install(|| {
            buf.par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
                .reduce(|| 0, u64::wrapping_add)
        });
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / secs / 1e9);
    }
    best
}

/// Token ids for timing: spread over the vocabulary, deterministic.
fn bench_ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

fn time_prompt(model: &mut Model<CpuBackend>, n: usize) -> Result<f64> {
    let ids = bench_ids(n, model.config.vocab_size);
    let mut s = model.session(n, 512);
    let start = Instant::now();
    model.forward(&mut s, &ids, Logits::Last)?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn time_generation(model: &mut Model<CpuBackend>, n: usize) -> Result<f64> {
    let ids = bench_ids(n, model.config.vocab_size);
    let mut s = model.session(n, 1);
    let start = Instant::now();
    for &id in &ids {
        model.forward(&mut s, &[id], Logits::Last)?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.threads.contains(&0) || a.repetitions == 0 {
        bail!("--threads and --repetitions must be at least 1");
    }
    let mut loaded = load_dir_with(&a.model, a.lm_head.options())?;
    let model = &mut loaded.model;
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
        let bandwidth = if a.no_probe || a.generate == 0 { None } else { Some(bandwidth_probe(&pool)) };
        for &p in &a.prompts {
            pool.install(|| time_prompt(model, p.min(8)))?; // warm-up
            let runs = (0..a.repetitions)
                .map(|_| pool.install(|| time_prompt(model, p)))
                .collect::<Result<Vec<_>>>()?;
            let (mean, std) = mean_std(&runs);
            rows.push(Row {
                test: format!("pp{p}"),
                threads: t,
                tokens_per_s: mean,
                stddev: std,
                bytes_per_token: None,
                bandwidth_gbs: None,
                roof_pct: None,
            });
        }
        if a.generate > 0 {
            pool.install(|| time_generation(model, 4))?;
            let runs = (0..a.repetitions)
                .map(|_| pool.install(|| time_generation(model, a.generate)))
                .collect::<Result<Vec<_>>>()?;
            let (mean, std) = mean_std(&runs);
            let roof = bandwidth.map(|bw| 100.0 * mean * bytes_per_token as f64 / (bw * 1e9));
            rows.push(Row {
                test: format!("tg{}", a.generate),
                threads: t,
                tokens_per_s: mean,
                stddev: std,
                bytes_per_token: Some(bytes_per_token),
                bandwidth_gbs: bandwidth,
                roof_pct: roof,
            });
        }
    }
    print_rows(&rows, a.output, &loaded.source.display().to_string());
    Ok(())
}

fn print_rows(rows: &[Row], format: OutputFormat, model: &str) {
    let opt = |v: Option<f64>, digits: usize| v.map(|x| format!("{x:.digits$}")).unwrap_or_default();
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(rows).unwrap_or_default()),
        OutputFormat::Csv => {
            println!("test,threads,tokens_per_s,stddev,bytes_per_token,bandwidth_gbs,roof_pct");
            for r in rows {
                println!(
                    "{},{},{:.3},{:.3},{},{},{}",
                    r.test,
                    r.threads,
                    r.tokens_per_s,
                    r.stddev,
                    r.bytes_per_token.map(|b| b.to_string()).unwrap_or_default(),
                    opt(r.bandwidth_gbs, 2),
                    opt(r.roof_pct, 1)
                );
            }
        }
        OutputFormat::Md | OutputFormat::Table => {
            println!("model: {model}");
            println!("| test | threads | tokens/s | ± | bytes/token | probe GB/s | % of roof |");
            println!("|---|---:|---:|---:|---:|---:|---:|");
            for r in rows {
                println!(
                    "| {} | {} | {:.2} | {:.2} | {} | {} | {} |",
                    r.test,
                    r.threads,
                    r.tokens_per_s,
                    r.stddev,
                    r.bytes_per_token.map(|b| b.to_string()).unwrap_or_default(),
                    opt(r.bandwidth_gbs, 1),
                    opt(r.roof_pct, 1)
                );
            }
        }
    }
}
