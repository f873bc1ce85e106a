//! A deterministic [`Engine`] for tests, the load tool and the chat page, with no model.
//!
//! Tokens are bytes (id = byte + 3; BOS = 1, EOS = 2). The reply to a prompt is
//! `"You said: <the last message or prompt, up to 48 characters, end punctuation dropped>."`
//! followed by the pangram `"The quick brown fox jumps over the lazy dog."`, one word per token,
//! then EOS. Sampling options are ignored (recorded in [`MockEngine::last_request`]); stop strings
//! are honoured the way a real engine must (text that could start a stop string is held back).
//!
//! Prompts that contain `__panic__` make tokenization panic; `__error__` makes generation fail
//! after two tokens. Generation is paced by [`MockConfig::token_delay`] and limited to
//! [`MockConfig::max_running`] sequences at once, more waiting in a queue of
//! [`MockConfig::max_queued`]; each running sequence holds `ceil(tokens / kv_block_size)` KV
//! blocks, released when it ends or is cancelled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::{watch, Semaphore};

use crate::engine::{
    ChatTurn, Engine, EngineError, EngineStats, FinishReason, GenerationEvent, GenerationRequest,
    SubmitError, TokenLogprob, TopLogprob,
};

/// The beginning-of-sequence id.
pub const BOS: u32 = 1;
/// The end-of-sequence id.
pub const EOS: u32 = 2;
/// Ids of byte `b` is `b + BYTE_OFFSET`.
const BYTE_OFFSET: u32 = 3;
/// Ids below this exist.
pub const VOCAB_SIZE: u32 = 256 + BYTE_OFFSET;
/// The words every reply ends with.
pub const PANGRAM: &str = "The quick brown fox jumps over the lazy dog.";
/// How many characters of the prompt the reply echoes.
const ECHO_CHARS: usize = 48;

/// The mock's settings.
#[derive(Clone, Debug)]
pub struct MockConfig {
    /// Reported by [`Engine::model_id`].
    pub model_id: String,
    /// Reported by [`Engine::context_len`].
    pub context_len: usize,
    /// Time between two tokens of a sequence.
    pub token_delay: Duration,
    /// Sequences generated at once.
    pub max_running: usize,
    /// Sequences that may wait for a slot; past that, [`SubmitError::QueueFull`].
    pub max_queued: usize,
    /// Tokens per KV block.
    pub kv_block_size: usize,
    /// KV blocks in all (reported only: sequences are not refused for lack of blocks).
    pub kv_blocks_total: usize,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            model_id: "mock-bitnet".to_string(),
            context_len: 512,
            token_delay: Duration::from_millis(2),
            max_running: 8,
            max_queued: 64,
            kv_block_size: 16,
            kv_blocks_total: 1024,
        }
    }
}

/// What the mock has done so far, for tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MockCounters {
    /// Requests accepted by `submit`.
    pub submitted: usize,
    /// Generations that sent `Done` or `Error`.
    pub finished: usize,
    /// Generations that stopped because their receiver was dropped.
    pub cancelled: usize,
    /// Generations ended by `shutdown`.
    pub shut_down: usize,
}

#[derive(Default)]
struct Load {
    running: usize,
    queued: usize,
    kv_blocks_used: usize,
    counters: MockCounters,
    last_request: Option<GenerationRequest>,
}

/// The mock engine. Cheap to share: `Arc<MockEngine>` coerces to `Arc<dyn Engine>`.
pub struct MockEngine {
    cfg: MockConfig,
    load: Arc<Mutex<Load>>,
    slots: Arc<Semaphore>,
    shutting_down: AtomicBool,
    shutdown_tx: watch::Sender<bool>,
}

impl MockEngine {
    /// A mock with the given settings.
    pub fn new(cfg: MockConfig) -> Self {
        let slots = Arc::new(Semaphore::new(cfg.max_running.max(1)));
        MockEngine {
            cfg,
            load: Arc::default(),
            slots,
            shutting_down: AtomicBool::new(false),
            shutdown_tx: watch::channel(false).0,
        }
    }

    /// What it has done so far.
    pub fn counters(&self) -> MockCounters {
        lock(&self.load).counters
    }

    /// The last request `submit` accepted.
    pub fn last_request(&self) -> Option<GenerationRequest> {
        lock(&self.load).last_request.clone()
    }

