//! AVX-512 kernels (F + BW, with VNNI where present).
//!
//! A whole 64-byte block is one register, and its four 2-bit fields are the codes of four runs
//! of 64 consecutive columns. With VNNI, `vpdpbusd(acc, codes u8, x i8)` sums four products
//! straight into i32 lanes; without it, `vpmaddubsw` + `vpmaddwd` as in the AVX2 kernels.
//! Int8 weights use `|x|` (u8) times `w` with the sign of `x` moved onto it.
//!
//! The kernel bodies are `#[inline(always)]` and generic over `VNNI`; thin wrappers compile
//! them under `avx512f,avx512bw` or `avx512f,avx512bw,avx512vnni`. Callers must have checked
//! the features with `KernelPath::Avx512Bw/Avx512Vnni.is_available()`.

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx2::reduce8;
use super::{Sink, GEMV_PREFETCH_BYTES};
use crate::group::GroupScales;
use crate::int8::PackedInt8;
use crate::layout::{PackedTernary, BLOCK_BYTES, BLOCK_COLS, ROW_TILE};
use crate::QuantizedActivations;

/// Tokens that share one unpacked weight block in the GEMM.
const TOKEN_TILE: usize = 8;
/// Blocks whose i16 sums fit before widening (no VNNI): a block adds 4 `maddubs` results in
/// [-512, 508] to each lane, and 64 of them stay within [-32768, 32512].
const I16_BLOCKS: usize = 16;

#[inline(always)]
unsafe fn load<T>(p: *const T) -> __m512i {
    // SAFETY: callers pass pointers to 64 readable bytes (inside checked slices).
    unsafe { _mm512_loadu_si512(p.cast()) }
}

/// The four 2-bit fields of a 64-byte block: `[s]` holds the codes of columns `64·s..64·s+64`.
#[inline(always)]
unsafe fn codes(v: __m512i) -> [__m512i; 4] {
    // SAFETY: AVX-512 BW is enabled in every function this is inlined into.
    unsafe {
        let mask = _mm512_set1_epi8(3);
        [
            _mm512_and_si512(v, mask),
            _mm512_and_si512(_mm512_srli_epi16::<2>(v), mask),
            _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask),
            _mm512_and_si512(_mm512_srli_epi16::<6>(v), mask),
        ]
    }
}

/// The codes of a 64-byte block for the GEMV, with one shift instead of three: `[0]`, `[2]`
/// are the codes of columns `0..64` and `128..192` (×1); `[1]`, `[3]` those of `64..128` and
/// `192..256` left in place, at four times their value.
#[inline(always)]
unsafe fn codes_x4(v: __m512i) -> [__m512i; 4] {
    // SAFETY: AVX-512 BW is enabled in every function this is inlined into.
    unsafe {
        let (m1, m4) = (_mm512_set1_epi8(3), _mm512_set1_epi8(12));
        let v4 = _mm512_srli_epi16::<4>(v);
        [_mm512_and_si512(v, m1), _mm512_and_si512(v, m4), _mm512_and_si512(v4, m1), _mm512_and_si512(v4, m4)]
    }
}

/// `Σ u·x` over one block as i16 lanes in [-2048, 2032] (no VNNI).
#[inline(always)]
unsafe fn block_i16(c: &[__m512i; 4], x: &[__m512i; 4]) -> __m512i {
    // SAFETY: AVX-512 BW is enabled in every function this is inlined into.
    unsafe {
        _mm512_add_epi16(
            _mm512_add_epi16(_mm512_maddubs_epi16(c[0], x[0]), _mm512_maddubs_epi16(c[1], x[1])),
            _mm512_add_epi16(_mm512_maddubs_epi16(c[2], x[2]), _mm512_maddubs_epi16(c[3], x[3])),
        )
    }
}

/// The 256 activations of one block, as four registers.
#[inline(always)]
unsafe fn load_block_x(x: *const i8) -> [__m512i; 4] {
    // SAFETY: `x` points at a whole 256-value block.
    unsafe { [load(x), load(x.add(64)), load(x.add(128)), load(x.add(192))] }
}

/// Eight i32x16 vectors to their eight horizontal sums.
#[inline(always)]
unsafe fn reduce8_512(a: &[__m512i; 8]) -> [i32; 8] {
    // SAFETY: AVX-512 F (so AVX2) is enabled in every function this is inlined into; `out`
    // has room for 32 bytes.
    unsafe {
        let halves: [__m256i; 8] = std::array::from_fn(|i| {
            _mm256_add_epi32(_mm512_castsi512_si256(a[i]), _mm512_extracti64x4_epi64::<1>(a[i]))
        });
        let mut out = [0i32; 8];
        _mm256_storeu_si256(out.as_mut_ptr().cast(), reduce8(&halves));
        out
    }
}

