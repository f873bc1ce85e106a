//! Float operations of the transformer block, written to match transformers' float32 math.

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
}
