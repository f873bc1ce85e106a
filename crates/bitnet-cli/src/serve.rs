//! `bitnet serve`: the OpenAI-compatible HTTP server (`bitnet-server`) over the
//! continuous-batching scheduler (`bitnet_inference::scheduler`).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use bitnet_inference::chat::ChatFormat;
use bitnet_inference::scheduler::{
    Event, EventSink, FinishReason as Finish, Request, Scheduler, SchedulerOptions, SubmitError as Refused,
};
use bitnet_inference::{Context as RunContext, ContextOptions, CpuBackend, KvType, Model, SamplingParams};
use bitnet_models::chat::ChatMessage;
use bitnet_models::pooling::{declared_pooling, Pooling};
use bitnet_models::tokenizer::Tokenizer;
use bitnet_server::engine::{
    ChatTurn, Engine, EngineError, EngineStats, FinishReason, GenerationEvent, GenerationRequest,
    SubmitError, TokenLogprob, TopLogprob,
};
use bitnet_server::ServerConfig;
use clap::Args;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::commands::{governor_enabled, load_for_chat, HeadArg};

#[derive(Args)]
pub struct ServeArgs {
    /// Checkpoint directory or .gguf file (default: the embedded model).
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together at most; more requests wait in the queue.
    #[arg(long, default_value_t = 16)]
    pub max_seqs: usize,
    /// Requests that may wait for a place; beyond that a request gets 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Tokens one request may hold, prompt and completion (default: the model's context).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Tokens the KV cache holds across all requests (default: --max-seqs × --ctx, at most
    /// the memory that --kv-type and the model's shapes make of 4 GiB).
    #[arg(long)]
    pub kv_tokens: Option<usize>,
    /// KV cache element type: f32 (exact), bf16 or f16 (half the memory).
    #[arg(long, default_value = "f32", value_parser = parse_kv_type)]
    pub kv_type: KvType,
    /// Prompt tokens read per step beside the running streams' decode steps.
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Require `Authorization: Bearer KEY` on /v1 requests (or set BITNET_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// `max_tokens` of a request that gives none (default: whatever the context leaves after
    /// the prompt).
    #[arg(long)]
    pub default_max_tokens: Option<usize>,
    /// Largest request body in bytes (larger: 413).
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// lm_head storage (see `bitnet generate --help`).
    #[arg(long, value_enum, default_value_t = HeadArg::Float)]
    pub lm_head: HeadArg,
}

fn parse_kv_type(s: &str) -> Result<KvType, String> {
    s.parse()
}

/// The scheduler as the HTTP layer sees it.
struct SchedulerEngine {
    scheduler: Scheduler,
    tokenizer: Arc<Tokenizer>,
    format: ChatFormat,
    model_id: String,
    context: usize,
    kv_total: usize,
    embedder: Embedder,
}

/// `/v1/embeddings` beside the scheduler: the shared weights and a context of its own, made on
/// the first request and kept (one embedding request at a time; generation goes on meanwhile).
struct Embedder {
    model: Arc<Model<CpuBackend>>,
    context: std::sync::Mutex<Option<RunContext<CpuBackend>>>,
    /// Why this checkpoint's embeddings are refused: it declares a pooling other than the last
    /// token's.
    refused: Option<String>,
}

impl Embedder {
    fn embed(&self, inputs: &[Vec<u32>], max_tokens: usize) -> Result<Vec<Vec<f32>>, EngineError> {
        if let Some(why) = &self.refused {
            return Err(EngineError::Invalid(why.clone()));
        }
        let mut slot = self.context.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            let opts = ContextOptions {
                max_seq_tokens: Some(max_tokens),
                governor: governor_enabled(),
                ..ContextOptions::new(max_tokens)
            };
            let ctx = RunContext::new(&self.model, CpuBackend::new(), &opts)
                .map_err(|e| EngineError::Internal(format!("cannot make the embedding context: {e}")))?;
            *slot = Some(ctx);
        }
        let ctx = slot.as_mut().expect("made above");
        inputs
            .iter()
            .map(|ids| self.model.embed(ctx, ids).map_err(|e| EngineError::Invalid(e.to_string())))
            .collect()
    }
}