    /// The text of token ids, as the mock's tokenizer decodes them (BOS and EOS as nothing).
    pub fn decode(ids: &[u32]) -> String {
        let bytes: Vec<u8> =
            ids.iter().filter(|&&id| id >= BYTE_OFFSET).map(|&id| (id - BYTE_OFFSET) as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The chat template: `<|role|>content\n` per turn, then `<|assistant|>`.
    pub fn render_chat(messages: &[ChatTurn]) -> String {
        let mut text: String = messages.iter().map(|m| format!("<|{}|>{}\n", m.role, m.content)).collect();
        text.push_str("<|assistant|>");
        text
    }

    /// The whole reply the mock gives a prompt, before stop strings and `max_tokens`.
    pub fn reply_for(prompt_ids: &[u32]) -> String {
        let prompt = Self::decode(prompt_ids);
        // The last turn's text: between the last role marker and the assistant's opening.
        let prompt = prompt.strip_suffix("<|assistant|>").unwrap_or(&prompt);
        let last = prompt.rsplit("|>").next().unwrap_or(prompt).trim();
        let echo: String = last.chars().take(ECHO_CHARS).collect();
        let echo = echo.trim_end_matches(['.', '!', '?']);
        format!("You said: {echo}. {PANGRAM}")
    }

    fn tokenize(text: &str) -> Result<Vec<u32>, EngineError> {
        if text.contains("__panic__") {
            panic!("the mock tokenizer was asked to panic");
        }
        Ok(std::iter::once(BOS).chain(text.bytes().map(|b| b as u32 + BYTE_OFFSET)).collect())
    }
}

impl Default for MockEngine {
    fn default() -> Self {
        MockEngine::new(MockConfig::default())
    }
}

impl Engine for MockEngine {
    fn model_id(&self) -> String {
        self.cfg.model_id.clone()
    }

    fn context_len(&self) -> usize {
        self.cfg.context_len
    }

    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        Self::tokenize(text)
    }

    fn encode_chat(&self, messages: &[ChatTurn]) -> Result<Vec<u32>, EngineError> {
        if let Some(m) = messages.iter().find(|m| !["system", "user", "assistant"].contains(&m.role.as_str()))
        {
            return Err(EngineError::Invalid(format!("the mock's template has no role '{}'", m.role)));
        }
        Self::tokenize(&Self::render_chat(messages))
    }

    fn submit(&self, req: GenerationRequest) -> Result<UnboundedReceiver<GenerationEvent>, SubmitError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(SubmitError::ShuttingDown);
        }
        let context = self.cfg.context_len;
        if req.prompt_ids.len() + req.max_tokens > context {
            return Err(SubmitError::PromptTooLong { prompt: req.prompt_ids.len(), context });
        }
        if let Some(id) = req.prompt_ids.iter().find(|&&id| id >= VOCAB_SIZE) {
            return Err(SubmitError::Invalid(format!(
                "token id {id} is outside the vocabulary of {VOCAB_SIZE}"
            )));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| SubmitError::Invalid("the mock engine runs inside a tokio runtime".into()))?;
        {
            let mut load = lock(&self.load);
            if load.running + load.queued >= self.cfg.max_running + self.cfg.max_queued {
                return Err(SubmitError::QueueFull);
            }
            load.queued += 1;
            load.counters.submitted += 1;
            load.last_request = Some(req.clone());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let sequence = Sequence {
            load: self.load.clone(),
            block_size: self.cfg.kv_block_size.max(1),
            blocks_held: 0,
            state: SequenceState::Queued,
        };
        let slots = self.slots.clone();
        let shutdown = self.shutdown_tx.subscribe();
        runtime.spawn(generate(req, tx, sequence, slots, shutdown, self.cfg.token_delay));
        Ok(rx)
    }

    /// A stand-in embedding: the counts of each input's ids in eight buckets (`id % 8`),
    /// L2-normalized, so equal inputs give equal vectors and tests can compute what to expect.
    fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError> {
        inputs
            .iter()
            .map(|ids| {
                if let Some(id) = ids.iter().find(|&&id| id >= VOCAB_SIZE) {
                    return Err(EngineError::Invalid(format!(
                        "token id {id} is outside the vocabulary of {VOCAB_SIZE}"
                    )));
                }
                let mut v = [0f32; 8];
                ids.iter().for_each(|&id| v[id as usize % 8] += 1.0);
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                Ok(v.iter().map(|x| x / norm).collect())
            })
            .collect()
    }

