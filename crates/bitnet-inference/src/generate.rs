//! Autoregressive generation: prefill the prompt, then decode one token at a time until an
//! end-of-sequence id, a stop string or the token limit, streaming text as it completes.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use bitnet_models::tokenizer::{TextStreamer, Tokenizer};

use crate::context::{Context, Sequence};
use crate::model::{Logits, Model};
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
    /// The text callback asked to stop.
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// Prompt tokens whose keys and values were already cached (not computed again).
    pub cached_prompt_tokens: usize,
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
pub struct StopMatcher {
    stops: Vec<String>,
    /// All text so far, cut before a stop string once one is hit.
    pub text: String,
    emitted: usize,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, text: String::new(), emitted: 0 }
    }

    /// Appends a piece; returns what may be printed now and whether a stop string was hit.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
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
        for s in &self.stops {
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

    /// The text held back so far (at the end of a generation that hit no stop string).
    pub fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }
}

/// Generates after `prompt_ids`, calling `on_text` with each piece of text as it completes;
/// `on_text` returning `ControlFlow::Break` stops the generation (a closed client, Ctrl-C).
///
/// `seq` may already hold tokens (the earlier turns of a chat): the tokens it shares with
/// `prompt_ids` stay cached and only the rest is computed. An empty `seq` first takes any cached
/// blocks that hold a prefix of the prompt. Afterwards `seq` holds the prompt and every generated
/// token but the last, so the next turn continues from it.
///
/// The loop runs on a worker thread of the context's pool: every parallel kernel call it makes
/// then goes through that worker's own queue, instead of the pool's injector, which allocates
/// a new block every few dozen calls from outside. Decoding then allocates nothing.
pub fn generate<B: Backend>(
    model: &Model<B>,
    ctx: &mut Context<B>,
    seq: &mut Sequence,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    on_text: impl FnMut(&str) -> ControlFlow<()> + Send,
) -> Result<Generation, InferenceError> {
    ctx.run(|ctx| generate_on_this_thread(model, ctx, seq, tokenizer, prompt_ids, opts, on_text))
}

/// Keeps the longest prefix `seq` shares with `prompt` (short of the prompt's last token, whose
/// logits are needed) and returns where the tokens still to compute start.
pub fn reuse_prefix<B: Backend>(ctx: &mut Context<B>, seq: &mut Sequence, prompt: &[u32]) -> usize {
    if seq.is_empty() {
        return ctx.share_prefix(seq, prompt);
    }
    let common = seq.tokens().iter().zip(prompt).take_while(|(a, b)| a == b).count();
    ctx.truncate(seq, common.min(prompt.len().saturating_sub(1)))
}

fn generate_on_this_thread<B: Backend>(
    model: &Model<B>,
    ctx: &mut Context<B>,
    seq: &mut Sequence,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation, InferenceError> {
    if prompt_ids.is_empty() {
        return Err(InferenceError::EmptyInput);
    }
    opts.sampling.validate()?;
    if prompt_ids.len() >= ctx.max_seq_tokens() {
        return Err(InferenceError::ContextFull {
            needed: prompt_ids.len() + 1,
            context: ctx.max_seq_tokens(),
        });
    }
    let vocab = model.config.vocab_size;
    seq.sampler = Sampler::new(opts.sampling.clone(), vocab);
    let mut streamer = TextStreamer::new();
    let mut stops = StopMatcher::new(opts.stop_strings.clone());

    // Greedy decoding without penalties needs only each step's argmax, which a device
    // computes where the logits are.
    let want = if opts.sampling.is_plain_greedy() { Logits::Greedy } else { Logits::Last };
    let start = Instant::now();
    let cached = reuse_prefix(ctx, seq, prompt_ids);
    model.forward(ctx, seq, &prompt_ids[cached..], want)?;
    let prompt_time = start.elapsed();
    let decode_start = Instant::now();
    let mut stop_reason = StopReason::MaxTokens;
    let mut generated = Vec::with_capacity(opts.max_new_tokens);
    while generated.len() < opts.max_new_tokens {
        let next = ctx.sample(0, seq).expect("the forward call asked for the last row's logits");
        generated.push(next);
        if opts.eos_ids.contains(&next) {
            stop_reason = StopReason::Eos;
            break;
        }
        if let Some(piece) = streamer.push(tokenizer, next)? {
            let (out, hit) = stops.push(&piece);
            if !out.is_empty() && on_text(&out).is_break() {
                stop_reason = StopReason::Cancelled;
                break;
            }
            if hit {
                stop_reason = StopReason::StopString;
                break;
            }
        }
        if generated.len() == opts.max_new_tokens {
            break;
        }
        if seq.len() + 1 > ctx.max_seq_tokens() {
            stop_reason = StopReason::ContextFull;
            break;
        }
        model.forward(ctx, seq, &[next], want)?;
    }
    if !matches!(stop_reason, StopReason::StopString | StopReason::Cancelled) {
        if let Some(piece) = streamer.finish(tokenizer)? {
            let (out, _) = stops.push(&piece);
            // The generation is over: a request to stop changes nothing now.
            let _ = on_text(&out);
        }
        let rest = stops.finish();
        if !rest.is_empty() {
            let _ = on_text(&rest);
        }
    }
    Ok(Generation {
        prompt_ids: prompt_ids.to_vec(),
        cached_prompt_tokens: cached,
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
        let mut m = StopMatcher::new(stops.clone());
        assert_eq!(m.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("Dmore"), (String::new(), true));
        assert_eq!(m.text, "hello ");
        let mut m = StopMatcher::new(stops);
        assert_eq!(m.push("a E"), ("a ".to_string(), false));
        assert_eq!(m.push("x"), ("Ex".to_string(), false));
    }
}
