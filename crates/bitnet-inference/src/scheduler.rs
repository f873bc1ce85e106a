//! Continuous batching: many requests decoded together on one [`Context`].
//!
//! A [`Scheduler`] owns a context on a thread of its own. Requests arrive through
//! [`Scheduler::submit`] and wait in a bounded queue; every step the scheduler
//! 1. drops requests whose client has gone (their blocks go back to the pool),
//! 2. admits waiting requests while there is room (running sequences under `max_seqs`, KV
//!    blocks for their prompt), each first taking any cached blocks of a shared prefix,
//! 3. builds one batch: a decode row for every running sequence, then prefill chunks of the
//!    prompts still being read, at most `prefill_chunk` rows of them per step so that a long
//!    prompt does not stall the streams already running,
//! 4. preempts the most recently admitted sequences when the pool cannot hold the batch: their
//!    blocks are freed and they go back to the head of the queue, to be recomputed (prompt and
//!    tokens generated so far) when room returns — never a crash, never a lost request,
//! 5. runs the batch, samples each sequence whose input is complete, and sends its text.
//!
//! Events go to an [`EventSink`] per request; a sink that reports its receiver gone cancels the
//! request.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use bitnet_models::tokenizer::{TextStreamer, Tokenizer};

use crate::context::{Context, Segment, Sequence};
use crate::generate::StopMatcher;
use crate::kv::KvStats;
use crate::model::{Logits, Model};
use crate::sampling::{logprobs, SamplingError, SamplingParams};
use crate::Backend;

/// One generation request.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub prompt_ids: Vec<u32>,
    /// New tokens at most (also bounded by the context).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Texts that end the generation; the text is cut before them.
    pub stop_strings: Vec<String>,
    /// Ids that end the generation (end of sequence, end of turn); not sent as text.
    pub stop_ids: Vec<u32>,
    /// `Some(n)`: send each token's log-probability and the `n` most likely alternatives.
    pub logprobs: Option<usize>,
}

/// A token's log-probability under the model and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id (end of sequence or of turn).
    Eos,
    /// A stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The sequence reached the context's limit.
    ContextFull,
    /// The client went away or the scheduler shut down.
    Cancelled,
}

/// How a request ended and what it cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens found in the prefix cache (not computed).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// Times the request was preempted and recomputed.
    pub preemptions: usize,
}

/// What a request's client receives, in order: tokens, then one `Done` (or one `Error`).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A generated token and the text it completes (possibly empty: a partial UTF-8 character,
    /// or text held back because it may start a stop string).
    Token {
        id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// Text released at the end that no token carried (held back for a stop string, or the
    /// tokenizer's last bytes).
    Text(String),
    Done(Finish),
    /// The engine failed while running the request (a backend error): it has ended.
    Error(String),
}

/// Where a request's events go.
pub trait EventSink: Send {
    /// Delivers one event; `Break` when the receiver has gone (the request is then cancelled).
    fn send(&mut self, event: Event) -> ControlFlow<()>;
    /// Whether the receiver has gone (checked every step, also while the request waits).
    fn is_closed(&self) -> bool {
        false
    }
}

