//! `bitnet embed`: the embedding of each input text (BitNet-embedding models: last-token
//! pooling, L2-normalized), one line of numbers per text or OpenAI's embeddings JSON.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bitnet_inference::load::{load_dir_on, LoadOptions};
use bitnet_inference::{Backend, Context as RunContext, ContextOptions};
use bitnet_models::pooling::{declared_pooling, Pooling};
use clap::Args;
use serde_json::json;

use crate::commands::{governor_enabled, set_threads};
use crate::device::{dispatch, DeviceArg, Gpu, OnBackend};

#[derive(Args)]
pub struct EmbedArgs {
    /// Checkpoint folder or .gguf file of an embedding model (last-token pooling).
    #[arg(short, long)]
    pub model: PathBuf,
    /// A text to embed; repeat the flag for several.
    #[arg(short, long, conflicts_with = "file", required_unless_present = "file")]
    pub input: Vec<String>,
    /// Read the texts from this file, one per line (empty lines skipped); `-` reads standard input.
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    /// Print OpenAI's embeddings response (`data[i].embedding`, `usage`) instead of one line
    /// of numbers per text.
    #[arg(long)]
    pub json: bool,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn embed(a: EmbedArgs) -> Result<()> {
    set_threads(a.threads)?;
    // Checked before the model loads: a mistake costs no loading time.
    match declared_pooling(&a.model)? {
        None | Some(Pooling::LastToken) => {}
        Some(other) => bail!(
            "{} declares {other} pooling; bitnet embed pools the last token (BitNet-embedding models)",
            a.model.display()
        ),
    }
    let texts = input_texts(&a)?;
    dispatch(a.device.device, Embed { args: a, texts })
}

/// The texts of `--input` or `--file`.
fn input_texts(a: &EmbedArgs) -> Result<Vec<String>> {
    let texts: Vec<String> = match &a.file {
        Some(f) => {
            let text = if f.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .context("reading the texts from standard input (--file -)")?;
                s
            } else {
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading the texts from {}", f.display()))?
            };
            text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
        }
        None => a.input.clone(),
    };
    if texts.is_empty() || texts.iter().any(String::is_empty) {
        bail!("nothing to embed: give non-empty texts with --input or lines in --file");
    }
    Ok(texts)
}

struct Embed {
    args: EmbedArgs,
    texts: Vec<String>,
}

impl OnBackend for Embed {
    type Output = ();
    fn run<B: Backend + 'static>(self, make: &(dyn Fn() -> B + Sync), _: Option<&Gpu>) -> Result<()> {
        let Embed { args: a, texts } = self;
        let loaded = load_dir_on(&a.model, &make(), LoadOptions::default())?;
        let tok = loaded.tokenizer.as_ref().with_context(|| {
            format!("{} has no tokenizer, which bitnet embed needs to read text", loaded.source.display())
        })?;
        let ids = texts.iter().map(|t| tok.encode(t)).collect::<Result<Vec<_>, _>>()?;
        let cfg = &loaded.model.config;
        let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
        if longest > cfg.max_position_embeddings {
            bail!(
                "a text has {longest} tokens, more than the model's context of {}",
                cfg.max_position_embeddings
            );
        }
        if ids.iter().any(|t| t.last().is_none_or(|id| !cfg.eos_token_ids.contains(id))) {
            eprintln!(
                "note: the tokenizer does not end every text with an end-of-text token; the last text token is pooled"
            );
        }
        let opts = ContextOptions {
            max_seq_tokens: Some(longest.max(1)),
            governor: governor_enabled(),
            ..ContextOptions::new(longest.max(1))
        };
        let mut ctx = RunContext::new(&loaded.model, make(), &opts)?;
        let vectors =
            ids.iter().map(|t| loaded.model.embed(&mut ctx, t)).collect::<Result<Vec<Vec<f32>>, _>>()?;
        let mut out = std::io::stdout().lock();
        if a.json {
            let tokens: usize = ids.iter().map(Vec::len).sum();
            let data: Vec<_> = vectors
                .iter()
                .enumerate()
                .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
                .collect();
            let v = json!({
                "object": "list",
                "data": data,
                "model": a.model.display().to_string(),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            });
            writeln!(out, "{v}")?;
        } else {
            for v in &vectors {
                let line: Vec<String> = v.iter().map(f32::to_string).collect();
                writeln!(out, "{}", line.join(" "))?;
            }
        }
        Ok(())
    }
}
