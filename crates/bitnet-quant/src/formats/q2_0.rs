//! Q2_0 (llama.cpp, type id 42) and PQ2_0 (PrismML's fork, type id 142): 2-bit codes with one
//! f16 scale per group, 64 weights (18 bytes) for Q2_0 and 128 (34 bytes) for PQ2_0.
//!
//! Layout of a block `x[0..G]`: `d` (f16) then `qs[G / 4]`. Element `j` is the 2-bit code in
//! bits `2·(j % 4)..2·(j % 4) + 2` of `qs[j / 4]` (the lowest bits first); code `q` is worth
//! `(q − 1)·d`, so 0, 1, 2, 3 mean `-d, 0, +d, +2d`. The reference quantizers
//! (`quantize_row_q2_0_ref`, `quantize_row_pq2_0_ref`) store `d = max|x|` and
//! `round(x / d)` (ties away from zero, `1/d` from the f32 `d`) plus one, so they never write
//! code 3; the dequantizer turns it into `+2d` as llama.cpp does, and ternary code extraction
//! rejects it.

use super::{check_blocks, f16_at, float, tq2_0::absmax_ternary_blocks, FormatError, GgmlType, TernaryCodes};

/// Elements per block of Q2_0.
pub const Q2_0_BLOCK: usize = 64;
/// Elements per block of PQ2_0.
pub const PQ2_0_BLOCK: usize = 128;

/// The block of `format` (Q2_0 or PQ2_0) and its bytes.
fn geometry(format: GgmlType) -> (usize, usize) {
    let block = if format == GgmlType::PQ2_0 { PQ2_0_BLOCK } else { Q2_0_BLOCK };
    (block, 2 + block / 4)
}

/// The 2-bit code of element `j` of a block.
#[inline]
fn code_of(blk: &[u8], j: usize) -> u8 {
    (blk[2 + j / 4] >> (2 * (j % 4))) & 3
}

/// Decodes Q2_0 or PQ2_0 bytes into `out` (`out.len()` elements).
pub fn dequantize(format: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    let (block, block_bytes) = geometry(format);
    check_blocks(format, out.len(), block, block_bytes, bytes.len())?;
    for (blk, o) in bytes.chunks_exact(block_bytes).zip(out.chunks_exact_mut(block)) {
        let d = f16_at(blk, 0);
        for (j, v) in o.iter_mut().enumerate() {
            *v = (i32::from(code_of(blk, j)) - 1) as f32 * d;
        }
    }
    Ok(())
}

/// The exact ternary codes and per-block scales of Q2_0 or PQ2_0 bytes holding `n` elements;
/// code 3 (`+2d`) is not ternary and is an error naming the element.
pub fn extract(format: GgmlType, bytes: &[u8], n: usize) -> Result<TernaryCodes, FormatError> {
    let (block, block_bytes) = geometry(format);
    let blocks = check_blocks(format, n, block, block_bytes, bytes.len())?;
    let mut codes = vec![0i8; n];
    let mut scales = Vec::with_capacity(blocks);
    for (bi, (blk, c)) in bytes.chunks_exact(block_bytes).zip(codes.chunks_exact_mut(block)).enumerate() {
        scales.push(f16_at(blk, 0));
        for (j, v) in c.iter_mut().enumerate() {
            let q = code_of(blk, j);
            if q == 3 {
                return Err(FormatError::NotTernary { format, index: bi * block + j, code: 2 });
            }
            *v = q as i8 - 1;
        }
    }
    Ok(TernaryCodes { codes, scales, block_len: block })
}

/// Packs exact codes in {-1, 0, +1} with one scale per block (stored as f16).
pub fn pack(format: GgmlType, codes: &[i8], scales: &[f32]) -> Result<Vec<u8>, FormatError> {
    let (block, block_bytes) = geometry(format);
    let blocks = super::check_multiple(format, codes.len(), block)?;
    if scales.len() != blocks {
        return Err(FormatError::ScaleCount { format, what: "scale", expected: blocks, got: scales.len() });
    }
    if let Some(i) = codes.iter().position(|c| !(-1..=1).contains(c)) {
        return Err(FormatError::NotTernary { format, index: i, code: i32::from(codes[i]) });
    }
    let mut out = vec![0u8; blocks * block_bytes];
    for ((y, c), &d) in out.chunks_exact_mut(block_bytes).zip(codes.chunks_exact(block)).zip(scales) {
        y[..2].copy_from_slice(&float::f32_to_f16_bits(d).to_le_bytes());
        for (j, &v) in c.iter().enumerate() {
            y[2 + j / 4] |= ((v + 1) as u8) << (2 * (j % 4));
        }
    }
    Ok(out)
}

/// Encodes `x` (a multiple of the block) like the reference quantizers: `d = max|x|` per block,
/// code `round(x / d)`.
pub fn quantize(format: GgmlType, x: &[f32]) -> Result<Vec<u8>, FormatError> {
    let (block, _) = geometry(format);
    let (codes, scales) = absmax_ternary_blocks(format, block, x)?;
    pack(format, &codes, &scales)
}