/// # Safety
/// The CPU must support AVX-512 F and BW, and VNNI if `VNNI`.
pub(crate) unsafe fn ternary_gemv<const VNNI: bool, S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    tiles: Range<usize>,
    sink: &S,
) {
    // SAFETY: the caller guarantees the features each wrapper enables.
    unsafe {
        if VNNI {
            ternary_gemv_vnni(w, x, tiles, sink)
        } else {
            ternary_gemv_bw(w, x, tiles, sink)
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn ternary_gemv_vnni<S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    tiles: Range<usize>,
    sink: &S,
) {
    // SAFETY: the features are enabled on this function.
    unsafe { ternary_gemv_body::<true, S>(w, x, tiles, sink) }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn ternary_gemv_bw<S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    tiles: Range<usize>,
    sink: &S,
) {
    // SAFETY: the features are enabled on this function.
    unsafe { ternary_gemv_body::<false, S>(w, x, tiles, sink) }
}

#[inline(always)]
unsafe fn ternary_gemv_body<const VNNI: bool, S: Sink>(
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
        // 256 activations, so every offset is in bounds; the features are the wrapper's.
        let dots = unsafe {
            let ones = _mm512_set1_epi16(1);
            // `acc1` sums the codes extracted at ×1, `acc4` those extracted at ×4 (VNNI);
            // without VNNI `acc1` takes 4·Σ directly.
            let mut acc1 = [_mm512_setzero_si512(); ROW_TILE];
            let mut acc4 = [_mm512_setzero_si512(); ROW_TILE];
            for b in 0..blocks {
                let xb = load_block_x(xr.as_ptr().add(b * BLOCK_COLS));
                let wb = tile.as_ptr().add(b * ROW_TILE * BLOCK_BYTES);
                for ri in 0..ROW_TILE {
                    // A hint, never a fault: past the last tile it touches nothing we read.
                    _mm_prefetch::<_MM_HINT_T0>(
                        wb.wrapping_add(GEMV_PREFETCH_BYTES + ri * BLOCK_BYTES).cast(),
                    );
                    let c = codes_x4(load(wb.add(ri * BLOCK_BYTES)));
                    if VNNI {
                        acc1[ri] = _mm512_dpbusd_epi32(acc1[ri], c[0], xb[0]);
                        acc4[ri] = _mm512_dpbusd_epi32(acc4[ri], c[1], xb[1]);
                        acc1[ri] = _mm512_dpbusd_epi32(acc1[ri], c[2], xb[2]);
                        acc4[ri] = _mm512_dpbusd_epi32(acc4[ri], c[3], xb[3]);
                    } else {
                        // 4·(×1 sums) + (×4 sums) stays within [-16384, 16256].
                        let p1 = _mm512_add_epi16(
                            _mm512_maddubs_epi16(c[0], xb[0]),
                            _mm512_maddubs_epi16(c[2], xb[2]),
                        );
                        let p4 = _mm512_add_epi16(
                            _mm512_maddubs_epi16(c[1], xb[1]),
                            _mm512_maddubs_epi16(c[3], xb[3]),
                        );
                        let p = _mm512_add_epi16(_mm512_slli_epi16::<2>(p1), p4);
                        acc1[ri] = _mm512_add_epi32(acc1[ri], _mm512_madd_epi16(p, ones));
                    }
                }
            }
            if VNNI {
                for ri in 0..ROW_TILE {
                    acc1[ri] = _mm512_add_epi32(_mm512_slli_epi32::<2>(acc1[ri]), acc4[ri]);
                }
            }
            // Every lane now holds 4·Σ u·x.
            reduce8_512(&acc1).map(|v| v >> 2)
        };
        let (r0, xsum) = (g * ROW_TILE, x.sum(0));
        for (ri, &d) in dots.iter().enumerate().take(w.rows() - r0) {
            sink.put(0, r0 + ri, d - xsum);
        }
    }
}

/// # Safety
/// The CPU must support AVX-512 F and BW, and VNNI if `VNNI`.
pub(crate) unsafe fn ternary_gemm<const VNNI: bool, S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    // SAFETY: the caller guarantees the features each wrapper enables.
    unsafe {
        if VNNI {
            ternary_gemm_vnni(w, x, rows, tokens, sink)
        } else {
            ternary_gemm_bw(w, x, rows, tokens, sink)
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn ternary_gemm_vnni<S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    // SAFETY: the features are enabled on this function.
    unsafe { ternary_gemm_body::<true, S>(w, x, rows, tokens, sink) }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn ternary_gemm_bw<S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    // SAFETY: the features are enabled on this function.
    unsafe { ternary_gemm_body::<false, S>(w, x, rows, tokens, sink) }
}

#[inline(always)]
unsafe fn ternary_gemm_body<const VNNI: bool, S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    if VNNI {
        // SAFETY: the features are the calling wrapper's.
        unsafe { ternary_gemm_register_tiles(w, x, rows, tokens, sink) };
        return;
    }
    let mut t0 = tokens.start;
    while t0 < tokens.end {
        // SAFETY: the features are the calling wrapper's.
        t0 += unsafe {
            match tokens.end - t0 {
                8.. => ternary_tile::<TOKEN_TILE, S>(w, x, rows.clone(), t0, sink),
                4..=7 => ternary_tile::<4, S>(w, x, rows.clone(), t0, sink),
                2..=3 => ternary_tile::<2, S>(w, x, rows.clone(), t0, sink),
                _ => ternary_tile::<1, S>(w, x, rows.clone(), t0, sink),
            }
        };
    }
}

/// Rows of one register tile of the VNNI GEMM: four rows of a row tile, whose blocks lie next to
/// each other (256 bytes a block).
const REG_ROWS: usize = 4;
/// Tokens of one register tile of the VNNI GEMM.
const REG_TOKENS: usize = 4;

/// Runs `$tile::<MT, S>(w, x, g, rows, t0, sink)` (which returns `MT`) over every register tile
/// of `rows` × `tokens`: groups of [`REG_ROWS`] rows, starting at multiples of four so that a
/// group never straddles a row tile, outer; tiles of up to [`REG_TOKENS`] tokens inner. (A
/// macro, not a closure: closures do not inherit the caller's target features, and the
/// intrinsics would become calls.)
macro_rules! for_register_tiles {
    ($tile:ident, $w:expr, $x:expr, $rows:expr, $tokens:expr, $sink:expr) => {
        for g in ($rows.start / REG_ROWS * REG_ROWS..$rows.end).step_by(REG_ROWS) {
            let mut t0 = $tokens.start;
            while t0 < $tokens.end {
                t0 += match $tokens.end - t0 {
                    4.. => $tile::<REG_TOKENS, S>($w, $x, g, $rows.clone(), t0, $sink),
                    3 => $tile::<3, S>($w, $x, g, $rows.clone(), t0, $sink),
                    2 => $tile::<2, S>($w, $x, g, $rows.clone(), t0, $sink),
                    _ => $tile::<1, S>($w, $x, g, $rows.clone(), t0, $sink),
                };
            }
        }
    };
}

/// The VNNI GEMM for a few tokens (decode steps of many sequences), in register tiles of
/// [`REG_ROWS`] rows × [`REG_TOKENS`] tokens: each 64-column run of codes is decoded once for
/// four tokens and each activation vector loaded once for four rows, so a block costs 64
/// `vpdpbusd` against 20 loads and 28 shifts and masks. A 1-row kernel ([`ternary_tile`], kept
/// for AVX-512 without VNNI) loads an activation vector for every `vpdpbusd` and ran at about
/// half the instruction's rate.
#[inline(always)]
unsafe fn ternary_gemm_register_tiles<S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    // Row groups outer: a group's weights (K bytes) stay in L1 while every token tile passes,
    // so the weights stream from memory once (64 multiply-adds a byte at 16 tokens) and the
    // activations (M × K bytes) come from L2.
    // SAFETY: the features are the calling wrapper's.
    unsafe { for_register_tiles!(ternary_register_tile, w, x, rows, tokens, sink) }
}

