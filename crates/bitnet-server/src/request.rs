//! Parsing and validating the bodies of `/v1/completions`, `/v1/chat/completions` and
//! `/v1/embeddings`.
//!
//! The body is read field by field from a JSON object rather than through a derived struct so
//! that every error names its field (`param` in OpenAI's error shape) and says what was expected.
//! Fields this server does not know are ignored; a known field of the wrong type or out of range
//! is a 400. JSON `null` counts as absent, as OpenAI's clients send it for unset options.
//! Parsing needs no engine: checks that need one (prompt length against the context) come later,
//! in the route handlers.

use serde_json::{Map, Value};

use crate::engine::ChatTurn;
use crate::error::ApiError;

/// Stop strings a request may give, as in OpenAI's API.
pub const MAX_STOP_STRINGS: usize = 4;
/// The most alternatives per token a request may ask log-probabilities for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A completions prompt: text, or token ids the client tokenized itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromptInput {
    /// `"prompt": "text"` or `["text"]`.
    Text(String),
    /// `"prompt": [1, 2, 3]` or `[[1, 2, 3]]`.
    Tokens(Vec<u32>),
}

/// The sampling and length options both endpoints share, validated, with OpenAI's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// `max_tokens` / `max_completion_tokens`; `None`: as many as the context leaves.
    pub max_tokens: Option<usize>,
    /// In [0, 2], default 1.
    pub temperature: f32,
    /// In (0, 1], default 1.
    pub top_p: f32,
    /// 0 (or -1 in the request): off.
    pub top_k: usize,
    /// In [0, 1], default 0.
    pub min_p: f32,
    /// Any integer; negative ones are taken as their two's-complement bits.
    pub seed: Option<u64>,
    /// In [-2, 2], default 0.
    pub frequency_penalty: f32,
    /// In [-2, 2], default 0.
    pub presence_penalty: f32,
    /// Up to [`MAX_STOP_STRINGS`] non-empty strings.
    pub stop: Vec<String>,
}

/// A validated `/v1/completions` request.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionParams {
    /// The prompt.
    pub prompt: PromptInput,
    /// Sampling options.
    pub sampling: SamplingParams,
    /// `logprobs: n`: the chosen token's log-probability and `n` alternatives.
    pub logprobs: Option<usize>,
    /// `stream: true`: answer with server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub include_usage: bool,
}

/// A validated `/v1/chat/completions` request.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatParams {
    /// The conversation, content flattened to text.
    pub messages: Vec<ChatTurn>,
    /// Sampling options.
    pub sampling: SamplingParams,
    /// `logprobs: true` gives `Some(top_logprobs)`.
    pub logprobs: Option<usize>,
    /// `stream: true`: answer with server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub include_usage: bool,
}

/// The most inputs one `/v1/embeddings` request may hold (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// How `/v1/embeddings` returns each vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbeddingFormat {
    /// A JSON list of numbers.
    Float,
    /// The little-endian f32 bytes in base64 (what OpenAI's Python client asks for by default).
    Base64,
}

/// A validated `/v1/embeddings` request.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingParams {
    /// The inputs, each a text or token ids.
    pub inputs: Vec<PromptInput>,
    /// `encoding_format`.
    pub format: EmbeddingFormat,
    /// `dimensions`, if given (only the model's own width is accepted, later).
    pub dimensions: Option<usize>,
}

