//! The JSON shapes of OpenAI's responses: whole (`text_completion`, `chat.completion`) and
//! streamed (`text_completion` chunks, `chat.completion.chunk`).

use serde_json::{json, Map, Value};

use crate::engine::{FinishReason, TokenLogprob};
use crate::state::AppState;

/// Which endpoint's shapes to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CompletionKind {
    /// `/v1/completions`: `choices[].text`, legacy log-probabilities.
    Text,
    /// `/v1/chat/completions`: `choices[].message` / `delta`, `logprobs.content`.
    Chat,
}

/// One response being built: its identity, and, when not streaming, the text and
/// log-probabilities gathered so far.
pub(crate) struct Completion {
    kind: CompletionKind,
    id: String,
    created: u64,
    model: String,
    /// Whether the request asked for log-probabilities.
    logprobs: bool,
    /// `stream_options.include_usage`.
    pub(crate) include_usage: bool,
    text: String,
    /// One entry per token, in the shape of `kind`.
    token_logprobs: Vec<TokenLogprob>,
    /// Offsets (in characters) of each logged token's text in `text` (completions' `text_offset`).
    text_offsets: Vec<usize>,
    chars: usize,
}

impl Completion {
    pub(crate) fn new(state: &AppState, kind: CompletionKind, logprobs: bool, include_usage: bool) -> Self {
        let prefix = match kind {
            CompletionKind::Text => "cmpl",
            CompletionKind::Chat => "chatcmpl",
        };
        Completion {
            kind,
            id: state.next_id(prefix),
            created: crate::state::unix_now(),
            model: state.model_id.clone(),
            logprobs,
            include_usage,
            text: String::new(),
            token_logprobs: Vec::new(),
            text_offsets: Vec::new(),
            chars: 0,
        }
    }

    pub(crate) fn kind(&self) -> CompletionKind {
        self.kind
    }

    /// Adds one token of a non-streamed generation.
    pub(crate) fn push_token(&mut self, text: &str, logprob: Option<&TokenLogprob>) {
        if let (true, Some(lp)) = (self.logprobs, logprob) {
            self.token_logprobs.push(lp.clone());
            self.text_offsets.push(self.chars);
        }
        self.text.push_str(text);
        self.chars += text.chars().count();
    }

    /// The whole response, once the generation is done.
    pub(crate) fn full_response(
        &self,
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    ) -> Value {
        let logprobs = self.logprobs.then(|| self.logprobs_json(&self.token_logprobs, &self.text_offsets));
        let choice = match self.kind {
            CompletionKind::Text => json!({
                "index": 0, "text": self.text, "logprobs": logprobs, "finish_reason": finish.as_str(),
            }),
            CompletionKind::Chat => json!({
                "index": 0,
                "message": { "role": "assistant", "content": self.text },
                "logprobs": logprobs,
                "finish_reason": finish.as_str(),
            }),
        };
        let mut response = self.envelope(false);
        response.insert("choices".into(), json!([choice]));
        response.insert("usage".into(), usage(prompt_tokens, completion_tokens));
        Value::Object(response)
    }

    /// Chat's first chunk: the assistant's role, no content yet.
    pub(crate) fn role_chunk(&self) -> Value {
        self.chunk(json!({ "role": "assistant", "content": "" }), None, None)
    }

    /// A chunk carrying one token's text (and log-probability).
    pub(crate) fn token_chunk(&mut self, text: &str, logprob: Option<&TokenLogprob>) -> Value {
        let logprobs = match (self.logprobs, logprob) {
            (true, Some(lp)) => Some(self.logprobs_json(std::slice::from_ref(lp), &[self.chars])),
            _ => None,
        };
        self.chars += text.chars().count();
        let delta = match self.kind {
            CompletionKind::Text => Value::String(text.to_string()),
            CompletionKind::Chat => json!({ "content": text }),
        };
        self.chunk(delta, logprobs, None)
    }

    /// The chunk that ends the choice, with its finish reason and no text.
    pub(crate) fn finish_chunk(&self, finish: FinishReason) -> Value {
        let delta = match self.kind {
            CompletionKind::Text => Value::String(String::new()),
            CompletionKind::Chat => json!({}),
        };
        self.chunk(delta, None, Some(finish))
    }

    /// The last chunk when `include_usage` is set: no choices, the token counts.
    pub(crate) fn usage_chunk(&self, prompt_tokens: usize, completion_tokens: usize) -> Value {
        let mut chunk = self.envelope(true);
        chunk.insert("choices".into(), json!([]));
        chunk.insert("usage".into(), usage(prompt_tokens, completion_tokens));
        Value::Object(chunk)
    }

    fn chunk(&self, delta: Value, logprobs: Option<Value>, finish: Option<FinishReason>) -> Value {
        let mut choice = Map::new();
        choice.insert("index".into(), json!(0));
        match self.kind {
            CompletionKind::Text => choice.insert("text".into(), delta),
            CompletionKind::Chat => choice.insert("delta".into(), delta),
        };
        choice.insert("logprobs".into(), logprobs.unwrap_or(Value::Null));
        choice.insert("finish_reason".into(), finish.map_or(Value::Null, |f| f.as_str().into()));
        let mut chunk = self.envelope(true);
        chunk.insert("choices".into(), json!([choice]));
        if self.include_usage {
            // OpenAI sends `usage: null` on every chunk but the last when usage is asked for.
            chunk.insert("usage".into(), Value::Null);
        }
        Value::Object(chunk)
    }

    fn envelope(&self, streaming: bool) -> Map<String, Value> {
        let object = match (self.kind, streaming) {
            (CompletionKind::Text, _) => "text_completion",
            (CompletionKind::Chat, false) => "chat.completion",
            (CompletionKind::Chat, true) => "chat.completion.chunk",
        };
        let mut m = Map::new();
        m.insert("id".into(), self.id.clone().into());
        m.insert("object".into(), object.into());
        m.insert("created".into(), self.created.into());
        m.insert("model".into(), self.model.clone().into());
        m
    }

    /// Log-probabilities of some tokens in the endpoint's shape.
    fn logprobs_json(&self, tokens: &[TokenLogprob], offsets: &[usize]) -> Value {
        match self.kind {
            CompletionKind::Text => json!({
                "tokens": tokens.iter().map(|t| t.token.as_str()).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|t| {
                    t.top.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect::<Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            }),
            CompletionKind::Chat => json!({
                "content": tokens.iter().map(|t| json!({
                    "token": t.token,
                    "logprob": t.logprob,
                    "bytes": t.token.as_bytes(),
                    "top_logprobs": t.top.iter().map(|a| json!({
                        "token": a.token, "logprob": a.logprob, "bytes": a.token.as_bytes(),
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }),
        }
    }
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}
