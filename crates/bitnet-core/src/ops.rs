//! Float operations of the transformer block, written to match transformers' float32 math.

use std::ops::{Add, AddAssign, Mul};

/// RMSNorm of one row as transformers computes it: `x · rsqrt(mean(x²) + eps)`, then times
/// the gain (when there is one). The mean is accumulated in f64 so that it sits within an ulp of
/// torch's f32 reduction whatever the summation order.
pub fn rmsnorm_row(x: &[f32], weight: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let inv = inverse_rms(x, eps);
    match weight {
        Some(w) => {
            for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
                *o = g * (v * inv);
            }
        }
        None => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * inv;
            }
        }
    }
}

/// `1 / sqrt(mean(x²) + eps)`, the square sum in f64.
fn inverse_rms(x: &[f32], eps: f32) -> f32 {
    let mean_sq = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len().max(1) as f64;
    1.0 / ((mean_sq as f32) + eps).sqrt()
}

/// [`rmsnorm_row`] in place, with the same arithmetic.
pub fn rmsnorm_row_in_place(x: &mut [f32], weight: Option<&[f32]>, eps: f32) {
    let inv = inverse_rms(x, eps);
    match weight {
        Some(w) => x.iter_mut().zip(w).for_each(|(v, &g)| *v = g * (*v * inv)),
        None => x.iter_mut().for_each(|v| *v *= inv),
    }
}

/// RMSNorm of `rows` rows of width `w.len()` (or `width` when there is no gain).
pub fn rmsnorm(x: &[f32], weight: Option<&[f32]>, width: usize, eps: f32, out: &mut [f32]) {
    for (xr, or) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        rmsnorm_row(xr, weight, eps, or);
    }
}

/// The RoPE inverse frequencies `1 / theta^(2i/d)`, rounded to f32 as transformers does.
pub fn rope_inv_freq(theta: f32, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let exponent = ((2 * i) as f32 / head_dim as f32) as f64;
            (1.0 / (theta as f64).powf(exponent)) as f32
        })
        .collect()
}

/// cos and sin of `pos · inv_freq[i]` for one position (each `head_dim / 2` long).
pub fn rope_cos_sin(pos: usize, inv_freq: &[f32], cos: &mut [f32], sin: &mut [f32]) {
    for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        // The angle is an f32 product in transformers; cos/sin of it are rounded once.
        let angle = (pos as f32 * f) as f64;
        *c = angle.cos() as f32;
        *s = angle.sin() as f32;
    }
}

/// NeoX (half-split) rotation of every head in `x` (`n_heads × head_dim`) in place:
/// `x·cos + rotate_half(x)·sin` with `rotate_half(x) = [-x[d/2..], x[..d/2]]`.
pub fn rope_neox(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            (lo[i], hi[i]) = rotate(lo[i], hi[i], cos[i], sin[i]);
        }
    }
}

/// One NeoX pair `(a, b)` (dims `i` and `i + d/2`) turned by the angle of `cos`, `sin`.
#[inline]
fn rotate(a: f32, b: f32, cos: f32, sin: f32) -> (f32, f32) {
    (a * cos - b * sin, b * cos + a * sin)
}

/// [`rope_neox`] of `x` written to `out` (the KV cache), with the same arithmetic.
pub fn rope_neox_into(x: &[f32], head_dim: usize, cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = head_dim / 2;
    for (head, dst) in x.chunks_exact(head_dim).zip(out.chunks_exact_mut(head_dim)) {
        let (lo, hi) = head.split_at(half);
        let (dlo, dhi) = dst.split_at_mut(half);
        for i in 0..half {
            (dlo[i], dhi[i]) = rotate(lo[i], hi[i], cos[i], sin[i]);
        }
    }
}

/// Softmax over `x` in place, in f32 with the max subtracted first.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `relu(g)² · u`, the BitNet b1.58 gate.
pub fn relu2_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let r = g.max(0.0);
        *o = r * r * u;
    }
}

/// `silu(g) · u`, the LLaMA gate.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `gelu_tanh(g) · u`, Gemma's GeGLU: torch's `gelu(g, approximate="tanh")`,
/// `0.5 · g · (1 + tanh(sqrt(2/π) · (g + 0.044715 · g³)))`, in f32.
pub fn gelu_tanh_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let inner = SQRT_2_OVER_PI * (g + 0.044_715 * g * g * g);
        *o = 0.5 * g * (1.0 + inner.tanh()) * u;
    }
}