/// Parses and validates a `/v1/embeddings` body: `input` is a string, a list of strings, a list
/// of token ids, or a list of lists of token ids, none of them empty.
pub fn parse_embedding_request(body: &[u8]) -> Result<EmbeddingParams, ApiError> {
    let obj = parse_object(body)?;
    let wrong = || {
        ApiError::invalid_param(
            "input",
            "'input' must be a string, a list of strings, a list of token ids, or a list of lists of token ids",
        )
    };
    let empty = |what: String| ApiError::invalid_param("input", format!("{what} is empty: nothing to embed"));
    let inputs = match field(&obj, "input") {
        None => return Err(ApiError::invalid_param("input", "'input' is required")),
        Some(Value::String(s)) => vec![PromptInput::Text(s.clone())],
        Some(Value::Array(items)) if items.is_empty() => return Err(empty("'input'".into())),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            vec![PromptInput::Tokens(parse_token_ids(items).map_err(|e| e.param("input"))?)]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(PromptInput::Text(s.clone())),
                Value::Array(ids) if ids.iter().all(Value::is_number) => {
                    parse_token_ids(ids).map(PromptInput::Tokens).map_err(|e| e.param("input"))
                }
                _ => Err(wrong()),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(wrong()),
    };
    if inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(ApiError::invalid_param(
            "input",
            format!("'input' holds {} inputs; at most {MAX_EMBEDDING_INPUTS} per request", inputs.len()),
        ));
    }
    if let Some(i) = inputs.iter().position(|p| match p {
        PromptInput::Text(t) => t.is_empty(),
        PromptInput::Tokens(ids) => ids.is_empty(),
    }) {
        return Err(empty(format!("input {i}")));
    }
    let format = match string_field(&obj, "encoding_format")? {
        None | Some("float") => EmbeddingFormat::Float,
        Some("base64") => EmbeddingFormat::Base64,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "encoding_format",
                format!("'encoding_format' must be \"float\" or \"base64\", got {other:?}"),
            ))
        }
    };
    let dimensions = integer_field(&obj, "dimensions", 1, u32::MAX as u64)?.map(|n| n as usize);
    Ok(EmbeddingParams { inputs, format, dimensions })
}

/// Parses and validates a `/v1/completions` body.
pub fn parse_completion_request(body: &[u8]) -> Result<CompletionParams, ApiError> {
    let obj = parse_object(body)?;
    reject_unsupported(&obj)?;
    if bool_field(&obj, "echo")?.unwrap_or(false) {
        return Err(ApiError::invalid_param("echo", "'echo' is not supported"));
    }
    if string_field(&obj, "suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param("suffix", "'suffix' is not supported"));
    }
    let prompt = match field(&obj, "prompt") {
        None => return Err(ApiError::invalid_param("prompt", "'prompt' is required")),
        Some(v) => parse_prompt(v)?,
    };
    let logprobs = integer_field(&obj, "logprobs", 0, MAX_TOP_LOGPROBS as u64)?.map(|n| n as usize);
    let (stream, include_usage) = parse_stream(&obj)?;
    Ok(CompletionParams { prompt, sampling: parse_sampling(&obj)?, logprobs, stream, include_usage })
}

/// Parses and validates a `/v1/chat/completions` body.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatParams, ApiError> {
    let obj = parse_object(body)?;
    reject_unsupported(&obj)?;
    let messages = match field(&obj, "messages") {
        None => return Err(ApiError::invalid_param("messages", "'messages' is required")),
        Some(v) => parse_messages(v)?,
    };
    let want_logprobs = bool_field(&obj, "logprobs")?.unwrap_or(false);
    let top_logprobs = integer_field(&obj, "top_logprobs", 0, MAX_TOP_LOGPROBS as u64)?;
    let logprobs = match (want_logprobs, top_logprobs) {
        (true, n) => Some(n.unwrap_or(0) as usize),
        (false, None) => None,
        (false, Some(_)) => {
            return Err(ApiError::invalid_param("top_logprobs", "'top_logprobs' needs 'logprobs': true"))
        }
    };
    let (stream, include_usage) = parse_stream(&obj)?;
    Ok(ChatParams { messages, sampling: parse_sampling(&obj)?, logprobs, stream, include_usage })
}

/// The body as a JSON object, or a 400 saying why not.
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    match value {
        Value::Object(obj) => Ok(obj),
        other => Err(ApiError::bad_request(format!(
            "the request body must be a JSON object, got {}",
            type_name(&other)
        ))),
    }
}

/// Options of OpenAI's API this server does not implement, refused rather than silently ignored
/// because a client relying on them would get wrong answers.
fn reject_unsupported(obj: &Map<String, Value>) -> Result<(), ApiError> {
    if let Some(n) = integer_field(obj, "n", 0, u64::MAX)? {
        if n != 1 {
            return Err(ApiError::invalid_param(
                "n",
                format!("'n' must be 1 (one choice per request), got {n}"),
            ));
        }
    }
    if let Some(v) = field(obj, "best_of") {
        if v.as_u64() != Some(1) {
            return Err(ApiError::invalid_param("best_of", "'best_of' is not supported"));
        }
    }
    if let Some(v) = field(obj, "logit_bias") {
        if !v.as_object().is_some_and(Map::is_empty) {
            return Err(ApiError::invalid_param("logit_bias", "'logit_bias' is not supported"));
        }
    }
    if let Some(v) = field(obj, "tools") {
        if !v.as_array().is_some_and(Vec::is_empty) {
            return Err(ApiError::invalid_param("tools", "'tools' (function calling) is not supported"));
        }
    }
    if let Some(v) = field(obj, "response_format") {
        let kind = v.get("type").and_then(Value::as_str);
        if kind != Some("text") {
            return Err(ApiError::invalid_param(
                "response_format",
                "only 'response_format': {\"type\": \"text\"} is supported",
            ));
        }
    }
    // `model` may name any model (the server answers with its own); `user` is ignored.
    string_field(obj, "model")?;
    string_field(obj, "user")?;
    Ok(())
}

