//! The definition of every dense product: one row of weights (its stored bytes) against one
//! token's activations, in plain Rust.
//!
//! The integer formats sum each block exactly in i32 (`isum`), then combine the blocks in f32 in
//! block order: `acc += (d_w · d_a) · (isum as f32)`, each operation rounded on its own (no fused
//! multiply-add). The SIMD kernels reproduce this order exactly.

use std::ops::Range;

use super::{DenseActivations, DenseFormat, DenseLinear, QK, QK_K};
use crate::formats::float::{bf16_bits_to_f32, f16_bits_to_f32};
use crate::kernels::SharedOut;

#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// F32 weights: `Σ_c w_c · x_c`, summed in column order.
pub fn dot_f32(w: &[u8], x: &[f32]) -> f32 {
    w.chunks_exact(4)
        .zip(x)
        .fold(0.0f32, |acc, (b, &v)| acc + f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * v)
}

/// F16 weights, widened exactly.
pub fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    w.chunks_exact(2).zip(x).fold(0.0f32, |acc, (b, &v)| acc + f16_at(b, 0) * v)
}

/// BF16 weights, widened exactly.
pub fn dot_bf16(w: &[u8], x: &[f32]) -> f32 {
    w.chunks_exact(2)
        .zip(x)
        .fold(0.0f32, |acc, (b, &v)| acc + bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])) * v)
}

/// Q8_0 weights (`d` f16, 32 × i8) against Q8 blocks: `Σ_b (d_w·d_a) · Σ w·a`.
pub fn dot_q8_0(w: &[u8], a: &[i8], d_a: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for ((blk, ab), &da) in w.chunks_exact(34).zip(a.chunks_exact(QK)).zip(d_a) {
        let isum: i32 = blk[2..].iter().zip(ab).map(|(&q, &v)| i32::from(q as i8) * i32::from(v)).sum();
        acc += (f16_at(blk, 0) * da) * isum as f32;
    }
    acc
}

/// Q4_0 weights (`d` f16, 16 bytes of nibbles: element `j` low, `j + 16` high; value `q - 8`).
pub fn dot_q4_0(w: &[u8], a: &[i8], d_a: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for ((blk, ab), &da) in w.chunks_exact(18).zip(a.chunks_exact(QK)).zip(d_a) {
        let mut isum = 0i32;
        for (j, &byte) in blk[2..].iter().enumerate() {
            isum += (i32::from(byte & 0x0F) - 8) * i32::from(ab[j]);
            isum += (i32::from(byte >> 4) - 8) * i32::from(ab[j + 16]);
        }
        acc += (f16_at(blk, 0) * da) * isum as f32;
    }
    acc
}

/// Q4_1 weights (`d`, `m` f16, nibbles as Q4_0; value `d·q + m`):
/// `Σ_b (d_w·d_a) · Σ q·a  +  Σ_b m_w · s_a`, the two sums kept apart and added at the end.
pub fn dot_q4_1(w: &[u8], a: &[i8], d_a: &[f32], s_a: &[f32]) -> f32 {
    let (mut acc, mut acc_min) = (0.0f32, 0.0f32);
    for (((blk, ab), &da), &sa) in w.chunks_exact(20).zip(a.chunks_exact(QK)).zip(d_a).zip(s_a) {
        let mut isum = 0i32;
        for (j, &byte) in blk[4..].iter().enumerate() {
            isum += i32::from(byte & 0x0F) * i32::from(ab[j]);
            isum += i32::from(byte >> 4) * i32::from(ab[j + 16]);
        }
        acc += (f16_at(blk, 0) * da) * isum as f32;
        acc_min += f16_at(blk, 2) * sa;
    }
    acc + acc_min
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K `scales` array (`get_scale_min_k4`).
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K weights against Q8_K: per super-block `isum = Σ_j sc_j · Σ_{32} q·a` and
/// `msum = Σ_j m_j · (bsum_{2j} + bsum_{2j+1})`; the result is
/// `Σ_b (d·d_a) · isum_b  −  Σ_b (dmin·d_a) · msum_b`, the two sums kept apart.
pub fn dot_q4_k(w: &[u8], a: &[i8], d_a: &[f32], bsums: &[i32]) -> f32 {
    let (mut acc, mut acc_min) = (0.0f32, 0.0f32);
    for (b, ((blk, ab), &da)) in w.chunks_exact(144).zip(a.chunks_exact(QK_K)).zip(d_a).enumerate() {
        let (scales, qs) = (&blk[4..16], &blk[16..]);
        let (mut isum, mut msum) = (0i32, 0i32);
        for c in 0..4 {
            let q = &qs[32 * c..32 * c + 32];
            let (sc_lo, m_lo) = scale_min_k4(2 * c, scales);
            let (sc_hi, m_hi) = scale_min_k4(2 * c + 1, scales);
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                lo += i32::from(q[l] & 0x0F) * i32::from(ab[64 * c + l]);
                hi += i32::from(q[l] >> 4) * i32::from(ab[64 * c + 32 + l]);
            }
            isum += i32::from(sc_lo) * lo + i32::from(sc_hi) * hi;
            let bs = &bsums[16 * b + 4 * c..16 * b + 4 * c + 4];
            msum += i32::from(m_lo) * (bs[0] + bs[1]) + i32::from(m_hi) * (bs[2] + bs[3]);
        }
        acc += (f16_at(blk, 0) * da) * isum as f32;
        acc_min += (f16_at(blk, 2) * da) * msum as f32;
    }
    acc - acc_min
}