    fn stats(&self) -> EngineStats {
        let load = lock(&self.load);
        EngineStats {
            running: load.running,
            queued: load.queued,
            kv_blocks_used: load.kv_blocks_used,
            kv_blocks_free: self.cfg.kv_blocks_total.saturating_sub(load.kv_blocks_used),
            kv_blocks_total: self.cfg.kv_blocks_total,
            kv_blocks_cached: 0,
        }
    }

    fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.shutdown_tx.send_replace(true);
    }
}

fn lock(load: &Mutex<Load>) -> MutexGuard<'_, Load> {
    load.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How a generation ended, for the counters.
enum Outcome {
    Finished,
    Cancelled,
    ShutDown,
}

#[derive(PartialEq)]
enum SequenceState {
    Queued,
    Running,
}

/// One sequence's share of the load; gives it back when dropped, however the task ends.
struct Sequence {
    load: Arc<Mutex<Load>>,
    block_size: usize,
    blocks_held: usize,
    state: SequenceState,
}

impl Sequence {
    fn start_running(&mut self) {
        let mut load = lock(&self.load);
        load.queued -= 1;
        load.running += 1;
        self.state = SequenceState::Running;
    }

    /// Holds enough KV blocks for `tokens` tokens.
    fn hold_tokens(&mut self, tokens: usize) {
        let blocks = tokens.div_ceil(self.block_size);
        let mut load = lock(&self.load);
        load.kv_blocks_used += blocks - self.blocks_held;
        self.blocks_held = blocks;
    }

    fn end(self, outcome: Outcome) {
        let mut load = lock(&self.load);
        match outcome {
            Outcome::Finished => load.counters.finished += 1,
            Outcome::Cancelled => load.counters.cancelled += 1,
            Outcome::ShutDown => load.counters.shut_down += 1,
        }
    }
}

impl Drop for Sequence {
    fn drop(&mut self) {
        let mut load = lock(&self.load);
        load.kv_blocks_used -= self.blocks_held;
        match self.state {
            SequenceState::Queued => load.queued -= 1,
            SequenceState::Running => load.running -= 1,
        }
    }
}

/// What interrupted a wait.
enum Interrupt {
    ReceiverDropped,
    Shutdown,
}

/// Waits for `fut` unless the receiver is dropped or the engine shuts down first.
async fn unless_interrupted<T>(
    fut: impl std::future::Future<Output = T>,
    tx: &UnboundedSender<GenerationEvent>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<T, Interrupt> {
    if *shutdown.borrow() {
        return Err(Interrupt::Shutdown);
    }
    tokio::select! {
        value = fut => Ok(value),
        _ = tx.closed() => Err(Interrupt::ReceiverDropped),
        _ = shutdown.wait_for(|&stop| stop) => Err(Interrupt::Shutdown),
    }
}

/// One sequence from queue to last event.
async fn generate(
    req: GenerationRequest,
    tx: UnboundedSender<GenerationEvent>,
    mut sequence: Sequence,
    slots: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    token_delay: Duration,
) {
    let outcome = match run_sequence(&req, &tx, &mut sequence, &slots, &mut shutdown, token_delay).await {
        Ok(()) => Outcome::Finished,
        Err(Interrupt::ReceiverDropped) => Outcome::Cancelled,
        Err(Interrupt::Shutdown) => {
            let _ = tx.send(GenerationEvent::Error("the server is shutting down".into()));
            Outcome::ShutDown
        }
    };
    sequence.end(outcome);
}

async fn run_sequence(
    req: &GenerationRequest,
    tx: &UnboundedSender<GenerationEvent>,
    sequence: &mut Sequence,
    slots: &Semaphore,
    shutdown: &mut watch::Receiver<bool>,
    token_delay: Duration,
) -> Result<(), Interrupt> {
    let _slot = unless_interrupted(slots.acquire(), tx, shutdown).await?;
    sequence.start_running();
    let prompt_tokens = req.prompt_ids.len();
    sequence.hold_tokens(prompt_tokens);
    let fail_after = MockEngine::decode(&req.prompt_ids).contains("__error__").then_some(2);
    let words = reply_words(&MockEngine::reply_for(&req.prompt_ids));
    let mut stops = StopFilter::new(&req.stop);
    let mut generated = 0;
    loop {
        unless_interrupted(tokio::time::sleep(token_delay), tx, shutdown).await?;
        if fail_after == Some(generated) {
            let _ = tx.send(GenerationEvent::Error("the mock engine failed as asked (__error__)".into()));
            return Ok(());
        }
        let word = words.get(generated);
        generated += 1;
        sequence.hold_tokens(prompt_tokens + generated);
        let (id, text, finish) = match word {
            None => (EOS, stops.flush(), Some(FinishReason::Stop)),
            Some(word) => {
                let (text, hit_stop) = stops.push(word);
                let id = word.bytes().next().map_or(EOS, |b| b as u32 + BYTE_OFFSET);
                match (hit_stop, generated == req.max_tokens) {
                    (true, _) => (id, text, Some(FinishReason::Stop)),
                    (false, true) => (id, text + &stops.flush(), Some(FinishReason::Length)),
                    (false, false) => (id, text, None),
                }
            }
        };
        let logprob = req.logprobs.map(|n| mock_logprob(generated, word.map_or("", String::as_str), n));
        send(tx, GenerationEvent::Token { id, text, logprob })?;
        if let Some(finish_reason) = finish {
            return send(
                tx,
                GenerationEvent::Done { finish_reason, prompt_tokens, completion_tokens: generated },
            );
        }
    }
}

fn send(tx: &UnboundedSender<GenerationEvent>, event: GenerationEvent) -> Result<(), Interrupt> {
    tx.send(event).map_err(|_| Interrupt::ReceiverDropped)
}

/// The reply cut into tokens: words, each but the first with its leading space.
fn reply_words(reply: &str) -> Vec<String> {
    reply.split(' ').enumerate().map(|(i, w)| if i == 0 { w.to_string() } else { format!(" {w}") }).collect()
}

/// Made-up but well-formed log-probabilities: the chosen token first among `n` alternatives.
fn mock_logprob(position: usize, token: &str, n: usize) -> TokenLogprob {
    let logprob = -0.25 * (position % 4) as f32;
    let top = (0..n)
        .map(|k| TopLogprob {
            id: BYTE_OFFSET + k as u32,
            token: if k == 0 { token.to_string() } else { format!("alt{k}") },
            logprob: logprob - k as f32,
        })
        .collect();
    TokenLogprob { token: token.to_string(), logprob, top }
}

/// Cuts the completion text at the first stop string, holding back any tail that could still
/// become one.
struct StopFilter<'a> {
    stops: &'a [String],
    /// Text generated but not yet sent.
    pending: String,
}

