//! aarch64 NEON kernels, with `sdot` where the CPU has the dot-product extension.
//!
//! A 16-byte slice of a block gives, after a shift by `2s` and a mask by 3, the codes of 16
//! consecutive columns. With `dotprod`, `sdot` multiplies them by the activations and sums
//! four products into each i32 lane (codes 0..2 are valid signed bytes). Without it,
//! `smlal`/`smlal2` accumulate the products in i16 and `sadalp` widens them once per block.
//!
//! `vdotq_s32` is not a stable intrinsic yet, so `sdot` is written as inline assembly. The
//! kernel bodies are `#[inline(always)]` and generic over `DOT`; the `DOT` variants are
//! compiled inside `#[target_feature(enable = "dotprod")]` wrappers, and callers must have
//! checked the feature with `KernelPath::NeonDotprod.is_available()`. NEON itself is part of
//! the aarch64 baseline.

use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

use super::Sink;
use crate::int6::{self, PackedInt6, CHUNK_BYTES, CHUNK_COLS};
use crate::int8::PackedInt8;
use crate::layout::{PackedTernary, BLOCK_BYTES, BLOCK_COLS, ROW_TILE};
use crate::QuantizedActivations;

/// Tokens that share one unpacked weight block in the GEMM.
const TOKEN_TILE: usize = 8;

/// `acc + Σ_{j<4} a[4l+j]·b[4l+j]` in each i32 lane `l` (the `sdot` instruction).
#[inline(always)]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: register-only arithmetic; reached only from `dotprod` wrappers.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// The four 2-bit fields of 16 packed bytes, as signed bytes in {0, 1, 2}.
#[inline(always)]
unsafe fn codes(v: uint8x16_t) -> [int8x16_t; 4] {
    // SAFETY: NEON is part of the aarch64 baseline.
    unsafe {
        let mask = vdupq_n_u8(3);
        [
            vreinterpretq_s8_u8(vandq_u8(v, mask)),
            vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8::<2>(v), mask)),
            vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8::<4>(v), mask)),
            // A byte shifted right by 6 has only its top code left: no mask.
            vreinterpretq_s8_u8(vshrq_n_u8::<6>(v)),
        ]
    }
}

/// `p + a·b` for 16 byte pairs, accumulated into 8 i16 lanes (two products per lane).
#[inline(always)]
unsafe fn mla16(p: int16x8_t, a: int8x16_t, b: int8x16_t) -> int16x8_t {
    // SAFETY: NEON is part of the aarch64 baseline.
    unsafe { vmlal_high_s8(vmlal_s8(p, vget_low_s8(a), vget_low_s8(b)), a, b) }
}

/// Four i32x4 vectors to their four horizontal sums.
#[inline(always)]
unsafe fn reduce4(a: int32x4_t, b: int32x4_t, c: int32x4_t, d: int32x4_t) -> int32x4_t {
    // SAFETY: NEON is part of the aarch64 baseline.
    unsafe { vpaddq_s32(vpaddq_s32(a, b), vpaddq_s32(c, d)) }
}

#[inline(always)]
unsafe fn reduce8(a: &[int32x4_t; 8]) -> [i32; 8] {
    let mut out = [0i32; 8];
    // SAFETY: NEON is baseline; `out` has room for two vectors of four.
    unsafe {
        vst1q_s32(out.as_mut_ptr(), reduce4(a[0], a[1], a[2], a[3]));
        vst1q_s32(out.as_mut_ptr().add(4), reduce4(a[4], a[5], a[6], a[7]));
    }
    out
}