impl EventSink for mpsc::Sender<Event> {
    fn send(&mut self, event: Event) -> ControlFlow<()> {
        match mpsc::Sender::send(self, event) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens; a request may hold {context} (prompt and completion)")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("token id {id} is out of range: the vocabulary has {vocab_size} tokens")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("the queue is full ({queued} requests waiting)")]
    QueueFull { queued: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Limits of a scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerOptions {
    /// Sequences decoded at once.
    pub max_seqs: usize,
    /// Requests that may wait for a place.
    pub max_queue: usize,
    /// Prompt rows per step beside the decode rows.
    pub prefill_chunk: usize,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self { max_seqs: 16, max_queue: 256, prefill_chunk: 256 }
    }
}

/// A snapshot of the scheduler's state, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub running: usize,
    pub queued: usize,
    pub kv: KvStats,
    /// Forward steps run.
    pub steps: u64,
    pub preemptions: u64,
    pub finished: u64,
}

enum Command {
    Submit(Box<Request>, Box<dyn EventSink>),
}

struct Shared {
    /// Requests submitted and not yet running (in the channel or waiting).
    queued: AtomicUsize,
    shutdown: AtomicBool,
    /// End every request now.
    cancel: AtomicBool,
    stats: Mutex<SchedulerStats>,
}

/// A context on its own thread serving many requests at once.
pub struct Scheduler {
    inbox: Mutex<Option<mpsc::Sender<Command>>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    opts: SchedulerOptions,
    max_seq_tokens: usize,
    vocab_size: usize,
}

impl Scheduler {
    /// Starts the scheduler's thread, which owns `ctx` from now on. Without a tokenizer, events
    /// carry ids and no text.
    pub fn start<B: Backend + 'static>(
        model: Arc<Model<B>>,
        ctx: Context<B>,
        tokenizer: Option<Arc<Tokenizer>>,
        opts: SchedulerOptions,
    ) -> std::io::Result<Self>
    where
        B::Linear: 'static,
    {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            stats: Mutex::new(SchedulerStats { kv: ctx.kv_stats(), ..Default::default() }),
        });
        let (max_seq_tokens, vocab_size) = (ctx.max_seq_tokens(), model.config.vocab_size);
        let worker = Worker {
            model,
            tokenizer,
            opts: opts.clone(),
            shared: shared.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            steps: 0,
            preemptions: 0,
            finished: 0,
        };
        let thread = std::thread::Builder::new().name("bitnet-scheduler".into()).spawn(move || {
            let mut ctx = ctx;
            let mut worker = worker;
            ctx.run(|ctx| worker.serve(ctx, rx));
        })?;
        Ok(Self {
            inbox: Mutex::new(Some(tx)),
            shared,
            thread: Mutex::new(Some(thread)),
            opts,
            max_seq_tokens,
            vocab_size,
        })
    }

    /// The most tokens one request may hold (prompt and completion).
    pub fn max_seq_tokens(&self) -> usize {
        self.max_seq_tokens
    }

    /// Queues a request; its events go to `sink`.
    pub fn submit(&self, req: Request, sink: Box<dyn EventSink>) -> Result<(), SubmitError> {
        if self.shared.shutdown.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        if req.prompt_ids.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if req.prompt_ids.len() >= self.max_seq_tokens {
            return Err(SubmitError::PromptTooLong {
                prompt: req.prompt_ids.len(),
                context: self.max_seq_tokens,
            });
        }
        if let Some(&id) = req.prompt_ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(SubmitError::TokenOutOfRange { id, vocab_size: self.vocab_size });
        }
        req.sampling.validate()?;
        let queued = self.shared.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= self.opts.max_queue {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull { queued });
        }
        let inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        let sent = inbox.as_ref().map(|tx| tx.send(Command::Submit(Box::new(req), sink)).is_ok());
        if sent != Some(true) {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(())
    }

    pub fn stats(&self) -> SchedulerStats {
        let mut s = *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        // Requests still in the channel count as queued too.
        s.queued = self.shared.queued.load(Ordering::SeqCst);
        s
    }

    /// Stops taking requests. With `cancel`, running and waiting requests end now (`Done` with
    /// `Cancelled`); without, they run to completion first. Returns when the thread has ended.
    pub fn shutdown(&self, cancel: bool) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        if cancel {
            self.shared.cancel.store(true, Ordering::SeqCst);
        }
        // Closing the inbox ends the thread once its work is done.
        self.inbox.lock().unwrap_or_else(|e| e.into_inner()).take();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown(true);
    }
}

/// A request being served.
struct Active {
    req: Request,
    sink: Box<dyn EventSink>,
    seq: Sequence,
    /// Tokens still to feed: the prompt's remainder, or the last sampled token.
    pending: Vec<u32>,
    /// Every token so far: prompt and generated (what a preempted request recomputes).
    all_tokens: Vec<u32>,
    generated: usize,
    cached_tokens: usize,
    preemptions: usize,
    streamer: TextStreamer,
    stops: StopMatcher,
    /// Rows of `pending` fed in the current step.
    feeding: usize,
    admitted_at: Instant,
}

