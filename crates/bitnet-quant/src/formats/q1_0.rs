//! Q1_0 (llama.cpp, type id 41): one bit per weight, in blocks of 128 of 18 bytes.
//!
//! Layout of a block `x[0..128]`: `d` (f16) then `qs[16]`. Element `j` is bit `j % 8` (bit 0
//! lowest) of `qs[j / 8]`: 1 means `+d`, 0 means `-d`. There is no zero. The reference quantizer
//! (`quantize_row_q1_0_ref`) stores `d = Σ|x| / 128` (summed in f32, in element order) and the
//! sign of each element, `x >= 0` giving 1.
//!
//! As ternary codes a block is `{-1, +1}` with its scale `d`; codes holding a 0 cannot be
//! written in this format.

use super::{check_blocks, check_multiple, f16_at, float, FormatError, GgmlType, TernaryCodes};

pub const BLOCK: usize = 128;
pub const BLOCK_BYTES: usize = 18;
const QS_AT: usize = 2;

/// The code (`±1`) of element `j` of a block.
#[inline]
fn code_of(blk: &[u8], j: usize) -> i8 {
    if (blk[QS_AT + j / 8] >> (j % 8)) & 1 == 1 {
        1
    } else {
        -1
    }
}

/// Decodes Q1_0 bytes into `out` (`out.len()` elements).
pub fn dequantize(bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    check_blocks(GgmlType::Q1_0, out.len(), BLOCK, BLOCK_BYTES, bytes.len())?;
    for (blk, o) in bytes.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(BLOCK)) {
        let d = f16_at(blk, 0);
        for (j, v) in o.iter_mut().enumerate() {
            *v = if code_of(blk, j) > 0 { d } else { -d };
        }
    }
    Ok(())
}

/// The exact codes (`±1`) and per-block scales of Q1_0 bytes holding `n` elements.
pub fn extract(bytes: &[u8], n: usize) -> Result<TernaryCodes, FormatError> {
    let blocks = check_blocks(GgmlType::Q1_0, n, BLOCK, BLOCK_BYTES, bytes.len())?;
    let mut codes = vec![0i8; n];
    let mut scales = Vec::with_capacity(blocks);
    for (blk, c) in bytes.chunks_exact(BLOCK_BYTES).zip(codes.chunks_exact_mut(BLOCK)) {
        scales.push(f16_at(blk, 0));
        for (j, v) in c.iter_mut().enumerate() {
            *v = code_of(blk, j);
        }
    }
    Ok(TernaryCodes { codes, scales, block_len: BLOCK })
}

/// Packs codes in `{-1, +1}` with one scale per 128-element block (stored as f16). A 0 code is
/// an error: the format has no zero.
pub fn pack(codes: &[i8], scales: &[f32]) -> Result<Vec<u8>, FormatError> {
    let blocks = check_multiple(GgmlType::Q1_0, codes.len(), BLOCK)?;
    if scales.len() != blocks {
        return Err(FormatError::ScaleCount {
            format: GgmlType::Q1_0,
            what: "scale",
            expected: blocks,
            got: scales.len(),
        });
    }
    if let Some(i) = codes.iter().position(|&c| c != 1 && c != -1) {
        return Err(FormatError::NotSign { format: GgmlType::Q1_0, index: i, code: i32::from(codes[i]) });
    }
    let mut out = vec![0u8; blocks * BLOCK_BYTES];
    for ((y, c), &d) in out.chunks_exact_mut(BLOCK_BYTES).zip(codes.chunks_exact(BLOCK)).zip(scales) {
        y[..QS_AT].copy_from_slice(&float::f32_to_f16_bits(d).to_le_bytes());
        for (j, &v) in c.iter().enumerate() {
            if v > 0 {
                y[QS_AT + j / 8] |= 1 << (j % 8);
            }
        }
    }
    Ok(out)
}

/// Encodes `x` (a multiple of 128 elements) as Q1_0 like `quantize_row_q1_0_ref`: the mean of
/// `|x|` per block and the sign of every element (`x >= 0` is `+`; NaN is `-`).
pub fn quantize(x: &[f32]) -> Result<Vec<u8>, FormatError> {
    check_multiple(GgmlType::Q1_0, x.len(), BLOCK)?;
    let codes: Vec<i8> = x.iter().map(|&v| if v >= 0.0 { 1 } else { -1 }).collect();
    let scales: Vec<f32> =
        x.chunks_exact(BLOCK).map(|b| b.iter().fold(0.0f32, |s, v| s + v.abs()) / BLOCK as f32).collect();
    pack(&codes, &scales)
}
