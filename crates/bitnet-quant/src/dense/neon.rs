//! aarch64 NEON kernels for the dense products of the block formats, one row at a time.
//!
//! Each block's integer dot product comes from `smull`/`smull2` (int8 × int8 into i16, exact:
//! every product is below 2¹⁵ in magnitude) and `sadalp` (pairwise into i32), then `addv`; the
//! K-quants' sub-block scales and mins are applied to those exact sums in i32. The block's float
//! term and the accumulation are then the scalar definition's own operations, in its order, so
//! the outputs equal [`super::scalar`]'s bit for bit. The float formats take the scalar code.

use std::arch::aarch64::*;
use std::ops::Range;

use super::scalar::{self, f16_at, scale_min_k4};
use super::{DenseActivations, DenseFormat, DenseLinear, QK, QK_K};
use crate::kernels::SharedOut;

/// `Σ w·a` over 16 signed bytes each, accumulated into `acc` (four i32 lanes).
#[inline(always)]
fn mla16(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    // SAFETY: NEON is part of the aarch64 baseline; register-only arithmetic.
    unsafe {
        let lo = vmull_s8(vget_low_s8(w), vget_low_s8(a));
        let hi = vmull_high_s8(w, a);
        vpadalq_s16(vpadalq_s16(acc, lo), hi)
    }
}

/// 16 activations at `a[at..at + 16]`.
#[inline(always)]
fn load16(a: &[i8], at: usize) -> int8x16_t {
    let a = &a[at..at + 16];
    // SAFETY: `a` holds 16 values (the slice above is bounds-checked).
    unsafe { vld1q_s8(a.as_ptr()) }
}

/// 16 stored bytes at `b[at..at + 16]`.
#[inline(always)]
fn bytes16(b: &[u8], at: usize) -> uint8x16_t {
    let b = &b[at..at + 16];
    // SAFETY: `b` holds 16 bytes (the slice above is bounds-checked).
    unsafe { vld1q_u8(b.as_ptr()) }
}

#[inline(always)]
fn sum(v: int32x4_t) -> i32 {
    // SAFETY: NEON is part of the aarch64 baseline.
    unsafe { vaddvq_s32(v) }
}

#[inline(always)]
fn low_nibbles(v: uint8x16_t) -> int8x16_t {
    // SAFETY: NEON is part of the aarch64 baseline.
    unsafe { vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F))) }
}

#[inline(always)]
fn high_nibbles(v: uint8x16_t) -> int8x16_t {
    // SAFETY: NEON is part of the aarch64 baseline.
    unsafe { vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)) }
}

/// The exact `Σ_{j<32} q_j · a_j` of one Q8_0/Q4_0/Q4_1 block (Q4_0 with its `- 8`).
#[inline(always)]
fn block32_isum(format: DenseFormat, blk: &[u8], a: &[i8]) -> i32 {
    let zero = || {
        // SAFETY: NEON is part of the aarch64 baseline.
        unsafe { vdupq_n_s32(0) }
    };
    let (w0, w1) = match format {
        DenseFormat::Q8_0 => {
            // SAFETY: NEON is part of the aarch64 baseline.
            unsafe { (vreinterpretq_s8_u8(bytes16(blk, 2)), vreinterpretq_s8_u8(bytes16(blk, 18))) }
        }
        DenseFormat::Q4_0 => {
            let raw = bytes16(blk, 2);
            // SAFETY: NEON is part of the aarch64 baseline.
            unsafe {
                let eight = vdupq_n_s8(8);
                (vsubq_s8(low_nibbles(raw), eight), vsubq_s8(high_nibbles(raw), eight))
            }
        }
        _ => {
            let raw = bytes16(blk, 4);
            (low_nibbles(raw), high_nibbles(raw))
        }
    };
    sum(mla16(mla16(zero(), w0, load16(a, 0)), w1, load16(a, 16)))
}

fn dot_block32(format: DenseFormat, w: &[u8], a: &[i8], d_a: &[f32], s_a: &[f32]) -> f32 {
    let bb = format.block_bytes();
    let (mut acc, mut acc_min) = (0.0f32, 0.0f32);
    for (b, (blk, ab)) in w.chunks_exact(bb).zip(a.chunks_exact(QK)).enumerate() {
        let isum = block32_isum(format, blk, ab);
        acc += (f16_at(blk, 0) * d_a[b]) * isum as f32;
        if format == DenseFormat::Q4_1 {
            acc_min += f16_at(blk, 2) * s_a[b];
        }
    }
    if format == DenseFormat::Q4_1 {
        acc + acc_min
    } else {
        acc
    }
}