/// The 6-bit value of element `i` (0..256) of a Q6_K block, before the `- 32`.
#[inline]
pub(crate) fn q6_k_value(blk: &[u8], i: usize) -> u8 {
    let (h, l) = (i / 128, i % 128);
    let (ql, qh) = (&blk[64 * h..64 * h + 64], &blk[128 + 32 * h..128 + 32 * h + 32]);
    let (part, l) = (l / 32, l % 32);
    let low = match part {
        0 => ql[l] & 0x0F,
        1 => ql[l + 32] & 0x0F,
        2 => ql[l] >> 4,
        _ => ql[l + 32] >> 4,
    };
    low | (((qh[l] >> (2 * part)) & 3) << 4)
}

/// Q6_K weights against Q8_K: per super-block `isum = Σ_{g<16} sc_g · Σ_{16} (q − 32)·a`,
/// then `Σ_b (d·d_a) · isum_b`.
pub fn dot_q6_k(w: &[u8], a: &[i8], d_a: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for ((blk, ab), &da) in w.chunks_exact(210).zip(a.chunks_exact(QK_K)).zip(d_a) {
        let mut isum = 0i32;
        for g in 0..16 {
            let sc = i32::from(blk[192 + g] as i8);
            let part: i32 =
                (16 * g..16 * g + 16).map(|i| (i32::from(q6_k_value(blk, i)) - 32) * i32::from(ab[i])).sum();
            isum += sc * part;
        }
        acc += (f16_at(blk, 208) * da) * isum as f32;
    }
    acc
}

/// The reference product of stored row `w` (of `format`) with token `t` of `a`.
pub fn dot_row(format: DenseFormat, w: &[u8], a: &DenseActivations, t: usize) -> f32 {
    let (q, d) = (a.values(t), a.scales(t));
    match format {
        DenseFormat::F32 => dot_f32(w, a.floats(t)),
        DenseFormat::F16 => dot_f16(w, a.floats(t)),
        DenseFormat::BF16 => dot_bf16(w, a.floats(t)),
        DenseFormat::Q8_0 => dot_q8_0(w, q, d),
        DenseFormat::Q4_0 => dot_q4_0(w, q, d),
        DenseFormat::Q4_1 => dot_q4_1(w, q, d, a.scaled_sums(t)),
        DenseFormat::Q4_K => dot_q4_k(w, q, d, a.sums(t)),
        DenseFormat::Q6_K => dot_q6_k(w, q, d),
        ternary => dot_decoded(ternary, w, a.floats(t)),
    }
}

/// A row of a ternary table against f32 activations: the decoded row (exact: code times an f16
/// scale), `Σ_c w_c · x_c` summed in column order. Decodes a block at a time, allocating nothing.
pub fn dot_decoded(format: DenseFormat, w: &[u8], x: &[f32]) -> f32 {
    let (block, block_bytes) = format.ggml().block_geometry();
    let (block, block_bytes) = (block as usize, block_bytes as usize);
    let mut decoded = [0.0f32; QK_K];
    let mut acc = 0.0f32;
    for (blk, xb) in w.chunks_exact(block_bytes).zip(x.chunks_exact(block)) {
        // Rows hold whole blocks of at most 256 (checked when the matrix was made).
        let _ = crate::formats::dequantize_into(format.ggml(), blk, block, &mut decoded[..block]);
        acc = decoded[..block].iter().zip(xb).fold(acc, |acc, (&w, &v)| acc + w * v);
    }
    acc
}

/// `rows` of `w` for every token of `a` (the scalar kernel path).
pub(crate) fn run_rows(w: &DenseLinear, a: &DenseActivations, rows: Range<usize>, out: &SharedOut<'_, f32>) {
    if w.float_activations() {
        return run_rows_dequantized(w, a, rows, out);
    }
    for r in rows {
        let row = w.row(r);
        for t in 0..a.m() {
            out.write(t, r, dot_row(w.format(), row, a, t));
        }
    }
}

thread_local! {
    /// One decoded row for [`run_rows_dequantized`], per thread.
    static DECODED_ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `rows` of a block-format `w` running on f32 activations: each row decoded once to f32, then
/// dotted with every token (`bitnet_core::dense::dot_f32`: eight partial sums in a fixed
/// order, so a token's value does not depend on the batch it is in).
pub(crate) fn run_rows_dequantized(
    w: &DenseLinear,
    a: &DenseActivations,
    rows: Range<usize>,
    out: &SharedOut<'_, f32>,
) {
    DECODED_ROW.with(|cell| {
        let mut own = Vec::new();
        let mut borrowed = cell.try_borrow_mut();
        // Re-entered on this thread (a pool worker inside another product): a buffer of its own.
        let row = match borrowed.as_mut() {
            Ok(b) => &mut **b,
            Err(_) => &mut own,
        };
        row.resize(w.cols(), 0.0);
        for r in rows {
            // Rows hold whole blocks and `r` is in range (both checked when `w` was built); were
            // that broken, the outputs say so rather than keep stale values.
            if w.dequantize_row(r, row).is_err() {
                row.fill(f32::NAN);
            }
            for t in 0..a.m() {
                out.write(t, r, bitnet_core::dense::dot_f32(row, a.floats(t)));
            }
        }
    });
}