/// The options shared by both endpoints.
fn parse_sampling(obj: &Map<String, Value>) -> Result<SamplingParams, ApiError> {
    // Chat's newer name wins when both are given.
    let max_tokens = match integer_field(obj, "max_completion_tokens", 1, u64::MAX)? {
        Some(n) => Some(n),
        None => integer_field(obj, "max_tokens", 1, u64::MAX)?,
    };
    let top_k = match field(obj, "top_k") {
        None => 0,
        Some(v) => match v.as_i64() {
            Some(-1) => 0,
            Some(k) if k >= 0 => k as usize,
            _ => {
                return Err(ApiError::invalid_param(
                    "top_k",
                    format!("'top_k' must be an integer ≥ 0 (or -1 for off), got {v}"),
                ))
            }
        },
    };
    let seed = match field(obj, "seed") {
        None => None,
        Some(v) => match (v.as_u64(), v.as_i64()) {
            (Some(s), _) => Some(s),
            (None, Some(s)) => Some(s as u64),
            _ => return Err(ApiError::invalid_param("seed", format!("'seed' must be an integer, got {v}"))),
        },
    };
    Ok(SamplingParams {
        max_tokens: max_tokens.map(|n| n.min(usize::MAX as u64) as usize),
        temperature: float_field(obj, "temperature", Range::closed(0.0, 2.0))?.unwrap_or(1.0),
        top_p: float_field(obj, "top_p", Range::open_closed(0.0, 1.0))?.unwrap_or(1.0),
        top_k,
        min_p: float_field(obj, "min_p", Range::closed(0.0, 1.0))?.unwrap_or(0.0),
        seed,
        frequency_penalty: float_field(obj, "frequency_penalty", Range::closed(-2.0, 2.0))?.unwrap_or(0.0),
        presence_penalty: float_field(obj, "presence_penalty", Range::closed(-2.0, 2.0))?.unwrap_or(0.0),
        stop: parse_stop(obj)?,
    })
}

/// `stream` and `stream_options.include_usage`.
fn parse_stream(obj: &Map<String, Value>) -> Result<(bool, bool), ApiError> {
    let stream = bool_field(obj, "stream")?.unwrap_or(false);
    let include_usage = match field(obj, "stream_options") {
        None => false,
        Some(Value::Object(opts)) => match opts.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(ApiError::invalid_param(
                    "stream_options.include_usage",
                    format!("'stream_options.include_usage' must be a boolean, got {}", type_name(other)),
                ))
            }
        },
        Some(other) => {
            return Err(ApiError::invalid_param(
                "stream_options",
                format!("'stream_options' must be an object, got {}", type_name(other)),
            ))
        }
    };
    Ok((stream, include_usage))
}

/// `stop`: a string or a list of up to four strings, none empty.
fn parse_stop(obj: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let stops: Vec<String> = match field(obj, "stop") {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(ApiError::invalid_param(
                    "stop",
                    format!("'stop' must hold strings, got {}", type_name(other)),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "stop",
                format!("'stop' must be a string or a list of strings, got {}", type_name(other)),
            ))
        }
    };
    if stops.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid_param(
            "stop",
            format!("'stop' may hold at most {MAX_STOP_STRINGS} strings, got {}", stops.len()),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param("stop", "'stop' strings must not be empty"));
    }
    Ok(stops)
}