/// Sends a request's events to the HTTP handler's channel, converting them.
struct ChannelSink {
    tx: UnboundedSender<GenerationEvent>,
    tokenizer: Arc<Tokenizer>,
}

impl ChannelSink {
    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id]).unwrap_or_default()
    }
}

impl EventSink for ChannelSink {
    fn send(&mut self, event: Event) -> ControlFlow<()> {
        let converted = match event {
            Event::Token { id, text, logprobs } => GenerationEvent::Token {
                id,
                text,
                logprob: logprobs.map(|lp| TokenLogprob {
                    token: self.token_text(id),
                    logprob: lp.logprob,
                    top: lp
                        .top
                        .iter()
                        .map(|&(id, logprob)| TopLogprob { id, token: self.token_text(id), logprob })
                        .collect(),
                }),
            },
            // Text released at the end (no token of its own): the handler only reads the text.
            Event::Text(text) => GenerationEvent::Token { id: u32::MAX, text, logprob: None },
            Event::Done(f) => GenerationEvent::Done {
                finish_reason: match f.reason {
                    Finish::Length | Finish::ContextFull => FinishReason::Length,
                    Finish::Eos | Finish::Stop | Finish::Cancelled => FinishReason::Stop,
                },
                prompt_tokens: f.prompt_tokens,
                completion_tokens: f.completion_tokens,
            },
            Event::Error(m) => GenerationEvent::Error(m),
        };
        match self.tx.send(converted) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Engine for SchedulerEngine {
    fn model_id(&self) -> String {
        self.model_id.clone()
    }

    fn context_len(&self) -> usize {
        self.context
    }

    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenizer.encode(text).map_err(|e| EngineError::Invalid(e.to_string()))
    }

    fn encode_chat(&self, messages: &[ChatTurn]) -> Result<Vec<u32>, EngineError> {
        let messages: Vec<ChatMessage> =
            messages.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect();
        self.format.encode(&self.tokenizer, &messages, true).map_err(|e| EngineError::Invalid(e.to_string()))
    }

    fn submit(&self, req: GenerationRequest) -> Result<UnboundedReceiver<GenerationEvent>, SubmitError> {
        let (tx, rx) = unbounded_channel();
        let sampling = SamplingParams {
            temperature: req.temperature,
            top_k: req.top_k,
            top_p: req.top_p,
            min_p: req.min_p,
            frequency_penalty: req.frequency_penalty,
            presence_penalty: req.presence_penalty,
            seed: req.seed.unwrap_or_else(rand_seed),
            ..SamplingParams::default()
        };
        let request = Request {
            prompt_ids: req.prompt_ids,
            max_tokens: req.max_tokens,
            sampling,
            stop_strings: req.stop,
            stop_ids: self.format.stop_ids.clone(),
            logprobs: req.logprobs,
        };
        let sink = ChannelSink { tx, tokenizer: self.tokenizer.clone() };
        self.scheduler.submit(request, Box::new(sink)).map_err(|e| match e {
            Refused::QueueFull { .. } => SubmitError::QueueFull,
            Refused::PromptTooLong { prompt, context } => SubmitError::PromptTooLong { prompt, context },
            Refused::ShuttingDown => SubmitError::ShuttingDown,
            other => SubmitError::Invalid(other.to_string()),
        })?;
        Ok(rx)
    }

    fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.embedder.embed(inputs, self.context)
    }

    fn stats(&self) -> EngineStats {
        let s = self.scheduler.stats();
        EngineStats {
            running: s.running,
            queued: s.queued,
            kv_blocks_used: s.kv.used,
            kv_blocks_free: s.kv.free,
            kv_blocks_total: self.kv_total,
            kv_blocks_cached: s.kv.cached,
        }
    }

    fn shutdown(&self) {
        self.scheduler.shutdown(true);
    }
}

