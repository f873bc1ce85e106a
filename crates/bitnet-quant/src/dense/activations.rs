//! The activations a dense product takes, quantized the way ggml's CPU backend quantizes them
//! on x86.
//!
//! * [`ActivationKind::Q8Blocks`] — blocks of 32 (ggml's `quantize_row_q8_0` and
//!   `quantize_row_q8_1`, AVX2 versions): `amax = max|x|`, `d = amax / 127` stored as f16,
//!   `q = round_half_even(x · 127 / amax)` (the multiplier is `127 / amax`, not `1 / d`), and
//!   Q8_1's `s = f16(d · Σq)` with the f32 `d`. One buffer serves Q8_0, Q4_0 and Q4_1 weights.
//! * [`ActivationKind::Q8K`] — blocks of 256 (`quantize_row_q8_K_ref`): `max` is the value of
//!   largest magnitude (the first one), `iscale = -127 / max`,
//!   `q = min(127, round_half_even(iscale · x))`, `d = 1 / iscale` (f32), and the sums of each
//!   16 values.
//! * [`ActivationKind::F32`] — the floats as they are.
//!
//! The quantized values lie in [-127, 127] (what ggml produces for finite input; `-128` is
//! excluded so that the SIMD kernels' sign trick cannot overflow).

use super::{DenseError, QK, QK_K};
use crate::formats::float::{f16_bits_to_f32, f32_to_f16_bits};
use crate::quantize::round_to_i8;

/// The encoding of a dense product's activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActivationKind {
    /// f32, for the float weight formats.
    F32,
    /// Int8 in blocks of 32 with an f16 scale and Q8_1's scaled sum (Q8_0, Q4_0, Q4_1 weights).
    Q8Blocks,
    /// Int8 in blocks of 256 with an f32 scale and sums of 16 (Q4_K, Q6_K weights).
    Q8K,
}

impl ActivationKind {
    /// Elements per block: the width must be a multiple of it.
    pub fn block(self) -> usize {
        match self {
            ActivationKind::F32 => 1,
            ActivationKind::Q8Blocks => QK,
            ActivationKind::Q8K => QK_K,
        }
    }

    /// Elements per partial sum kept with the values (`sums`).
    fn sum_group(self) -> usize {
        match self {
            ActivationKind::F32 => 1,
            ActivationKind::Q8Blocks => QK,
            ActivationKind::Q8K => 16,
        }
    }
}

/// `m` tokens of width `k` encoded as an [`ActivationKind`]. A caller keeps one per input width
/// and reuses it: [`DenseActivations::quantize`] grows the buffers only when a call needs more
/// room than any before.
#[derive(Clone, Debug)]
pub struct DenseActivations {
    kind: ActivationKind,
    m: usize,
    k: usize,
    /// `[m, k]` floats (F32).
    x: Vec<f32>,
    /// `[m, k]` int8 values.
    q: Vec<i8>,
    /// `[m, k / block]` scales: Q8Blocks' f16 `d` widened; Q8K's f32 `d`.
    d: Vec<f32>,
    /// `[m, k / 32]` Q8_1 scaled sums `f16(d · Σq)`, widened (Q8Blocks only).
    s: Vec<f32>,
    /// `[m, k / group]` sums of the int8 values: per block of 32 (Q8Blocks), per 16 (Q8K).
    sums: Vec<i32>,
}

impl Default for DenseActivations {
    fn default() -> Self {
        Self::new()
    }
}

/// `v[..n]`, growing `v` first if it is shorter.
fn room<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

impl DenseActivations {
    /// An empty buffer; the first [`DenseActivations::quantize`] sizes it.
    pub fn new() -> Self {
        Self {
            kind: ActivationKind::F32,
            m: 0,
            k: 0,
            x: Vec::new(),
            q: Vec::new(),
            d: Vec::new(),
            s: Vec::new(),
            sums: Vec::new(),
        }
    }

    /// A buffer already sized for `max_m` tokens of width `k` in `kind`, so that no later call
    /// of that size allocates.
    pub fn with_capacity(kind: ActivationKind, max_m: usize, k: usize) -> Self {
        let mut a = Self::new();
        let n = max_m * k;
        match kind {
            ActivationKind::F32 => a.x.resize(n, 0.0),
            _ => {
                let block = kind.block();
                a.q.resize(n, 0);
                a.d.resize(n / block, 0.0);
                a.s.resize(n / block, 0.0);
                a.sums.resize(n / kind.sum_group(), 0);
            }
        }
        a
    }

