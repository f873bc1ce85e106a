//! Quantizers: absmean ternary weights, per-token absmax int8 activations (the BitNet b1.58
//! numerics of bitnet-reference.md §2), and symmetric n-bit quantizers for experiments and
//! for the int8 lm_head.
//!
//! Rounding is always half to even (`torch.round`).

#[cfg(target_arch = "x86_64")]
use crate::KernelPath;
use crate::QuantError;

/// The clamp floor both BitNet quantizers put under the mean or max, as transformers does.
pub const QUANT_EPS: f32 = 1e-5;

/// Ternarizes a weight matrix by its absolute mean (`WeightQuant.forward`):
/// `t = clamp(round_half_even(w / mean|w|), -1, 1)`.
/// Returns the ternary codes and `mean|w|` (the multiplier that dequantizes them).
pub fn absmean_ternary(w: &[f32]) -> (Vec<i8>, f32) {
    let s = 1.0 / abs_mean(w).max(QUANT_EPS);
    // Rounding after the clamp to [-128, 127] gives the same codes and vectorizes.
    let t = w.iter().map(|&v| round_to_i8(v * s).clamp(-1, 1)).collect();
    (t, 1.0 / s)
}

/// `mean|x|`. torch sums f32 in blocks; f64 keeps the mean within an ulp of any summation order.
/// Eight interleaved partial sums (a fixed order) let the sum vectorize: one serial f64 chain
/// ran at one add per four cycles.
fn abs_mean(x: &[f32]) -> f32 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|v| v.abs() as f64).sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v.abs() as f64;
        }
    }
    let sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
    (sum / x.len().max(1) as f64) as f32
}

/// `max|x|`, ignoring NaN (as `f32::max` does).
fn abs_max(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// The per-token activation scale `s_a = 127 / max|x|` (a multiplier: `q = round(x * s_a)`).
pub type ActivationScale = f32;

/// Quantizes one token's activations to int8 (`ActQuant`): `s_a = 127 / clamp(max|x|, 1e-5)`,
/// `q = clamp(round_half_even(x * s_a), -128, 127)`. Writes `q` and returns `s_a`.
///
/// Runs on AVX2 where the active kernel path is an x86 SIMD one; the results are identical.
pub fn quantize_activation_row(x: &[f32], q: &mut [i8]) -> ActivationScale {
    #[cfg(target_arch = "x86_64")]
    if matches!(KernelPath::active(), KernelPath::Avx2 | KernelPath::Avx512Bw | KernelPath::Avx512Vnni) {
        // SAFETY: every x86 SIMD path implies AVX2, and `active` only returns available paths.
        return unsafe { crate::kernels::avx2::quantize_row(x, q) };
    }
    quantize_activation_row_scalar(x, q)
}

/// [`quantize_activation_row`] in plain Rust: the definition.
pub fn quantize_activation_row_scalar(x: &[f32], q: &mut [i8]) -> ActivationScale {
    assert_eq!(x.len(), q.len());
    let s = 127.0 / abs_max(x).max(QUANT_EPS);
    for (qi, &xi) in q.iter_mut().zip(x) {
        *qi = round_to_i8(xi * s);
    }
    s
}

/// `clamp(round_half_even(v), -128, 127)`, NaN to 0, written so that it vectorizes: adding and
/// subtracting 1.5·2²³ rounds any |v| ≤ 2²² to an integer, half to even, in the default
/// rounding mode (`f32::round_ties_even` is a library call on baseline x86-64).
#[inline]
pub(crate) fn round_to_i8(v: f32) -> i8 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23
    let c = v.clamp(-128.0, 127.0);
    ((c + ROUND) - ROUND) as i8
}

/// Where a symmetric quantizer takes its scales from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// One scale for the whole tensor.
    PerTensor,
    /// One scale per row of `cols` values.
    PerRow { cols: usize },
}

/// A symmetrically quantized tensor: `x ≈ values[i] · scales[i / group]`.
#[derive(Clone, Debug, PartialEq)]
pub struct SymmetricQuant {
    /// Bits per value, 1..=8.
    pub bits: u8,
    /// Integers in `[-qmax, qmax]` (1 bit: in {-1, +1}).
    pub values: Vec<i8>,
    /// Dequantization multipliers, one per group.
    pub scales: Vec<f32>,
    /// Values per scale (the row length, or the whole length for one scale per tensor).
    pub group: usize,
}

impl SymmetricQuant {
    /// The float values the quantized ones stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        self.values.iter().enumerate().map(|(i, &q)| q as f32 * self.scales[i / self.group.max(1)]).collect()
    }
}

/// The largest magnitude a symmetric `bits`-bit quantizer produces: 1 for 1 and 2 bits
/// (binary {-1, +1} and ternary {-1, 0, +1}), `2^(bits-1) - 1` above.
pub fn symmetric_qmax(bits: u8) -> i8 {
    match bits {
        0 | 1 => 1,
        8.. => 127,
        b => (1i8 << (b - 1)) - 1,
    }
}

