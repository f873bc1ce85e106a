//! The 6-bit storage of an [`crate::Int8Matrix`]: weights in [-31, 31], 6 bits each, for an
//! lm_head three quarters the size of the int8 one (the head is the largest single read of a
//! decoded token).
//!
//! Each weight is stored offset, `u = q + 32 ∈ [1, 63]`, so the kernels can feed it to an
//! unsigned × signed multiply (`vpmaddubsw`) and subtract `32 · Σ x` once per row and token.
//!
//! Layout. Rows are padded to a multiple of 8 and columns to the activations' padded width, a
//! multiple of 256. A row is cut into 96-byte chunks of 128 columns, and each group of eight
//! rows is stored chunk-interleaved (chunk 0 of rows 0–7, then chunk 1 of rows 0–7, …), so a
//! GEMV over the group reads one sequential stream. A chunk:
//! * bytes 0..64, the low nibbles: byte `j < 32` holds `u[j] & 15` in bits 0–3 and
//!   `u[j + 32] & 15` in bits 4–7, byte `32 + j` the same for columns `64 + j` and `96 + j`;
//! * bytes 64..96, the high pairs: byte `64 + j` holds `u[j + 32·f] >> 4` in bits `2f..2f+2`,
//!   `f = 0..4`.
//!
//! so three aligned 32-byte loads give the 128 codes with immediate shifts and masks only: the
//! high pairs of columns `j + 32·f` sit in the byte that serves all four.

use crate::aligned::AlignedBytes;
use crate::layout::{padded_cols, ROW_TILE};

/// Columns per chunk.
pub(crate) const CHUNK_COLS: usize = 128;
/// Bytes per chunk: 64 of low nibbles, 32 of high pairs.
pub(crate) const CHUNK_BYTES: usize = 96;
/// The offset that makes a weight unsigned: `u = q + OFFSET`.
pub(crate) const OFFSET: i32 = 32;
/// The largest magnitude a 6-bit weight may have.
pub const MAX_ABS: i8 = 31;

#[derive(Clone, Debug)]
pub(crate) struct PackedInt6 {
    rows: usize,
    cols: usize,
    /// Padded columns (a multiple of 256, so of 64).
    padded: usize,
    /// Bytes per row: `padded / 128 · 96`.
    stride: usize,
    /// Chunks per row.
    chunks: usize,
    data: AlignedBytes,
}

/// The shape of a packed matrix's rows: all that packing a block of rows needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Int6Layout {
    cols: usize,
    padded: usize,
    chunks: usize,
    stride: usize,
}

impl Int6Layout {
    fn new(cols: usize) -> Self {
        let padded = padded_cols(cols);
        let chunks = padded / CHUNK_COLS;
        Self { cols, padded, chunks, stride: chunks * CHUNK_BYTES }
    }

    /// Bytes of one group of [`ROW_TILE`] rows.
    pub(crate) fn group_bytes(&self) -> usize {
        ROW_TILE * self.stride
    }

    /// Packs the row-major weights `q` (rows of `cols`, in [-31, 31]: the caller checks the
    /// range) into `groups`, the storage of the groups that hold them, starting at the first
    /// row of a group.
    pub(crate) fn pack_rows(&self, q: &[i8], groups: &mut [u8]) {
        let mut u = vec![OFFSET as u8; self.padded];
        // Padding rows stay all-zero bytes (u = 0, q = -32): their outputs are never read.
        for (r, row) in q.chunks_exact(self.cols.max(1)).enumerate() {
            for (o, &v) in u.iter_mut().zip(row) {
                *o = (v as i32 + OFFSET) as u8;
            }
            for (c, uc) in u.chunks_exact(CHUNK_COLS).enumerate() {
                let at = chunk_offset(r, c, self.chunks);
                let chunk = &mut groups[at..at + CHUNK_BYTES];
                let (lo, hi) = chunk.split_at_mut(64);
                for (i, b) in lo.iter_mut().enumerate() {
                    // Byte i < 32 holds columns i and i + 32; byte 32 + j columns 64 + j, 96 + j.
                    let c = i % 32 + 64 * (i / 32);
                    *b = (uc[c] & 15) | (uc[c + 32] & 15) << 4;
                }
                for (j, b) in hi.iter_mut().enumerate() {
                    *b = (0..4).fold(0u8, |acc, f| acc | (uc[j + 32 * f] >> 4) << (2 * f));
                }
            }
        }
    }
}

impl PackedInt6 {
    /// All-zero storage for `[rows, cols]`, filled through [`PackedInt6::layout`].
    pub(crate) fn zeroed(rows: usize, cols: usize) -> Self {
        let Int6Layout { padded, chunks, stride, .. } = Int6Layout::new(cols);
        let data = AlignedBytes::zeroed(rows.div_ceil(ROW_TILE) * ROW_TILE * stride);
        Self { rows, cols, padded, stride, chunks, data }
    }