/// The horizontal sums of a register tile's accumulators, `[token][row]`, eight vectors at a
/// time. (Loops, not closures: a closure here would not inherit the caller's target features.)
#[inline(always)]
unsafe fn reduce_tile<const MT: usize>(acc: &[[__m512i; MT]; REG_ROWS]) -> [[i32; REG_ROWS]; MT] {
    let mut dots = [[0i32; REG_ROWS]; MT];
    // SAFETY: AVX-512 F is enabled in every function this is inlined into.
    unsafe {
        let mut k = 0;
        while k < REG_ROWS * MT {
            let mut lanes = [_mm512_setzero_si512(); 8];
            for (j, lane) in lanes.iter_mut().enumerate().take(REG_ROWS * MT - k) {
                *lane = acc[(k + j) % REG_ROWS][(k + j) / REG_ROWS];
            }
            for (j, d) in reduce8_512(&lanes).into_iter().enumerate().take(REG_ROWS * MT - k) {
                dots[(k + j) / REG_ROWS][(k + j) % REG_ROWS] = d;
            }
            k += 8;
        }
    }
    dots
}

/// Rows `g..g + 4` against tokens `t0..t0 + MT`; rows outside `rows` (padding included) are
/// computed and not written. Returns `MT`.
#[inline(always)]
unsafe fn ternary_register_tile<const MT: usize, S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    g: usize,
    rows: Range<usize>,
    t0: usize,
    sink: &S,
) -> usize {
    let blocks = w.blocks();
    let xs: [&[i8]; MT] = std::array::from_fn(|i| x.padded_row(t0 + i));
    assert!(xs.iter().all(|r| r.len() >= blocks * BLOCK_COLS));
    let wg = w.tile(g / ROW_TILE)[(g % ROW_TILE) * BLOCK_BYTES..].as_ptr();
    // SAFETY: rows `g..g + 4` lie in one row tile (padded to 8 rows), whose block `bb` holds
    // their four blocks at `bb · 8 · 64 + 64 · i`; token rows hold `blocks · 256` activations
    // (asserted above); the features are the calling wrapper's.
    let dots = unsafe {
        let mask = _mm512_set1_epi8(3);
        let mut acc = [[_mm512_setzero_si512(); MT]; REG_ROWS];
        // The same block of the group two ahead (the next row tile): without it the first
        // token tile of every group waits on memory (one core, 8 layers from DRAM at 16
        // tokens: 58 → 50 ms). A prefetch past the matrix's end does not fault.
        let ahead = w.tile_bytes();
        for bb in 0..blocks {
            let wb = wg.add(bb * ROW_TILE * BLOCK_BYTES);
            for i in 0..REG_ROWS {
                _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(ahead + i * BLOCK_BYTES).cast());
            }
            let mut v: [__m512i; REG_ROWS] = std::array::from_fn(|i| load(wb.add(i * BLOCK_BYTES)));
            for s in 0..4 {
                // Field `s` of each row's block: the codes of columns 64·s..64·s + 64.
                let c: [__m512i; REG_ROWS] = std::array::from_fn(|i| _mm512_and_si512(v[i], mask));
                for t in 0..MT {
                    let xv = load(xs[t].as_ptr().add(bb * BLOCK_COLS + 64 * s));
                    for i in 0..REG_ROWS {
                        acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], c[i], xv);
                    }
                }
                for vi in &mut v {
                    *vi = _mm512_srli_epi16::<2>(*vi);
                }
            }
        }
        reduce_tile(&acc)
    };
    let live = g.max(rows.start)..(g + REG_ROWS).min(rows.end);
    for (t, row_dots) in dots.iter().enumerate() {
        sink.put_run(t0 + t, live.start, &row_dots[live.start - g..live.end - g], x.sum(t0 + t));
    }
    MT
}

