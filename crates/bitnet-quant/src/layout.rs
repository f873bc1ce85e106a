//! The engine's packed ternary layout, built once at load from row-major ternary codes.
//!
//! Every weight `t ∈ {-1, 0, 1}` is stored as the 2-bit code `u = t + 1 ∈ {0, 1, 2}`.
//! The kernels multiply the unsigned codes by signed int8 activations (`maddubs`, `vpdpbusd`,
//! `sdot`) and subtract the activation sum once per output: `Σ t·x = Σ u·x − Σ x`.
//!
//! * **Block**: one row × [`BLOCK_COLS`] = 256 columns in [`BLOCK_BYTES`] = 64 bytes. Byte `j`
//!   (0..64) holds in bits `2s..2s+1` (s = 0..4) the code of column `64·s + j` of the block.
//!   A shift by `2s` and a mask by 3 turn any 16-, 32- or 64-byte slice of the block into codes
//!   of 16, 32 or 64 *consecutive* columns, so NEON, AVX2 and AVX-512 all read the activations
//!   with plain contiguous loads.
//! * **Row tile**: [`ROW_TILE`] = 8 rows are interleaved block by block. Tile `g` holds, for
//!   each block `b` in order, the blocks of rows `8g..8g+8`:
//!   `offset(r, b) = ((g·blocks + b)·8 + r mod 8)·64` with `g = r / 8`. A GEMV over 8 rows at a
//!   time reads the weights as one sequential stream, and a GEMM finds a tile's weights
//!   (8 · K/4 bytes) together in cache while it reuses them across tokens.
//! * **Padding**: columns are padded to a multiple of 256 and rows to a multiple of 8, with
//!   code 1 (t = 0). The activations are padded with zeros to the same width, so padding adds
//!   nothing to any sum and any K (even K = 1) works.

use crate::aligned::AlignedBytes;

/// Columns in one packed block.
pub const BLOCK_COLS: usize = 256;
/// Bytes in one packed block (2 bits per column).
pub const BLOCK_BYTES: usize = BLOCK_COLS / 4;
/// Rows interleaved in one tile.
pub const ROW_TILE: usize = 8;

/// Four codes 1 (t = 0): the byte that pads.
const ZERO_CODES: u8 = 0b0101_0101;

/// The padded width of a row of `cols` values: a whole number of blocks.
pub const fn padded_cols(cols: usize) -> usize {
    cols.div_ceil(BLOCK_COLS) * BLOCK_COLS
}

/// Ternary weights `[rows, cols]` in the packed layout described in the module docs.
#[derive(Clone, Debug)]
pub(crate) struct PackedTernary {
    rows: usize,
    cols: usize,
    blocks: usize,
    tiles: usize,
    data: AlignedBytes,
}

impl PackedTernary {
    /// Packs row-major codes, which the caller has checked are in {-1, 0, 1}.
    pub(crate) fn pack(t: &[i8], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(t.len(), rows * cols);
        let blocks = cols.div_ceil(BLOCK_COLS);
        let tiles = rows.div_ceil(ROW_TILE);
        let mut data = AlignedBytes::zeroed(tiles * blocks * ROW_TILE * BLOCK_BYTES);
        let bytes = data.as_bytes_mut();
        bytes.fill(ZERO_CODES);
        for (r, row) in t.chunks_exact(cols.max(1)).enumerate().take(rows) {
            for b in 0..blocks {
                let block = &mut bytes[Self::offset_of(blocks, r, b)..][..BLOCK_BYTES];
                let cols_here = &row[b * BLOCK_COLS..cols.min((b + 1) * BLOCK_COLS)];
                for (j, byte) in block.iter_mut().enumerate() {
                    let mut packed = 0u8;
                    for s in 0..4 {
                        let code = cols_here.get(64 * s + j).map_or(1, |&v| (v + 1) as u8);
                        packed |= code << (2 * s);
                    }
                    *byte = packed;
                }
            }
        }
        Self { rows, cols, blocks, tiles, data }
    }

    /// The row-major ternary codes (the inverse of [`PackedTernary::pack`]).
    pub(crate) fn unpack(&self) -> Vec<i8> {
        let mut t = vec![0i8; self.rows * self.cols];
        let bytes = self.data.as_bytes();
        // Block by block: byte j of a block holds columns j, 64 + j, 128 + j and 192 + j.
        for (r, row) in t.chunks_exact_mut(self.cols.max(1)).enumerate().take(self.rows) {
            for (b, cols) in row.chunks_mut(BLOCK_COLS).enumerate() {
                let block = &bytes[Self::offset_of(self.blocks, r, b)..][..BLOCK_BYTES];
                for (s, part) in cols.chunks_mut(BLOCK_BYTES).enumerate() {
                    for (v, &byte) in part.iter_mut().zip(block) {
                        *v = ((byte >> (2 * s)) & 3) as i8 - 1;
                    }
                }
            }
        }
        t
    }

    fn offset_of(blocks: usize, r: usize, b: usize) -> usize {
        ((r / ROW_TILE * blocks + b) * ROW_TILE + r % ROW_TILE) * BLOCK_BYTES
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }
    /// Blocks per row (`padded_cols(cols) / 256`).
    pub(crate) fn blocks(&self) -> usize {
        self.blocks
    }
    /// Row tiles (`ceil(rows / 8)`).
    pub(crate) fn tiles(&self) -> usize {
        self.tiles
    }
    /// Bytes of packed weights, padding included.
    pub(crate) fn bytes(&self) -> usize {
        self.data.as_bytes().len()
    }
    /// The bytes of row tile `g`: `blocks` runs of 8 blocks of 64 bytes.
    pub(crate) fn tile(&self, g: usize) -> &[u8] {
        let len = self.blocks * ROW_TILE * BLOCK_BYTES;
        &self.data.as_bytes()[g * len..(g + 1) * len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_bit_positions_follow_the_spec() {
        // Row 0 has t = +1 in column 64·s + j; every other value is 0.
        for (s, j) in [(0, 0), (1, 0), (3, 63), (2, 17)] {
            let mut t = vec![0i8; 256];
            t[64 * s + j] = 1;
            let p = PackedTernary::pack(&t, 1, 256);
            let tile = p.tile(0);
            assert_eq!(tile[j], ZERO_CODES & !(3 << (2 * s)) | (2 << (2 * s)));
            assert!(tile.iter().enumerate().all(|(i, &b)| i == j || b == ZERO_CODES));
        }
    }

    #[test]
    fn rows_interleave_block_by_block() {
        // 9 rows, 300 columns: 2 tiles of 2 blocks. Row 9 sits alone in tile 1, padded.
        let (rows, cols) = (9, 300);
        let t: Vec<i8> = (0..rows * cols).map(|i| [(-1i8), 0, 1][(i * 7 + i / 5) % 3]).collect();
        let p = PackedTernary::pack(&t, rows, cols);
        assert_eq!((p.blocks(), p.tiles(), p.bytes()), (2, 2, 2 * 2 * 8 * 64));
        assert_eq!(PackedTernary::offset_of(2, 3, 1), (8 + 3) * 64);
        assert_eq!(PackedTernary::offset_of(2, 8, 0), 16 * 64);
        assert_eq!(p.unpack(), t);
    }
}