macro_rules! dot_wrappers {
    ($pub_name:ident, $dot:ident, $plain:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        /// # Safety
        /// With `DOT`, the CPU must have the dot-product extension.
        pub(crate) unsafe fn $pub_name<const DOT: bool, S: Sink>($($arg: $ty),*) {
            // SAFETY: the caller guarantees `dotprod` when `DOT`.
            unsafe { if DOT { $dot($($arg),*) } else { $plain($($arg),*) } }
        }

        #[target_feature(enable = "dotprod")]
        unsafe fn $dot<S: Sink>($($arg: $ty),*) {
            // SAFETY: `dotprod` is enabled on this function.
            unsafe { $body::<true, S>($($arg),*) }
        }

        unsafe fn $plain<S: Sink>($($arg: $ty),*) {
            // SAFETY: the plain body uses baseline NEON only.
            unsafe { $body::<false, S>($($arg),*) }
        }
    };
}

dot_wrappers!(ternary_gemv, ternary_gemv_dot, ternary_gemv_plain, ternary_gemv_body,
    (w: &PackedTernary, x: &QuantizedActivations, tiles: Range<usize>, sink: &S));
dot_wrappers!(ternary_gemm, ternary_gemm_dot, ternary_gemm_plain, ternary_gemm_body,
    (w: &PackedTernary, x: &QuantizedActivations, rows: Range<usize>, tokens: Range<usize>, sink: &S));
dot_wrappers!(int8_gemv, int8_gemv_dot, int8_gemv_plain, int8_gemv_body,
    (w: &PackedInt8, x: &QuantizedActivations, groups: Range<usize>, sink: &S));
dot_wrappers!(int8_gemm, int8_gemm_dot, int8_gemm_plain, int8_gemm_body,
    (w: &PackedInt8, x: &QuantizedActivations, rows: Range<usize>, tokens: Range<usize>, sink: &S));
dot_wrappers!(int6_gemv, int6_gemv_dot, int6_gemv_plain, int6_gemv_body,
    (w: &PackedInt6, x: &QuantizedActivations, token: usize, groups: Range<usize>, sink: &S));
dot_wrappers!(int6_gemm, int6_gemm_dot, int6_gemm_plain, int6_gemm_body,
    (w: &PackedInt6, x: &QuantizedActivations, rows: Range<usize>, tokens: Range<usize>, sink: &S));

#[inline(always)]
unsafe fn ternary_gemv_body<const DOT: bool, S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    tiles: Range<usize>,
    sink: &S,
) {
    let blocks = w.blocks();
    let xr = x.padded_row(0);
    assert!(xr.len() >= blocks * BLOCK_COLS);
    for g in tiles {
        let tile = w.tile(g);
        // SAFETY: tile `g` holds `blocks · 8` blocks of 64 bytes and `xr` `blocks` blocks of
        // 256 activations, so every offset is in bounds.
        let dots = unsafe {
            let mut acc = [vdupq_n_s32(0); ROW_TILE];
            for b in 0..blocks {
                // The block's activations, [4s + h] = columns 64s + 16h .. +16.
                let xp = xr.as_ptr().add(b * BLOCK_COLS);
                let xb: [int8x16_t; 16] =
                    std::array::from_fn(|i| vld1q_s8(xp.add(64 * (i / 4) + 16 * (i % 4))));
                let wb = tile.as_ptr().add(b * ROW_TILE * BLOCK_BYTES);
                for (ri, a) in acc.iter_mut().enumerate() {
                    let wr = wb.add(ri * BLOCK_BYTES);
                    if DOT {
                        for h in 0..4 {
                            let c = codes(vld1q_u8(wr.add(16 * h)));
                            for s in 0..4 {
                                *a = sdot(*a, c[s], xb[4 * s + h]);
                            }
                        }
                    } else {
                        // 32 products of at most 256 per i16 lane: no overflow.
                        let mut p = vdupq_n_s16(0);
                        for h in 0..4 {
                            let c = codes(vld1q_u8(wr.add(16 * h)));
                            for s in 0..4 {
                                p = mla16(p, c[s], xb[4 * s + h]);
                            }
                        }
                        *a = vpadalq_s16(*a, p);
                    }
                }
            }
            reduce8(&acc)
        };
        let (r0, xsum) = (g * ROW_TILE, x.sum(0));
        for (ri, &d) in dots.iter().enumerate().take(w.rows() - r0) {
            sink.put(0, r0 + ri, d - xsum);
        }
    }
}