/// `rows` against tokens `t0..t0 + MT` without VNNI (`vpmaddubsw`, i16 sums over
/// [`I16_BLOCKS`] blocks): each row's block decoded once for the `MT` tokens.
#[inline(always)]
unsafe fn ternary_tile<const MT: usize, S: Sink>(
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
        // SAFETY: row `r`'s block `bb` is `bb · 8 · 64` bytes after its first block, inside
        // its tile; token rows hold `blocks · 256` activations; the features are the wrapper's.
        let dots = unsafe {
            let ones = _mm512_set1_epi16(1);
            let mut acc32 = [_mm512_setzero_si512(); 8];
            let mut b = 0;
            while b < blocks {
                let end = (b + I16_BLOCKS).min(blocks);
                let mut acc16 = [_mm512_setzero_si512(); MT];
                for bb in b..end {
                    let c = codes(load(wr.add(bb * ROW_TILE * BLOCK_BYTES)));
                    for i in 0..MT {
                        let xb = load_block_x(xs[i].as_ptr().add(bb * BLOCK_COLS));
                        acc16[i] = _mm512_add_epi16(acc16[i], block_i16(&c, &xb));
                    }
                }
                for i in 0..MT {
                    acc32[i] = _mm512_add_epi32(acc32[i], _mm512_madd_epi16(acc16[i], ones));
                }
                b = end;
            }
            reduce8_512(&acc32)
        };
        for (i, &d) in dots.iter().enumerate().take(MT) {
            sink.put(t0 + i, r, d - x.sum(t0 + i));
        }
    }
    MT
}

/// `acc + x·w` for 64 int8 pairs, as i32 lanes. `xa = |x|`, `neg` = the lanes where `x < 0`.
#[inline(always)]
unsafe fn int8_acc<const VNNI: bool>(acc: __m512i, w: __m512i, xa: __m512i, neg: __mmask64) -> __m512i {
    // SAFETY: AVX-512 BW (and VNNI when `VNNI`) is enabled in every function this is inlined into.
    unsafe {
        // w with the sign of x moved onto it; |w| ≤ 127, so negating cannot overflow.
        let sw = _mm512_mask_sub_epi8(w, neg, _mm512_setzero_si512(), w);
        if VNNI {
            _mm512_dpbusd_epi32(acc, xa, sw)
        } else {
            _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(xa, sw), _mm512_set1_epi16(1)))
        }
    }
}

