//! AVX2 and AVX-512 kernels of the float product: the dot products of one weight row with `N`
//! tokens, each weight loaded and widened once for all `N`.
//!
//! Every token's dot product takes the same operations in the same order whatever `N` is and
//! whichever of the two instruction sets runs it:
//!
//! * bf16: four 8-lane partial sums, `acc[j]` taking columns `32i + 8j ..+ 8` by fused
//!   multiply-add; then any remaining whole groups of eight columns into `acc[0]`; then
//!   `(acc[0] + acc[1]) + (acc[2] + acc[3])`, its eight lanes summed in order, and the last
//!   `cols % 8` columns added one by one (a multiply, then an add).
//! * f16: two partial sums over 16 columns, then as bf16 from the last multiple of 16.
//! * f32: the portable order ([`super::dot_widen`]: one 8-lane partial sum, a multiply then an
//!   add, never fused), so f32 weights give the portable bits on every kernel.
//!
//! AVX-512 keeps two of the 8-lane partial sums in one 16-lane register (`acc[0] | acc[1]`,
//! `acc[2] | acc[3]`): each lane sees the operations it sees under AVX2.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::bf16_to_f32;

/// Whether this CPU has what the AVX2 kernels use.
pub(super) fn avx2_available() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// Eight bf16 at `p` widened to f32: a 16-bit shift, exact.
#[inline(always)]
unsafe fn widen8_bf16(p: *const u16) -> __m256 {
    // SAFETY: the caller guarantees 8 values at `p` and AVX2.
    unsafe { _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())), 16)) }
}

/// Sixteen bf16 at `p` widened to f32.
#[inline(always)]
unsafe fn widen16_bf16(p: *const u16) -> __m512 {
    // SAFETY: the caller guarantees 16 values at `p` and AVX-512 F.
    unsafe { _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())), 16)) }
}

/// The two 8-lane halves of a 16-lane register: lanes 0–7, lanes 8–15.
#[inline(always)]
unsafe fn halves(v: __m512) -> [__m256; 2] {
    // SAFETY: AVX-512 F (the caller's).
    unsafe {
        [
            _mm512_castps512_ps256(v),
            _mm256_castsi256_ps(_mm512_extracti64x4_epi64::<1>(_mm512_castps_si512(v))),
        ]
    }
}

/// The eight lanes of `v` added in order.
#[inline(always)]
unsafe fn sum_lanes(v: __m256) -> f32 {
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds 8 floats; AVX (the caller's).
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    lanes.iter().sum()
}

/// The end of a bf16 dot product whose first `i` columns (a multiple of 32) are in `acc`: the
/// remaining groups of eight into `acc[0]`, the reduction, the last columns.
#[inline(always)]
unsafe fn finish_bf16(mut acc: [__m256; 4], mut i: usize, w: &[bf16], x: &[f32]) -> f32 {
    let (n, pw, px) = (w.len(), w.as_ptr().cast::<u16>(), x.as_ptr());
    // SAFETY: `i + 8 <= n` columns of the row and of the token (`x` is at least `n` long);
    // AVX2 and FMA (the caller's).
    unsafe {
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(widen8_bf16(pw.add(i)), _mm256_loadu_ps(px.add(i)), acc[0]);
            i += 8;
        }
        let mut s = sum_lanes(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        for k in i..n {
            s += bf16_to_f32(w[k]) * x[k];
        }
        s
    }
}

/// The end of an f16 dot product whose first `i` columns (a multiple of 16) are in `acc`.
#[inline(always)]
unsafe fn finish_f16(acc: [__m256; 2], i: usize, w: &[f16], x: &[f32]) -> f32 {
    // SAFETY: AVX (the caller's).
    let mut s = unsafe { sum_lanes(_mm256_add_ps(acc[0], acc[1])) };
    for k in i..w.len() {
        s += w[k].to_f32() * x[k];
    }
    s
}

/// bf16 dot products of a row with `N` tokens on AVX2.
///
/// # Safety
/// AVX2 and FMA; every token at least `w.len()` long.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dots_bf16_avx2<const N: usize>(w: &[bf16], xs: &[&[f32]; N]) -> [f32; N] {
    assert!(xs.iter().all(|x| x.len() >= w.len()));
    let (pw, full) = (w.as_ptr().cast::<u16>(), w.len() / 32 * 32);
    let px: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 4]; N];
    // A token's four partial sums are independent chains. Beyond two tokens they run two at a
    // time (two passes over the row, which is in L1 by then), so that the 2N accumulators and
    // the widened weights fit in the 16 registers.
    // SAFETY: the features are this function's; the passes read `full` columns.
    unsafe {
        if N <= 2 {
            bf16_avx2_lanes::<N, 0, 4>(pw, &px, full, &mut acc);
        } else {
            bf16_avx2_lanes::<N, 0, 2>(pw, &px, full, &mut acc);
            bf16_avx2_lanes::<N, 2, 2>(pw, &px, full, &mut acc);
        }
    }
    let mut out = [0.0; N];
    for t in 0..N {
        // SAFETY: as above.
        out[t] = unsafe { finish_bf16(acc[t], full, w, xs[t]) };
    }
    out
}

