//! Q4_0 and Q4_1: blocks of 32 weights with 4-bit quants.
//!
//! * Q4_0, 18 bytes: `d` (f16), then 16 bytes `qs`; byte `j` holds element `j` in its low
//!   nibble and element `j + 16` in its high nibble; `x = (q - 8) * d`.
//! * Q4_1, 20 bytes: `d` (f16), `m` (f16), then `qs` as in Q4_0; `x = q * d + m`.
//!
//! Q4_1 is here because llama.cpp writes it for small models (the SmolLM2 test file uses it).

use super::{check_blocks, f16_at, FormatError, GgmlType};

pub const BLOCK: usize = 32;
pub const Q4_0_BLOCK_BYTES: usize = 18;
pub const Q4_1_BLOCK_BYTES: usize = 20;

/// Decodes Q4_0 bytes into `out` (`out.len()` elements).
pub fn dequantize_q4_0(bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    check_blocks(GgmlType::Q4_0, out.len(), BLOCK, Q4_0_BLOCK_BYTES, bytes.len())?;
    for (blk, o) in bytes.chunks_exact(Q4_0_BLOCK_BYTES).zip(out.chunks_exact_mut(BLOCK)) {
        let d = f16_at(blk, 0);
        let (lo, hi) = o.split_at_mut(BLOCK / 2);
        for (j, &q) in blk[2..].iter().enumerate() {
            lo[j] = (i32::from(q & 0x0F) - 8) as f32 * d;
            hi[j] = (i32::from(q >> 4) - 8) as f32 * d;
        }
    }
    Ok(())
}

/// Decodes Q4_1 bytes into `out` (`out.len()` elements).
pub fn dequantize_q4_1(bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    check_blocks(GgmlType::Q4_1, out.len(), BLOCK, Q4_1_BLOCK_BYTES, bytes.len())?;
    for (blk, o) in bytes.chunks_exact(Q4_1_BLOCK_BYTES).zip(out.chunks_exact_mut(BLOCK)) {
        let d = f16_at(blk, 0);
        let m = f16_at(blk, 2);
        let (lo, hi) = o.split_at_mut(BLOCK / 2);
        for (j, &q) in blk[4..].iter().enumerate() {
            lo[j] = f32::from(q & 0x0F) * d + m;
            hi[j] = f32::from(q >> 4) * d + m;
        }
    }
    Ok(())
}