fn dot_q4_k(w: &[u8], a: &[i8], d_a: &[f32], bsums: &[i32]) -> f32 {
    let (mut acc, mut acc_min) = (0.0f32, 0.0f32);
    for (b, (blk, ab)) in w.chunks_exact(144).zip(a.chunks_exact(QK_K)).enumerate() {
        let scales = &blk[4..16];
        let (mut isum, mut msum) = (0i32, 0i32);
        for c in 0..4 {
            let (sc_lo, m_lo) = scale_min_k4(2 * c, scales);
            let (sc_hi, m_hi) = scale_min_k4(2 * c + 1, scales);
            let (q0, q1) = (bytes16(blk, 16 + 32 * c), bytes16(blk, 32 + 32 * c));
            // SAFETY: NEON is part of the aarch64 baseline.
            let zero = unsafe { vdupq_n_s32(0) };
            let lo = mla16(
                mla16(zero, low_nibbles(q0), load16(ab, 64 * c)),
                low_nibbles(q1),
                load16(ab, 64 * c + 16),
            );
            let hi = mla16(
                mla16(zero, high_nibbles(q0), load16(ab, 64 * c + 32)),
                high_nibbles(q1),
                load16(ab, 64 * c + 48),
            );
            isum += i32::from(sc_lo) * sum(lo) + i32::from(sc_hi) * sum(hi);
            let bs = &bsums[16 * b + 4 * c..16 * b + 4 * c + 4];
            msum += i32::from(m_lo) * (bs[0] + bs[1]) + i32::from(m_hi) * (bs[2] + bs[3]);
        }
        acc += (f16_at(blk, 0) * d_a[b]) * isum as f32;
        acc_min += (f16_at(blk, 2) * d_a[b]) * msum as f32;
    }
    acc - acc_min
}

fn dot_q6_k(w: &[u8], a: &[i8], d_a: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for (b, (blk, ab)) in w.chunks_exact(210).zip(a.chunks_exact(QK_K)).enumerate() {
        let mut isum = 0i32;
        for h in 0..2 {
            for half in 0..2 {
                // Columns l = 16·half .. 16·half + 16 of the four 32-wide parts of half `h`.
                let l = 16 * half;
                let ql0 = bytes16(blk, 64 * h + l);
                let ql1 = bytes16(blk, 64 * h + 32 + l);
                let qh = bytes16(blk, 128 + 32 * h + l);
                // SAFETY: NEON is part of the aarch64 baseline.
                let parts = unsafe {
                    let (m4, m3) = (vdupq_n_u8(0x0F), vdupq_n_u8(3));
                    let high = |bits: uint8x16_t| vshlq_n_u8::<4>(vandq_u8(bits, m3));
                    [
                        vorrq_u8(vandq_u8(ql0, m4), high(qh)),
                        vorrq_u8(vandq_u8(ql1, m4), high(vshrq_n_u8::<2>(qh))),
                        vorrq_u8(vshrq_n_u8::<4>(ql0), high(vshrq_n_u8::<4>(qh))),
                        vorrq_u8(vshrq_n_u8::<4>(ql1), vshlq_n_u8::<4>(vshrq_n_u8::<6>(qh))),
                    ]
                };
                for (k, codes) in parts.into_iter().enumerate() {
                    // Element 128h + 32k + l .. + 16: group 8h + 2k + half.
                    let g = 8 * h + 2 * k + half;
                    // SAFETY: NEON is part of the aarch64 baseline.
                    let signed = unsafe { vsubq_s8(vreinterpretq_s8_u8(codes), vdupq_n_s8(32)) };
                    // SAFETY: as above.
                    let zero = unsafe { vdupq_n_s32(0) };
                    let dot = sum(mla16(zero, signed, load16(ab, 128 * h + 32 * k + l)));
                    isum += i32::from(blk[192 + g] as i8) * dot;
                }
            }
        }
        acc += (f16_at(blk, 208) * d_a[b]) * isum as f32;
    }
    acc
}

/// `rows` of `w` for every token of `a`.
pub(super) fn run_rows(w: &DenseLinear, a: &DenseActivations, rows: Range<usize>, out: &SharedOut<'_, f32>) {
    let format = w.format();
    for r in rows {
        let row = w.row(r);
        for t in 0..a.m() {
            let (q, d) = (a.values(t), a.scales(t));
            let y = match format {
                DenseFormat::Q8_0 | DenseFormat::Q4_0 | DenseFormat::Q4_1 => {
                    dot_block32(format, row, q, d, a.scaled_sums(t))
                }
                DenseFormat::Q4_K => dot_q4_k(row, q, d, a.sums(t)),
                DenseFormat::Q6_K => dot_q6_k(row, q, d),
                _ => scalar::dot_row(format, row, a, t),
            };
            out.write(t, r, y);
        }
    }
}