#[inline(always)]
unsafe fn ternary_gemm_body<const DOT: bool, S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    let mut t0 = tokens.start;
    while t0 < tokens.end {
        // SAFETY: the features are the calling wrapper's.
        t0 += unsafe {
            match tokens.end - t0 {
                8.. => ternary_tile::<DOT, TOKEN_TILE, S>(w, x, rows.clone(), t0, sink),
                4..=7 => ternary_tile::<DOT, 4, S>(w, x, rows.clone(), t0, sink),
                2..=3 => ternary_tile::<DOT, 2, S>(w, x, rows.clone(), t0, sink),
                _ => ternary_tile::<DOT, 1, S>(w, x, rows.clone(), t0, sink),
            }
        };
    }
}

#[inline(always)]
unsafe fn ternary_tile<const DOT: bool, const MT: usize, S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    rows: Range<usize>,
    t0: usize,
    sink: &S,
) -> usize {
    let blocks = w.blocks();
    let xs: [&[i8]; MT] = std::array::from_fn(|i| x.padded_row(t0 + i));
    assert!(xs.iter().all(|r| r.len() >= blocks * BLOCK_COLS));
    for r in rows {
        let wr = w.tile(r / ROW_TILE)[(r % ROW_TILE) * BLOCK_BYTES..].as_ptr();
        // SAFETY: row `r`'s block `b` is `b · 8 · 64` bytes after its first block, inside its
        // tile; token rows hold `blocks · 256` activations.
        let dots = unsafe {
            let mut acc = [vdupq_n_s32(0); 8];
            for b in 0..blocks {
                let wb = wr.add(b * ROW_TILE * BLOCK_BYTES);
                let mut p = [vdupq_n_s16(0); MT];
                for h in 0..4 {
                    let c = codes(vld1q_u8(wb.add(16 * h)));
                    for i in 0..MT {
                        let xp = xs[i].as_ptr().add(b * BLOCK_COLS + 16 * h);
                        for (s, &cs) in c.iter().enumerate() {
                            let xv = vld1q_s8(xp.add(64 * s));
                            if DOT {
                                acc[i] = sdot(acc[i], cs, xv);
                            } else {
                                p[i] = mla16(p[i], cs, xv);
                            }
                        }
                    }
                }
                if !DOT {
                    for i in 0..MT {
                        acc[i] = vpadalq_s16(acc[i], p[i]);
                    }
                }
            }
            reduce8(&acc)
        };
        for (i, &d) in dots.iter().enumerate().take(MT) {
            sink.put(t0 + i, r, d - x.sum(t0 + i));
        }
    }
    MT
}

/// `acc + Σ w·x` over 16 int8 pairs, as i32 lanes.
#[inline(always)]
unsafe fn int8_acc<const DOT: bool>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    // SAFETY: `sdot` only in `DOT` bodies (dotprod wrappers); the rest is baseline NEON.
    unsafe {
        if DOT {
            sdot(acc, w, x)
        } else {
            // |w| ≤ 127 and |x| ≤ 128: two products per i16 lane reach at most 32512.
            vpadalq_s16(acc, mla16(vdupq_n_s16(0), w, x))
        }
    }
}

#[inline(always)]
unsafe fn int8_gemv_body<const DOT: bool, S: Sink>(
    w: &PackedInt8,
    x: &QuantizedActivations,
    groups: Range<usize>,
    sink: &S,
) {
    let stride = w.stride();
    let xr = x.padded_row(0);
    assert!(xr.len() >= stride);
    for g in groups {
        let group = w.group(g);
        // SAFETY: the group holds 8 rows of `stride` values, `xr` holds `stride`, and
        // `c + 16 <= stride`.
        let dots = unsafe {
            let mut acc = [vdupq_n_s32(0); ROW_TILE];
            for c in (0..stride).step_by(16) {
                let xv = vld1q_s8(xr.as_ptr().add(c));
                for (ri, a) in acc.iter_mut().enumerate() {
                    *a = int8_acc::<DOT>(
                        *a,
                        vld1q_s8(group.as_ptr().add(PackedInt8::group_offset(ri, c))),
                        xv,
                    );
                }
            }
            reduce8(&acc)
        };
        let r0 = g * ROW_TILE;
        for (ri, &d) in dots.iter().enumerate().take(w.rows() - r0) {
            sink.put(0, r0 + ri, d);
        }
    }
}

