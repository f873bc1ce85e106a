//! The routes: what each endpoint reads, checks, asks the engine and answers.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::{GenerationEvent, GenerationRequest};
use crate::error::ApiError;
use crate::request::{
    parse_chat_request, parse_completion_request, parse_embedding_request, EmbeddingFormat, PromptInput,
    SamplingParams,
};
use crate::response::{Completion, CompletionKind};
use crate::state::AppState;
use crate::stream::completion_events;

/// The chat page, one self-contained file.
const CHAT_PAGE: &str = include_str!("chat.html");

/// `GET /`: the chat page.
pub(crate) async fn chat_page() -> Html<&'static str> {
    Html(CHAT_PAGE)
}

/// `GET /health`: 200 while serving, 503 once shutdown has begun.
pub(crate) async fn health(State(state): State<AppState>) -> Response {
    let stats = state.engine.stats();
    let shutting_down = state.shutting_down.load(Ordering::Relaxed);
    let status = if shutting_down { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let body = json!({
        "status": if shutting_down { "shutting_down" } else { "ok" },
        "model": state.model_id,
        "running": stats.running,
        "queued": stats.queued,
    });
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus' text format.
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(&state.engine.stats());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// `GET /v1/models`: the one model served.
pub(crate) async fn list_models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "object": "list", "data": [model_card(&state)] }))
}

/// `GET /v1/models/{id}`: the model if `id` is its name, else 404.
pub(crate) async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if id == state.model_id {
        Json(model_card(&state)).into_response()
    } else {
        ApiError::with_status(
            StatusCode::NOT_FOUND,
            format!("model '{id}' does not exist; this server has '{}'", state.model_id),
        )
        .code("model_not_found")
        .into_response()
    }
}

fn model_card(state: &AppState) -> Value {
    json!({
        "id": state.model_id,
        "object": "model",
        "created": state.started_unix,
        "owned_by": "bitnet-rust",
        "max_model_len": state.engine.context_len(),
    })
}

/// Unknown routes.
pub(crate) async fn not_found(req: Request) -> ApiError {
    ApiError::with_status(
        StatusCode::NOT_FOUND,
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
    .code("not_found")
}

/// Known routes asked with the wrong method.
pub(crate) async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::with_status(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not accept {}", req.uri().path(), req.method()),
    )
    .code("method_not_allowed")
}

/// `POST /v1/completions`.
pub(crate) async fn completions(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let arrived = Instant::now();
    let result = async {
        let body = read_body(&headers, body, state.cfg.max_body_bytes).await?;
        let params = parse_completion_request(&body)?;
        let prompt_ids = match params.prompt {
            PromptInput::Text(text) => {
                let engine = state.engine.clone();
                run_blocking(move || engine.encode_prompt(&text)).await?
            }
            PromptInput::Tokens(ids) => ids,
        };
        let req = generation_request(&state, prompt_ids, params.sampling, params.logprobs, "prompt")?;
        let kind = CompletionKind::Text;
        let completion = Completion::new(&state, kind, params.logprobs.is_some(), params.include_usage);
        Ok::<_, ApiError>((submit(&state, req)?, completion, params.stream))
    }
    .await;
    answer(state, arrived, "/v1/completions", result).await
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let arrived = Instant::now();
    let result = async {
        let body = read_body(&headers, body, state.cfg.max_body_bytes).await?;
        let params = parse_chat_request(&body)?;
        let engine = state.engine.clone();
        let messages = params.messages;
        let prompt_ids = run_blocking(move || engine.encode_chat(&messages)).await?;
        let req = generation_request(&state, prompt_ids, params.sampling, params.logprobs, "messages")?;
        let completion =
            Completion::new(&state, CompletionKind::Chat, params.logprobs.is_some(), params.include_usage);
        Ok::<_, ApiError>((submit(&state, req)?, completion, params.stream))
    }
    .await;
    answer(state, arrived, "/v1/chat/completions", result).await
}

