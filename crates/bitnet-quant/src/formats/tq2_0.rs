//! TQ2_0 (llama.cpp): ternary weights, 2 bits each, in blocks of 256 of 66 bytes.
//!
//! Layout of a block of elements `x[0..256]`: `qs[64]` then `d` (f16, the block's
//! `max|x|`). `qs` is two 32-byte halves `j ∈ {0, 32}`; byte `qs[j + m]` holds elements
//! `4j + m + 32n` for `n = 0..4` in bits `2n..2n+2` (n = 0 lowest), as the code `q + 1` with
//! `q ∈ {-1, 0, +1}`. Value: `(code - 1) * d`. The code 3 never comes out of the quantizer; the
//! dequantizer turns it into `2d` like llama.cpp does, and code extraction rejects it.

use super::{check_blocks, check_multiple, f16_at, float, FormatError, GgmlType, TernaryCodes};

pub const BLOCK: usize = 256;
pub const BLOCK_BYTES: usize = 66;
const QS_BYTES: usize = 64;

/// The element of a block held in byte `byte` of `qs`, bits `2n..2n+2`.
#[inline]
fn element_of(byte: usize, n: usize) -> usize {
    let (j, m) = (byte / 32 * 32, byte % 32);
    4 * j + m + 32 * n
}

/// Decodes TQ2_0 bytes into `out` (`out.len()` elements).
pub fn dequantize(bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    check_blocks(GgmlType::TQ2_0, out.len(), BLOCK, BLOCK_BYTES, bytes.len())?;
    for (blk, o) in bytes.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(BLOCK)) {
        let d = f16_at(blk, QS_BYTES);
        for (b, &q) in blk[..QS_BYTES].iter().enumerate() {
            for n in 0..4 {
                let code = i32::from((q >> (2 * n)) & 3);
                o[element_of(b, n)] = (code - 1) as f32 * d;
            }
        }
    }
    Ok(())
}

/// The exact codes and per-block scales of TQ2_0 bytes holding `n` elements.
pub fn extract(bytes: &[u8], n: usize) -> Result<TernaryCodes, FormatError> {
    let blocks = check_blocks(GgmlType::TQ2_0, n, BLOCK, BLOCK_BYTES, bytes.len())?;
    let mut codes = vec![0i8; n];
    let mut scales = Vec::with_capacity(blocks);
    for (bi, (blk, c)) in bytes.chunks_exact(BLOCK_BYTES).zip(codes.chunks_exact_mut(BLOCK)).enumerate() {
        scales.push(f16_at(blk, QS_BYTES));
        for (b, &q) in blk[..QS_BYTES].iter().enumerate() {
            for n in 0..4 {
                let code = (q >> (2 * n)) & 3;
                let e = element_of(b, n);
                if code == 3 {
                    return Err(FormatError::NotTernary {
                        format: GgmlType::TQ2_0,
                        index: bi * BLOCK + e,
                        code: 2,
                    });
                }
                c[e] = code as i8 - 1;
            }
        }
    }
    Ok(TernaryCodes { codes, scales, block_len: BLOCK })
}

/// Packs exact codes in {-1, 0, +1} with one scale per 256-element block (stored as f16).
pub fn pack(codes: &[i8], scales: &[f32]) -> Result<Vec<u8>, FormatError> {
    let blocks = check_multiple(GgmlType::TQ2_0, codes.len(), BLOCK)?;
    if scales.len() != blocks {
        return Err(FormatError::ScaleCount {
            format: GgmlType::TQ2_0,
            what: "scale",
            expected: blocks,
            got: scales.len(),
        });
    }
    let mut out = vec![0u8; blocks * BLOCK_BYTES];
    for (bi, ((y, c), &d)) in
        out.chunks_exact_mut(BLOCK_BYTES).zip(codes.chunks_exact(BLOCK)).zip(scales).enumerate()
    {
        for (b, q) in y[..QS_BYTES].iter_mut().enumerate() {
            for n in 0..4 {
                let e = element_of(b, n);
                let v = c[e];
                if !(-1..=1).contains(&v) {
                    return Err(FormatError::NotTernary {
                        format: GgmlType::TQ2_0,
                        index: bi * BLOCK + e,
                        code: i32::from(v),
                    });
                }
                *q |= ((v + 1) as u8) << (2 * n);
            }
        }
        y[QS_BYTES..].copy_from_slice(&float::f32_to_f16_bits(d).to_le_bytes());
    }
    Ok(out)
}

/// Encodes `x` (a multiple of 256 elements) as TQ2_0 like `quantize_row_tq2_0_ref`:
/// `d = max|x|` per block, code `round(x / d)` (ties away from zero), `1/d` from the f32 `d`.
pub fn quantize(x: &[f32]) -> Result<Vec<u8>, FormatError> {
    let (codes, scales) = absmax_ternary_blocks(GgmlType::TQ2_0, BLOCK, x)?;
    pack(&codes, &scales)
}

/// The codes and per-block scales the absmax ternary quantizers store (TQ1_0, TQ2_0, Q2_0,
/// PQ2_0, PTQ1_0): `d = max|x|` per block of `block`, code `round(x / d)` (ties away from zero),
/// `1/d` from the f32 `d`.
pub(crate) fn absmax_ternary_blocks(
    format: GgmlType,
    block: usize,
    x: &[f32],
) -> Result<(Vec<i8>, Vec<f32>), FormatError> {
    let blocks = check_multiple(format, x.len(), block)?;
    let mut codes = vec![0i8; x.len()];
    let mut scales = Vec::with_capacity(blocks);
    for (xb, c) in x.chunks_exact(block).zip(codes.chunks_exact_mut(block)) {
        let (d, id) = absmax_scale(xb);
        scales.push(d);
        for (ci, &v) in c.iter_mut().zip(xb) {
            *ci = round_ternary(v * id);
        }
    }
    Ok((codes, scales))
}

/// `(max|x|, 1/max|x|)`, the inverse 0 for an all-zero block.
fn absmax_scale(x: &[f32]) -> (f32, f32) {
    let d = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}

/// `lroundf(v)` limited to {-1, 0, +1} (NaN gives 0).
#[inline]
fn round_ternary(v: f32) -> i8 {
    (v.round() as i32).clamp(-1, 1) as i8
}