#[inline(always)]
unsafe fn int8_gemm_body<const DOT: bool, S: Sink>(
    w: &PackedInt8,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    let mut t0 = tokens.start;
    while t0 < tokens.end {
        // SAFETY: the features are the calling wrapper's.
        t0 += unsafe {
            match tokens.end - t0 {
                8.. => int8_tile::<DOT, TOKEN_TILE, S>(w, x, rows.clone(), t0, sink),
                4..=7 => int8_tile::<DOT, 4, S>(w, x, rows.clone(), t0, sink),
                2..=3 => int8_tile::<DOT, 2, S>(w, x, rows.clone(), t0, sink),
                _ => int8_tile::<DOT, 1, S>(w, x, rows.clone(), t0, sink),
            }
        };
    }
}

/// `rows` against tokens `t0..t0 + MT`, each load of 16 weights shared by the `MT` tokens.
#[inline(always)]
unsafe fn int8_tile<const DOT: bool, const MT: usize, S: Sink>(
    w: &PackedInt8,
    x: &QuantizedActivations,
    rows: Range<usize>,
    t0: usize,
    sink: &S,
) -> usize {
    let stride = w.stride();
    let xs: [&[i8]; MT] = std::array::from_fn(|i| x.padded_row(t0 + i));
    assert!(xs.iter().all(|r| r.len() >= stride));
    for r in rows {
        let (group, ri) = w.row_in_group(r);
        // SAFETY: the group holds 8 rows and every token row `stride` values, and
        // `c + 16 <= stride` with `c` a multiple of 16 (inside one chunk).
        let dots = unsafe {
            let mut acc = [vdupq_n_s32(0); TOKEN_TILE];
            for c in (0..stride).step_by(16) {
                let wv = vld1q_s8(group.as_ptr().add(PackedInt8::group_offset(ri, c)));
                for i in 0..MT {
                    acc[i] = int8_acc::<DOT>(acc[i], wv, vld1q_s8(xs[i].as_ptr().add(c)));
                }
            }
            reduce8(&acc)
        };
        for (i, &d) in dots.iter().enumerate().take(MT) {
            sink.put(t0 + i, r, d);
        }
    }
    MT
}

/// The offset codes `u` of one 128-column chunk of a 6-bit row ([`crate::int6`]), 16
/// consecutive columns per vector; `u ≤ 63`, so they are valid signed bytes for `sdot`.
#[inline(always)]
unsafe fn int6_chunk(p: *const u8) -> [int8x16_t; 8] {
    // SAFETY: `p` points at a 96-byte chunk; NEON is baseline.
    unsafe {
        let (m4, m_hi) = (vdupq_n_u8(15), vdupq_n_u8(0x30));
        let lo = [vld1q_u8(p), vld1q_u8(p.add(16)), vld1q_u8(p.add(32)), vld1q_u8(p.add(48))];
        let hi = [vld1q_u8(p.add(64)), vld1q_u8(p.add(80))];
        std::array::from_fn(|v| {
            // Columns 16v..16v+16: low nibbles in `lo` (low half for columns below 32 in each
            // 64, high half above), high pairs in field `c / 32` of `hi`, moved to bits 4–5.
            let c = 16 * v;
            let l = lo[c % 32 / 16 + 2 * (c / 64)];
            let nibble = if c / 32 % 2 == 0 { vandq_u8(l, m4) } else { vshrq_n_u8::<4>(l) };
            let h = hi[c % 32 / 16];
            let pair = match c / 32 {
                0 => vshlq_n_u8::<4>(h),
                1 => vshlq_n_u8::<2>(h),
                2 => h,
                _ => vshrq_n_u8::<2>(h),
            };
            vreinterpretq_s8_u8(vorrq_u8(nibble, vandq_u8(pair, m_hi)))
        })
    }
}

