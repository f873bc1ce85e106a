//! Portable kernels over the packed layouts: the fallback on CPUs without a SIMD path, and a
//! check of the layouts themselves (the SIMD paths are tested against the row-major
//! reference, not against this).

use std::ops::Range;

use super::Sink;
use crate::int6::{self, PackedInt6};
use crate::int8::{PackedInt8, CHUNK};
use crate::layout::{PackedTernary, BLOCK_BYTES, BLOCK_COLS, ROW_TILE};
use crate::QuantizedActivations;

/// `Σ t·x` over one packed block (64 bytes, 256 columns).
#[inline]
fn block_dot(block: &[u8], x: &[i8]) -> i32 {
    let mut acc = 0i32;
    for (j, &byte) in block.iter().enumerate().take(BLOCK_BYTES) {
        for s in 0..4 {
            let t = ((byte >> (2 * s)) & 3) as i32 - 1;
            acc += t * x[64 * s + j] as i32;
        }
    }
    acc
}

pub(crate) fn ternary_gemv<S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    tiles: Range<usize>,
    sink: &S,
) {
    let xr = x.padded_row(0);
    for g in tiles {
        let tile = w.tile(g);
        for ri in 0..ROW_TILE.min(w.rows() - g * ROW_TILE) {
            let acc = (0..w.blocks())
                .map(|b| {
                    let at = (b * ROW_TILE + ri) * BLOCK_BYTES;
                    block_dot(&tile[at..at + BLOCK_BYTES], &xr[b * BLOCK_COLS..(b + 1) * BLOCK_COLS])
                })
                .sum();
            sink.put(0, g * ROW_TILE + ri, acc);
        }
    }
}

pub(crate) fn ternary_gemm<S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    for r in rows {
        let (tile, ri) = (w.tile(r / ROW_TILE), r % ROW_TILE);
        for t in tokens.clone() {
            let xr = x.padded_row(t);
            let acc = (0..w.blocks())
                .map(|b| {
                    let at = (b * ROW_TILE + ri) * BLOCK_BYTES;
                    block_dot(&tile[at..at + BLOCK_BYTES], &xr[b * BLOCK_COLS..(b + 1) * BLOCK_COLS])
                })
                .sum();
            sink.put(t, r, acc);
        }
    }
}

/// Code sums per group of `G` columns of the rows of tile `g` with one token's padded
/// activations `xr`: `out[gi · 8 + ri] = Σ_{c ∈ group gi} u[8g + ri, c] · x[c]` over the stored
/// codes `u = t + 1` (rows past the matrix are padding, codes 1).
pub(crate) fn ternary_tile_group_sums<const G: usize>(
    w: &PackedTernary,
    g: usize,
    xr: &[i8],
    out: &mut [i32],
) {
    let tile = w.tile(g);
    let per_block = BLOCK_COLS / G;
    for b in 0..w.blocks() {
        for ri in 0..ROW_TILE {
            let at = (b * ROW_TILE + ri) * BLOCK_BYTES;
            let block = &tile[at..at + BLOCK_BYTES];
            let xb = &xr[b * BLOCK_COLS..(b + 1) * BLOCK_COLS];
            for gb in 0..per_block {
                let sum = (gb * G..(gb + 1) * G)
                    .map(|c| ((block[c % 64] >> (2 * (c / 64))) & 3) as i32 * xb[c] as i32)
                    .sum();
                out[(b * per_block + gb) * ROW_TILE + ri] = sum;
            }
        }
    }
}

/// [`ternary_tile_group_sums`] of every tile of `tiles`, each handed to `f(g, sums)` as soon as
/// it is computed.
pub(crate) fn ternary_tiles_group_sums<const G: usize, F: FnMut(usize, &[i32])>(
    w: &PackedTernary,
    tiles: Range<usize>,
    xr: &[i8],
    part: &mut [i32],
    mut f: F,
) {
    for g in tiles {
        ternary_tile_group_sums::<G>(w, g, xr, part);
        f(g, part);
    }
}

pub(crate) fn int8_gemm<S: Sink>(
    w: &PackedInt8,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    for r in rows {
        let (group, ri) = w.row_in_group(r);
        for t in tokens.clone() {
            let xr = x.padded_row(t);
            let mut acc = 0i32;
            for c in (0..w.stride()).step_by(CHUNK) {
                let wc = &group[PackedInt8::group_offset(ri, c)..][..CHUNK];
                acc += wc.iter().zip(&xr[c..c + CHUNK]).map(|(&a, &b)| a as i32 * b as i32).sum::<i32>();
            }
            sink.put(t, r, acc);
        }
    }
}

/// The 6-bit product: chunk by chunk, the offset codes `u = q + 32` decoded, then
/// `Σ u·x − 32 · Σ x` (the same integers as `Σ q·x`). Allocates nothing.
pub(crate) fn int6_gemm<S: Sink>(
    w: &PackedInt6,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    let mut u = [0u8; int6::CHUNK_COLS];
    for r in rows {
        for t in tokens.clone() {
            let mut acc = 0i32;
            for (c, xc) in x.padded_row(t)[..w.padded_cols()].chunks_exact(int6::CHUNK_COLS).enumerate() {
                w.decode_chunk(r, c, &mut u);
                acc += u.iter().zip(xc).map(|(&a, &b)| a as i32 * b as i32).sum::<i32>();
            }
            sink.put(t, r, acc - int6::OFFSET * x.sum(t));
        }
    }
}
