//! Autoregressive generation: prefill the prompt, then decode one token at a time until an
//! end-of-sequence id, a stop string or the token limit, streaming text as it completes.

use std::time::{Duration, Instant};

use bitnet_models::tokenizer::{TextStreamer, Tokenizer};

use crate::model::{Logits, Model, Session};
use crate::sampling::{Sampler, SamplingParams};
use crate::{Backend, InferenceError};

#[derive(Clone, Debug, Default)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Ids that end generation (config.json and generation_config.json together).
    pub eos_ids: Vec<u32>,
    /// Texts that end generation; the text is cut before them.
    pub stop_strings: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    ContextFull,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub generated: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub prompt_time: Duration,
    pub decode_time: Duration,
}

impl Generation {
    pub fn prompt_tokens_per_s(&self) -> f64 {
        self.prompt_ids.len() as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }
    /// Decode speed over the tokens after the first (the first comes from the prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.generated.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Holds back the tail of the text that could still turn into a stop string.
struct StopMatcher<'a> {
    stops: &'a [String],
    text: String,
    emitted: usize,
}

impl StopMatcher<'_> {
    /// Appends a piece; returns what may be printed now and whether a stop string was hit.
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        let search_from = self.emitted.saturating_sub(self.stops.iter().map(String::len).max().unwrap_or(0));
        let hit = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[search_from..].find(s.as_str()).map(|i| i + search_from))
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            let out = self.text[self.emitted.min(at)..].to_string();
            self.emitted = at;
            return (out, true);
        }
        // Keep back the longest suffix that is a prefix of some stop string.
        let mut safe = self.text.len();
        for s in self.stops {
            for k in (1..s.len().min(self.text.len() + 1)).rev() {
                if s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                    safe = safe.min(self.text.len() - k);
                    break;
                }
            }
        }
        let safe = safe.max(self.emitted);
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (out, false)
    }

    fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }
}

/// Generates from `prompt_ids`, calling `on_text` with each piece of text as it completes.
/// The session is reset first.
///
/// The loop runs on a worker thread of the thread pool: every parallel kernel call it makes
/// then goes through that worker's own queue, instead of the pool's injector, which allocates
/// a new block every few dozen calls from outside. Decoding then allocates nothing.
pub fn generate<B: Backend>(
    model: &mut Model<B>,
    session: &mut Session<B>,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    on_text: impl FnMut(&str) + Send,
) -> Result<Generation, InferenceError> {
    rayon::scope(|_| generate_on_this_thread(model, session, tokenizer, prompt_ids, opts, on_text))
}

fn generate_on_this_thread<B: Backend>(
    model: &mut Model<B>,
    session: &mut Session<B>,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, InferenceError> {
    if prompt_ids.is_empty() {
        return Err(InferenceError::EmptyInput);
    }
    if prompt_ids.len() >= session.max_tokens() {
        return Err(InferenceError::ContextFull {
            needed: prompt_ids.len() + 1,
            context: session.max_tokens(),
        });
    }
    session.reset();
    let vocab = model.config.vocab_size;
    let mut sampler = Sampler::new(opts.sampling.clone(), vocab);
    let mut history: Vec<u32> = Vec::with_capacity(prompt_ids.len() + opts.max_new_tokens);
    history.extend_from_slice(prompt_ids);
    let mut streamer = TextStreamer::new();
    let mut stops = StopMatcher { stops: &opts.stop_strings, text: String::new(), emitted: 0 };

    let start = Instant::now();
    model.forward(session, prompt_ids, Logits::Last)?;
    let prompt_time = start.elapsed();
    let decode_start = Instant::now();
    let mut stop_reason = StopReason::MaxTokens;
    let mut generated = Vec::with_capacity(opts.max_new_tokens);
    while generated.len() < opts.max_new_tokens {
        let next = sampler.sample(&mut session.logits[..vocab], &history);
        generated.push(next);
        history.push(next);
        if opts.eos_ids.contains(&next) {
            stop_reason = StopReason::Eos;
            break;
        }
        if let Some(piece) = streamer.push(tokenizer, next)? {
            let (out, hit) = stops.push(&piece);
            if !out.is_empty() {
                on_text(&out);
            }
            if hit {
                stop_reason = StopReason::StopString;
                break;
            }
        }
        if generated.len() == opts.max_new_tokens {
            break;
        }
        if session.pos + 1 > session.max_tokens() {
            stop_reason = StopReason::ContextFull;
            break;
        }
        model.forward(session, &[next], Logits::Last)?;
    }
    if stop_reason != StopReason::StopString {
        if let Some(piece) = streamer.finish(tokenizer)? {
            let (out, _) = stops.push(&piece);
            on_text(&out);
        }
        let rest = stops.finish();
        if !rest.is_empty() {
            on_text(&rest);
        }
    }
    Ok(Generation {
        prompt_ids: prompt_ids.to_vec(),
        generated,
        text: stops.text,
        stop_reason,
        prompt_time,
        decode_time: decode_start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    #[test]
    fn stop_strings_cut_and_hold_back() {
        let stops = vec!["END".to_string()];
        let mut m = StopMatcher { stops: &stops, text: String::new(), emitted: 0 };
        assert_eq!(m.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("Dmore"), (String::new(), true));
        assert_eq!(m.text, "hello ");
        let mut m = StopMatcher { stops: &stops, text: String::new(), emitted: 0 };
        assert_eq!(m.push("a E"), ("a ".to_string(), false));
        assert_eq!(m.push("x"), ("Ex".to_string(), false));
    }
}