/// A seed for a request that gives none: different every time, as OpenAI's are.
fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
    );
    h.finish()
}

/// The KV cache's budget when none is given: 4 GiB.
const DEFAULT_KV_BYTES: usize = 4 << 30;

pub fn serve(a: ServeArgs) -> Result<()> {
    if a.max_seqs == 0 || a.max_queue == 0 || a.prefill_chunk == 0 || a.default_max_tokens == Some(0) {
        bail!("--max-seqs, --max-queue, --prefill-chunk and --default-max-tokens must be at least 1");
    }
    let api_key =
        a.api_key.clone().or_else(|| std::env::var("BITNET_API_KEY").ok().filter(|k| !k.is_empty()));
    let (loaded, tokenizer, format) = load_for_chat(a.model.as_deref(), a.threads, a.lm_head)?;
    let cfg = &loaded.model.config;
    let max_ctx = cfg.max_position_embeddings;
    let context = match a.ctx {
        Some(0) => bail!("--ctx must be at least 1"),
        Some(n) if n > max_ctx => bail!("--ctx {n} is more than the model's context of {max_ctx} tokens"),
        Some(n) => n,
        None => max_ctx,
    };
    let token_bytes = 2 * cfg.num_layers * cfg.kv_dim() * a.kv_type.bytes();
    let kv_tokens = match a.kv_tokens {
        Some(n) if n < context => bail!("--kv-tokens {n} cannot hold even one request of --ctx {context}"),
        Some(n) => n,
        None => (a.max_seqs * context).min(DEFAULT_KV_BYTES / token_bytes.max(1)).max(context),
    };
    let opts = ContextOptions {
        kv_type: a.kv_type,
        max_seq_tokens: Some(context),
        governor: governor_enabled(),
        ..ContextOptions::new(kv_tokens)
    };
    let model = Arc::new(loaded.model);
    let run = RunContext::new(&model, CpuBackend::new(), &opts)?;
    let kv_total = run.kv_stats().total;
    let tokenizer = Arc::new(tokenizer);
    let sched =
        SchedulerOptions { max_seqs: a.max_seqs, max_queue: a.max_queue, prefill_chunk: a.prefill_chunk };
    let scheduler = Scheduler::start(model.clone(), run, Some(tokenizer.clone()), sched)
        .context("starting the scheduler thread")?;
    let model_id = match &a.model {
        Some(p) => {
            p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
        }
        None => "bitnet-default".to_string(),
    };
    let refused = match declared_pooling(&loaded.source) {
        _ if !loaded.source.exists() => None,
        Ok(None | Some(Pooling::LastToken)) => None,
        Ok(Some(other)) => Some(format!(
            "{} declares {other} pooling; this server pools the last token (BitNet-embedding models)",
            model_id
        )),
        Err(e) => Some(format!("cannot read the checkpoint's pooling: {e}")),
    };
    let embedder = Embedder { model, context: std::sync::Mutex::new(None), refused };
    let engine =
        Arc::new(SchedulerEngine { scheduler, tokenizer, format, model_id, context, kv_total, embedder });
    let server_cfg = ServerConfig {
        host: a.host.clone(),
        port: a.port,
        api_key,
        max_body_bytes: a.max_body_bytes,
        default_max_tokens: a.default_max_tokens,
        ..ServerConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    crate::interrupt::set_mode(crate::interrupt::Mode::Serving);
    runtime.block_on(async move {
        let server = bitnet_server::Server::bind(&server_cfg).await?;
        eprintln!(
            "serving {} on http://{} ({} sequences at once, {} KV tokens of {}, context {context}); Ctrl-C stops",
            engine.model_id,
            server.local_addr(),
            a.max_seqs,
            kv_total * bitnet_inference::BLOCK_TOKENS,
            a.kv_type.name(),
        );
        server.run(engine, server_cfg, bitnet_server::shutdown_signal()).await?;
        eprintln!("stopped");
        anyhow::Ok(())
    })
}
