//! `bitnet chat`: a multi-turn conversation in the terminal (or through a pipe), streaming each
//! reply. The history stays in the KV cache: each turn's prompt is the whole conversation as the
//! template renders it, and only the tokens past what the cache already holds are computed.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use bitnet_inference::{generate, GenerateOptions, Sequence, StopReason};
use bitnet_models::chat::ChatMessage;
use clap::Args;

use crate::commands::{load_for_chat, single_sequence_context, HeadArg, SamplingArgs};
use crate::interrupt;

#[derive(Args)]
pub struct ChatArgs {
    /// Checkpoint directory or .gguf file (default: the embedded model, which is not
    /// instruction-tuned: it continues text rather than answering).
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// A system message that starts the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Tokens per reply at most.
    #[arg(short = 'n', long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Context length: the whole conversation must fit (default: the model's).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// lm_head storage (see `bitnet generate --help`).
    #[arg(long, value_enum, default_value_t = HeadArg::Float)]
    pub lm_head: HeadArg,
}

const HELP: &str = "commands: /reset (forget the conversation), /system TEXT (new system message, then reset), /help, /exit; Ctrl-C stops a reply, Ctrl-D exits";

/// The conversation so far, starting with the system message if any.
fn fresh(system: &Option<String>) -> Vec<ChatMessage> {
    system.iter().map(|s| ChatMessage::system(s.clone())).collect()
}

pub fn chat(a: ChatArgs) -> Result<()> {
    let (loaded, tokenizer, format) = load_for_chat(a.model.as_deref(), a.threads, a.lm_head)?;
    let (sampling, notice) = a.sampling.resolve(&loaded.generation)?;
    let interactive = std::io::stdin().is_terminal();
    if let Some(n) = notice {
        eprintln!("{n}");
    }
    let max_ctx = loaded.model.config.max_position_embeddings;
    let ctx_len = match a.ctx {
        Some(0) => bail!("--ctx must be at least 1"),
        Some(n) if n > max_ctx => bail!("--ctx {n} is more than the model's context of {max_ctx} tokens"),
        Some(n) => n,
        None => max_ctx,
    };
    let mut run = single_sequence_context(&loaded.model, bitnet_inference::CpuBackend::new(), ctx_len)?;
    let mut seq = Sequence::new();
    let mut system = a.system.clone();
    let mut messages = fresh(&system);
    if interactive {
        eprintln!("chatting with {} ({HELP})", loaded.source.display());
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let stdout = std::io::stdout();
    loop {
        interrupt::set_mode(interrupt::Mode::Other);
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading standard input")?;
        let text = line.trim_end_matches(['\r', '\n']);
        match text.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/help" => {
                eprintln!("{HELP}");
                continue;
            }
            "/reset" => {
                messages = fresh(&system);
                run.release(&mut seq);
                eprintln!("(conversation reset)");
                continue;
            }
            t if t.starts_with("/system") => {
                let s = t["/system".len()..].trim();
                system = (!s.is_empty()).then(|| s.to_string());
                messages = fresh(&system);
                run.release(&mut seq);
                eprintln!(
                    "(system message {}; conversation reset)",
                    if system.is_some() { "set" } else { "cleared" }
                );
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::user(text));
        let ids = format.encode(&tokenizer, &messages, true)?;
        if ids.len() + 1 >= ctx_len {
            messages.pop();
            eprintln!(
                "the conversation ({} tokens) no longer fits the context of {ctx_len}: /reset to start again",
                ids.len()
            );
            continue;
        }
        let opts = GenerateOptions {
            max_new_tokens: a.max_tokens.min(ctx_len - ids.len() - 1),
            sampling: sampling.clone(),
            eos_ids: format.stop_ids.clone(),
            stop_strings: format.stop_strings.clone(),
        };
        interrupt::take();
        interrupt::set_mode(interrupt::Mode::Streaming);
        let g = generate(&loaded.model, &mut run, &mut seq, &tokenizer, &ids, &opts, |piece| {
            let mut out = stdout.lock();
            if out.write_all(piece.as_bytes()).and_then(|_| out.flush()).is_err() {
                return ControlFlow::Break(());
            }
            match interrupt::take() {
                true => ControlFlow::Break(()),
                false => ControlFlow::Continue(()),
            }
        })?;
        {
            let mut out = stdout.lock();
            let _ = out.write_all(b"\n");
            let _ = out.flush();
        }
        match g.stop_reason {
            StopReason::Cancelled => eprintln!("(reply stopped)"),
            StopReason::ContextFull => eprintln!("(the context is full: /reset to start again)"),
            StopReason::MaxTokens if interactive => {
                eprintln!("(reply cut at {} tokens: -n raises it)", opts.max_new_tokens)
            }
            _ => {}
        }
        messages.push(ChatMessage::assistant(g.text.trim_end()));
    }
    Ok(())
}
