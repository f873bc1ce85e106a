//! Turning logits into the next token: greedy, temperature, top-k, top-p, min-p and a
//! repetition penalty, in the order transformers applies them.

use bitnet_core::ops::{exp_f32, exp_in_place, max_lanes, sum_lanes};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the `k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// transformers' repetition penalty: divide positive logits of seen tokens by it, multiply
    /// negative ones; 1 is off.
    pub repeat_penalty: f32,
    /// OpenAI's penalties: subtract `frequency_penalty × count + presence_penalty` from the
    /// logit of every token that occurs `count > 0` times in the history; 0 is off.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

/// A sampling parameter out of its range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{param} must be {expected}, got {value}")]
pub struct SamplingError {
    /// The parameter's name as `SamplingParams` spells it.
    pub param: &'static str,
    pub expected: &'static str,
    pub value: f32,
}

impl SamplingParams {
    /// Whether the next token is always the argmax of the model's logits: greedy, and no
    /// penalty changes the logits first.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature == 0.0
            && self.repeat_penalty == 1.0
            && self.frequency_penalty == 0.0
            && self.presence_penalty == 0.0
    }

    /// Checks ranges; the error names the parameter.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let check = |ok: bool, param, expected, value| match ok {
            true => Ok(()),
            false => Err(SamplingError { param, expected, value }),
        };
        let t = self.temperature;
        check(t >= 0.0 && t.is_finite(), "temperature", "a finite number >= 0", t)?;
        check(self.top_p > 0.0 && self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)?;
        check((0.0..=1.0).contains(&self.min_p), "min_p", "in [0, 1]", self.min_p)?;
        let r = self.repeat_penalty;
        check(r > 0.0 && r.is_finite(), "repeat_penalty", "a finite number > 0", r)?;
        let f = self.frequency_penalty;
        check((-2.0..=2.0).contains(&f), "frequency_penalty", "in [-2, 2]", f)?;
        let p = self.presence_penalty;
        check((-2.0..=2.0).contains(&p), "presence_penalty", "in [-2, 2]", p)?;
        Ok(())
    }
}

/// The sampling a checkpoint asks for in its generation_config.json (`do_sample`,
/// `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty`); each `None` when absent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationDefaults {
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl GenerationDefaults {
    pub fn from_json(v: &serde_json::Value) -> Self {
        let f = |k: &str| v.get(k).and_then(serde_json::Value::as_f64).map(|x| x as f32);
        Self {
            do_sample: v.get("do_sample").and_then(serde_json::Value::as_bool),
            temperature: f("temperature"),
            top_k: v.get("top_k").and_then(serde_json::Value::as_u64).map(|k| k as usize),
            top_p: f("top_p"),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
        }
    }

    /// Whether the checkpoint asks for anything but greedy decoding.
    pub fn samples(&self) -> bool {
        self.do_sample == Some(true) && self.temperature.is_none_or(|t| t > 0.0)
    }

    /// The checkpoint's sampling as parameters (greedy unless it asks to sample, as in
    /// transformers, where `do_sample` false ignores the rest).
    pub fn params(&self) -> SamplingParams {
        let mut p = SamplingParams::default();
        if self.samples() {
            p.temperature = self.temperature.unwrap_or(1.0);
            // transformers' default top_k is 50 when sampling and the config says nothing.
            p.top_k = self.top_k.unwrap_or(50);
            p.top_p = self.top_p.unwrap_or(1.0);
            p.min_p = self.min_p.unwrap_or(0.0);
        }
        p.repeat_penalty = self.repetition_penalty.unwrap_or(1.0);
        p
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// (probability or logit, token) pairs, reused across calls.
    candidates: Vec<(f32, u32)>,
    /// Every token's probability, reused across calls.
    probs: Vec<f32>,
    /// Marks tokens already penalized in this call.
    seen: Vec<bool>,
    /// Occurrences of each token in the history (OpenAI penalties), zeroed after each call.
    counts: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, vocab_size: usize) -> Self {
        Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            candidates: Vec::with_capacity(vocab_size),
            probs: Vec::with_capacity(vocab_size),
            seen: vec![false; vocab_size],
            counts: vec![0; vocab_size],
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits`, given the tokens so far (`history`) for the penalty.
    /// `logits` is modified in place.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repeat_penalty != 1.0 {
            for &id in history {
                let i = id as usize;
                if i < logits.len() && !self.seen[i] {
                    self.seen[i] = true;
                    let l = &mut logits[i];
                    *l = if *l > 0.0 { *l / p.repeat_penalty } else { *l * p.repeat_penalty };
                }
            }
            for &id in history {
                if let Some(s) = self.seen.get_mut(id as usize) {
                    *s = false;
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for &id in history {
                if let Some(n) = self.counts.get_mut(id as usize) {
                    *n += 1;
                }
            }
            for &id in history {
                let i = id as usize;
                if i < logits.len() && self.counts[i] > 0 {
                    logits[i] -= p.frequency_penalty * self.counts[i] as f32 + p.presence_penalty;
                    self.counts[i] = 0;
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        // The best logit is subtracted before dividing: a tiny temperature then sends every
        // other logit to -inf (greedy), where dividing first would overflow to inf and NaN.
        // The best token survives every filter and its scaled logit is exactly 0, so the
        // softmax's exponentials need no further shift.
        let best = max_lanes(logits);
        let c = &mut self.candidates;
        if p.top_k > 0 && p.top_k < logits.len() {
            // The k best, in no particular order (ties broken by the lower id), then their
            // softmax.
            c.clear();
            c.extend(logits.iter().enumerate().map(|(i, &l)| ((l - best) / p.temperature, i as u32)));
            c.select_nth_unstable_by(p.top_k - 1, by_rank);
            c.truncate(p.top_k);
            let mut sum = 0.0f32;
            for e in c.iter_mut() {
                e.0 = exp_f32(e.0);
                sum += e.0;
            }
            for e in c.iter_mut() {
                e.0 /= sum;
            }
        } else {
            // Every token: the exponentials vectorized over one contiguous row (a 128 k
            // vocabulary: 0.64 → 0.17 ms), summed in lanes.
            let probs = &mut self.probs;
            probs.clear();
            probs.extend(logits.iter().map(|&l| (l - best) / p.temperature));
            exp_in_place(probs);
            let sum = sum_lanes(probs);
            if p.top_p >= 1.0 && p.min_p <= 0.0 {
                // A plain draw needs neither order nor normalized probabilities: walk the
                // tokens as they come against a draw scaled by their sum.
                return draw(probs.iter().copied().zip(0u32..), sum, &mut self.rng);
            }
            for q in probs.iter_mut() {
                *q /= sum;
            }
            c.clear();
            c.extend(probs.iter().copied().zip(0u32..));
        }
        // Top-p and min-p keep a prefix of the ranking: sort only as far as that prefix goes.
        // Sorting all 128 k candidates of a large vocabulary took 4 ms a token, on the thread
        // that serves every sequence.
        if p.top_p < 1.0 || p.min_p > 0.0 {
            let keep = ranked_prefix(c, p.top_p, p.min_p);
            c.truncate(keep);
        }
        let total: f32 = c.iter().map(|e| e.0).sum();
        draw(c.iter().copied(), total, &mut self.rng)
    }
}

/// One token drawn from `(weight, id)` pairs whose weights sum to `total` (probabilities, or
/// their unnormalized exponentials), walked in the order given.
fn draw(candidates: impl Iterator<Item = (f32, u32)>, total: f32, rng: &mut StdRng) -> u32 {
    let mut r = rng.random::<f32>() * total;
    let mut last = 0;
    for (q, id) in candidates {
        r -= q;
        if r <= 0.0 {
            return id;
        }
        if q > 0.0 {
            last = id;
        }
    }
    // Rounding left a sliver past the end: the last candidate that has any probability.
    last
}

/// The order of candidates `(probability or scaled logit, id)`: most likely first, the lower
/// id first among equals.
fn by_rank(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// How many of the most likely candidates top-p and min-p keep, with those first in `c`, in
/// rank order: top-p, the fewest whose probabilities reach `top_p` (when below 1), then min-p,
/// those at least `min_p` times the best (at least one). The ranking is sorted in growing
/// prefixes (64, 512, … candidates, each found by a selection), so a peaked distribution
/// sorts a few dozen and a flat one, in the worst case, all.
fn ranked_prefix(c: &mut [(f32, u32)], top_p: f32, min_p: f32) -> usize {
    let (mut sorted, mut want, mut cum) = (0, 64, 0.0f32);
    loop {
        let end = want.min(c.len());
        if end < c.len() {
            c[sorted..].select_nth_unstable_by(end - sorted - 1, by_rank);
        }
        c[sorted..end].sort_unstable_by(by_rank);
        let floor = c[0].0 * min_p;
        for (i, e) in c.iter().enumerate().take(end).skip(sorted) {
            if e.0 < floor {
                return i.max(1);
            }
            cum += e.0;
            if top_p < 1.0 && cum >= top_p {
                return i + 1;
            }
        }
        if end == c.len() {
            return end;
        }
        (sorted, want) = (end, end * 8);
    }
}

/// The log-probability of `token` and the `n` most likely tokens with theirs, under the softmax
/// of `logits` (the model's distribution, before any penalty or temperature).
pub fn logprobs(logits: &[f32], token: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let log_sum = logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
    let chosen = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| l - log_sum);
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if top.len() < n || l > top[top.len() - 1].1 {
                let at = top.partition_point(|&(_, v)| v >= l);
                top.insert(at, (i as u32, l));
                top.truncate(n);
            }
        }
    }
    (chosen, top.into_iter().map(|(i, l)| (i, l - log_sum)).collect())
}

