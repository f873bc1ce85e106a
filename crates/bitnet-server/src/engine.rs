//! The interface between the HTTP layer and whatever generates tokens.
//!
//! The server knows nothing of models, KV caches or schedulers: it turns a request into token ids
//! through [`Engine::encode_prompt`] / [`Engine::encode_chat`], hands a [`GenerationRequest`] to
//! [`Engine::submit`] and forwards the [`GenerationEvent`]s that come back. The batching engine
//! in `bitnet-inference` implements this trait; [`crate::mock::MockEngine`] implements it for tests.

use tokio::sync::mpsc::UnboundedReceiver;

/// A token generator shared by every request the server handles.
///
/// Every method is called from the server's async tasks, so none may block for long: `submit`
/// queues the work and returns at once; the generation itself runs elsewhere (the engine's own
/// thread or tasks) and reports through the returned channel.
pub trait Engine: Send + Sync + 'static {
    /// The model's name, reported by `/v1/models` and in every response's `model` field.
    fn model_id(&self) -> String;

    /// The most tokens one sequence may hold: prompt plus completion. The server rejects a request
    /// whose prompt, or prompt plus `max_tokens`, exceeds it (400) before submitting.
    fn context_len(&self) -> usize;

    /// Tokenizes a completions prompt, adding BOS (or not) as the model wants.
    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, EngineError>;

    /// Renders a conversation through the model's chat template, ending with the assistant's turn
    /// opened (the generation prompt), and tokenizes it.
    fn encode_chat(&self, messages: &[ChatTurn]) -> Result<Vec<u32>, EngineError>;

    /// Starts a generation; its events arrive on the returned receiver, ending with exactly one
    /// [`GenerationEvent::Done`] or [`GenerationEvent::Error`], after which the engine drops its
    /// sender.
    ///
    /// Dropping the receiver cancels the request: the engine notices on its next send (or sooner,
    /// with `UnboundedSender::is_closed`) and frees the sequence and its KV blocks. The server drops
    /// it when a client disconnects.
    ///
    /// The engine validates what only it can know (token ids inside the vocabulary: otherwise
    /// [`SubmitError::Invalid`]) and applies the stop strings: it holds back text that could be the
    /// start of a stop string and never sends the stop string itself.
    fn submit(&self, req: GenerationRequest) -> Result<UnboundedReceiver<GenerationEvent>, SubmitError>;

    /// The embedding of each input (token ids, already checked against the context): the
    /// model's pooled, L2-normalized final hidden state, one vector per input, all of one
    /// width. Runs on a blocking thread; an engine that cannot embed answers
    /// [`EngineError::Invalid`] (a 400), which is what this default does.
    fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError> {
        let _ = inputs;
        Err(EngineError::Invalid("this server's model does not compute embeddings".into()))
    }

    /// A snapshot of the engine's load, read by `/metrics` and `/health`.
    fn stats(&self) -> EngineStats;

    /// Cancels all in-flight and queued work and refuses new work with
    /// [`SubmitError::ShuttingDown`]. Graceful shutdown calls it once the in-flight requests have
    /// drained or the drain deadline has passed. Each cancelled request's channel ends with
    /// [`GenerationEvent::Error`] or is simply closed.
    fn shutdown(&self);
}

/// One message of a chat conversation, its content already flattened to text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTurn {
    /// `system`, `user` or `assistant` (the server maps OpenAI's `developer` to `system`).
    pub role: String,
    /// The message's text.
    pub content: String,
}

