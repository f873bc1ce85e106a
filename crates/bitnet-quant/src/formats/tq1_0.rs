//! TQ1_0 (llama.cpp): ternary weights at 1.6875 bits, in blocks of 256 of 54 bytes.
//!
//! Layout of a block `x[0..256]`: `qs[48]`, `qh[4]`, then `d` (f16, the block's `max|x|`).
//! Codes are `q + 1 ∈ {0, 1, 2}` (trits), packed in base 3 with the first element as the
//! most significant trit:
//! * `qs[m]`, `m < 32`: the 5 trits of elements `m + 32n`, `n = 0..5` (elements 0..160);
//! * `qs[32 + m]`, `m < 16`: the 5 trits of elements `160 + m + 16n`, `n = 0..5` (160..240);
//! * `qh[j]`, `j < 4`: the 4 trits of elements `240 + j + 4n`, `n = 0..4`, then a 0 trit so
//!   that the first is again the most significant of five (240..256).
//!
//! A packed value `v ∈ [0, 243)` is stored as the byte `ceil(v * 256 / 243)`, a fixed-point
//! fraction of 1, so trit `k` (k = 0 most significant) is `((byte * 3^k) mod 256) * 3 >> 8`:
//! a multiply and a shift, no division. Every byte decodes to valid trits, so extraction
//! cannot meet a non-ternary code.

use super::{
    check_blocks, check_multiple, f16_at, float, tq2_0::absmax_ternary_blocks, FormatError, GgmlType,
    TernaryCodes,
};

pub const BLOCK: usize = 256;
pub const BLOCK_BYTES: usize = 54;
const D_AT: usize = 52;

/// Trit `k` (0 = most significant) of a packed byte, in {0, 1, 2}.
#[inline]
fn trit(byte: u8, k: u32) -> u8 {
    let shifted = byte.wrapping_mul(3u8.pow(k));
    ((u16::from(shifted) * 3) >> 8) as u8
}

/// Packs five trits (first most significant) as the fixed-point byte.
#[inline]
fn pack5(trits: [u8; 5]) -> u8 {
    let v = trits.iter().fold(0u16, |acc, &t| acc * 3 + u16::from(t));
    ((v * 256).div_ceil(243)) as u8
}

/// For each byte of a block (`qs` then `qh`), the elements of its trits in order; the last
/// trit of a `qh` byte is padding and maps to `None`.
fn byte_elements(byte: usize) -> [Option<usize>; 5] {
    let mut e = [None; 5];
    for (n, slot) in e.iter_mut().enumerate() {
        *slot = match byte {
            0..=31 => Some(byte + 32 * n),
            32..=47 => Some(160 + (byte - 32) + 16 * n),
            _ if n < 4 => Some(240 + (byte - 48) + 4 * n),
            _ => None,
        };
    }
    e
}

/// Calls `f(element, code)` for the 256 trits of a block.
#[inline]
fn for_each_trit(blk: &[u8], mut f: impl FnMut(usize, u8)) {
    for (b, &byte) in blk[..D_AT].iter().enumerate() {
        for (k, e) in byte_elements(b).into_iter().enumerate() {
            if let Some(e) = e {
                f(e, trit(byte, k as u32));
            }
        }
    }
}

/// Decodes TQ1_0 bytes into `out` (`out.len()` elements).
pub fn dequantize(bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    check_blocks(GgmlType::TQ1_0, out.len(), BLOCK, BLOCK_BYTES, bytes.len())?;
    for (blk, o) in bytes.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(BLOCK)) {
        let d = f16_at(blk, D_AT);
        for_each_trit(blk, |e, t| o[e] = (i32::from(t) - 1) as f32 * d);
    }
    Ok(())
}

/// The exact codes and per-block scales of TQ1_0 bytes holding `n` elements.
pub fn extract(bytes: &[u8], n: usize) -> Result<TernaryCodes, FormatError> {
    let blocks = check_blocks(GgmlType::TQ1_0, n, BLOCK, BLOCK_BYTES, bytes.len())?;
    let mut codes = vec![0i8; n];
    let mut scales = Vec::with_capacity(blocks);
    for (blk, c) in bytes.chunks_exact(BLOCK_BYTES).zip(codes.chunks_exact_mut(BLOCK)) {
        scales.push(f16_at(blk, D_AT));
        for_each_trit(blk, |e, t| c[e] = t as i8 - 1);
    }
    Ok(TernaryCodes { codes, scales, block_len: BLOCK })
}

/// Packs exact codes in {-1, 0, +1} with one scale per 256-element block (stored as f16).
pub fn pack(codes: &[i8], scales: &[f32]) -> Result<Vec<u8>, FormatError> {
    let blocks = check_multiple(GgmlType::TQ1_0, codes.len(), BLOCK)?;
    if scales.len() != blocks {
        return Err(FormatError::ScaleCount {
            format: GgmlType::TQ1_0,
            what: "scale",
            expected: blocks,
            got: scales.len(),
        });
    }
    if let Some(i) = codes.iter().position(|c| !(-1..=1).contains(c)) {
        return Err(FormatError::NotTernary { format: GgmlType::TQ1_0, index: i, code: i32::from(codes[i]) });
    }
    let mut out = vec![0u8; blocks * BLOCK_BYTES];
    for ((y, c), &d) in out.chunks_exact_mut(BLOCK_BYTES).zip(codes.chunks_exact(BLOCK)).zip(scales) {
        for (b, slot) in y[..D_AT].iter_mut().enumerate() {
            let mut trits = [0u8; 5];
            for (t, e) in trits.iter_mut().zip(byte_elements(b)) {
                if let Some(e) = e {
                    *t = (c[e] + 1) as u8;
                }
            }
            *slot = pack5(trits);
        }
        y[D_AT..].copy_from_slice(&float::f32_to_f16_bits(d).to_le_bytes());
    }
    Ok(out)
}

/// Encodes `x` (a multiple of 256 elements) as TQ1_0 like `quantize_row_tq1_0_ref`:
/// `d = max|x|` per block, code `round(x / d)` (ties away from zero), `1/d` from the f32 `d`.
pub fn quantize(x: &[f32]) -> Result<Vec<u8>, FormatError> {
    let (codes, scales) = absmax_ternary_blocks(GgmlType::TQ1_0, x)?;
    pack(&codes, &scales)
}