/// # Safety
/// The CPU must support AVX-512 F and BW, and VNNI if `VNNI`.
pub(crate) unsafe fn int8_gemv<const VNNI: bool, S: Sink>(
    w: &PackedInt8,
    x: &QuantizedActivations,
    groups: Range<usize>,
    sink: &S,
) {
    // SAFETY: the caller guarantees the features each wrapper enables.
    unsafe {
        if VNNI {
            int8_gemv_vnni(w, x, groups, sink)
        } else {
            int8_gemv_bw(w, x, groups, sink)
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn int8_gemv_vnni<S: Sink>(w: &PackedInt8, x: &QuantizedActivations, groups: Range<usize>, sink: &S) {
    // SAFETY: the features are enabled on this function.
    unsafe { int8_gemv_body::<true, S>(w, x, groups, sink) }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn int8_gemv_bw<S: Sink>(w: &PackedInt8, x: &QuantizedActivations, groups: Range<usize>, sink: &S) {
    // SAFETY: the features are enabled on this function.
    unsafe { int8_gemv_body::<false, S>(w, x, groups, sink) }
}

#[inline(always)]
unsafe fn int8_gemv_body<const VNNI: bool, S: Sink>(
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
        // `c + 64 <= stride` (a multiple of 256); the features are the wrapper's.
        let dots = unsafe {
            let mut acc = [_mm512_setzero_si512(); ROW_TILE];
            for c in (0..stride).step_by(64) {
                let xv = load(xr.as_ptr().add(c));
                let (xa, neg) = (_mm512_abs_epi8(xv), _mm512_movepi8_mask(xv));
                for (ri, a) in acc.iter_mut().enumerate() {
                    let wc = group.as_ptr().add(PackedInt8::group_offset(ri, c));
                    _mm_prefetch::<_MM_HINT_T0>(wc.wrapping_add(GEMV_PREFETCH_BYTES).cast());
                    *a = int8_acc::<VNNI>(*a, load(wc), xa, neg);
                }
            }
            reduce8_512(&acc)
        };
        let r0 = g * ROW_TILE;
        for (ri, &d) in dots.iter().enumerate().take(w.rows() - r0) {
            sink.put(0, r0 + ri, d);
        }
    }
}

/// # Safety
/// The CPU must support AVX-512 F and BW, and VNNI if `VNNI`.
pub(crate) unsafe fn int8_gemm<const VNNI: bool, S: Sink>(
    w: &PackedInt8,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    // SAFETY: the caller guarantees the features each wrapper enables.
    unsafe {
        if VNNI {
            int8_gemm_vnni(w, x, rows, tokens, sink)
        } else {
            int8_gemm_bw(w, x, rows, tokens, sink)
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn int8_gemm_vnni<S: Sink>(
    w: &PackedInt8,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    // SAFETY: the features are enabled on this function.
    unsafe { int8_gemm_body::<true, S>(w, x, rows, tokens, sink) }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn int8_gemm_bw<S: Sink>(
    w: &PackedInt8,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    // SAFETY: the features are enabled on this function.
    unsafe { int8_gemm_body::<false, S>(w, x, rows, tokens, sink) }
}

#[inline(always)]
unsafe fn int8_gemm_body<const VNNI: bool, S: Sink>(
    w: &PackedInt8,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    if VNNI {
        // SAFETY: the features are the calling wrapper's.
        unsafe { int8_gemm_register_tiles(w, x, rows, tokens, sink) };
        return;
    }
    let mut t0 = tokens.start;
    while t0 < tokens.end {
        // SAFETY: the features are the calling wrapper's.
        t0 += unsafe {
            match tokens.end - t0 {
                8.. => int8_tile::<TOKEN_TILE, S>(w, x, rows.clone(), t0, sink),
                4..=7 => int8_tile::<4, S>(w, x, rows.clone(), t0, sink),
                2..=3 => int8_tile::<2, S>(w, x, rows.clone(), t0, sink),
                _ => int8_tile::<1, S>(w, x, rows.clone(), t0, sink),
            }
        };
    }
}

/// The int8 GEMM with VNNI (the integer head of a decode step of many sequences) in register
/// tiles of [`REG_ROWS`] rows × [`REG_TOKENS`] tokens, as [`ternary_gemm_register_tiles`]: per
/// 64 columns, 16 `vpdpbusd` against 4 weight and 4 activation loads. The weights are offset to
/// unsigned codes `u = w + 128` (the sign bit flipped, once per load for every token), so that
/// `vpdpbusd` takes the activations as they are, and `Σ u·x − 128 · Σ x` is the product: the
/// same integers (wrapping i32 arithmetic, exact whenever the result fits).
#[inline(always)]
unsafe fn int8_gemm_register_tiles<S: Sink>(
    w: &PackedInt8,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    // SAFETY: the features are the calling wrapper's.
    unsafe { for_register_tiles!(int8_register_tile, w, x, rows, tokens, sink) }
}

/// Int8 rows `g..g + 4` against tokens `t0..t0 + MT`; rows outside `rows` are computed and not
/// written. Returns `MT`.
#[inline(always)]
unsafe fn int8_register_tile<const MT: usize, S: Sink>(
    w: &PackedInt8,
    x: &QuantizedActivations,
    g: usize,
    rows: Range<usize>,
    t0: usize,
    sink: &S,
) -> usize {
    let stride = w.stride();
    let xs: [&[i8]; MT] = std::array::from_fn(|i| x.padded_row(t0 + i));
    assert!(xs.iter().all(|r| r.len() >= stride));
    let (group, ri) = w.row_in_group(g);
    // The same chunk of the same rows in the next group of eight, ahead of the first token tile.
    let ahead = ROW_TILE * stride;
    // SAFETY: the group holds 8 rows (rows `ri..ri + 4` with `ri` 0 or 4), whose chunk `c`
    // lies at `group_offset(ri + i, c)`, 64 bytes each, and every token row `stride` values,
    // `c + 64 <= stride`; the features are the calling wrapper's.
    let dots = unsafe {
        let flip = _mm512_set1_epi8(i8::MIN);
        let mut acc = [[_mm512_setzero_si512(); MT]; REG_ROWS];
        for c in (0..stride).step_by(64) {
            let wc = group.as_ptr().add(PackedInt8::group_offset(ri, c));
            for i in 0..REG_ROWS {
                _mm_prefetch::<_MM_HINT_T0>(wc.wrapping_add(ahead + i * 64).cast());
            }
            let u: [__m512i; REG_ROWS] =
                std::array::from_fn(|i| _mm512_xor_si512(load(wc.add(i * 64)), flip));
            for t in 0..MT {
                let xv = load(xs[t].as_ptr().add(c));
                for i in 0..REG_ROWS {
                    acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], u[i], xv);
                }
            }
        }
        reduce_tile(&acc)
    };
    let live = g.max(rows.start)..(g + REG_ROWS).min(rows.end);
    for (t, row_dots) in dots.iter().enumerate() {
        let sub = x.sum(t0 + t).wrapping_mul(128);
        for r in live.clone() {
            sink.put(t0 + t, r, row_dots[r - g].wrapping_sub(sub));
        }
    }
    MT
}

/// `rows` against tokens `t0..t0 + MT` without VNNI, each load of 64 weights shared by the
/// `MT` tokens: `vpmaddubsw` would saturate on offset codes, so `|x|` times `w` with the sign
/// of `x` moved onto it, per token. (With VNNI, [`int8_register_tile`].)
#[inline(always)]
unsafe fn int8_tile<const MT: usize, S: Sink>(
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
        // `c + 64 <= stride` with `c` a multiple of 64 (one whole chunk); the features are the
        // wrapper's.
        let dots = unsafe {
            let mut acc = [_mm512_setzero_si512(); TOKEN_TILE];
            for c in (0..stride).step_by(64) {
                let wv = load(group.as_ptr().add(PackedInt8::group_offset(ri, c)));
                for i in 0..MT {
                    let xv = load(xs[i].as_ptr().add(c));
                    acc[i] = int8_acc::<false>(acc[i], wv, _mm512_abs_epi8(xv), _mm512_movepi8_mask(xv));
                }
            }
            reduce8_512(&acc)
        };
        for (i, &d) in dots.iter().enumerate().take(MT) {
            sink.put(t0 + i, r, d);
        }
    }
    MT
}

/// Code sums per group of `G` columns of the eight rows of each tile of `tiles` with one token's
/// padded activations (see the AVX2 `ternary_tile_group_sums`, which gives the same integers),
/// each tile's sums handed to `f(g, sums)`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn ternary_tiles_group_sums_vnni<const G: usize, F: FnMut(usize, &[i32])>(
    w: &PackedTernary,
    tiles: Range<usize>,
    xr: &[i8],
    part: &mut [i32],
    mut f: F,
) {
    for g in tiles {
        // SAFETY: the features are enabled on this function.
        unsafe { tile_group_sums_body::<true, G, false>(w, g, xr, part, &[], &[]) };
        f(g, part);
    }
}

/// The two entry points of the combined group product (see [`tile_group_sums_body`]'s
/// `COMBINE`): each tile of `tiles` combined ([`crate::group::combine_tile`] of its group sums
/// with `xs` and the scales `d`) inside the kernel, handed to `f(g, values)`. A macro: the two
/// differ only in their target features and the kernel's `VNNI`.
macro_rules! group_combined {
    ($($(#[$doc:meta])* $name:ident($features:literal, $vnni:literal);)*) => {$(
        $(#[$doc])*
        ///
        /// # Safety
        /// The CPU must support the function's target features.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name<const G: usize, F: FnMut(usize, [f32; ROW_TILE])>(
            w: &PackedTernary,
            tiles: Range<usize>,
            xr: &[i8],
            xs: &[i32],
            d: &GroupScales,
            mut f: F,
        ) {
            for g in tiles {
                // SAFETY: the features are enabled on this function.
                let v = unsafe { tile_group_sums_body::<$vnni, G, true>(w, g, xr, &mut [], xs, d.tile(g)) };
                f(g, to_f32s(v));
            }
        }
    )*};
}

group_combined! {
    /// With `vpdpbusd` (AVX-512 F, BW and VNNI).
    ternary_tiles_group_combined_vnni("avx512f,avx512bw,avx512vnni", true);
    /// Without VNNI (AVX-512 F and BW).
    ternary_tiles_group_combined_bw("avx512f,avx512bw", false);
}

/// The eight lanes of `v`.
#[inline(always)]
fn to_f32s(v: __m256) -> [f32; ROW_TILE] {
    let mut out = [0.0f32; ROW_TILE];
    // SAFETY: `out` holds 8 f32; AVX is part of every feature set this is inlined under.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
    out
}

/// As [`ternary_tiles_group_sums_vnni`], without VNNI.
///
/// # Safety
/// The CPU must support AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn ternary_tiles_group_sums_bw<const G: usize, F: FnMut(usize, &[i32])>(
    w: &PackedTernary,
    tiles: Range<usize>,
    xr: &[i8],
    part: &mut [i32],
    mut f: F,
) {
    for g in tiles {
        // SAFETY: the features are enabled on this function.
        unsafe { tile_group_sums_body::<false, G, false>(w, g, xr, part, &[], &[]) };
        f(g, part);
    }
}

/// Rows in lanes: the eight rows' 64-byte blocks are transposed by quadwords, so that register
/// `q` holds bytes `8q..8q + 8` of every row (quadword `i` = row `i`). Field `s` of those bytes
/// is columns `64·s + 8q..+8`, multiplied by the activations of those columns broadcast to every
/// quadword: each i32 lane sums four products of one row, and a group's accumulator gathers its
/// columns for all eight rows at once, with no horizontal reduction; at the end of a block the
/// two lanes of each row are added. Fields 1 and 3 are taken in place, at four times their
/// value (one shift for all four fields, as in the GEMV), into accumulators of their own whose
/// sums lose the factor with an exact shift. Without VNNI, `vpmaddubsw` sums pairs in i16 and
/// `vpmaddwd` widens them at the end of the block: a group of 256 adds 16 pair sums per
/// accumulator, each within [-2048, 2032] for the ×4 fields (codes 0, 4, 8 times activations in
/// [-128, 127]), so at most [-32768, 32512]: no i16 overflow.
///
/// With `COMBINE`, each group's sums go straight into [`crate::group::combine_tile`]'s f32
/// sums instead of `out` (`d` the tile's scales, `xs` the token's group activation sums, one
/// per real group), returned as eight lanes: the same operations in the same order, so the same
/// bits, but each group's float steps overlap the next block's integer work instead of forming
/// one long dependent chain after the tile.
#[inline(always)]
unsafe fn tile_group_sums_body<const VNNI: bool, const G: usize, const COMBINE: bool>(
    w: &PackedTernary,
    g: usize,
    xr: &[i8],
    out: &mut [i32],
    xs: &[i32],
    d: &[f32],
) -> __m256 {
    let per_block = BLOCK_COLS / G;
    let blocks = w.blocks();
    let tile = w.tile(g);
    assert!(xr.len() >= blocks * BLOCK_COLS);
    assert!(if COMBINE {
        d.len() >= xs.len() * ROW_TILE
    } else {
        out.len() >= blocks * per_block * ROW_TILE
    });
    assert!(tile.len() >= blocks * ROW_TILE * BLOCK_BYTES);
    let mut combined = _mm256_setzero_ps();
    // SAFETY: tile `g` holds `blocks · 8` blocks of 64 bytes and `xr` `blocks` blocks of 256
    // activations (checked above), so every offset is in bounds; the features are the wrapper's.
    unsafe {
        let (m1, m4) = (_mm512_set1_epi8(3), _mm512_set1_epi8(12));
        let ones = _mm512_set1_epi16(1);
        for b in 0..blocks {
            let wb = tile.as_ptr().add(b * ROW_TILE * BLOCK_BYTES);
            let xb = xr.as_ptr().add(b * BLOCK_COLS);
            for ri in 0..ROW_TILE {
                _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(GEMV_PREFETCH_BYTES + ri * BLOCK_BYTES).cast());
            }
            let t = transpose_rows([
                load(wb),
                load(wb.add(BLOCK_BYTES)),
                load(wb.add(2 * BLOCK_BYTES)),
                load(wb.add(3 * BLOCK_BYTES)),
                load(wb.add(4 * BLOCK_BYTES)),
                load(wb.add(5 * BLOCK_BYTES)),
                load(wb.add(6 * BLOCK_BYTES)),
                load(wb.add(7 * BLOCK_BYTES)),
            ]);
            // acc[h][s]: field s, columns 32h..32h + 32 of it (quadwords 4h..4h + 4), for all
            // eight rows; fields 1 and 3 at four times their value. Fixed indices: registers.
            let mut acc = [[_mm512_setzero_si512(); 4]; 2];
            for (h, acc_h) in acc.iter_mut().enumerate() {
                for qq in 0..4 {
                    let q = 4 * h + qq;
                    let v = t[q];
                    let v4 = _mm512_srli_epi16::<4>(v);
                    let c = [
                        _mm512_and_si512(v, m1),
                        _mm512_and_si512(v, m4),
                        _mm512_and_si512(v4, m1),
                        _mm512_and_si512(v4, m4),
                    ];
                    for (s, a) in acc_h.iter_mut().enumerate() {
                        let xq = _mm512_set1_epi64((xb.add(64 * s + 8 * q) as *const i64).read_unaligned());
                        *a = if VNNI {
                            _mm512_dpbusd_epi32(*a, c[s], xq)
                        } else {
                            // Four pair sums of at most ±2048 per lane: within i16.
                            _mm512_add_epi16(*a, _mm512_maddubs_epi16(c[s], xq))
                        };
                    }
                }
            }
            // The code sums of each field half as i32 lanes, the ×4 taken off (exact: multiples of 4).
            let mut f = [[_mm512_setzero_si512(); 4]; 2];
            for h in 0..2 {
                for s in 0..4 {
                    let a = if VNNI { acc[h][s] } else { _mm512_madd_epi16(acc[h][s], ones) };
                    f[h][s] = if s % 2 == 1 { _mm512_srai_epi32::<2>(a) } else { a };
                }
            }
            for gb in 0..per_block {
                // The field halves of group gb: 32 columns = one (h, s); 64 = both halves of field
                // gb; 128 = fields 2gb, 2gb + 1; 256 = all.
                let lanes = match G {
                    32 => f[gb % 2][gb / 2],
                    64 => _mm512_add_epi32(f[0][gb], f[1][gb]),
                    128 => _mm512_add_epi32(
                        _mm512_add_epi32(f[0][2 * gb], f[1][2 * gb]),
                        _mm512_add_epi32(f[0][2 * gb + 1], f[1][2 * gb + 1]),
                    ),
                    _ => {
                        let a = _mm512_add_epi32(
                            _mm512_add_epi32(f[0][0], f[1][0]),
                            _mm512_add_epi32(f[0][1], f[1][1]),
                        );
                        let b = _mm512_add_epi32(
                            _mm512_add_epi32(f[0][2], f[1][2]),
                            _mm512_add_epi32(f[0][3], f[1][3]),
                        );
                        _mm512_add_epi32(a, b)
                    }
                };
                // Row i's two lanes (quadword i) added, then one dword per row.
                let rows = _mm512_cvtepi64_epi32(_mm512_add_epi32(lanes, _mm512_srli_epi64::<32>(lanes)));
                let gi = b * per_block + gb;
                if !COMBINE {
                    _mm256_storeu_si256(out.as_mut_ptr().add(gi * ROW_TILE).cast(), rows);
                } else if gi < xs.len() {
                    // combine_tile's step for group gi: a multiply, then an add.
                    let u = _mm256_cvtepi32_ps(_mm256_sub_epi32(rows, _mm256_set1_epi32(xs[gi])));
                    let term = _mm256_mul_ps(_mm256_loadu_ps(d.as_ptr().add(gi * ROW_TILE)), u);
                    combined = _mm256_add_ps(combined, term);
                }
            }
        }
    }
    combined
}

/// Transposes eight registers of eight quadwords: quadword `i` of result `q` is quadword `q` of
/// input `i` (8 unpacks, then two rounds of 128-bit lane shuffles). Written out, without closures,
/// so that everything inlines into the AVX-512 wrappers.
#[inline(always)]
unsafe fn transpose_rows(r: [__m512i; 8]) -> [__m512i; 8] {
    // SAFETY: AVX-512 F is enabled in every function this is inlined into.
    unsafe {
        // Lane k (128 bits) of lo[p] holds quadword 2k of rows 2p and 2p + 1; hi[p] quadword 2k + 1.
        let lo = [
            _mm512_unpacklo_epi64(r[0], r[1]),
            _mm512_unpacklo_epi64(r[2], r[3]),
            _mm512_unpacklo_epi64(r[4], r[5]),
            _mm512_unpacklo_epi64(r[6], r[7]),
        ];
        let hi = [
            _mm512_unpackhi_epi64(r[0], r[1]),
            _mm512_unpackhi_epi64(r[2], r[3]),
            _mm512_unpackhi_epi64(r[4], r[5]),
            _mm512_unpackhi_epi64(r[6], r[7]),
        ];
        let e = gather_lanes(lo);
        let o = gather_lanes(hi);
        [e[0], o[0], e[1], o[1], e[2], o[2], e[3], o[3]]
    }
}

/// Result `k` holds lane `k` (128 bits) of each of the four sources, in order: lanes 0, 2 then
/// 1, 3 of two sources at a time, then the same again.
#[inline(always)]
unsafe fn gather_lanes(a: [__m512i; 4]) -> [__m512i; 4] {
    // SAFETY: AVX-512 F is enabled in every function this is inlined into.
    unsafe {
        let s0 = _mm512_shuffle_i64x2::<0b10_00_10_00>(a[0], a[1]);
        let s1 = _mm512_shuffle_i64x2::<0b11_01_11_01>(a[0], a[1]);
        let s2 = _mm512_shuffle_i64x2::<0b10_00_10_00>(a[2], a[3]);
        let s3 = _mm512_shuffle_i64x2::<0b11_01_11_01>(a[2], a[3]);
        [
            _mm512_shuffle_i64x2::<0b10_00_10_00>(s0, s2),
            _mm512_shuffle_i64x2::<0b10_00_10_00>(s1, s3),
            _mm512_shuffle_i64x2::<0b11_01_11_01>(s0, s2),
            _mm512_shuffle_i64x2::<0b11_01_11_01>(s1, s3),
        ]
    }
}
