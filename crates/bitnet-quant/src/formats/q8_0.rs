//! Q8_0: blocks of 32 weights, 34 bytes: `d` (f16) then 32 `i8` quants; `x = q * d`.
//!
//! Quantization (`quantize_row_q8_0_ref`): `d = max|x| / 127`, `q = round(x / d)` with ties away
//! from zero; `1/d` is taken from the f32 `d` before it is rounded to f16.

use super::{check_blocks, check_multiple, f16_at, float::f32_to_f16_bits, FormatError, GgmlType};

pub const BLOCK: usize = 32;
pub const BLOCK_BYTES: usize = 34;

/// Decodes Q8_0 bytes into `out` (`out.len()` elements).
pub fn dequantize(bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    check_blocks(GgmlType::Q8_0, out.len(), BLOCK, BLOCK_BYTES, bytes.len())?;
    for (blk, o) in bytes.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(BLOCK)) {
        let d = f16_at(blk, 0);
        for (v, &q) in o.iter_mut().zip(&blk[2..]) {
            *v = f32::from(q as i8) * d;
        }
    }
    Ok(())
}

/// Encodes `x` (a multiple of 32 elements) as Q8_0.
pub fn quantize(x: &[f32]) -> Result<Vec<u8>, FormatError> {
    let blocks = check_multiple(GgmlType::Q8_0, x.len(), BLOCK)?;
    let mut out = Vec::with_capacity(blocks * BLOCK_BYTES);
    for xb in x.chunks_exact(BLOCK) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f32_to_f16_bits(d).to_le_bytes());
        // `as i8` saturates, and NaN becomes 0, so odd input cannot wrap.
        out.extend(xb.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    Ok(out)
}
