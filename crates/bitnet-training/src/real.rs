//! The float type the model is written over: `f32` for training, `f64` for gradient checks.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

pub use bitnet_core::ops::{dot_lanes, exp_f32, lanes, max_lanes, sum_lanes};

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
    /// `x ← exp(x)` for every element (the softmaxes' exponentials, in bulk so that `f32` can
    /// take a vectorized polynomial; `f64` keeps `exp`).
    fn exp_in_place(xs: &mut [Self]) {
        for x in xs {
            *x = x.exp();
        }
    }
    /// Absmean ternary weights (`bitnet-reference.md` §2.1): the codes and `mean|w|`.
    fn absmean_ternary(w: &[Self]) -> (Vec<i8>, Self);
    /// Per-token absmax int8 activations (§2.2): writes the codes, returns `s_a = 127 / max|x|`.
    fn quantize_activation_row(x: &[Self], q: &mut [i8]) -> Self;
    /// `x` itself when `Self` is `f32` (for the kernels that exist only in f32).
    fn as_f32(x: &[Self]) -> Option<&[f32]>;
    fn as_f32_mut(x: &mut [Self]) -> Option<&mut [f32]>;
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
    /// Within 1 ulp of the exact exponential (libm's `expf` within 0.5): see [`exp_f32`].
    fn exp_in_place(xs: &mut [Self]) {
        bitnet_core::ops::exp_in_place(xs);
    }
    fn absmean_ternary(w: &[Self]) -> (Vec<i8>, Self) {
        bitnet_quant::absmean_ternary(w)
    }
    fn quantize_activation_row(x: &[Self], q: &mut [i8]) -> Self {
        bitnet_quant::quantize_activation_row(x, q)
    }
    fn as_f32(x: &[Self]) -> Option<&[f32]> {
        Some(x)
    }
    fn as_f32_mut(x: &mut [Self]) -> Option<&mut [f32]> {
        Some(x)
    }
}

/// Runs `f` compiled for AVX2 and FMA where the CPU has them (twice SSE2's lanes; the same
/// bits, as Rust never fuses a multiply and an add on its own). For element-wise loops over
/// a chunk: `f` must be a closure that inlines into the wrapper, or its code stays baseline.
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are available (checked just above).
        return unsafe { wide_avx2(f) };
    }
    f()
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn wide_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
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
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
}
