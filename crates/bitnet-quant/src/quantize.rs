//! Absmean ternary weight quantization and absmax int8 activation quantization.

/// The clamp floor both quantizers put under the mean or max, as transformers does.
pub const QUANT_EPS: f32 = 1e-5;

/// Ternarizes a weight matrix by its absolute mean (`WeightQuant.forward`):
/// `t = clamp(round_half_even(w / mean|w|), -1, 1)`.
/// Returns the ternary codes and `mean|w|` (the multiplier that dequantizes them).
pub fn absmean_ternary(w: &[f32]) -> (Vec<i8>, f32) {
    // torch sums f32 in blocks; f64 keeps the mean within an ulp of any summation order.
    let mean = (w.iter().map(|v| v.abs() as f64).sum::<f64>() / w.len().max(1) as f64) as f32;
    let s = 1.0 / mean.max(QUANT_EPS);
    let t = w.iter().map(|&v| (v * s).round_ties_even().clamp(-1.0, 1.0) as i8).collect();
    (t, 1.0 / s)
}

/// The per-token activation scale `s_a = 127 / max|x|` (a multiplier: `q = round(x * s_a)`).
pub type ActivationScale = f32;

/// Quantizes one token's activations to int8 (`ActQuant`): `s_a = 127 / clamp(max|x|, 1e-5)`,
/// `q = clamp(round_half_even(x * s_a), -128, 127)`. Writes `q` and returns `s_a`.
pub fn quantize_activation_row(x: &[f32], q: &mut [i8]) -> ActivationScale {
    debug_assert_eq!(x.len(), q.len());
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let s = 127.0 / amax.max(QUANT_EPS);
    for (qi, &xi) in q.iter_mut().zip(x) {
        *qi = (xi * s).round_ties_even().clamp(-128.0, 127.0) as i8;
    }
    s
}