/// 6-bit GEMV of token `token`, eight rows at a time: `Σ u·x − 32 · Σ x` per row.
#[inline(always)]
unsafe fn int6_gemv_body<const DOT: bool, S: Sink>(
    w: &PackedInt6,
    x: &QuantizedActivations,
    token: usize,
    groups: Range<usize>,
    sink: &S,
) {
    let chunks = w.padded_cols() / CHUNK_COLS;
    let xr = x.padded_row(token);
    assert!(xr.len() >= w.padded_cols());
    let offset_sum = int6::OFFSET * x.sum(token);
    for g in groups {
        let group = w.group(g);
        // SAFETY: the group holds `chunks` steps of 8 interleaved 96-byte chunks and `xr`
        // `chunks · 128` activations; `u ≤ 63` keeps the plain path's i16 pairs in range.
        let dots = unsafe {
            let mut acc = [vdupq_n_s32(0); ROW_TILE];
            for c in 0..chunks {
                let xc: [int8x16_t; 8] =
                    std::array::from_fn(|v| vld1q_s8(xr.as_ptr().add(c * CHUNK_COLS + 16 * v)));
                let step = group.as_ptr().add(c * ROW_TILE * CHUNK_BYTES);
                for (ri, a) in acc.iter_mut().enumerate() {
                    let u = int6_chunk(step.add(ri * CHUNK_BYTES));
                    for v in 0..8 {
                        *a = int8_acc::<DOT>(*a, u[v], xc[v]);
                    }
                }
            }
            reduce8(&acc)
        };
        let r0 = g * ROW_TILE;
        for (ri, &d) in dots.iter().enumerate().take(w.rows() - r0) {
            sink.put(token, r0 + ri, d - offset_sum);
        }
    }
}

/// 6-bit GEMM: eight tokens per pass, each chunk of a row decoded once for all eight;
/// `Σ u·x − 32 · Σ x` per token and row.
#[inline(always)]
unsafe fn int6_gemm_body<const DOT: bool, S: Sink>(
    w: &PackedInt6,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    let chunks = w.padded_cols() / CHUNK_COLS;
    for t in tokens.clone() {
        assert!(x.padded_row(t).len() >= w.padded_cols());
    }
    // A partial last tile reuses the lanes of the missing tokens.
    let mut t0 = tokens.start;
    while t0 < tokens.end {
        let n = (tokens.end - t0).min(TOKEN_TILE);
        let xs: [*const i8; TOKEN_TILE] = std::array::from_fn(|i| x.padded_row(t0 + i.min(n - 1)).as_ptr());
        for r in rows.clone() {
            // SAFETY: every chunk is 96 bytes and every token row holds `chunks · 128`
            // activations; `u ≤ 63` keeps the plain path's i16 pairs in range.
            let dots = unsafe {
                let mut acc = [vdupq_n_s32(0); TOKEN_TILE];
                for c in 0..chunks {
                    let u = int6_chunk(w.chunk(r, c).as_ptr());
                    for (a, &xp) in acc.iter_mut().zip(&xs) {
                        for (v, &uv) in u.iter().enumerate() {
                            *a = int8_acc::<DOT>(*a, uv, vld1q_s8(xp.add(c * CHUNK_COLS + 16 * v)));
                        }
                    }
                }
                reduce8(&acc)
            };
            for (i, &d) in dots.iter().enumerate().take(n) {
                sink.put(t0 + i, r, d - int6::OFFSET * x.sum(t0 + i));
            }
        }
        t0 += n;
    }
}