/// Symmetric quantization to `bits` ∈ 1..=8 bits with one scale per tensor or per row.
///
/// * 2..=8 bits (absmax): `scale = max(max|x|, 1e-5) / qmax`,
///   `q = clamp(round_half_even(x · qmax / max(max|x|, 1e-5)), -qmax, qmax)`.
/// * 1 bit (BitNet binarization): `scale = mean|x|`, `q = +1` for `x ≥ 0` and `-1` below.
///
/// Quantizing the dequantized result again gives the same integers.
pub fn quantize_symmetric(
    x: &[f32],
    bits: u8,
    granularity: Granularity,
) -> Result<SymmetricQuant, QuantError> {
    if !(1..=8).contains(&bits) {
        return Err(QuantError::Shape(format!("cannot quantize to {bits} bits (1 to 8 are supported)")));
    }
    let group = match granularity {
        Granularity::PerTensor => x.len(),
        Granularity::PerRow { cols } if cols > 0 && x.len().is_multiple_of(cols) => cols,
        Granularity::PerRow { cols } if cols == 0 && x.is_empty() => 0,
        Granularity::PerRow { cols } => {
            return Err(QuantError::Shape(format!("{} values are not rows of {cols}", x.len())));
        }
    };
    let mut values = vec![0i8; x.len()];
    let mut scales = Vec::with_capacity(x.len() / group.max(1));
    for (xs, qs) in x.chunks(group.max(1)).zip(values.chunks_mut(group.max(1))) {
        scales.push(quantize_group(xs, qs, bits));
    }
    Ok(SymmetricQuant { bits, values, scales, group })
}

/// Quantizes one group in place and returns its scale.
fn quantize_group(x: &[f32], q: &mut [i8], bits: u8) -> f32 {
    if bits == 1 {
        for (qi, &xi) in q.iter_mut().zip(x) {
            *qi = if xi >= 0.0 { 1 } else { -1 };
        }
        return abs_mean(x);
    }
    let qmax = symmetric_qmax(bits) as f32;
    let amax = abs_max(x).max(QUANT_EPS);
    let inv = qmax / amax;
    for (qi, &xi) in q.iter_mut().zip(x) {
        *qi = (xi * inv).round_ties_even().clamp(-qmax, qmax) as i8;
    }
    amax / qmax
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_rounding_matches_round_ties_even() {
        let mut v = -130.0f32;
        while v <= 130.0 {
            let want = v.round_ties_even().clamp(-128.0, 127.0) as i8;
            assert_eq!(round_to_i8(v), want, "{v}");
            v += 0.125;
        }
        for v in [0.5f32, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5, 1e30, -1e30, f32::INFINITY] {
            assert_eq!(round_to_i8(v), v.round_ties_even().clamp(-128.0, 127.0) as i8, "{v}");
        }
        assert_eq!(round_to_i8(f32::NAN), 0);
        // Just below and above a half.
        for k in -127i32..127 {
            let h = k as f32 + 0.5;
            for v in [h.next_down(), h, h.next_up()] {
                assert_eq!(round_to_i8(v), v.round_ties_even() as i8, "{v}");
            }
        }
    }

    #[test]
    fn absmean_codes_are_the_rounded_and_clamped_ratios() {
        let mut rng = crate::selftest::Rng::new(5);
        let mut w: Vec<f32> = (0..4099).map(|_| (rng.range(-50_000, 50_000) as f32) * 1e-5).collect();
        // Halves of the mean, outliers, a signed zero.
        let m = abs_mean(&w);
        w.extend([0.5 * m, -0.5 * m, 1.5 * m, -1.5 * m, 10.0, -10.0, -0.0]);
        let (t, _) = absmean_ternary(&w);
        let s = 1.0 / abs_mean(&w).max(QUANT_EPS);
        for (&v, &code) in w.iter().zip(&t) {
            let want = (v * s).round_ties_even().clamp(-1.0, 1.0) as i8;
            assert_eq!(code, want, "{v}");
        }
        assert!(t.contains(&0) && t.contains(&1) && t.contains(&-1));
    }

    #[test]
    fn simd_activation_quantizer_equals_the_scalar_one() {
        let mut rng = crate::selftest::Rng::new(3);
        for len in [0usize, 1, 7, 8, 31, 32, 33, 100, 2560, 6913] {
            for special in [None, Some(f32::NAN), Some(f32::INFINITY), Some(-0.0)] {
                let mut x: Vec<f32> =
                    (0..len).map(|_| (rng.range(-100_000, 100_000) as f32) * 1e-3).collect();
                if let (Some(v), true) = (special, len > 3) {
                    x[len / 2] = v;
                }
                // Exact halves after scaling: make 127 the max so that s = 1.
                if len > 40 {
                    x[0] = 127.0;
                    for (i, v) in x[1..40].iter_mut().enumerate() {
                        *v = i as f32 - 19.5;
                    }
                }
                let (mut a, mut b) = (vec![0i8; len], vec![0i8; len]);
                let sa = quantize_activation_row(&x, &mut a);
                let sb = quantize_activation_row_scalar(&x, &mut b);
                assert_eq!((sa.to_bits(), &a), (sb.to_bits(), &b), "len {len} special {special:?}");
            }
        }
    }

    #[test]
    fn qmax_per_width() {
        assert_eq!([1, 2, 4, 8].map(symmetric_qmax), [1, 1, 7, 127]);
    }

    #[test]
    fn one_bit_is_sign_times_mean() {
        let q = quantize_symmetric(&[0.5, -1.5, 0.0, 2.0], 1, Granularity::PerTensor).unwrap();
        assert_eq!(q.values, [1, -1, 1, 1]);
        assert_eq!(q.scales, [1.0]);
        assert_eq!(q.dequantize(), [1.0, -1.0, 1.0, 1.0]);
    }

    #[test]
    fn per_row_scales_are_per_row() {
        let q = quantize_symmetric(&[1.0, -0.5, 0.0, 14.0, 7.0, -3.5], 4, Granularity::PerRow { cols: 3 })
            .unwrap();
        assert_eq!(q.values, [7, -4, 0, 7, 4, -2]); // -3.5 rounds half to even
        assert_eq!(q.scales, [1.0 / 7.0, 2.0]);
        assert!(quantize_symmetric(&[1.0; 5], 4, Granularity::PerRow { cols: 3 }).is_err());
        assert!(quantize_symmetric(&[1.0], 9, Granularity::PerTensor).is_err());
    }
}
