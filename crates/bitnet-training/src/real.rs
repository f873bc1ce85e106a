//! The float type the model is written over: `f32` for training, `f64` for gradient checks.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

/// A real number type: the arithmetic and the few functions the layers need.
///
/// The two quantizers are part of the trait so that `f32` uses the project's own
/// (`bitnet_quant`) and `f64` an identical formula in double precision, which lets the
/// gradient tests run the whole model in `f64`.
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + Debug
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn sqrt(self) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn abs(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn recip(self) -> Self {
        Self::ONE / self
    }
    /// Absmean ternary weights (`bitnet-reference.md` §2.1): the codes and `mean|w|`.
    fn absmean_ternary(w: &[Self]) -> (Vec<i8>, Self);
    /// Per-token absmax int8 activations (§2.2): writes the codes, returns `s_a = 127 / max|x|`.
    fn quantize_activation_row(x: &[Self], q: &mut [i8]) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline]
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline]
    fn max(self, other: Self) -> Self {
        f32::max(self, other)
    }
    fn absmean_ternary(w: &[Self]) -> (Vec<i8>, Self) {
        bitnet_quant::absmean_ternary(w)
    }
    fn quantize_activation_row(x: &[Self], q: &mut [i8]) -> Self {
        bitnet_quant::quantize_activation_row(x, q)
    }
}

/// The clamp floor under `mean|w|` and `max|x|` (transformers' 1e-5).
const QUANT_EPS_F64: f64 = 1e-5;

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline]
    fn abs(self) -> Self {
        f64::abs(self)
    }
    #[inline]
    fn max(self, other: Self) -> Self {
        f64::max(self, other)
    }
    /// The same formula as `bitnet_quant::absmean_ternary`, in double precision.
    fn absmean_ternary(w: &[Self]) -> (Vec<i8>, Self) {
        let mean = w.iter().map(|v| v.abs()).sum::<f64>() / w.len().max(1) as f64;
        let s = 1.0 / mean.max(QUANT_EPS_F64);
        let t = w.iter().map(|&v| (v * s).round_ties_even().clamp(-1.0, 1.0) as i8).collect();
        (t, 1.0 / s)
    }
    /// The same formula as `bitnet_quant::quantize_activation_row`, in double precision.
    fn quantize_activation_row(x: &[Self], q: &mut [i8]) -> Self {
        let amax = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let s = 127.0 / amax.max(QUANT_EPS_F64);
        for (qi, &xi) in q.iter_mut().zip(x) {
            *qi = (xi * s).round_ties_even().clamp(-128.0, 127.0) as i8;
        }
        s
    }
}