    /// Packs row-major weights in [-31, 31] (the caller checks the range).
    pub(crate) fn pack(q: &[i8], rows: usize, cols: usize) -> Self {
        let mut p = Self::zeroed(rows, cols);
        let layout = p.layout();
        layout.pack_rows(&q[..rows * cols], p.groups_mut());
        p
    }

    pub(crate) fn layout(&self) -> Int6Layout {
        Int6Layout { cols: self.cols, padded: self.padded, chunks: self.chunks, stride: self.stride }
    }

    /// The storage of every group, to be filled a block of groups at a time.
    pub(crate) fn groups_mut(&mut self) -> &mut [u8] {
        self.data.as_bytes_mut()
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }
    pub(crate) fn padded_cols(&self) -> usize {
        self.padded
    }
    pub(crate) fn groups(&self) -> usize {
        self.rows.div_ceil(ROW_TILE)
    }
    pub(crate) fn bytes(&self) -> usize {
        self.data.as_bytes().len()
    }
    /// Chunk `c` of row `r` (96 bytes).
    pub(crate) fn chunk(&self, r: usize, c: usize) -> &[u8] {
        let at = chunk_offset(r, c, self.chunks);
        &self.data.as_bytes()[at..at + CHUNK_BYTES]
    }
    /// Rows `8g..8g+8` (padding rows included), chunk-interleaved: `8 · stride` bytes.
    pub(crate) fn group(&self, g: usize) -> &[u8] {
        let len = ROW_TILE * self.stride;
        &self.data.as_bytes()[g * len..(g + 1) * len]
    }

    /// Row `r`'s offset codes `u`, `padded_cols` of them.
    pub(crate) fn decode_row(&self, r: usize, u: &mut [u8]) {
        for (c, uc) in u.chunks_exact_mut(CHUNK_COLS).enumerate() {
            self.decode_chunk(r, c, uc);
        }
    }

    /// The 128 offset codes of chunk `c` of row `r`.
    pub(crate) fn decode_chunk(&self, r: usize, c: usize, u: &mut [u8]) {
        let chunk = self.chunk(r, c);
        for (j, u) in u[..CHUNK_COLS].iter_mut().enumerate() {
            let lo = (chunk[j % 32 + 32 * (j / 64)] >> (4 * (j / 32 % 2))) & 15;
            let hi = (chunk[64 + j % 32] >> (2 * (j / 32))) & 3;
            *u = lo | hi << 4;
        }
    }
}

/// Where chunk `c` of row `r` starts: its group, then chunk by chunk, row by row.
fn chunk_offset(r: usize, c: usize, chunks: usize) -> usize {
    ((r / ROW_TILE * chunks + c) * ROW_TILE + r % ROW_TILE) * CHUNK_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_decode_to_what_was_packed() {
        let (rows, cols) = (11, 300);
        let q: Vec<i8> = (0..rows * cols).map(|i| ((i * 37 + i / 7) % 63) as i8 - 31).collect();
        let p = PackedInt6::pack(&q, rows, cols);
        assert_eq!(p.padded_cols(), 512);
        assert_eq!(p.stride, 512 / 128 * 96);
        // Chunk 1 of row 9 (group 1, row 1 of it) follows chunk 1 of row 8.
        assert_eq!(chunk_offset(9, 1, 4), (4 * 8 + 8 + 1) * 96);
        let mut u = vec![0u8; p.padded_cols()];
        for r in 0..rows {
            p.decode_row(r, &mut u);
            for c in 0..cols {
                assert_eq!(u[c] as i32 - OFFSET, q[r * cols + c] as i32, "row {r} column {c}");
            }
            assert!(u[cols..].iter().all(|&v| v as i32 == OFFSET), "padding decodes to q = 0");
        }
    }

    #[test]
    fn chunk_layout_follows_the_spec() {
        // Only column 109 (= 96 + 13: low nibble in byte 32 + 13's high half, high pair in
        // byte 64 + 13, bits 6–7) is non-zero: q = 31, u = 63. Everything else is u = 32
        // (low nibble 0, high pair 2).
        let mut q = vec![0i8; 128];
        q[109] = 31;
        let p = PackedInt6::pack(&q, 1, 128);
        let row = p.chunk(0, 0);
        assert_eq!(row[32 + 13], (63 & 15) << 4);
        assert_eq!(row[64 + 13], 2 | 2 << 2 | 2 << 4 | 3 << 6);
        assert!(row[..96]
            .iter()
            .enumerate()
            .all(|(i, &b)| i == 45 || i == 77 || b == if i < 64 { 0 } else { 0xAA }));
    }
}
