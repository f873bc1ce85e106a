//! TQ1_0 (llama.cpp): ternary weights at 1.6875 bits, in blocks of 256 of 54 bytes; and
//! PTQ1_0 (PrismML's fork, type id 143): the same packing in blocks of 128 of 28 bytes.
//!
//! Layout of a block `x[0..B]`: `qs[(B − B/16) / 5]`, `qh[B / 64]`, then `d` (f16, the block's
//! `max|x|`). Codes are `q + 1 ∈ {0, 1, 2}` (trits), packed in base 3 with the first element as
//! the most significant trit. `qs` is filled in stages of 32, 16 and 8 bytes, each used while it
//! fits: a stage of `c` bytes starting at byte `j0` holds elements `5·j0 + m + c·n` in trit `n`
//! of its byte `m`. Then `qh[h]` holds the 4 trits of elements `5·|qs| + h + |qh|·n`,
//! `n = 0..4`, then a 0 trit so that the first is again the most significant of five.
//! * TQ1_0 (B = 256): `qs[48]` = a stage of 32 (elements 0..160) and one of 16 (160..240);
//!   `qh[4]` holds elements 240..256.
//! * PTQ1_0 (B = 128): `qs[24]` = a stage of 16 (elements 0..80) and one of 8 (80..120);
//!   `qh[2]` holds elements 120..128.
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
/// Elements per block of PTQ1_0.
pub const PTQ1_0_BLOCK: usize = 128;
/// Bytes per block of PTQ1_0.
pub const PTQ1_0_BLOCK_BYTES: usize = 28;

/// The geometry of one of the two base-3 formats.
struct Base3 {
    block: usize,
}

impl Base3 {
    fn of(format: GgmlType) -> Self {
        let block = if format == GgmlType::PTQ1_0 { PTQ1_0_BLOCK } else { BLOCK };
        Base3 { block }
    }
    fn qs_len(&self) -> usize {
        (self.block - 4 * self.block / 64) / 5
    }
    fn qh_len(&self) -> usize {
        self.block / 64
    }
    /// Where the scale starts.
    fn d_at(&self) -> usize {
        self.qs_len() + self.qh_len()
    }
    fn block_bytes(&self) -> usize {
        self.d_at() + 2
    }

    /// For each byte of a block (`qs` then `qh`), the elements of its trits in order; the last
    /// trit of a `qh` byte is padding and maps to `None`.
    fn byte_elements(&self) -> Vec<[Option<usize>; 5]> {
        let (qs, qh) = (self.qs_len(), self.qh_len());
        let mut table = vec![[None; 5]; qs + qh];
        let mut j0 = 0;
        for c in [32, 16, 8] {
            while j0 + c <= qs {
                for m in 0..c {
                    table[j0 + m] = std::array::from_fn(|n| Some(5 * j0 + m + c * n));
                }
                j0 += c;
            }
        }
        for h in 0..qh {
            table[qs + h] = std::array::from_fn(|n| (n < 4).then_some(5 * qs + h + qh * n));
        }
        table
    }
}

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

/// Calls `f(element, code)` for the trits of a block.
#[inline]
fn for_each_trit(table: &[[Option<usize>; 5]], blk: &[u8], mut f: impl FnMut(usize, u8)) {
    for (elements, &byte) in table.iter().zip(blk) {
        for (k, e) in elements.iter().enumerate() {
            if let Some(e) = *e {
                f(e, trit(byte, k as u32));
            }
        }
    }
}

/// Decodes TQ1_0 bytes into `out` (`out.len()` elements).
pub fn dequantize(bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    dequantize_base3(GgmlType::TQ1_0, bytes, out)
}

