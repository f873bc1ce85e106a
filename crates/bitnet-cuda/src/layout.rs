//! The device layouts of weights and activations, packed on the host from layout-neutral
//! codes ([`bitnet_quant::TernaryCodes`], [`bitnet_quant::Int8Matrix::to_int8`]).
//!
//! * **Ternary rows**: `padded_cols(cols) / 16` u32 words per row, 16 columns a word. In word
//!   `w`, byte `i` holds in bits `2s..2s+1` the code `u = t + 1` of column `16w + 4s + i`, so
//!   `(word >> 2s) & 0x03030303` is the four codes of columns `16w + 4s ..= 16w + 4s + 3` in
//!   byte order, the operand of one `dp4a` against the int32 holding those four int8
//!   activations. Padding columns have code 1 (t = 0).
//! * **Int8 rows** (the integer head): `padded_cols(cols)` bytes per row, zero padded.
//! * **Activations**: int8 rows of `padded_cols(width)` bytes, zero padded, one scale and one
//!   code sum per token.
//!
//! Rows are padded to 64 columns, one 16-byte vector of ternary words (64 columns) or four of
//! int8 activations, the unit the kernels load.

/// Columns of one 16-byte vector of ternary weights.
pub const VECTOR_COLS: usize = 64;

/// `cols` rounded up to whole vectors.
pub fn padded_cols(cols: usize) -> usize {
    cols.div_ceil(VECTOR_COLS).max(1) * VECTOR_COLS
}

/// Packs row-major ternary codes (`rows × cols`, each in {-1, 0, 1}) into device words, rows
/// in parallel.
pub fn pack_ternary(codes: &[i8], rows: usize, cols: usize) -> Vec<u32> {
    use rayon::prelude::*;
    let words_per_row = padded_cols(cols) / 16;
    let mut out = vec![0u32; rows * words_per_row];
    let rows_in = codes.par_chunks_exact(cols.max(1)).take(rows);
    out.par_chunks_exact_mut(words_per_row).zip(rows_in).for_each(|(words, row)| {
        for (w, word) in words.iter_mut().enumerate() {
            let mut packed = 0u32;
            for s in 0..4 {
                for i in 0..4 {
                    let c = 16 * w + 4 * s + i;
                    let code = row.get(c).map_or(1, |&t| (t + 1) as u32);
                    packed |= code << (8 * i + 2 * s);
                }
            }
            *word = packed;
        }
    });
    out
}

/// The codes back from device words (the inverse of [`pack_ternary`], for tests).
pub fn unpack_ternary(words: &[u32], rows: usize, cols: usize) -> Vec<i8> {
    let words_per_row = padded_cols(cols) / 16;
    let mut codes = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let (w, s, i) = (c / 16, (c % 16) / 4, c % 4);
            let word = words[r * words_per_row + w];
            codes.push(((word >> (8 * i + 2 * s)) & 3) as i8 - 1);
        }
    }
    codes
}

/// Row-major int8 values (`rows × cols`) in rows of `padded_cols(cols)` bytes, zero padded.
pub fn pad_int8_rows(values: &[i8], rows: usize, cols: usize) -> Vec<i8> {
    let stride = padded_cols(cols);
    let mut out = vec![0i8; rows * stride];
    for (r, row) in values.chunks_exact(cols.max(1)).enumerate().take(rows) {
        out[r * stride..r * stride + cols].copy_from_slice(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ternary_words_round_trip_and_follow_the_spec() {
        for (rows, cols) in [(1, 1), (3, 17), (2, 64), (5, 300)] {
            let codes: Vec<i8> = (0..rows * cols).map(|i| ((i * 7 + i / 3) % 3) as i8 - 1).collect();
            let words = pack_ternary(&codes, rows, cols);
            assert_eq!(words.len(), rows * padded_cols(cols) / 16);
            assert_eq!(unpack_ternary(&words, rows, cols), codes);
        }
        // Column 16w + 4s + i sits in byte i at bit 2s of word w.
        let mut codes = vec![0i8; 64];
        codes[16 + 4 * 2 + 3] = 1; // w = 1, s = 2, i = 3: code 2
        let words = pack_ternary(&codes, 1, 64);
        assert_eq!(words[1], 0x5555_5555 ^ (0b11 << (8 * 3 + 4)));
        // Padding columns are code 1 (t = 0).
        assert_eq!(pack_ternary(&[-1], 1, 1)[3], 0x5555_5555);
    }

    #[test]
    fn int8_rows_are_zero_padded() {
        let v: Vec<i8> = (0..6).map(|i| i as i8 - 3).collect();
        let p = pad_int8_rows(&v, 2, 3);
        assert_eq!(p.len(), 128);
        assert_eq!(&p[..4], &[-3, -2, -1, 0]);
        assert_eq!(&p[64..67], &[0, 1, 2]);
    }
}