/// `POST /v1/embeddings`: each input tokenized (texts) or taken as ids, checked against the
/// context, embedded by the engine off the async workers, answered in OpenAI's shape.
pub(crate) async fn embeddings(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let body = read_body(&headers, body, state.cfg.max_body_bytes).await?;
        let params = parse_embedding_request(&body)?;
        let engine = state.engine.clone();
        let inputs = params.inputs;
        let ids = run_blocking(move || {
            inputs
                .into_iter()
                .map(|input| match input {
                    PromptInput::Text(text) => engine.encode_prompt(&text),
                    PromptInput::Tokens(ids) => Ok(ids),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        let context = state.engine.context_len();
        for (i, one) in ids.iter().enumerate() {
            if one.is_empty() || one.len() > context {
                return Err(ApiError::invalid_param(
                    "input",
                    format!("input {i} has {} tokens; the model takes 1 to {context}", one.len()),
                )
                .code("context_length_exceeded"));
            }
        }
        let engine = state.engine.clone();
        let tokens: usize = ids.iter().map(Vec::len).sum();
        let vectors = run_blocking(move || engine.embed(&ids)).await?;
        state.metrics.add_prompt_tokens(tokens);
        let width = vectors.first().map_or(0, Vec::len);
        if let Some(d) = params.dimensions.filter(|&d| d != width) {
            return Err(ApiError::invalid_param(
                "dimensions",
                format!("this model's embeddings have {width} dimensions; 'dimensions' {d} cannot be given"),
            ));
        }
        let data: Vec<Value> = vectors
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let embedding = match params.format {
                    EmbeddingFormat::Float => json!(v),
                    EmbeddingFormat::Base64 => json!(base64_f32(v)),
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        Ok(Json(json!({
            "object": "list",
            "data": data,
            "model": state.engine.model_id(),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
        .into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The little-endian bytes of `v` in standard base64 (with padding), as OpenAI's
/// `encoding_format: "base64"` sends them.
fn base64_f32(v: &[f32]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Streams or collects a submitted generation, or answers the error that came before it.
async fn answer(
    state: AppState,
    arrived: Instant,
    endpoint: &'static str,
    submitted: Result<(UnboundedReceiver<GenerationEvent>, Completion, bool), ApiError>,
) -> Response {
    let (events, completion, stream) = match submitted {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let tracker = RequestTracker::new(state, endpoint, arrived);
    if stream {
        let chunks =
            completion_events(events, completion, tracker).map(Ok::<Event, std::convert::Infallible>);
        Sse::new(chunks).keep_alive(KeepAlive::default()).into_response()
    } else {
        collect(events, completion, tracker).await.into_response()
    }
}

/// Waits for the whole generation and answers one JSON object.
async fn collect(
    mut events: UnboundedReceiver<GenerationEvent>,
    mut completion: Completion,
    mut tracker: RequestTracker,
) -> Result<Json<Value>, ApiError> {
    loop {
        match events.recv().await {
            Some(GenerationEvent::Token { id: _, text, logprob }) => {
                tracker.on_token();
                completion.push_token(&text, logprob.as_ref());
            }
            Some(GenerationEvent::Done { finish_reason, prompt_tokens, completion_tokens }) => {
                return Ok(Json(completion.full_response(finish_reason, prompt_tokens, completion_tokens)));
            }
            Some(GenerationEvent::Error(message)) => {
                return Err(ApiError::with_status(StatusCode::INTERNAL_SERVER_ERROR, message))
            }
            None => return Err(tracker.ended_early()),
        }
    }
}

/// Follows one generation request from arrival to its last event: the in-flight gauge, token
/// latencies and the request's duration, recorded when it is dropped (finished or cancelled).
pub(crate) struct RequestTracker {
    state: AppState,
    endpoint: &'static str,
    arrived: Instant,
    last_token: Option<Instant>,
}

impl RequestTracker {
    fn new(state: AppState, endpoint: &'static str, arrived: Instant) -> Self {
        state.metrics.request_started();
        RequestTracker { state, endpoint, arrived, last_token: None }
    }

    /// Records a token's arrival: time to first token, or the gap since the previous one.
    pub(crate) fn on_token(&mut self) {
        let now = Instant::now();
        let metrics = &self.state.metrics;
        match self.last_token {
            None => metrics.observe_time_to_first_token(now - self.arrived),
            Some(previous) => metrics.observe_inter_token_latency(now - previous),
        }
        metrics.add_completion_token();
        self.last_token = Some(now);
    }

    /// The error for a channel the engine closed without `Done` or `Error`.
    pub(crate) fn ended_early(&self) -> ApiError {
        if self.state.shutting_down.load(Ordering::Relaxed) {
            ApiError::with_status(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server shut down before the generation finished",
            )
        } else {
            ApiError::with_status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the engine ended the generation without finishing it",
            )
        }
    }
}

impl Drop for RequestTracker {
    fn drop(&mut self) {
        self.state.metrics.request_finished();
        self.state.metrics.observe_request_duration(self.endpoint, self.arrived.elapsed());
    }
}

/// Reads the body, refusing more than `limit` bytes with 413 (at once when Content-Length says so).
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::with_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
        .code("request_too_large")
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut frames = body.into_data_stream();
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(frame) = frames.next().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        if bytes.len() + frame.len() > limit {
            return Err(too_large());
        }
        bytes.extend_from_slice(&frame);
    }
    Ok(Bytes::from(bytes))
}

/// Runs tokenization off the async workers (a long prompt takes a while). A panic inside is
/// resumed here, where the catch-panic layer turns it into a 500.
async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::engine::EngineError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => {
            Err(ApiError::with_status(StatusCode::INTERNAL_SERVER_ERROR, format!("tokenization failed: {e}")))
        }
    }
}

/// Checks the prompt against the context and fills in the completion length.
fn generation_request(
    state: &AppState,
    prompt_ids: Vec<u32>,
    sampling: SamplingParams,
    logprobs: Option<usize>,
    prompt_param: &str,
) -> Result<GenerationRequest, ApiError> {
    let context = state.engine.context_len();
    let prompt = prompt_ids.len();
    if prompt == 0 {
        return Err(ApiError::invalid_param(prompt_param, "the prompt is empty after tokenization"));
    }
    if prompt >= context {
        return Err(ApiError::invalid_param(
            prompt_param,
            format!(
                "the prompt has {prompt} tokens; the model's context is {context} tokens, \
                 leaving no room for a completion"
            ),
        )
        .code("context_length_exceeded"));
    }
    let room = context - prompt;
    let max_tokens = match sampling.max_tokens {
        Some(n) if n > room => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                format!(
                    "the model's context is {context} tokens, but {prompt} prompt tokens + \
                     max_tokens {n} = {} tokens",
                    prompt.saturating_add(n)
                ),
            )
            .code("context_length_exceeded"))
        }
        Some(n) => n,
        None => state.cfg.default_max_tokens.map_or(room, |d| d.min(room)),
    };
    Ok(GenerationRequest {
        prompt_ids,
        max_tokens,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        top_k: sampling.top_k,
        min_p: sampling.min_p,
        seed: sampling.seed,
        frequency_penalty: sampling.frequency_penalty,
        presence_penalty: sampling.presence_penalty,
        stop: sampling.stop,
        logprobs,
    })
}

/// Hands the request to the engine, unless the server is shutting down.
fn submit(state: &AppState, req: GenerationRequest) -> Result<UnboundedReceiver<GenerationEvent>, ApiError> {
    if state.shutting_down.load(Ordering::Relaxed) {
        return Err(crate::engine::SubmitError::ShuttingDown.into());
    }
    let prompt_tokens = req.prompt_ids.len();
    let events = state.engine.submit(req)?;
    state.metrics.add_prompt_tokens(prompt_tokens);
    Ok(events)
}