/// Partial sums `J0..J0 + JN` of each token over the first `full` columns (a multiple of 32).
#[inline(always)]
unsafe fn bf16_avx2_lanes<const N: usize, const J0: usize, const JN: usize>(
    pw: *const u16,
    px: &[*const f32; N],
    full: usize,
    acc: &mut [[__m256; 4]; N],
) {
    // part[j][t]: partial sum J0 + j of token t.
    let mut part: [[__m256; N]; JN] = std::array::from_fn(|j| std::array::from_fn(|t| acc[t][J0 + j]));
    let mut i = 0;
    while i < full {
        for (j, part) in part.iter_mut().enumerate() {
            let at = i + 8 * (J0 + j);
            // SAFETY: `at + 8 <= full` columns of the row and of every token; AVX2 and FMA.
            unsafe {
                let wv = widen8_bf16(pw.add(at));
                for (sum, x) in part.iter_mut().zip(px) {
                    *sum = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(at)), *sum);
                }
            }
        }
        i += 32;
    }
    for (t, acc) in acc.iter_mut().enumerate() {
        for (j, part) in part.iter().enumerate() {
            acc[J0 + j] = part[t];
        }
    }
}

/// bf16 dot products of `R` rows with `N` tokens on AVX-512: the AVX2 kernel's bits. Two rows
/// share each load of a token (AVX-512 has the registers for their 4N partial sums).
///
/// # Safety
/// AVX-512 F, AVX2 and FMA; every row `cols` long and every token at least `cols` long.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn dots_bf16_avx512<const R: usize, const N: usize>(
    ws: &[&[bf16]; R],
    xs: &[&[f32]; N],
) -> [[f32; N]; R] {
    let cols = ws[0].len();
    assert!(ws.iter().all(|w| w.len() == cols) && xs.iter().all(|x| x.len() >= cols));
    let full = cols / 32 * 32;
    let pw: [*const u16; R] = std::array::from_fn(|r| ws[r].as_ptr().cast::<u16>());
    let px: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
    // acc[0] | acc[1] and acc[2] | acc[3] of each row and token.
    let (mut lo, mut hi) = ([[_mm512_setzero_ps(); N]; R], [[_mm512_setzero_ps(); N]; R]);
    let mut i = 0;
    while i < full {
        // SAFETY: `i + 32 <= full` columns of every row and token; the features are this
        // function's.
        unsafe {
            let w0: [__m512; R] = std::array::from_fn(|r| widen16_bf16(pw[r].add(i)));
            let w1: [__m512; R] = std::array::from_fn(|r| widen16_bf16(pw[r].add(i + 16)));
            for t in 0..N {
                let (x0, x1) = (_mm512_loadu_ps(px[t].add(i)), _mm512_loadu_ps(px[t].add(i + 16)));
                for r in 0..R {
                    lo[r][t] = _mm512_fmadd_ps(w0[r], x0, lo[r][t]);
                    hi[r][t] = _mm512_fmadd_ps(w1[r], x1, hi[r][t]);
                }
            }
        }
        i += 32;
    }
    let mut out = [[0.0; N]; R];
    for r in 0..R {
        for t in 0..N {
            // SAFETY: as above.
            out[r][t] = unsafe {
                let ([a0, a1], [a2, a3]) = (halves(lo[r][t]), halves(hi[r][t]));
                finish_bf16([a0, a1, a2, a3], full, ws[r], xs[t])
            };
        }
    }
    out
}