    /// Encodes `x` (`m` rows of `k` floats) as `kind`.
    pub fn quantize(
        &mut self,
        kind: ActivationKind,
        x: &[f32],
        m: usize,
        k: usize,
    ) -> Result<(), DenseError> {
        let n = m.checked_mul(k).ok_or(DenseError::Overflow { rows: m, cols: k })?;
        if x.len() != n {
            return Err(DenseError::InputLength { m, cols: k, expected: n, got: x.len() });
        }
        let block = kind.block();
        if !k.is_multiple_of(block) {
            return Err(DenseError::ActivationBlock { kind, k, block });
        }
        (self.kind, self.m, self.k) = (kind, m, k);
        match kind {
            ActivationKind::F32 => room(&mut self.x, n).copy_from_slice(x),
            ActivationKind::Q8Blocks => {
                let blocks = n / QK;
                let q = room(&mut self.q, n);
                let d = room(&mut self.d, blocks);
                let s = room(&mut self.s, blocks);
                let sums = room(&mut self.sums, blocks);
                for (b, (xb, qb)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
                    (d[b], s[b], sums[b]) = quantize_q8_block(xb, qb);
                }
            }
            ActivationKind::Q8K => {
                let q = room(&mut self.q, n);
                let d = room(&mut self.d, n / QK_K);
                let sums = room(&mut self.sums, n / 16);
                for (b, (xb, qb)) in x.chunks_exact(QK_K).zip(q.chunks_exact_mut(QK_K)).enumerate() {
                    d[b] = quantize_q8k_block(xb, qb);
                    for (j, g) in qb.chunks_exact(16).enumerate() {
                        sums[b * 16 + j] = g.iter().map(|&v| i32::from(v)).sum();
                    }
                }
            }
        }
        Ok(())
    }

    pub fn kind(&self) -> ActivationKind {
        self.kind
    }
    /// Tokens held.
    pub fn m(&self) -> usize {
        self.m
    }
    /// Width of each token.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Token `t`'s floats (F32 only; empty otherwise).
    pub fn floats(&self, t: usize) -> &[f32] {
        match self.kind {
            ActivationKind::F32 => &self.x[t * self.k..(t + 1) * self.k],
            _ => &[],
        }
    }
    /// Token `t`'s int8 values (empty for F32).
    pub fn values(&self, t: usize) -> &[i8] {
        match self.kind {
            ActivationKind::F32 => &[],
            _ => &self.q[t * self.k..(t + 1) * self.k],
        }
    }
    /// Token `t`'s block scales `d` (one per 32 or 256 values; empty for F32).
    pub fn scales(&self, t: usize) -> &[f32] {
        match self.kind {
            ActivationKind::F32 => &[],
            kind => {
                let nb = self.k / kind.block();
                &self.d[t * nb..(t + 1) * nb]
            }
        }
    }
    /// Token `t`'s Q8_1 scaled block sums `f16(d · Σq)` (Q8Blocks only; empty otherwise).
    pub fn scaled_sums(&self, t: usize) -> &[f32] {
        match self.kind {
            ActivationKind::Q8Blocks => {
                let nb = self.k / QK;
                &self.s[t * nb..(t + 1) * nb]
            }
            _ => &[],
        }
    }
    /// Token `t`'s integer sums: per block of 32 (Q8Blocks) or per 16 values (Q8K, ggml's
    /// `bsums`); empty for F32.
    pub fn sums(&self, t: usize) -> &[i32] {
        match self.kind {
            ActivationKind::F32 => &[],
            kind => {
                let ng = self.k / kind.sum_group();
                &self.sums[t * ng..(t + 1) * ng]
            }
        }
    }
}

/// Quantizes 32 values as ggml's AVX2 `quantize_row_q8_1` does; returns `(d, s, Σq)` with `d`
/// and `s` rounded to f16 and widened back.
pub fn quantize_q8_block(x: &[f32], q: &mut [i8]) -> (f32, f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (qv, &v) in q.iter_mut().zip(x) {
        // Round half to even, NaN to 0, saturated, and -128 kept out (`round_to_i8`: the same
        // integers as `round_ties_even` and a clamp, without its library call).
        let r = i32::from(round_to_i8(v * id).max(-127));
        *qv = r as i8;
        sum += r;
    }
    let d16 = f16_bits_to_f32(f32_to_f16_bits(d));
    let s16 = f16_bits_to_f32(f32_to_f16_bits(d * sum as f32));
    (d16, s16, sum)
}

/// Quantizes 256 values as ggml's `quantize_row_q8_K_ref` does; returns `d`.
pub fn quantize_q8k_block(x: &[f32], q: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (qv, &v) in q.iter_mut().zip(x) {
        *qv = round_to_i8(iscale * v).max(-127);
    }
    1.0 / iscale
}

#[cfg(test)]
mod tests {
    use super::round_to_i8;

    /// The quantizers' rounding equals `round_ties_even` followed by the clamp to ±127 (what
    /// ggml computes), on ties, the ends of the range, beyond it, infinities and NaN.
    #[test]
    fn rounding_equals_round_ties_even_and_the_clamp() {
        let reference = |x: f32| (x.round_ties_even() as i32).clamp(-127, 127) as i8;
        let mut cases = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30, 4194304.5, -8388609.0];
        for k in -260..=260 {
            let x = k as f32 * 0.5;
            cases.extend([x, x.next_up(), x.next_down()]);
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            cases.push(((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 300.0);
        }
        for x in cases {
            assert_eq!(round_to_i8(x).max(-127), reference(x), "{x}");
        }
    }
}