/// `x *= factor`.
pub fn scale(x: &mut [f32], factor: f32) {
    x.iter_mut().for_each(|v| *v *= factor);
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `exp(x)` in plain `f32` arithmetic that the compiler vectorizes: `x = n·ln 2 + r` with
/// `|r| ≤ ln 2 / 2` (Cody-Waite, `ln 2` in two parts), Cephes' degree-7 polynomial for `e^r`,
/// then `2^n` as two exponent-field factors so that results down to the subnormals (and up to
/// the overflow to infinity) come out right. No fused multiply-adds, so every CPU gives the
/// same bits. Checked against `f64::exp` over every f32 in [-104, 89] outside ±1e-6: at most
/// 0.99 ulp for normal results, at most one subnormal step (1.4e-45) below; below -104 it
/// gives 0, above 89 infinity, NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // Adding 1.5·2^23 rounds a float of magnitude below 2^22 to an integer (to even).
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -104.0 { -104.0 } else { x };
    let x = if x > 89.0 { 89.0 } else { x };
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n_f = shifted - ROUND;
    let n = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    // ln 2 = 0.693359375 (exact in 9 bits, so n·it is exact) - 2.12194440e-4.
    let r = x - n_f * 0.693_359_4 - n_f * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
    let e_r = p * (r * r) + r + 1.0;
    // n ∈ [-150, 129]: each half is a normal power of two.
    let (n1, n2) = (n >> 1, n - (n >> 1));
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    e_r * pow2(n1) * pow2(n2)
}

fn exp_each(xs: &mut [f32]) {
    for x in xs {
        *x = exp_f32(*x);
    }
}

/// [`exp_each`] compiled for AVX2 (8 lanes instead of SSE2's 4; the same bits).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_each_avx2(xs: &mut [f32]) {
    exp_each(xs)
}

/// [`exp_f32`] of every value, on AVX2 where the CPU has it (the same bits: 8 lanes at a time
/// instead of SSE2's 4). The softmax of training and of the sampler.
pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available (checked just above).
        unsafe { exp_each_avx2(xs) };
        return;
    }
    exp_each(xs);
}

/// Independent partial sums of [`sum_lanes`] and [`dot_lanes`]: a plain `.sum()` of floats is one
/// serial chain (the order is fixed), at one add per add-latency; eight chains vectorize.
const LANES: usize = 8;

/// `Σ f(i)` for `i < n`, accumulated in `LANES` interleaved partial sums then added pairwise.
/// The order depends only on `n`, so results are deterministic.
#[inline(always)]
pub fn lanes<T>(n: usize, f: impl Fn(usize) -> T) -> T
where
    T: Copy + Default + AddAssign + Add<Output = T>,
{
    let mut acc = [T::default(); LANES];
    let body = n - n % LANES;
    for i in (0..body).step_by(LANES) {
        for (j, a) in acc.iter_mut().enumerate() {
            *a += f(i + j);
        }
    }
    for (j, i) in (body..n).enumerate() {
        acc[j] += f(i);
    }
    let [a0, a1, a2, a3, a4, a5, a6, a7] = acc;
    ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
}

/// `Σ x`, vectorizable (see [`lanes`]).
#[inline(always)]
pub fn sum_lanes<T>(x: &[T]) -> T
where
    T: Copy + Default + AddAssign + Add<Output = T>,
{
    lanes(x.len(), |i| x[i])
}

/// `Σ x·y` over the shorter of the two, vectorizable (see [`lanes`]).
#[inline(always)]
pub fn dot_lanes<T>(x: &[T], y: &[T]) -> T
where
    T: Copy + Default + AddAssign + Add<Output = T> + Mul<Output = T>,
{
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    lanes(n, |i| x[i] * y[i])
}