/// `prompt`: a string, a list of one string, a list of token ids, or a list of one such list.
fn parse_prompt(v: &Value) -> Result<PromptInput, ApiError> {
    let wrong = || {
        ApiError::invalid_param(
            "prompt",
            "'prompt' must be a string, a list of token ids, or a list holding one of those",
        )
    };
    match v {
        Value::String(s) => Ok(PromptInput::Text(s.clone())),
        Value::Array(items) if items.is_empty() => {
            Err(ApiError::invalid_param("prompt", "'prompt' must not be an empty list"))
        }
        Value::Array(items) if items.iter().all(Value::is_number) => {
            parse_token_ids(items).map(PromptInput::Tokens)
        }
        Value::Array(items) if items.len() == 1 => match &items[0] {
            Value::String(s) => Ok(PromptInput::Text(s.clone())),
            Value::Array(ids) if !ids.is_empty() && ids.iter().all(Value::is_number) => {
                parse_token_ids(ids).map(PromptInput::Tokens)
            }
            _ => Err(wrong()),
        },
        Value::Array(items) if items.iter().all(|i| i.is_string() || i.is_array()) => {
            Err(ApiError::invalid_param(
                "prompt",
                format!("'prompt' holds {} prompts; this server takes one prompt per request", items.len()),
            ))
        }
        _ => Err(wrong()),
    }
}

fn parse_token_ids(items: &[Value]) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|v| {
            v.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
                ApiError::invalid_param("prompt", format!("token ids must be integers in [0, 2^32), got {v}"))
            })
        })
        .collect()
}

/// `messages`: a non-empty list of `{role, content}`.
fn parse_messages(v: &Value) -> Result<Vec<ChatTurn>, ApiError> {
    let Value::Array(items) = v else {
        return Err(ApiError::invalid_param(
            "messages",
            format!("'messages' must be a list, got {}", type_name(v)),
        ));
    };
    if items.is_empty() {
        return Err(ApiError::invalid_param("messages", "'messages' must not be empty"));
    }
    items.iter().enumerate().map(|(i, m)| parse_message(i, m)).collect()
}

fn parse_message(index: usize, v: &Value) -> Result<ChatTurn, ApiError> {
    let param = |name: &str| format!("messages[{index}].{name}");
    let Value::Object(m) = v else {
        return Err(ApiError::invalid_param(
            &format!("messages[{index}]"),
            format!("each message must be an object, got {}", type_name(v)),
        ));
    };
    let role = match m.get("role") {
        Some(Value::String(r)) => r.as_str(),
        Some(other) => {
            return Err(ApiError::invalid_param(
                &param("role"),
                format!("'{}' must be a string, got {}", param("role"), type_name(other)),
            ))
        }
        None => {
            return Err(ApiError::invalid_param(&param("role"), format!("'{}' is required", param("role"))))
        }
    };
    let role = match role {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        other => {
            return Err(ApiError::invalid_param(
                &param("role"),
                format!("role '{other}' is not supported (system, developer, user or assistant)"),
            ))
        }
    };
    let content = match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parse_content_parts(&param("content"), parts)?,
        None | Some(Value::Null) if role == "assistant" => String::new(),
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                &param("content"),
                format!("'{}' is required", param("content")),
            ))
        }
        Some(other) => {
            return Err(ApiError::invalid_param(
                &param("content"),
                format!(
                    "'{}' must be a string or a list of text parts, got {}",
                    param("content"),
                    type_name(other)
                ),
            ))
        }
    };
    Ok(ChatTurn { role: role.to_string(), content })
}

/// Content given as `[{"type": "text", "text": ...}, ...]`: the texts joined with newlines, as
/// OpenAI's own template does.
fn parse_content_parts(param: &str, parts: &[Value]) -> Result<String, ApiError> {
    let texts = parts
        .iter()
        .map(|part| match (part.get("type").and_then(Value::as_str), part.get("text")) {
            (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
            (Some("text"), _) => {
                Err(ApiError::invalid_param(param, format!("a text part of '{param}' needs a string 'text'")))
            }
            (Some(kind), _) => Err(ApiError::invalid_param(
                param,
                format!("content parts of type '{kind}' are not supported, only 'text'"),
            )),
            (None, _) => Err(ApiError::invalid_param(
                param,
                format!("each part of '{param}' must be an object with a 'type'"),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(texts.join("\n"))
}

/// A field's value, `None` when absent or null.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn bool_field(obj: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::invalid_param(
            name,
            format!("'{name}' must be a boolean, got {}", type_name(other)),
        )),
    }
}

fn string_field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => {
            Err(ApiError::invalid_param(name, format!("'{name}' must be a string, got {}", type_name(other))))
        }
    }
}