/// Index of the largest value; the first one on ties, like torch.argmax.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max() {
        let mut s = Sampler::new(SamplingParams::default(), 4);
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, 0.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_follows_sign() {
        let mut s = Sampler::new(SamplingParams { repeat_penalty: 2.0, ..Default::default() }, 3);
        let mut l = [4.0, 3.0, -1.0];
        // token 0 is penalized to 2.0, so token 1 wins; token 2 repeated twice counts once.
        assert_eq!(s.sample(&mut l, &[0, 2, 2]), 1);
        assert_eq!(l, [2.0, 3.0, -2.0]);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_repeats() {
        let params = SamplingParams { temperature: 1.0, top_k: 1, seed: 7, ..Default::default() };
        let mut s = Sampler::new(params, 5);
        assert_eq!(s.sample(&mut [0.0, 1.0, 5.0, 2.0, 4.9], &[]), 2);
        let params = SamplingParams { temperature: 1.0, seed: 42, ..Default::default() };
        let draw = |params: &SamplingParams| {
            let mut s = Sampler::new(params.clone(), 5);
            (0..20).map(|_| s.sample(&mut [0.0, 1.0, 1.0, 1.0, 1.0], &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params));
    }

    #[test]
    fn generation_config_sampling_is_read_like_transformers() {
        let v = serde_json::json!({"do_sample": true, "temperature": 0.8, "top_k": 40});
        let p = GenerationDefaults::from_json(&v).params();
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.8, 40, 1.0));
        // do_sample false (or absent) is greedy whatever else is set.
        let v = serde_json::json!({"do_sample": false, "temperature": 0.8});
        assert_eq!(GenerationDefaults::from_json(&v).params().temperature, 0.0);
        assert_eq!(GenerationDefaults::from_json(&serde_json::json!({})).params(), SamplingParams::default());
    }

    #[test]
    fn a_tiny_temperature_is_greedy_not_nan() {
        let params = SamplingParams { temperature: 1e-40, seed: 3, ..Default::default() };
        let mut s = Sampler::new(params, 4);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.5, 2.0, 1.0, -3.0], &[]), 1);
        }
    }

    #[test]
    fn openai_penalties_subtract_per_occurrence() {
        let params = SamplingParams { frequency_penalty: 0.5, presence_penalty: 1.0, ..Default::default() };
        let mut s = Sampler::new(params, 3);
        let mut l = [4.0, 3.0, 0.0];
        // token 0 seen twice: 4 - (2 × 0.5 + 1) = 2, token 2 once: 0 - 1.5.
        assert_eq!(s.sample(&mut l, &[0, 2, 0]), 1);
        assert_eq!(l, [2.0, 3.0, -1.5]);
        // The counts do not leak into the next call.
        let mut l = [4.0, 3.0, 0.0];
        s.sample(&mut l, &[2]);
        assert_eq!(l, [4.0, 3.0, -1.5]);
        let bad = SamplingParams { presence_penalty: 3.0, ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().param, "presence_penalty");
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_top_tokens_in_order() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let (chosen, top) = logprobs(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert!((chosen as f64 - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!((top[0].1 as f64 - (3.0 - z.ln())).abs() < 1e-6);
    }

    /// Drawn without any order (no top-p, no min-p) or from the ranked prefix, tokens come
    /// as often as their probabilities say.
    #[test]
    fn draws_follow_the_probabilities() {
        let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|p| p.ln()).collect();
        for params in [
            SamplingParams { temperature: 1.0, seed: 9, ..Default::default() },
            SamplingParams { temperature: 1.0, top_p: 0.999, seed: 9, ..Default::default() },
            SamplingParams { temperature: 1.0, top_k: 3, seed: 9, ..Default::default() },
        ] {
            let mut s = Sampler::new(params.clone(), 4);
            let mut counts = [0usize; 4];
            let draws = 40_000;
            for _ in 0..draws {
                counts[s.sample(&mut logits.clone(), &[]) as usize] += 1;
            }
            let total: f32 = if params.top_k == 3 { 9.0 } else { 10.0 };
            for (i, &n) in counts.iter().enumerate() {
                let want = if params.top_k == 3 && i == 0 { 0.0 } else { (i + 1) as f32 / total };
                let got = n as f32 / draws as f32;
                assert!((got - want).abs() < 0.01, "{params:?}: token {i} drawn {got}, probability {want}");
            }
        }
    }

    /// The prefix sorting keeps exactly the tokens that sorting every candidate and then
    /// applying top-p and min-p keeps, on peaked and flat distributions and with ties, where
    /// the prefix ends inside the first selection, in a later one, and at the very end.
    #[test]
    fn ranked_prefix_keeps_what_a_full_sort_keeps() {
        let reference = |c: &[(f32, u32)], top_p: f32, min_p: f32| -> Vec<u32> {
            let mut c = c.to_vec();
            c.sort_unstable_by(by_rank);
            if top_p < 1.0 {
                let mut cum = 0.0f32;
                let n = c.iter().position(|e| {
                    cum += e.0;
                    cum >= top_p
                });
                c.truncate(n.map_or(c.len(), |i| i + 1));
            }
            let floor = c[0].0 * min_p;
            let n = c.iter().take_while(|e| e.0 >= floor).count().max(1);
            c[..n].iter().map(|e| e.1).collect()
        };
        let mut rng = StdRng::seed_from_u64(5);
        let mut checked = 0;
        for (n, spread) in [(7usize, 1.0f32), (300, 0.05), (3000, 8.0), (20000, 2.0), (50000, 0.5)] {
            for ties in [false, true] {
                let logits: Vec<f32> = (0..n)
                    .map(|_| {
                        let l = (rng.random::<f32>() - 0.5) * 2.0 * spread;
                        if ties {
                            (l * 4.0).round() / 4.0
                        } else {
                            l
                        }
                    })
                    .collect();
                let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
                let c: Vec<(f32, u32)> =
                    logits.iter().enumerate().map(|(i, &l)| ((l - max).exp() / sum, i as u32)).collect();
                for (top_p, min_p) in
                    [(0.9, 0.0), (0.5, 0.0), (0.999, 0.0), (1.0, 0.05), (1.0, 1e-12), (0.95, 0.3)]
                {
                    let mut got = c.clone();
                    let k = ranked_prefix(&mut got, top_p, min_p);
                    let want = reference(&c, top_p, min_p);
                    let got: Vec<u32> = got[..k].iter().map(|e| e.1).collect();
                    assert_eq!(got, want, "n {n} spread {spread} ties {ties} top_p {top_p} min_p {min_p}");
                    checked += want.len();
                }
            }
        }
        assert!(checked > 10_000, "the cases should reach past the first selections: {checked}");
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        // Token 0 has almost all the mass: both filters must leave only it.
        let mut s =
            Sampler::new(SamplingParams { temperature: 1.0, min_p: 0.5, seed: 1, ..Default::default() }, 3);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [10.0, 0.0, 0.0], &[]), 0);
        }
        let mut s =
            Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.9, seed: 1, ..Default::default() }, 3);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [10.0, 0.0, 0.0], &[]), 0);
        }
    }
}