/// The largest of `x` (which must not be empty), in
/// `LANES` running maxima: a single running maximum is a serial compare-and-select chain.
/// The maximum of numbers does not depend on the order it is taken in, so neither does this
/// (for inputs without NaN, which a softmax's logits are).
#[inline(always)]
pub fn max_lanes<T: Copy + PartialOrd>(x: &[T]) -> T {
    let mut acc = [x[0]; LANES];
    let chunks = x.chunks_exact(LANES);
    for &v in chunks.remainder() {
        if v > acc[0] {
            acc[0] = v;
        }
    }
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            if v > *a {
                *a = v;
            }
        }
    }
    acc.iter().fold(acc[0], |m, &v| if v > m { v } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_half_split_pairs() {
        // head_dim 4: pairs are (x0, x2) and (x1, x3).
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        let (c, s) = ([0.0, 1.0], [1.0, 0.0]);
        rope_neox(&mut x, 4, &c, &s);
        assert_eq!(x, vec![-3.0, 2.0, 1.0, 4.0]);
    }

    #[test]
    fn rmsnorm_unit_rows_stay_unit() {
        let x = vec![1.0, -1.0, 1.0, -1.0];
        let mut out = vec![0.0; 4];
        rmsnorm_row(&x, Some(&[2.0, 2.0, 2.0, 2.0]), 0.0, &mut out);
        assert_eq!(out, vec![2.0, -2.0, 2.0, -2.0]);
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut x = vec![1.0, 3.0, 2.0, f32::NEG_INFINITY];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[2] && x[2] > x[0] && x[3] == 0.0);
    }

    #[test]
    fn gates() {
        let mut o = vec![0.0; 2];
        relu2_mul(&[-2.0, 3.0], &[5.0, 2.0], &mut o);
        assert_eq!(o, vec![0.0, 18.0]);
        silu_mul(&[0.0, 0.0], &[1.0, 1.0], &mut o);
        assert_eq!(o, vec![0.0, 0.0]);
    }

    /// torch 2.15's `gelu(x, approximate="tanh")` in f32 (printed with `float.hex`), to a few
    /// ulps: torch's vectorized tanh and libm's round differently in the last bits.
    #[test]
    fn gelu_tanh_matches_torch() {
        let x = [-6.0, -3.0, -1.5, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.5, 3.0, 6.0, 12.0];
        let torch = [
            -0.0,
            -0.003_637_433,
            -0.100_428_43,
            -0.154_286,
            -0.000_499_601_07,
            0.0,
            0.000_500_399,
            0.345_714,
            1.399_571_5,
            2.996_362_7,
            6.0,
            12.0,
        ];
        let mut got = [0.0; 12];
        gelu_tanh_mul(&x, &[1.0; 12], &mut got);
        for ((&g, &t), &x) in got.iter().zip(&torch).zip(&x) {
            assert!((g - t).abs() <= 4.0 * f32::EPSILON * t.abs().max(1e-3), "gelu({x}) = {g}, torch {t}");
        }
        // The up projection multiplies.
        gelu_tanh_mul(&[1.5], &[-2.0], &mut got[..1]);
        assert!((got[0] + 2.0 * 1.399_571_5).abs() < 1e-6);
    }

    /// Distance of `got` from the exact `want` in units of the f32 spacing at `want`.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let spacing = (f32::from_bits(w.to_bits() + 1) - w) as f64;
        (got as f64 - want).abs() / spacing
    }

    #[test]
    fn exp_f32_is_within_one_ulp() {
        // A dense sample (every 97th f32) of the whole range, and the edges.
        let mut worst: f64 = 0.0;
        for bits in (0u32..0x42d0_0000).step_by(97) {
            for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                let want = (x as f64).exp();
                if x > 89.0 {
                    continue;
                }
                if want < f32::MIN_POSITIVE as f64 {
                    assert!((exp_f32(x) as f64 - want).abs() <= 1.5e-45, "exp({x})");
                } else if want < f32::MAX as f64 {
                    worst = worst.max(ulps(exp_f32(x), want));
                }
            }
        }
        assert!(worst <= 1.0, "worst error {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn exp_in_place_matches_the_scalar_form() {
        let mut xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 900.0) * 0.117).collect();
        let want: Vec<f32> = xs.iter().map(|&x| exp_f32(x)).collect();
        exp_in_place(&mut xs);
        assert!(xs.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn lane_sums_equal_the_exact_sums() {
        // Small integers sum exactly in f32 in any order, so every length must match exactly.
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 255, 4096, 4099] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 23) as f32 - 11.0).collect();
            let y: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 13) as f32 - 6.0).collect();
            let sum: i64 = x.iter().map(|&v| v as i64).sum();
            let dot: i64 = x.iter().zip(&y).map(|(&a, &b)| (a * b) as i64).sum();
            assert_eq!(sum_lanes(&x) as i64, sum, "sum, n = {n}");
            assert_eq!(dot_lanes(&x, &y) as i64, dot, "dot, n = {n}");
            assert_eq!(lanes(n, |i| x[i] * 2.0) as i64, 2 * sum, "lanes, n = {n}");
        }
    }

    #[test]
    fn lane_maxima_equal_the_serial_maximum() {
        // The largest value at every position of every length, ragged tails included.
        for n in [1usize, 2, 7, 8, 9, 15, 16, 17, 255, 4099] {
            for at in 0..n {
                let x: Vec<f32> = (0..n).map(|i| if i == at { 3.5 } else { -((i % 11) as f32) }).collect();
                assert_eq!(max_lanes(&x), 3.5, "n = {n}, largest at {at}");
            }
        }
    }
}