/// An integer field in `[min, max]`.
fn integer_field(obj: &Map<String, Value>, name: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
    let Some(v) = field(obj, name) else { return Ok(None) };
    let Value::Number(n) = v else {
        return Err(ApiError::invalid_param(
            name,
            format!("'{name}' must be an integer, got {}", type_name(v)),
        ));
    };
    match n.as_u64() {
        Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
        _ if n.is_f64() => {
            Err(ApiError::invalid_param(name, format!("'{name}' must be an integer, got {n}")))
        }
        _ if max == u64::MAX => {
            Err(ApiError::invalid_param(name, format!("'{name}' must be at least {min}, got {n}")))
        }
        _ => Err(ApiError::invalid_param(name, format!("'{name}' must be in [{min}, {max}], got {n}"))),
    }
}

/// The allowed values of a float field.
#[derive(Clone, Copy)]
struct Range {
    low: f64,
    high: f64,
    low_open: bool,
}

impl Range {
    fn closed(low: f64, high: f64) -> Self {
        Range { low, high, low_open: false }
    }
    fn open_closed(low: f64, high: f64) -> Self {
        Range { low, high, low_open: true }
    }
    fn contains(self, x: f64) -> bool {
        let above_low = if self.low_open { x > self.low } else { x >= self.low };
        above_low && x <= self.high
    }
    fn describe(self) -> String {
        format!("{}{}, {}]", if self.low_open { "(" } else { "[" }, self.low, self.high)
    }
}

fn float_field(obj: &Map<String, Value>, name: &str, range: Range) -> Result<Option<f32>, ApiError> {
    let Some(v) = field(obj, name) else { return Ok(None) };
    let Some(x) = v.as_f64() else {
        return Err(ApiError::invalid_param(
            name,
            format!("'{name}' must be a number, got {}", type_name(v)),
        ));
    };
    if !range.contains(x) {
        return Err(ApiError::invalid_param(
            name,
            format!("'{name}' must be in {}, got {x}", range.describe()),
        ));
    }
    Ok(Some(x as f32))
}

