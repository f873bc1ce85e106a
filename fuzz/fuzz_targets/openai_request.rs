//! Any bytes given as a `/v1/completions`, `/v1/chat/completions` or `/v1/embeddings` body give
//! validated parameters or a 400 naming the problem, never a panic; what is accepted is in range.
#![no_main]

use bitnet_server::request::{
    parse_chat_request, parse_completion_request, parse_embedding_request, PromptInput, SamplingParams,
    MAX_EMBEDDING_INPUTS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS,
};
use bitnet_server::ApiError;
use libfuzzer_sys::fuzz_target;

fn check_sampling(s: &SamplingParams) {
    assert!((0.0..=2.0).contains(&s.temperature));
    assert!(s.top_p > 0.0 && s.top_p <= 1.0);
    assert!((0.0..=1.0).contains(&s.min_p));
    assert!((-2.0..=2.0).contains(&s.frequency_penalty));
    assert!((-2.0..=2.0).contains(&s.presence_penalty));
    assert!(s.max_tokens.is_none_or(|n| n >= 1));
    assert!(s.stop.len() <= MAX_STOP_STRINGS && s.stop.iter().all(|s| !s.is_empty()));
}

fn check_error(e: &ApiError) {
    assert_eq!(e.status.as_u16(), 400);
    assert!(!e.message.is_empty());
}

fuzz_target!(|data: &[u8]| {
    match parse_completion_request(data) {
        Ok(p) => {
            check_sampling(&p.sampling);
            assert!(p.logprobs.is_none_or(|n| n <= MAX_TOP_LOGPROBS));
        }
        Err(e) => check_error(&e),
    }
    match parse_chat_request(data) {
        Ok(p) => {
            check_sampling(&p.sampling);
            assert!(!p.messages.is_empty());
            assert!(p.messages.iter().all(|m| ["system", "user", "assistant"].contains(&m.role.as_str())));
        }
        Err(e) => check_error(&e),
    }
    match parse_embedding_request(data) {
        Ok(p) => {
            assert!(!p.inputs.is_empty() && p.inputs.len() <= MAX_EMBEDDING_INPUTS);
            assert!(p.inputs.iter().all(|i| match i {
                PromptInput::Text(t) => !t.is_empty(),
                PromptInput::Tokens(ids) => !ids.is_empty(),
            }));
            assert!(p.dimensions.is_none_or(|d| d >= 1));
        }
        Err(e) => check_error(&e),
    }
});
