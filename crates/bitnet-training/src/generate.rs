//! Sampling text from a model (full recompute per token: enough for the small models trained
//! here, and independent of the inference crate).

use anyhow::Result;
use tokenizers::Tokenizer;

use crate::data::EOS_ID;
use crate::model::{Model, Prepared};
use crate::rng::Rng;

/// Continues `prompt` (BOS is prepended by the tokenizer) by up to `max_new` tokens, sampling
/// from the `top_k` most likely tokens at `temperature` (0 = greedy). Returns prompt + continuation.
#[allow(clippy::too_many_arguments)]
pub fn sample_text(
    model: &Model<f32>,
    weights: &Prepared<f32>,
    tok: &Tokenizer,
    prompt: &str,
    max_new: usize,
    temperature: f32,
    top_k: usize,
    rng: &mut Rng,
) -> Result<String> {
    let enc = tok.encode(prompt, true).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut ids: Vec<u32> = enc.get_ids().to_vec();
    let ctx = model.config.max_position_embeddings;
    for _ in 0..max_new {
        let start = ids.len().saturating_sub(ctx);
        let logits = model.last_logits(weights, &ids[start..]);
        let next = pick(&logits, temperature, top_k, rng);
        if next == EOS_ID {
            break;
        }
        ids.push(next);
    }
    tok.decode(&ids, true).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Greedy or top-k sampling from logits.
pub fn pick(logits: &[f32], temperature: f32, top_k: usize, rng: &mut Rng) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if temperature <= 0.0 {
        return order[0] as u32;
    }
    let k = top_k.clamp(1, logits.len());
    let top = &order[..k];
    let max = logits[top[0]];
    let weights: Vec<f64> = top.iter().map(|&i| (((logits[i] - max) / temperature) as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.uniform() * total;
    for (&i, w) in top.iter().zip(&weights) {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    top[k - 1] as u32
}