/// f16 dot products of a row with `N` tokens on AVX2.
///
/// # Safety
/// AVX2, FMA and F16C; every token at least `w.len()` long.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dots_f16_avx2<const N: usize>(w: &[f16], xs: &[&[f32]; N]) -> [f32; N] {
    assert!(xs.iter().all(|x| x.len() >= w.len()));
    let (pw, full) = (w.as_ptr().cast::<u16>(), w.len() / 16 * 16);
    let px: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
    // acc[j][t]: partial sum j of token t.
    let mut acc = [[_mm256_setzero_ps(); N]; 2];
    let mut i = 0;
    while i < full {
        for (j, acc) in acc.iter_mut().enumerate() {
            let at = i + 8 * j;
            // SAFETY: `at + 8 <= full` columns of the row and of every token; the features are
            // this function's.
            unsafe {
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(pw.add(at).cast()));
                for (sum, x) in acc.iter_mut().zip(px) {
                    *sum = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(at)), *sum);
                }
            }
        }
        i += 16;
    }
    let mut out = [0.0; N];
    for t in 0..N {
        // SAFETY: as above.
        out[t] = unsafe { finish_f16([acc[0][t], acc[1][t]], full, w, xs[t]) };
    }
    out
}

/// f16 dot products of `R` rows with `N` tokens on AVX-512: the AVX2 kernel's bits.
///
/// # Safety
/// AVX-512 F, AVX2, FMA and F16C; every row `cols` long and every token at least `cols` long.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn dots_f16_avx512<const R: usize, const N: usize>(
    ws: &[&[f16]; R],
    xs: &[&[f32]; N],
) -> [[f32; N]; R] {
    let cols = ws[0].len();
    assert!(ws.iter().all(|w| w.len() == cols) && xs.iter().all(|x| x.len() >= cols));
    let full = cols / 16 * 16;
    let pw: [*const u16; R] = std::array::from_fn(|r| ws[r].as_ptr().cast::<u16>());
    let px: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
    // acc[0] | acc[1] of each row and token.
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    let mut i = 0;
    while i < full {
        // SAFETY: `i + 16 <= full` columns of every row and token; the features are this
        // function's.
        unsafe {
            let wv: [__m512; R] =
                std::array::from_fn(|r| _mm512_cvtph_ps(_mm256_loadu_si256(pw[r].add(i).cast())));
            for t in 0..N {
                let xv = _mm512_loadu_ps(px[t].add(i));
                for r in 0..R {
                    acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
                }
            }
        }
        i += 16;
    }
    let mut out = [[0.0; N]; R];
    for r in 0..R {
        for t in 0..N {
            // SAFETY: as above.
            out[r][t] = unsafe { finish_f16(halves(acc[r][t]), full, ws[r], xs[t]) };
        }
    }
    out
}

/// f32 dot products of a row with `N` tokens in the portable order ([`super::dot_widen`]):
/// lane `j` is its partial sum `j`, a multiply then an add.
///
/// # Safety
/// AVX2; every token at least `w.len()` long.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dots_f32_avx2<const N: usize>(w: &[f32], xs: &[&[f32]; N]) -> [f32; N] {
    assert!(xs.iter().all(|x| x.len() >= w.len()));
    let (pw, full) = (w.as_ptr(), w.len() / 8 * 8);
    let px: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
    let mut acc = [_mm256_setzero_ps(); N];
    let mut i = 0;
    while i < full {
        // SAFETY: `i + 8 <= full` columns of the row and of every token; AVX2.
        unsafe {
            let wv = _mm256_loadu_ps(pw.add(i));
            for t in 0..N {
                acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(wv, _mm256_loadu_ps(px[t].add(i))));
            }
        }
        i += 8;
    }
    let mut out = [0.0; N];
    for t in 0..N {
        let mut s = 0.0f32;
        for k in full..w.len() {
            s += w[k] * xs[t][k];
        }
        // SAFETY: AVX2.
        out[t] = unsafe { sum_lanes(acc[t]) } + s;
    }
    out
}
