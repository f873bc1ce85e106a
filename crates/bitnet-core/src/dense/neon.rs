//! NEON kernels of the float product: the portable order ([`super::dot_widen`]) with each
//! weight loaded and widened once for `N` tokens. The eight partial sums of a token are two
//! 4-lane registers, lane `j` of the pair being partial sum `j`; a multiply then an add, never
//! fused, so the bits are the portable kernel's.

use std::arch::aarch64::*;

use half::bf16;

use super::bf16_to_f32;

/// bf16 dot products of a row with `N` tokens.
///
/// # Safety
/// NEON; every token at least `w.len()` long.
#[target_feature(enable = "neon")]
pub(super) unsafe fn dots_bf16<const N: usize>(w: &[bf16], xs: &[&[f32]; N]) -> [f32; N] {
    let pw = w.as_ptr().cast::<u16>();
    // SAFETY: the caller's guarantees; eight weights at `pw + i` for every `i` the body passes.
    unsafe {
        dots_body(
            w.len(),
            xs,
            |k| bf16_to_f32(w[k]),
            |i| {
                let raw = vld1q_u16(pw.add(i));
                (
                    vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(raw))),
                    vreinterpretq_f32_u32(vshll_high_n_u16::<16>(raw)),
                )
            },
        )
    }
}

/// f32 dot products of a row with `N` tokens.
///
/// # Safety
/// NEON; every token at least `w.len()` long.
#[target_feature(enable = "neon")]
pub(super) unsafe fn dots_f32<const N: usize>(w: &[f32], xs: &[&[f32]; N]) -> [f32; N] {
    let pw = w.as_ptr();
    // SAFETY: as for `dots_bf16`.
    unsafe { dots_body(w.len(), xs, |k| w[k], |i| (vld1q_f32(pw.add(i)), vld1q_f32(pw.add(i + 4)))) }
}

/// The portable order over `n` columns: `widen8(i)` gives columns `i..i + 8` of the row as two
/// registers, `widen(k)` column `k` alone.
///
/// # Safety
/// NEON; `widen8(i)` must be sound for every multiple of eight `i + 8 <= n`; every token at
/// least `n` long.
#[inline(always)]
unsafe fn dots_body<const N: usize>(
    n: usize,
    xs: &[&[f32]; N],
    widen: impl Fn(usize) -> f32,
    widen8: impl Fn(usize) -> (float32x4_t, float32x4_t),
) -> [f32; N] {
    assert!(xs.iter().all(|x| x.len() >= n));
    let px: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
    let full = n / 8 * 8;
    // SAFETY: NEON (the caller's).
    let mut acc = unsafe { [[vdupq_n_f32(0.0); 2]; N] };
    let mut i = 0;
    while i < full {
        let (w0, w1) = widen8(i);
        for t in 0..N {
            // SAFETY: `i + 8 <= n` columns of every token.
            unsafe {
                acc[t][0] = vaddq_f32(acc[t][0], vmulq_f32(w0, vld1q_f32(px[t].add(i))));
                acc[t][1] = vaddq_f32(acc[t][1], vmulq_f32(w1, vld1q_f32(px[t].add(i + 4))));
            }
        }
        i += 8;
    }
    let mut out = [0.0; N];
    for t in 0..N {
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe {
            vst1q_f32(lanes.as_mut_ptr(), acc[t][0]);
            vst1q_f32(lanes.as_mut_ptr().add(4), acc[t][1]);
        }
        let mut s = 0.0f32;
        for (k, &x) in xs[t].iter().enumerate().take(n).skip(full) {
            s += widen(k) * x;
        }
        out[t] = lanes.iter().sum::<f32>() + s;
    }
    out
}
