//! Turning logits into the next token: greedy, temperature, top-k, top-p, min-p and a
//! repetition penalty, in the order transformers applies them.

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
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repeat_penalty: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    /// Checks ranges, naming the flag that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("--temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("--top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("--min-p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(format!("--repeat-penalty must be > 0, got {}", self.repeat_penalty));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// (probability or logit, token) pairs, reused across calls.
    candidates: Vec<(f32, u32)>,
    /// Marks tokens already penalized in this call.
    seen: Vec<bool>,
}

impl Sampler {
    pub fn new(params: SamplingParams, vocab_size: usize) -> Self {
        Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            candidates: Vec::with_capacity(vocab_size),
            seen: vec![false; vocab_size],
        }
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
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (l / p.temperature, i as u32)));
        // Sort only what top-k keeps: select the k best first, then order them.
        let keep = if p.top_k > 0 { p.top_k.min(c.len()) } else { c.len() };
        if keep < c.len() {
            c.select_nth_unstable_by(keep - 1, |a, b| b.0.total_cmp(&a.0));
            c.truncate(keep);
        }
        c.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        // Softmax over the survivors (the best is first).
        let max = c[0].0;
        let mut sum = 0.0f32;
        for e in c.iter_mut() {
            e.0 = (e.0 - max).exp();
            sum += e.0;
        }
        for e in c.iter_mut() {
            e.0 /= sum;
        }
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut n = c.len();
            for (i, e) in c.iter().enumerate() {
                cum += e.0;
                if cum >= p.top_p {
                    n = i + 1;
                    break;
                }
            }
            c.truncate(n);
        }
        if p.min_p > 0.0 {
            let floor = c[0].0 * p.min_p;
            let n = c.iter().take_while(|e| e.0 >= floor).count().max(1);
            c.truncate(n);
        }
        let total: f32 = c.iter().map(|e| e.0).sum();
        let mut r = self.rng.random::<f32>() * total;
        for e in c.iter() {
            r -= e.0;
            if r <= 0.0 {
                return e.1;
            }
        }
        c[c.len() - 1].1
    }
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