/// Code sums per group of `G` columns of the eight rows of each tile of `tiles` with one token's
/// padded activations, with `sdot` (see the scalar `ternary_tile_group_sums`: the same
/// integers), each tile's sums handed to `f(g, sums)`.
///
/// # Safety
/// The CPU must have the dot-product extension.
#[target_feature(enable = "dotprod")]
pub(crate) unsafe fn ternary_tiles_group_sums_dot<const G: usize, F: FnMut(usize, &[i32])>(
    w: &PackedTernary,
    tiles: Range<usize>,
    xr: &[i8],
    part: &mut [i32],
    mut f: F,
) {
    for g in tiles {
        // SAFETY: `dotprod` is enabled on this function.
        unsafe { tile_group_sums_body::<true, G>(w, g, xr, part) };
        f(g, part);
    }
}

/// As [`ternary_tiles_group_sums_dot`], on baseline NEON.
///
/// # Safety
/// None beyond aarch64 (NEON is baseline); `unsafe` for symmetry with the other paths.
pub(crate) unsafe fn ternary_tiles_group_sums_plain<const G: usize, F: FnMut(usize, &[i32])>(
    w: &PackedTernary,
    tiles: Range<usize>,
    xr: &[i8],
    part: &mut [i32],
    mut f: F,
) {
    for g in tiles {
        // SAFETY: the plain body uses baseline NEON only.
        unsafe { tile_group_sums_body::<false, G>(w, g, xr, part) };
        f(g, part);
    }
}

/// A 16-byte slice `h` of a block, field `s`, is columns `64·s + 16·h..+16`: a unit of 16
/// columns, and a group is a run of whole units. Per row, each group's units go into one i32x4
/// accumulator (`sdot`), or one i16x8 (`smlal`: at most 16 units of two products of at most
/// 256 per lane) widened at the end; then the eight rows of a group are reduced, a sum per row.
#[inline(always)]
unsafe fn tile_group_sums_body<const DOT: bool, const G: usize>(
    w: &PackedTernary,
    g: usize,
    xr: &[i8],
    out: &mut [i32],
) {
    let per_block = BLOCK_COLS / G;
    let blocks = w.blocks();
    let tile = w.tile(g);
    assert!(xr.len() >= blocks * BLOCK_COLS && out.len() >= blocks * per_block * ROW_TILE);
    assert!(tile.len() >= blocks * ROW_TILE * BLOCK_BYTES);
    // SAFETY: tile `g` holds `blocks · 8` blocks of 64 bytes and `xr` `blocks` blocks of 256
    // activations (checked above), so every offset is in bounds; `sdot` only when `DOT`.
    unsafe {
        for b in 0..blocks {
            let xp = xr.as_ptr().add(b * BLOCK_COLS);
            let xb: [int8x16_t; 16] = std::array::from_fn(|i| vld1q_s8(xp.add(64 * (i / 4) + 16 * (i % 4))));
            let wb = tile.as_ptr().add(b * ROW_TILE * BLOCK_BYTES);
            let mut rows = [[vdupq_n_s32(0); ROW_TILE]; 8];
            for ri in 0..ROW_TILE {
                let wr = wb.add(ri * BLOCK_BYTES);
                let mut acc = [vdupq_n_s32(0); 8];
                let mut p = [vdupq_n_s16(0); 8];
                for h in 0..4 {
                    let c = codes(vld1q_u8(wr.add(16 * h)));
                    for s in 0..4 {
                        let gb = (64 * s + 16 * h) / G;
                        if DOT {
                            acc[gb] = sdot(acc[gb], c[s], xb[4 * s + h]);
                        } else {
                            p[gb] = mla16(p[gb], c[s], xb[4 * s + h]);
                        }
                    }
                }
                for gb in 0..per_block {
                    rows[gb][ri] = if DOT { acc[gb] } else { vpaddlq_s16(p[gb]) };
                }
            }
            for (gb, slot) in rows.iter().enumerate().take(per_block) {
                let sums = reduce8(slot);
                out[(b * per_block + gb) * ROW_TILE..][..ROW_TILE].copy_from_slice(&sums);
            }
        }
    }
}