impl<'a> StopFilter<'a> {
    fn new(stops: &'a [String]) -> Self {
        StopFilter { stops, pending: String::new() }
    }

    /// Adds a token's text; returns the text now safe to send and whether a stop string appeared
    /// (then the text ends just before it).
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.pending.truncate(at);
            return (std::mem::take(&mut self.pending), true);
        }
        let held = self.longest_stop_prefix_suffix();
        let send_len = self.pending.len() - held;
        let rest = self.pending.split_off(send_len);
        (std::mem::replace(&mut self.pending, rest), false)
    }

    /// Everything held back, at the end of the generation.
    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest tail of `pending` that begins some stop string.
    fn longest_stop_prefix_suffix(&self) -> usize {
        (1..=self.pending.len())
            .rev()
            .filter(|&n| self.pending.is_char_boundary(self.pending.len() - n))
            .find(|&n| {
                let tail = &self.pending[self.pending.len() - n..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_filter_holds_back_possible_stops() {
        let stops = vec!["fox j".to_string()];
        let mut f = StopFilter::new(&stops);
        assert_eq!(f.push("The"), ("The".to_string(), false));
        assert_eq!(f.push(" brown"), (" brown".to_string(), false));
        assert_eq!(f.push(" fox"), (" ".to_string(), false));
        assert_eq!(f.push(" jumps"), (String::new(), true));
        let mut g = StopFilter::new(&stops);
        assert_eq!(g.push(" fox"), (" ".to_string(), false));
        assert_eq!(g.push(" runs"), ("fox runs".to_string(), false));
    }

    #[test]
    fn reply_echoes_the_last_turn() {
        let turns = [
            ChatTurn { role: "system".into(), content: "be nice".into() },
            ChatTurn { role: "user".into(), content: "hello there".into() },
        ];
        let ids = MockEngine::tokenize(&MockEngine::render_chat(&turns)).unwrap();
        assert_eq!(MockEngine::reply_for(&ids), format!("You said: hello there. {PANGRAM}"));
        let ids = MockEngine::tokenize("Once upon").unwrap();
        assert_eq!(MockEngine::reply_for(&ids), format!("You said: Once upon. {PANGRAM}"));
    }
}