/// Everything the engine needs to run one sequence. The server has validated every value's range
/// (see `docs/serving.md`) and that `prompt_ids.len() + max_tokens <= context_len()`.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRequest {
    /// The tokenized prompt, never empty.
    pub prompt_ids: Vec<u32>,
    /// The most tokens to generate, at least 1.
    pub max_tokens: usize,
    /// Softmax temperature, in [0, 2]; 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: usize,
    /// Drop tokens whose probability is under `min_p` times the top token's, in [0, 1]; 0 disables it.
    pub min_p: f32,
    /// Seed of the request's own sampler; `None`: the engine picks one.
    pub seed: Option<u64>,
    /// OpenAI's frequency penalty, in [-2, 2]: subtracted from a token's logit once per occurrence
    /// in the completion so far.
    pub frequency_penalty: f32,
    /// OpenAI's presence penalty, in [-2, 2]: subtracted once from the logit of every token that
    /// occurred in the completion so far.
    pub presence_penalty: f32,
    /// Up to 4 non-empty strings; generation stops before the first one that appears in the
    /// completion text, with [`FinishReason::Stop`].
    pub stop: Vec<String>,
    /// `None`: no log-probabilities. `Some(n)`: each token event carries the chosen token's
    /// log-probability and the `n` most likely alternatives (n ≤ 20).
    pub logprobs: Option<usize>,
}

/// What a generation reports, in order: any number of `Token`s, then one `Done` or `Error`.
#[derive(Clone, Debug, PartialEq)]
pub enum GenerationEvent {
    /// One generated token.
    Token {
        /// The token's id.
        id: u32,
        /// The completion text this token completes: empty while a multi-byte character or a
        /// possible stop string is pending, several tokens' worth once it resolves. Concatenating
        /// every event's `text` gives the completion, stop string already cut.
        text: String,
        /// Present when the request asked for log-probabilities.
        logprob: Option<TokenLogprob>,
    },
    /// The generation finished normally.
    Done {
        /// Why it finished.
        finish_reason: FinishReason,
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Tokens generated (every `Token` event, including those whose text a stop string cut).
        completion_tokens: usize,
    },
    /// The generation failed; the message is shown to the client.
    Error(String),
}

/// Why a generation finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// The name OpenAI's API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The log-probability of a chosen token and of its most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The chosen token's own text, decoded alone (lossily where it is part of a character).
    pub token: String,
    /// log p(chosen token), natural log, after temperature and penalties.
    pub logprob: f32,
    /// The most likely tokens, most likely first, as many as the request asked for.
    pub top: Vec<TopLogprob>,
}

/// One alternative in [`TokenLogprob::top`].
#[derive(Clone, Debug, PartialEq)]
pub struct TopLogprob {
    /// The token's id.
    pub id: u32,
    /// The token's own text, decoded alone.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
}

/// The engine's load at one moment. KV-cache fields count blocks of the paged cache; an engine
/// without one reports zeros.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Sequences being decoded.
    pub running: usize,
    /// Sequences waiting for a slot.
    pub queued: usize,
    /// KV blocks held by running sequences.
    pub kv_blocks_used: usize,
    /// KV blocks free for new sequences.
    pub kv_blocks_free: usize,
    /// All KV blocks.
    pub kv_blocks_total: usize,
    /// Blocks kept for prefix reuse, not held by any sequence (counted in `kv_blocks_free`).
    pub kv_blocks_cached: usize,
}

/// Why the engine could not tokenize a prompt or conversation (a 400 for the client).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The input cannot be tokenized or templated (unknown role, template error...).
    #[error("{0}")]
    Invalid(String),
    /// The engine failed for a reason of its own (a 500 for the client).
    #[error("{0}")]
    Internal(String),
}

/// Why [`Engine::submit`] refused a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// No room in the queue (429).
    #[error("the server is busy: the request queue is full, retry later")]
    QueueFull,
    /// The prompt does not fit the context (400).
    #[error("the prompt has {prompt} tokens, more than the model's context of {context}")]
    PromptTooLong {
        /// Tokens in the prompt.
        prompt: usize,
        /// The context length.
        context: usize,
    },
    /// The engine is shutting down (503).
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The request is invalid for this engine (400), e.g. a token id outside the vocabulary.
    #[error("{0}")]
    Invalid(String),
}
