//! A generation's events as server-sent events: chunks, the finish chunk, the usage chunk when
//! asked for, then `data: [DONE]`.
//!
//! The stream owns the engine's receiver: when the client disconnects, hyper drops the response
//! body, which drops the stream and so the receiver, and the engine cancels the sequence.

use axum::response::sse::Event;
use futures_util::stream::{self, Stream};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::GenerationEvent;
use crate::error::ApiError;
use crate::handlers::RequestTracker;
use crate::response::{Completion, CompletionKind};

/// Where a stream stands.
enum Phase {
    /// Chat's role chunk is still to be sent.
    Role,
    /// Forwarding tokens.
    Tokens,
    /// The generation finished; the usage chunk is next.
    Usage { prompt_tokens: usize, completion_tokens: usize },
    /// `[DONE]` is next.
    DoneMarker,
    /// Nothing more.
    End,
}

struct StreamState {
    events: UnboundedReceiver<GenerationEvent>,
    completion: Completion,
    tracker: RequestTracker,
    phase: Phase,
}

/// The SSE events of one streamed completion.
pub(crate) fn completion_events(
    events: UnboundedReceiver<GenerationEvent>,
    completion: Completion,
    tracker: RequestTracker,
) -> impl Stream<Item = Event> + Send {
    let phase = match completion.kind() {
        CompletionKind::Chat => Phase::Role,
        CompletionKind::Text => Phase::Tokens,
    };
    let state = StreamState { events, completion, tracker, phase };
    stream::unfold(state, |mut s| async move {
        let event = next_event(&mut s).await?;
        Some((event, s))
    })
}

/// The next event to send, or `None` when the stream is over.
async fn next_event(s: &mut StreamState) -> Option<Event> {
    match s.phase {
        Phase::Role => {
            s.phase = Phase::Tokens;
            Some(json_event(&s.completion.role_chunk()))
        }
        Phase::Tokens => Some(next_token_event(s).await),
        Phase::Usage { prompt_tokens, completion_tokens } => {
            s.phase = Phase::DoneMarker;
            Some(json_event(&s.completion.usage_chunk(prompt_tokens, completion_tokens)))
        }
        Phase::DoneMarker => {
            s.phase = Phase::End;
            Some(Event::default().data("[DONE]"))
        }
        Phase::End => None,
    }
}

/// Waits for the engine's next event that gives the client something to read.
async fn next_token_event(s: &mut StreamState) -> Event {
    loop {
        match s.events.recv().await {
            Some(GenerationEvent::Token { id: _, text, logprob }) => {
                s.tracker.on_token();
                // A token that completes no text yet (half a character, a possible stop string)
                // is not worth a chunk unless its log-probability was asked for.
                if text.is_empty() && logprob.is_none() {
                    continue;
                }
                return json_event(&s.completion.token_chunk(&text, logprob.as_ref()));
            }
            Some(GenerationEvent::Done { finish_reason, prompt_tokens, completion_tokens }) => {
                s.phase = if s.completion.include_usage {
                    Phase::Usage { prompt_tokens, completion_tokens }
                } else {
                    Phase::DoneMarker
                };
                return json_event(&s.completion.finish_chunk(finish_reason));
            }
            Some(GenerationEvent::Error(message)) => {
                s.phase = Phase::DoneMarker;
                let error = ApiError::with_status(axum::http::StatusCode::INTERNAL_SERVER_ERROR, message);
                return json_event(&error.body());
            }
            None => {
                s.phase = Phase::DoneMarker;
                return json_event(&s.tracker.ended_early().body());
            }
        }
    }
}

fn json_event(v: &Value) -> Event {
    Event::default().data(v.to_string())
}