struct Worker<B: Backend> {
    model: Arc<Model<B>>,
    tokenizer: Option<Arc<Tokenizer>>,
    opts: SchedulerOptions,
    shared: Arc<Shared>,
    waiting: VecDeque<Active>,
    running: Vec<Active>,
    steps: u64,
    preemptions: u64,
    finished: u64,
}

impl<B: Backend> Worker<B> {
    fn serve(&mut self, ctx: &mut Context<B>, rx: mpsc::Receiver<Command>) {
        let mut inbox_open = true;
        loop {
            // Wait for work when there is none; otherwise take what has arrived.
            if self.running.is_empty() && self.waiting.is_empty() {
                if !inbox_open {
                    break;
                }
                match rx.recv() {
                    Ok(cmd) => self.take(cmd, ctx),
                    Err(_) => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.take(cmd, ctx),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        inbox_open = false;
                        break;
                    }
                }
            }
            if self.shared.cancel.load(Ordering::SeqCst) {
                break;
            }
            self.drop_closed(ctx);
            self.admit(ctx);
            if !self.running.is_empty() {
                self.step(ctx);
            }
            self.publish(ctx);
        }
        self.cancel_all(ctx);
        self.publish(ctx);
    }

    fn take(&mut self, cmd: Command, ctx: &Context<B>) {
        let Command::Submit(req, sink) = cmd;
        let vocab = self.model.config.vocab_size;
        let seq = Sequence::with_sampling(req.sampling.clone(), vocab);
        let room = ctx.max_seq_tokens().saturating_sub(req.prompt_ids.len());
        let req = Request { max_tokens: req.max_tokens.min(room), ..*req };
        let stops = StopMatcher::new(req.stop_strings.clone());
        self.waiting.push_back(Active {
            pending: req.prompt_ids.clone(),
            all_tokens: req.prompt_ids.clone(),
            req,
            sink,
            seq,
            generated: 0,
            cached_tokens: 0,
            preemptions: 0,
            streamer: TextStreamer::new(),
            stops,
            feeding: 0,
            admitted_at: Instant::now(),
        });
    }

    /// Requests whose client has gone end here.
    fn drop_closed(&mut self, ctx: &mut Context<B>) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].sink.is_closed() {
                let a = self.running.swap_remove(i);
                self.finish(ctx, a, FinishReason::Cancelled);
            } else {
                i += 1;
            }
        }
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        while let Some(a) = self.waiting.pop_front() {
            if a.sink.is_closed() {
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                self.finish(ctx, a, FinishReason::Cancelled);
            } else {
                kept.push_back(a);
            }
        }
        self.waiting = kept;
    }

    /// Moves waiting requests to running while there is room for their prompts.
    fn admit(&mut self, ctx: &mut Context<B>) {
        while self.running.len() < self.opts.max_seqs {
            let Some(a) = self.waiting.front_mut() else { break };
            if a.seq.is_empty() {
                let taken = ctx.share_prefix(&mut a.seq, &a.pending);
                a.pending.drain(..taken);
                if a.preemptions == 0 {
                    a.cached_tokens = taken;
                }
            }
            // Room for the rest of its prompt and its first generated token, beside one new
            // block for each running sequence's next step.
            let need = Context::<B>::blocks_for(a.seq.len() + a.pending.len() + 1) - a.seq.blocks();
            if need + self.running.len() > ctx.available_blocks() && !self.running.is_empty() {
                break;
            }
            let mut a = self.waiting.pop_front().expect("front exists");
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            a.admitted_at = Instant::now();
            self.running.push(a);
        }
    }

    /// Rows each running request feeds this step: decode rows first, then prefill chunks.
    fn plan(&mut self, ctx: &Context<B>) {
        let mut budget = ctx.max_batch();
        for a in &mut self.running {
            a.feeding = 0;
        }
        for a in self.running.iter_mut().filter(|a| a.pending.len() == 1) {
            if budget > 0 {
                a.feeding = 1;
                budget -= 1;
            }
        }
        let mut prefill = self.opts.prefill_chunk.max(1).min(budget);
        for a in self.running.iter_mut().filter(|a| a.pending.len() > 1) {
            let n = a.pending.len().min(prefill);
            a.feeding = n;
            prefill -= n;
        }
    }

    /// Blocks the planned batch needs beyond what its sequences hold.
    fn blocks_needed(&self) -> usize {
        self.running
            .iter()
            .filter(|a| a.feeding > 0)
            .map(|a| Context::<B>::blocks_for(a.seq.len() + a.feeding) - a.seq.blocks())
            .sum()
    }

    /// Frees the most recently admitted running request and puts it back at the head of the
    /// queue, to be recomputed later.
    fn preempt_one(&mut self, ctx: &mut Context<B>) -> bool {
        let Some(idx) = (0..self.running.len()).max_by_key(|&i| self.running[i].admitted_at) else {
            return false;
        };
        let mut a = self.running.remove(idx);
        ctx.release(&mut a.seq);
        a.pending = a.all_tokens.clone();
        a.preemptions += 1;
        a.feeding = 0;
        self.preemptions += 1;
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        self.waiting.push_front(a);
        true
    }

    fn step(&mut self, ctx: &mut Context<B>) {
        self.plan(ctx);
        while self.blocks_needed() > ctx.available_blocks() {
            if self.running.len() <= 1 || !self.preempt_one(ctx) {
                break;
            }
            self.plan(ctx);
        }
        if self.blocks_needed() > ctx.available_blocks() {
            // One request alone outgrows the whole cache: one that has started ends as if its
            // context were full; one whose prompt does not fit can never run.
            if let Some(a) = self.running.pop() {
                match a.generated {
                    0 => self.fail(ctx, a, "the KV cache cannot hold this prompt: raise the cache size"),
                    _ => self.finish(ctx, a, FinishReason::ContextFull),
                }
            }
            return;
        }
        let mut segments = Vec::with_capacity(self.running.len());
        let mut members = Vec::with_capacity(self.running.len());
        for (i, a) in self.running.iter_mut().enumerate() {
            if a.feeding == 0 {
                continue;
            }
            let last = a.feeding == a.pending.len();
            // A greedy request without log-probabilities needs only the argmax: its logits stay
            // on the device.
            let greedy = a.req.logprobs.is_none() && a.seq.sampler.params().is_plain_greedy();
            let logits = match (last, greedy) {
                (false, _) => Logits::None,
                (true, false) => Logits::Last,
                (true, true) => Logits::Greedy,
            };
            segments.push(Segment { seq: &mut a.seq, tokens: &a.pending[..a.feeding], logits });
            members.push(i);
        }
        if segments.is_empty() {
            return;
        }
        let result = self.model.forward_batch(ctx, &mut segments);
        drop(segments);
        self.steps += 1;
        if let Err(e) = result {
            // Nothing was computed (the batch was checked first) or the backend failed: end
            // the batch's requests with the error rather than retrying forever.
            let msg = e.to_string();
            for &i in members.iter().rev() {
                let a = self.running.remove(i);
                self.fail(ctx, a, &msg);
            }
            return;
        }
        let mut finished = Vec::new();
        for (seg, &i) in members.iter().enumerate() {
            let a = &mut self.running[i];
            a.pending.drain(..a.feeding);
            if !a.pending.is_empty() {
                continue;
            }
            if let Some(reason) = self.sample_and_send(ctx, seg, i) {
                finished.push((i, reason));
            }
        }
        for &(i, reason) in finished.iter().rev() {
            let a = self.running.remove(i);
            self.finish(ctx, a, reason);
        }
    }

    /// Samples request `i`'s next token from segment `seg`'s logits and sends it; returns why
    /// the request ends, if it does.
    fn sample_and_send(&mut self, ctx: &mut Context<B>, seg: usize, i: usize) -> Option<FinishReason> {
        let vocab = self.model.config.vocab_size;
        let a = &mut self.running[i];
        let lp_of = |logits: &[f32], id: u32, n: usize| {
            let (logprob, top) = logprobs(logits, id, n);
            TokenLogprobs { logprob, top }
        };
        let (next, raw_top) = match ctx.greedy_of(seg) {
            Some(id) => (id, None),
            None => {
                let rows = ctx.logits_of_mut(seg);
                let n = rows.len();
                let last = &mut rows[n - vocab..];
                let raw_top = a.req.logprobs.map(|_| last.to_vec());
                (a.seq.sample(last), raw_top)
            }
        };
        a.generated += 1;
        a.all_tokens.push(next);
        if a.req.stop_ids.contains(&next) {
            return Some(FinishReason::Eos);
        }
        let piece = match &self.tokenizer {
            Some(tok) => a.streamer.push(tok, next).ok().flatten().unwrap_or_default(),
            None => String::new(),
        };
        let (mut text, hit) = a.stops.push(&piece);
        let ends = if hit {
            Some(FinishReason::Stop)
        } else if a.generated >= a.req.max_tokens {
            Some(FinishReason::Length)
        } else if a.seq.len() + 1 >= ctx.max_seq_tokens() {
            Some(FinishReason::ContextFull)
        } else {
            None
        };
        if matches!(ends, Some(FinishReason::Length | FinishReason::ContextFull)) {
            // The last token carries the text still held back, so that no event follows it.
            if let Some(Ok(Some(piece))) = self.tokenizer.as_ref().map(|t| a.streamer.finish(t)) {
                text.push_str(&a.stops.push(&piece).0);
            }
            text.push_str(&a.stops.finish());
        }
        let lp = raw_top.map(|raw| lp_of(&raw, next, a.req.logprobs.unwrap_or(0)));
        if a.sink.send(Event::Token { id: next, text, logprobs: lp }).is_break() {
            return Some(FinishReason::Cancelled);
        }
        if ends.is_some() {
            return ends;
        }
        a.pending.push(next);
        None
    }

    /// Ends a request: releases its blocks, flushes its text and sends `Done`.
    fn finish(&mut self, ctx: &mut Context<B>, mut a: Active, reason: FinishReason) {
        ctx.release(&mut a.seq);
        if !matches!(reason, FinishReason::Stop | FinishReason::Cancelled) {
            let mut tail = String::new();
            if let Some(Ok(Some(piece))) = self.tokenizer.as_ref().map(|t| a.streamer.finish(t)) {
                let (out, _) = a.stops.push(&piece);
                tail.push_str(&out);
            }
            tail.push_str(&a.stops.finish());
            if !tail.is_empty() {
                let _ = a.sink.send(Event::Text(tail));
            }
        }
        self.finished += 1;
        // Published before the client hears of the end, so that what it reads next is current.
        self.publish(ctx);
        let _ = a.sink.send(Event::Done(Finish {
            reason,
            prompt_tokens: a.req.prompt_ids.len(),
            cached_tokens: a.cached_tokens,
            completion_tokens: a.generated,
            preemptions: a.preemptions,
        }));
    }

    fn fail(&mut self, ctx: &mut Context<B>, mut a: Active, message: &str) {
        ctx.release(&mut a.seq);
        self.finished += 1;
        self.publish(ctx);
        let _ = a.sink.send(Event::Error(message.to_string()));
    }

    fn cancel_all(&mut self, ctx: &mut Context<B>) {
        while let Some(a) = self.running.pop() {
            self.finish(ctx, a, FinishReason::Cancelled);
        }
        while let Some(a) = self.waiting.pop_front() {
            self.finish(ctx, a, FinishReason::Cancelled);
        }
    }

    fn publish(&self, ctx: &Context<B>) {
        let mut s = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        *s = SchedulerStats {
            running: self.running.len(),
            queued: self.waiting.len(),
            kv: ctx.kv_stats(),
            steps: self.steps,
            preemptions: self.preemptions,
            finished: self.finished,
        };
    }
}