/// Decodes TQ1_0 or PTQ1_0 bytes into `out` (`out.len()` elements).
pub fn dequantize_base3(format: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    let l = Base3::of(format);
    check_blocks(format, out.len(), l.block, l.block_bytes(), bytes.len())?;
    let table = l.byte_elements();
    for (blk, o) in bytes.chunks_exact(l.block_bytes()).zip(out.chunks_exact_mut(l.block)) {
        let d = f16_at(blk, l.d_at());
        for_each_trit(&table, blk, |e, t| o[e] = (i32::from(t) - 1) as f32 * d);
    }
    Ok(())
}

/// The exact codes and per-block scales of TQ1_0 bytes holding `n` elements.
pub fn extract(bytes: &[u8], n: usize) -> Result<TernaryCodes, FormatError> {
    extract_base3(GgmlType::TQ1_0, bytes, n)
}

/// The exact codes and per-block scales of TQ1_0 or PTQ1_0 bytes holding `n` elements.
pub fn extract_base3(format: GgmlType, bytes: &[u8], n: usize) -> Result<TernaryCodes, FormatError> {
    let l = Base3::of(format);
    let blocks = check_blocks(format, n, l.block, l.block_bytes(), bytes.len())?;
    let table = l.byte_elements();
    let mut codes = vec![0i8; n];
    let mut scales = Vec::with_capacity(blocks);
    for (blk, c) in bytes.chunks_exact(l.block_bytes()).zip(codes.chunks_exact_mut(l.block)) {
        scales.push(f16_at(blk, l.d_at()));
        for_each_trit(&table, blk, |e, t| c[e] = t as i8 - 1);
    }
    Ok(TernaryCodes { codes, scales, block_len: l.block })
}

/// Packs exact codes in {-1, 0, +1} with one scale per 256-element block (stored as f16).
pub fn pack(codes: &[i8], scales: &[f32]) -> Result<Vec<u8>, FormatError> {
    pack_base3(GgmlType::TQ1_0, codes, scales)
}

/// Packs exact codes in {-1, 0, +1} with one scale per block of TQ1_0 or PTQ1_0 (stored as f16).
pub fn pack_base3(format: GgmlType, codes: &[i8], scales: &[f32]) -> Result<Vec<u8>, FormatError> {
    let l = Base3::of(format);
    let blocks = check_multiple(format, codes.len(), l.block)?;
    if scales.len() != blocks {
        return Err(FormatError::ScaleCount { format, what: "scale", expected: blocks, got: scales.len() });
    }
    if let Some(i) = codes.iter().position(|c| !(-1..=1).contains(c)) {
        return Err(FormatError::NotTernary { format, index: i, code: i32::from(codes[i]) });
    }
    let table = l.byte_elements();
    let mut out = vec![0u8; blocks * l.block_bytes()];
    for ((y, c), &d) in out.chunks_exact_mut(l.block_bytes()).zip(codes.chunks_exact(l.block)).zip(scales) {
        for (slot, elements) in y[..l.d_at()].iter_mut().zip(&table) {
            let trits: [u8; 5] = std::array::from_fn(|n| elements[n].map_or(0, |e| (c[e] + 1) as u8));
            *slot = pack5(trits);
        }
        y[l.d_at()..].copy_from_slice(&float::f32_to_f16_bits(d).to_le_bytes());
    }
    Ok(out)
}

/// Encodes `x` (a multiple of 256 elements) as TQ1_0 like `quantize_row_tq1_0_ref`:
/// `d = max|x|` per block, code `round(x / d)` (ties away from zero), `1/d` from the f32 `d`.
pub fn quantize(x: &[f32]) -> Result<Vec<u8>, FormatError> {
    quantize_base3(GgmlType::TQ1_0, x)
}

/// Encodes `x` as TQ1_0 or PTQ1_0 (`quantize_row_ptq1_0_ref` quantizes like TQ1_0, per 128).
pub fn quantize_base3(format: GgmlType, x: &[f32]) -> Result<Vec<u8>, FormatError> {
    let l = Base3::of(format);
    let (codes, scales) = absmax_ternary_blocks(format, l.block, x)?;
    pack_base3(format, &codes, &scales)
}