/// JSON's name for a value's type, for error messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(body: &str) -> Result<CompletionParams, ApiError> {
        parse_completion_request(body.as_bytes())
    }

    fn chat(body: &str) -> Result<ChatParams, ApiError> {
        parse_chat_request(body.as_bytes())
    }

    fn param_of(e: ApiError) -> String {
        e.param.unwrap_or_default()
    }

    #[test]
    fn completion_defaults_follow_openai() {
        let p = completion(r#"{"prompt": "hi", "model": "anything", "user": "u1", "unknown": [1]}"#).unwrap();
        assert_eq!(p.prompt, PromptInput::Text("hi".into()));
        assert_eq!(p.sampling.temperature, 1.0);
        assert_eq!(p.sampling.top_p, 1.0);
        assert_eq!(p.sampling.max_tokens, None);
        assert!(p.sampling.stop.is_empty());
        assert!(!p.stream && !p.include_usage && p.logprobs.is_none());
    }

    #[test]
    fn prompt_forms() {
        assert_eq!(completion(r#"{"prompt": ["x"]}"#).unwrap().prompt, PromptInput::Text("x".into()));
        assert_eq!(completion(r#"{"prompt": [1, 2]}"#).unwrap().prompt, PromptInput::Tokens(vec![1, 2]));
        assert_eq!(completion(r#"{"prompt": [[7]]}"#).unwrap().prompt, PromptInput::Tokens(vec![7]));
        for bad in [
            r#"{"prompt": []}"#,
            r#"{"prompt": ["a", "b"]}"#,
            r#"{"prompt": [-1]}"#,
            r#"{"prompt": 5}"#,
            r#"{}"#,
        ] {
            assert_eq!(param_of(completion(bad).unwrap_err()), "prompt", "{bad}");
        }
    }

    #[test]
    fn every_range_is_checked() {
        for (body, param) in [
            (r#"{"prompt": "a", "temperature": -0.1}"#, "temperature"),
            (r#"{"prompt": "a", "temperature": "hot"}"#, "temperature"),
            (r#"{"prompt": "a", "top_p": 0}"#, "top_p"),
            (r#"{"prompt": "a", "top_p": 1.5}"#, "top_p"),
            (r#"{"prompt": "a", "top_k": -2}"#, "top_k"),
            (r#"{"prompt": "a", "min_p": 2}"#, "min_p"),
            (r#"{"prompt": "a", "max_tokens": 0}"#, "max_tokens"),
            (r#"{"prompt": "a", "max_tokens": 1.5}"#, "max_tokens"),
            (r#"{"prompt": "a", "n": 2}"#, "n"),
            (r#"{"prompt": "a", "stop": ["a","b","c","d","e"]}"#, "stop"),
            (r#"{"prompt": "a", "stop": [""]}"#, "stop"),
            (r#"{"prompt": "a", "stop": 3}"#, "stop"),
            (r#"{"prompt": "a", "frequency_penalty": 3}"#, "frequency_penalty"),
            (r#"{"prompt": "a", "presence_penalty": -3}"#, "presence_penalty"),
            (r#"{"prompt": "a", "logprobs": 21}"#, "logprobs"),
            (r#"{"prompt": "a", "logprobs": true}"#, "logprobs"),
            (r#"{"prompt": "a", "stream": "yes"}"#, "stream"),
            (r#"{"prompt": "a", "stream_options": {"include_usage": 1}}"#, "stream_options.include_usage"),
            (r#"{"prompt": "a", "model": 3}"#, "model"),
            (r#"{"prompt": "a", "seed": "x"}"#, "seed"),
            (r#"{"prompt": "a", "echo": true}"#, "echo"),
        ] {
            assert_eq!(param_of(completion(body).unwrap_err()), param, "{body}");
        }
    }

    #[test]
    fn sampling_values_pass_through() {
        let p = completion(
            r#"{"prompt": "a", "temperature": 0, "top_p": 0.5, "top_k": 40, "min_p": 0.1, "seed": -1,
                "stop": "\n", "frequency_penalty": 0.5, "presence_penalty": -0.5, "max_tokens": 7,
                "logprobs": 3, "stream": true, "stream_options": {"include_usage": true}}"#,
        )
        .unwrap();
        let s = &p.sampling;
        assert_eq!((s.temperature, s.top_p, s.top_k, s.min_p), (0.0, 0.5, 40, 0.1));
        assert_eq!((s.seed, s.max_tokens), (Some(u64::MAX), Some(7)));
        assert_eq!((s.frequency_penalty, s.presence_penalty), (0.5, -0.5));
        assert_eq!(s.stop, vec!["\n".to_string()]);
        assert_eq!((p.logprobs, p.stream, p.include_usage), (Some(3), true, true));
    }

    #[test]
    fn chat_messages_and_parts() {
        let p = chat(
            r#"{"messages": [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null}],
                "max_completion_tokens": 5, "max_tokens": 9, "logprobs": true, "top_logprobs": 2}"#,
        )
        .unwrap();
        assert_eq!(
            p.messages,
            vec![
                ChatTurn { role: "system".into(), content: "be brief".into() },
                ChatTurn { role: "user".into(), content: "a\nb".into() },
                ChatTurn { role: "assistant".into(), content: String::new() },
            ]
        );
        assert_eq!((p.sampling.max_tokens, p.logprobs), (Some(5), Some(2)));
    }

    #[test]
    fn chat_errors_name_the_message() {
        for (body, param) in [
            (r#"{"messages": []}"#, "messages"),
            (r#"{"messages": "hi"}"#, "messages"),
            (r#"{"messages": [{"role": "tool", "content": "x"}]}"#, "messages[0].role"),
            (r#"{"messages": [{"role": "user", "content": "x"}, {"content": "y"}]}"#, "messages[1].role"),
            (r#"{"messages": [{"role": "user"}]}"#, "messages[0].content"),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                "messages[0].content",
            ),
            (r#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}"#, "top_logprobs"),
            (r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": 1}"#, "logprobs"),
            (r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{}]}"#, "tools"),
        ] {
            assert_eq!(param_of(chat(body).unwrap_err()), param, "{body}");
        }
    }

    #[test]
    fn malformed_bodies_are_400_without_param() {
        for body in ["", "{", "[1]", "\"x\"", "{\"prompt\": \"a\",}"] {
            let e = completion(body).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
            assert!(e.param.is_none(), "{body}");
        }
    }
}
