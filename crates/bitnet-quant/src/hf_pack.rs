//! The Hugging Face 2-bit packing of ternary weights (`integrations/bitnet.py`).
//!
//! `W[out, in]` becomes `u8[out/4, in]`, packed along the output rows in four contiguous
//! blocks: bits `2i..2i+1` of `packed[r, c]` hold `W[i*R + r, c] + 1` with `R = out/4`.

use crate::QuantError;

/// Unpacks `u8[rows/4, cols]` to ternary `i8[rows, cols]` (row-major).
/// The unused code 3 is an error: it has no ternary value.
pub fn unpack_hf(packed: &[u8], rows: usize, cols: usize) -> Result<Vec<i8>, QuantError> {
    check_packed(packed, rows, cols)?;
    let mut t = vec![0i8; rows * cols];
    unpack_rows(packed, rows, cols, 0, &mut t);
    Ok(t)
}

/// Checks that `packed` is `u8[rows/4, cols]` without the unused code 3, which has no ternary
/// value: after this, [`unpack_rows`] cannot fail.
pub fn check_packed(packed: &[u8], rows: usize, cols: usize) -> Result<(), QuantError> {
    if !rows.is_multiple_of(4) || Some(packed.len()) != (rows / 4).checked_mul(cols) {
        return Err(QuantError::Shape(format!(
            "packed weight of {} bytes cannot hold [{rows}, {cols}] in the 2-bit HF layout \
             (needs rows divisible by 4 and {} bytes)",
            packed.len(),
            (rows / 4).saturating_mul(cols)
        )));
    }
    // A byte holds one code per quarter of the rows; any field equal to 3 is invalid.
    let has_code_3 = |b: u8| (0..4).any(|i| (b >> (2 * i)) & 3 == 3);
    if let Some(pos) = packed.iter().position(|&b| has_code_3(b)) {
        return Err(QuantError::Shape(format!(
            "packed weight holds the unused code 3 at packed row {}, column {}",
            pos / cols.max(1),
            pos % cols.max(1)
        )));
    }
    Ok(())
}

/// Unpacks the rows `first..first + out.len() / cols` of a [`check_packed`] matrix into `out`
/// (row-major), so that a loader can repack a block of rows at a time.
pub fn unpack_rows(packed: &[u8], rows: usize, cols: usize, first: usize, out: &mut [i8]) {
    let block = rows / 4;
    // Output row i*block + r takes field i of packed row r.
    for (k, dst) in out.chunks_exact_mut(cols.max(1)).enumerate() {
        let r = first + k;
        let shift = 2 * (r / block.max(1));
        let src = &packed[r % block.max(1) * cols..][..cols];
        for (d, &byte) in dst.iter_mut().zip(src) {
            *d = ((byte >> shift) & 3) as i8 - 1;
        }
    }
}

/// Packs ternary `i8[rows, cols]` into `u8[rows/4, cols]` (the inverse of [`unpack_hf`]).
pub fn pack_hf(t: &[i8], rows: usize, cols: usize) -> Result<Vec<u8>, QuantError> {
    if !rows.is_multiple_of(4) || t.len() != rows * cols {
        return Err(QuantError::Shape(format!(
            "cannot pack {} ternary values as [{rows}, {cols}] (rows must divide by 4)",
            t.len()
        )));
    }
    let block = rows / 4;
    let mut packed = vec![0u8; block * cols];
    for r in 0..block {
        for c in 0..cols {
            let mut byte = 0u8;
            for i in 0..4 {
                let v = t[(i * block + r) * cols + c];
                byte |= ((v.clamp(-1, 1) + 1) as u8) << (2 * i);
            }
            packed[r * cols + c] = byte;
        }
    }
    Ok(packed)
}
