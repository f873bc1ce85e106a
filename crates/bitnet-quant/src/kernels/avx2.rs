//! AVX2 kernels.
//!
//! Ternary: `vpmaddubsw(codes u8 ∈ {0,1,2}, x i8)` gives i16 pair sums in [-512, 508]; those
//! are summed in i16 while they provably fit, widened with `vpmaddwd(·, 1)` to i32, reduced,
//! and the token's activation sum is subtracted to shift the codes to {-1, 0, 1}. The GEMV is
//! bound by the instructions that unpack the codes, so it extracts half of them without a
//! shift ([`block_dot_x4`]). The GEMM unpacks a panel of rows once into one byte per code on
//! the stack, eight rows interleaved so that each lane sums for one row, and shares it among
//! up to 128 tokens ([`ternary_gemm`]).
//!
//! Int8: `vpmaddubsw(|x|, sign(w, x))` = `x·w` pairwise (|x| ≤ 128 and |w| ≤ 127, so a pair sum
//! is at most 32512 and never saturates), widened to i32 at once.
//!
//! Every function here is `unsafe` because it needs AVX2; the dispatchers call them only after
//! `KernelPath::Avx2.is_available()` (or AVX-512, which implies it). Shapes are checked by the
//! safe packed types before any pointer is formed.

use std::arch::x86_64::*;
use std::ops::Range;

use super::SharedOut;
use super::{Sink, GEMV_PREFETCH_BYTES};
use crate::group::GroupScales;
use crate::int6::{self, PackedInt6, CHUNK_BYTES, CHUNK_COLS};
use crate::int8::{PackedInt8, CHUNK};
use crate::layout::{PackedTernary, BLOCK_BYTES, BLOCK_COLS, ROW_TILE};
use crate::{QuantizedActivations, WeightScale};

/// Tokens that share one weight row in the int8 GEMM.
const TOKEN_TILE: usize = 8;
/// Blocks whose i16 partial sums (row-wise GEMM) can be added before widening: a block adds 8 `maddubs`
/// results in [-512, 508] to each lane, and 64 of them stay within [-32768, 32512].
const I16_BLOCKS: usize = 8;

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load(p: *const u8) -> __m256i {
    // SAFETY: callers pass pointers to 32 readable bytes (inside checked slices).
    unsafe { _mm256_loadu_si256(p.cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_i8(p: *const i8) -> __m256i {
    // SAFETY: as in `load`.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// The four 2-bit fields of 32 packed bytes: `[s]` holds the codes of columns `64·s + j`.
#[inline]
#[target_feature(enable = "avx2")]
fn codes(v: __m256i) -> [__m256i; 4] {
    let mask = _mm256_set1_epi8(3);
    [
        _mm256_and_si256(v, mask),
        _mm256_and_si256(_mm256_srli_epi16::<2>(v), mask),
        _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask),
        _mm256_and_si256(_mm256_srli_epi16::<6>(v), mask),
    ]
}

/// `Σ u·x` over the 128 columns that one 32-byte half of a block codes, as i16 lanes in
/// [-2048, 2032]. `x` points at the activation of the half's first column.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn half_dot(c: &[__m256i; 4], x: *const i8) -> __m256i {
    // SAFETY: `x` and the three offsets below are inside the 256-column block of `x`.
    unsafe {
        let p01 = _mm256_add_epi16(
            _mm256_maddubs_epi16(c[0], load_i8(x)),
            _mm256_maddubs_epi16(c[1], load_i8(x.add(64))),
        );
        let p23 = _mm256_add_epi16(
            _mm256_maddubs_epi16(c[2], load_i8(x.add(128))),
            _mm256_maddubs_epi16(c[3], load_i8(x.add(192))),
        );
        _mm256_add_epi16(p01, p23)
    }
}

/// `4 · Σ u·x` over one 64-byte block as i16 lanes in [-16384, 16256], for the GEMV.
///
/// Codes 0 and 2 of each byte are extracted at their value (`v & 3`, `(v >> 4) & 3`), codes 1
/// and 3 in place at four times their value (`v & 12`, `(v >> 4) & 12`): one shift instead of
/// three. `maddubs` of the ×4 codes stays within [-2048, 2032] per pair, and
/// `4·(×1 sums) + (×4 sums)` fits i16, so the caller widens once per block and divides the
/// total by 4 at the end.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn block_dot_x4(w: *const u8, x: *const i8) -> __m256i {
    let (m1, m4) = (_mm256_set1_epi8(3), _mm256_set1_epi8(12));
    let (mut p1, mut p4) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    for half in 0..2 {
        // SAFETY: `w` points at a 64-byte block and `x` at its 256 activations.
        unsafe {
            let v = load(w.add(32 * half));
            let v4 = _mm256_srli_epi16::<4>(v);
            let xh = x.add(32 * half);
            p1 = _mm256_add_epi16(
                p1,
                _mm256_add_epi16(
                    _mm256_maddubs_epi16(_mm256_and_si256(v, m1), load_i8(xh)),
                    _mm256_maddubs_epi16(_mm256_and_si256(v4, m1), load_i8(xh.add(128))),
                ),
            );
            p4 = _mm256_add_epi16(
                p4,
                _mm256_add_epi16(
                    _mm256_maddubs_epi16(_mm256_and_si256(v, m4), load_i8(xh.add(64))),
                    _mm256_maddubs_epi16(_mm256_and_si256(v4, m4), load_i8(xh.add(192))),
                ),
            );
        }
    }
    _mm256_add_epi16(_mm256_slli_epi16::<2>(p1), p4)
}

/// Horizontal sums of eight vectors: lane `i` of the result is the sum of `a[i]`.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn reduce8(a: &[__m256i; 8]) -> __m256i {
    let s01 = _mm256_hadd_epi32(a[0], a[1]);
    let s23 = _mm256_hadd_epi32(a[2], a[3]);
    let s45 = _mm256_hadd_epi32(a[4], a[5]);
    let s67 = _mm256_hadd_epi32(a[6], a[7]);
    let t0 = _mm256_hadd_epi32(s01, s23);
    let t1 = _mm256_hadd_epi32(s45, s67);
    _mm256_add_epi32(_mm256_permute2x128_si256::<0x20>(t0, t1), _mm256_permute2x128_si256::<0x31>(t0, t1))
}

#[inline]
#[target_feature(enable = "avx2")]
fn to_array(v: __m256i) -> [i32; 8] {
    let mut out = [0i32; 8];
    // SAFETY: `out` has room for 32 bytes.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), v) };
    out
}

/// GEMV (one token) over row tiles `tiles`: eight rows at a time, reading each tile's weights
/// as one stream.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn ternary_gemv<S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    tiles: Range<usize>,
    sink: &S,
) {
    let blocks = w.blocks();
    let xr = x.padded_row(0);
    assert!(xr.len() >= blocks * BLOCK_COLS);
    let xsum = _mm256_set1_epi32(x.sum(0));
    let ones = _mm256_set1_epi16(1);
    for g in tiles {
        let tile = w.tile(g);
        let mut acc = [_mm256_setzero_si256(); ROW_TILE];
        for b in 0..blocks {
            // SAFETY: tile `g` holds `blocks · 8` blocks of 64 bytes and `xr` holds `blocks`
            // blocks of 256 activations, so every offset below is in bounds.
            unsafe {
                let wb = tile.as_ptr().add(b * ROW_TILE * BLOCK_BYTES);
                let xb = xr.as_ptr().add(b * BLOCK_COLS);
                for (ri, a) in acc.iter_mut().enumerate() {
                    // A hint, never a fault: past the last tile it touches nothing we read.
                    _mm_prefetch::<_MM_HINT_T0>(
                        wb.wrapping_add(GEMV_PREFETCH_BYTES + ri * BLOCK_BYTES).cast(),
                    );
                    let p = block_dot_x4(wb.add(ri * BLOCK_BYTES), xb);
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(p, ones));
                }
            }
        }
        // The accumulators hold 4·Σ u·x, a multiple of 4.
        let dots = to_array(_mm256_sub_epi32(_mm256_srai_epi32::<2>(reduce8(&acc)), xsum));
        let r0 = g * ROW_TILE;
        for (ri, &d) in dots.iter().enumerate().take(w.rows() - r0) {
            sink.put(0, r0 + ri, d);
        }
    }
}

/// Row groups of the GEMM microkernel: each group is a row tile of 8 rows, one row per i32
/// lane (two i16 lanes while summing).
const MR_GROUPS: usize = 2;
/// Tokens of the GEMM microkernel: 2 groups × 6 tokens = 12 accumulators, plus two code
/// registers and one broadcast activation, fit the 16 ymm registers without spilling.
const NR: usize = 6;
/// Rows unpacked together: a token tile of activations is reused from L1 across them.
const PANEL_ROWS: usize = 48;
/// Row groups in a panel.
const PANEL_GROUPS: usize = PANEL_ROWS / ROW_TILE;
/// Blocks per K-chunk: the unpacked panel is 48 rows × 2048 codes, 96 KiB, and stays in L2.
const CHUNK_BLOCKS: usize = 8;
/// Four-column steps in a block. A step adds one `maddubs` result in [-512, 508] to each
/// i16 lane (codes u ∈ {0, 1, 2} times x ∈ [-128, 127], two per lane: 2·2·(-128) = -512 and
/// 2·2·127 = 508, so `maddubs` never saturates); a block is 64 of them, within
/// [-32768, 32512], so the i16 sums are widened once per block and never wrap.
const BLOCK_STEPS: usize = BLOCK_COLS / 4;
/// Four-column steps in a chunk.
const CHUNK_STEPS: usize = CHUNK_BLOCKS * BLOCK_STEPS;
/// Tokens whose partial sums a panel keeps while it walks the K-chunks.
const TOKEN_BLOCK: usize = 128;
/// Fewer tokens than this take the row-wise GEMM: unpacking a panel costs about as much as
/// applying it to a few tokens (at M = 2 the panel kernel ran at half the row-wise speed; they
/// break even near 24 tokens for K = 2560 and 12–16 for K = 6912).
pub(crate) const PANEL_MIN_TOKENS: usize = 24;

/// Unpacked codes of one panel × one K-chunk, one byte per code, *row-interleaved*: the 32
/// bytes of (group `gi`, step `s`) hold, for the group's rows `r = 0..8` in turn, the codes of
/// columns `4s..4s + 4`, at `(gi · steps + s) · 32` with `steps = 64 · blocks`.
type PanelCodes = std::mem::MaybeUninit<[u8; PANEL_GROUPS * CHUNK_STEPS * 32]>;

/// GEMM over `rows` × `tokens`. From 24 tokens on, panels of 48 rows are unpacked one K-chunk
/// (≤ 2048 columns) at a time into u8 codes on the stack, eight rows interleaved four columns
/// at a time (the unpacking is shared by up to 128 tokens). The microkernel broadcasts four
/// activations of a token to all lanes and multiplies them with `vpmaddubsw` by the codes of
/// 2 × 8 rows: every lane sums for one row, so the sums leave the kernel as vectors of eight
/// rows with no horizontal reduction, which short rows (K = 256) would pay for on every
/// output. Partial sums per (row, token) carry across blocks and chunks in i32.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn ternary_gemm<S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    // SAFETY: AVX2 is present (this function's contract).
    unsafe { ternary_gemm_panels::<false, S>(w, x, rows, tokens, sink) }
}

/// [`ternary_gemm`] with the microkernel on `vpdpbusd` (AVX-512 VNNI on 256-bit vectors): the
/// same panels, each lane's four products summed straight into i32, so one instruction
/// replaces `vpmaddubsw` + `vpaddw` and no i16 stage needs widening.
///
/// # Safety
/// The CPU must support AVX2, AVX-512 F, VL and VNNI.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn ternary_gemm_vnni<S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    // SAFETY: the features are this function's contract.
    unsafe { ternary_gemm_panels::<true, S>(w, x, rows, tokens, sink) }
}

/// The body of [`ternary_gemm`] and [`ternary_gemm_vnni`].
///
/// # Safety
/// The CPU must support AVX2, and AVX-512 F, VL and VNNI if `VNNI`.
#[target_feature(enable = "avx2")]
unsafe fn ternary_gemm_panels<const VNNI: bool, S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    assert!(rows.end <= w.rows() && tokens.end <= x.m());
    if tokens.len() < PANEL_MIN_TOKENS {
        // Rows per block: about 96 KiB of packed weights, which stay in L2 while every token
        // tile streams past them.
        let block_rows = ((96 << 10) / (w.blocks() * BLOCK_BYTES).max(1)).clamp(ROW_TILE, 512);
        let mut r = rows.start;
        while r < rows.end {
            let end = (r + block_rows / ROW_TILE * ROW_TILE).min(rows.end);
            // SAFETY: AVX2 is present (this function's contract).
            unsafe { ternary_gemm_rowwise(w, x, r..end, tokens.clone(), sink) };
            r = end;
        }
        return;
    }
    let mut sums = RowSums { partial: [[0i32; PANEL_ROWS]; TOKEN_BLOCK], tb: 0, x, sink };
    // SAFETY: the features are this function's contract.
    unsafe { gemm_panels::<VNNI, _>(w, x, rows, tokens, &mut sums) }
}

/// The group-scaled product ([`crate::group`]) of `rows` × `tokens` on the panels of
/// [`ternary_gemm`]: the microkernels hand over each group's code sums `U` as they finish
/// one, and `out[t, r]` is `scale(Σ_g d[r, g] · (U − xs[t, g]) as f32, s_a[t])` summed in group
/// order, as [`crate::group::combine_tile`] sums them: the same bits as the GEMV path.
/// `xs` holds every token's group activation sums, `scales.groups_per_row()` a token.
///
/// # Safety
/// The CPU must support AVX2, and AVX-512 F, VL and VNNI if `VNNI`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn ternary_gemm_grouped<const VNNI: bool>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    scales: &GroupScales,
    xs: &[i32],
    weight_scale: WeightScale,
    out: &SharedOut<'_, f32>,
) {
    assert!(rows.end <= w.rows() && tokens.end <= x.m());
    let groups = scales.groups_per_row();
    assert!(scales.group().is_multiple_of(4) && xs.len() >= x.m() * groups);
    let mut sums = GroupSums {
        acc: [[0.0; PANEL_ROWS]; TOKEN_BLOCK],
        scales,
        groups,
        xs,
        tile0: 0,
        tb: 0,
        x,
        weight_scale,
        out,
    };
    // SAFETY: the features are this function's contract.
    unsafe { gemm_panels::<VNNI, _>(w, x, rows, tokens, &mut sums) }
}

/// Where the panels' sums go: [`RowSums`] (a row's whole dot product, in i32) or
/// [`GroupSums`] (one group's sum at a time, scaled into f32).
trait PanelSums {
    /// Steps (four columns each) of one unit: the columns whose sum one [`PanelSums::put`]
    /// hands over. `None`: as many as the microkernel keeps in its registers (a block for the
    /// i16 sums of AVX2, the chunk with VNNI).
    fn unit_steps(&self) -> Option<usize>;
    /// A panel (rows from `panel.start`, a row tile) and a block of tokens from `tb` begin.
    fn begin(&mut self, panel: usize, tb: usize);
    /// `sums[gi][j]`: lane `i` is `Σ u·x` over unit `unit` of the row (in units from column 0)
    /// for row `8·(g0 + gi) + i` of the panel and token `j0 + j` of the block; `first` if the
    /// unit starts the row. Inlined into the microkernels (their AVX2 is the caller's).
    fn put<const G: usize, const T: usize>(
        &mut self,
        j0: usize,
        g0: usize,
        unit: usize,
        sums: [[__m256i; T]; G],
        first: bool,
    );
    /// Writes the rows `panel` for the `tn` tokens of the block.
    fn finish(&self, panel: Range<usize>, tn: usize);
}

/// The per-tensor product's sums: every unit adds into the row's i32 partial sum.
struct RowSums<'a, S> {
    partial: [[i32; PANEL_ROWS]; TOKEN_BLOCK],
    /// The token block's first token.
    tb: usize,
    x: &'a QuantizedActivations,
    sink: &'a S,
}

/// The group-scaled product's sums (see [`ternary_gemm_grouped`]): `acc[j][row]` in f32.
struct GroupSums<'a> {
    acc: [[f32; PANEL_ROWS]; TOKEN_BLOCK],
    scales: &'a GroupScales,
    groups: usize,
    xs: &'a [i32],
    /// The panel's first row tile and the token block's first token.
    tile0: usize,
    tb: usize,
    x: &'a QuantizedActivations,
    weight_scale: WeightScale,
    out: &'a SharedOut<'a, f32>,
}

impl<S: Sink> PanelSums for RowSums<'_, S> {
    fn unit_steps(&self) -> Option<usize> {
        None
    }
    fn begin(&mut self, _panel: usize, tb: usize) {
        self.tb = tb;
    }
    #[inline(always)]
    fn put<const G: usize, const T: usize>(
        &mut self,
        j0: usize,
        g0: usize,
        _unit: usize,
        sums: [[__m256i; T]; G],
        first: bool,
    ) {
        for (gi, sums_g) in sums.iter().enumerate() {
            let row = 8 * (g0 + gi);
            for (j, &v) in sums_g.iter().enumerate() {
                // SAFETY: `put` runs inside the microkernels, which need AVX2.
                unsafe { put_partial(&mut self.partial[j0 + j][row..row + 8], v, first) }
            }
        }
    }
    fn finish(&self, panel: Range<usize>, tn: usize) {
        for (t, p) in (self.tb..self.tb + tn).zip(&self.partial) {
            self.sink.put_run(t, panel.start, &p[..panel.len()], self.x.sum(t));
        }
    }
}

impl PanelSums for GroupSums<'_> {
    fn unit_steps(&self) -> Option<usize> {
        Some(self.scales.group() / 4)
    }
    fn begin(&mut self, panel: usize, tb: usize) {
        // Every row's sum starts from 0.0, as combine_tile's does (a first `set` would keep a
        // -0.0 that 0.0 + -0.0 turns into 0.0).
        self.acc.iter_mut().for_each(|a| a.fill(0.0));
        (self.tile0, self.tb) = (panel / ROW_TILE, tb);
    }
    #[inline(always)]
    fn put<const G: usize, const T: usize>(
        &mut self,
        j0: usize,
        g0: usize,
        unit: usize,
        sums: [[__m256i; T]; G],
        _first: bool,
    ) {
        if unit >= self.groups {
            return; // columns past the last group: padding
        }
        let xs: [i32; T] = std::array::from_fn(|j| self.xs[(self.tb + j0 + j) * self.groups + unit]);
        for (gi, sums_g) in sums.iter().enumerate() {
            let d = &self.scales.tile(self.tile0 + g0 + gi)[unit * ROW_TILE..][..ROW_TILE];
            let row = 8 * (g0 + gi);
            // SAFETY: `put` runs inside the microkernels, which need AVX2.
            unsafe { add_group_terms(&mut self.acc[j0..j0 + T], row, d, sums_g, &xs) }
        }
    }
    fn finish(&self, panel: Range<usize>, tn: usize) {
        for (j, acc) in self.acc.iter().enumerate().take(tn) {
            let t = self.tb + j;
            let s_a = self.x.scale(t);
            for (i, &a) in acc[..panel.len()].iter().enumerate() {
                self.out.write(t, panel.start + i, self.weight_scale.apply_f32(a, s_a));
            }
        }
    }
}

/// The panel GEMM for at least [`PANEL_MIN_TOKENS`] tokens (see [`ternary_gemm`]), its sums
/// handed to `sums`.
///
/// # Safety
/// The CPU must support AVX2, and AVX-512 F, VL and VNNI if `VNNI`.
#[target_feature(enable = "avx2")]
unsafe fn gemm_panels<const VNNI: bool, P: PanelSums>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sums: &mut P,
) {
    // Panels start on a row tile: the unpacking reads whole tiles (the last one padded).
    assert_eq!(rows.start % ROW_TILE, 0, "the GEMM's rows start on a row tile");
    let blocks = w.blocks();
    let chunks = blocks.div_ceil(CHUNK_BLOCKS);
    let unit_steps = sums.unit_steps().unwrap_or(if VNNI { CHUNK_STEPS } else { BLOCK_STEPS });
    // A unit never spans two blocks (the AVX2 kernel's i16 sums are widened per block).
    assert!(sums.unit_steps().is_none() || BLOCK_STEPS.is_multiple_of(unit_steps));
    // Only the groups and steps that `unpack_panel` writes are ever read, so the codes need no
    // initialisation (zeroing 96 KiB per call would cost a few percent).
    let mut codes = PanelCodes::uninit();
    let mut r0 = rows.start;
    while r0 < rows.end {
        let panel = r0..(r0 + PANEL_ROWS).min(rows.end);
        let groups = panel.len().div_ceil(ROW_TILE);
        let mut tb = tokens.start;
        while tb < tokens.end {
            let tn = (tokens.end - tb).min(TOKEN_BLOCK);
            sums.begin(panel.start, tb);
            for c in 0..chunks {
                // Even chunks of at most 8 blocks.
                let blocks = c * blocks / chunks..(c + 1) * blocks / chunks;
                // SAFETY: AVX2 is present (this function's contract).
                unsafe { unpack_panel(w, panel.start / ROW_TILE, groups, blocks.clone(), &mut codes) };
                let last_block_steps = if blocks.end == w.blocks() {
                    (w.cols() - (blocks.end - 1) * BLOCK_COLS).div_ceil(4)
                } else {
                    BLOCK_STEPS
                };
                let chunk =
                    Chunk { codes: &codes, groups, blocks, first: c == 0, last_block_steps, unit_steps };
                let mut t = tb;
                while t < tb + tn {
                    // SAFETY: AVX2 is present; every call's tokens are below `tb + tn`, within
                    // the token block, and the chunk's groups were unpacked just above.
                    t += unsafe {
                        match tb + tn - t {
                            NR.. => micro_tile::<VNNI, NR, P>(x, &chunk, t, t - tb, sums),
                            5 => micro_tile::<VNNI, 5, P>(x, &chunk, t, t - tb, sums),
                            4 => micro_tile::<VNNI, 4, P>(x, &chunk, t, t - tb, sums),
                            3 => micro_tile::<VNNI, 3, P>(x, &chunk, t, t - tb, sums),
                            2 => micro_tile::<VNNI, 2, P>(x, &chunk, t, t - tb, sums),
                            _ => micro_tile::<VNNI, 1, P>(x, &chunk, t, t - tb, sums),
                        }
                    };
                }
            }
            sums.finish(panel.clone(), tn);
            tb += tn;
        }
        r0 = panel.end;
    }
}

/// Transposes an 8 × 8 matrix of 32-bit elements: lane `i` of `out[j]` is lane `j` of `v[i]`.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose8x8_epi32(v: [__m256i; 8]) -> [__m256i; 8] {
    let t: [__m256i; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[i & !1], v[i | 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_epi32(a, b)
        } else {
            _mm256_unpackhi_epi32(a, b)
        }
    });
    // t[2p] = (a0 b0 a1 b1 | a4 b4 a5 b5), t[2p + 1] = (a2 b2 a3 b3 | a6 b6 a7 b7) of pair p.
    let u: [__m256i; 8] = std::array::from_fn(|i| {
        let half = i / 4; // rows 0..4 or 4..8
        let (a, b) = (t[4 * half + (i % 4) / 2], t[4 * half + 2 + (i % 4) / 2]);
        if i % 2 == 0 {
            _mm256_unpacklo_epi64(a, b)
        } else {
            _mm256_unpackhi_epi64(a, b)
        }
    });
    // u[4h + j] holds element j (and j + 4) of rows 4h..4h + 4.
    std::array::from_fn(|j| {
        let (a, b) = (u[j % 4], u[4 + j % 4]);
        if j < 4 {
            _mm256_permute2x128_si256::<0x20>(a, b)
        } else {
            _mm256_permute2x128_si256::<0x31>(a, b)
        }
    })
}

/// Unpacks blocks `blocks` (at most 8) of the row tiles `first..first + groups` (at most 6)
/// into `out` in the row-interleaved order of [`PanelCodes`].
#[target_feature(enable = "avx2")]
unsafe fn unpack_panel(
    w: &PackedTernary,
    first: usize,
    groups: usize,
    blocks: Range<usize>,
    out: &mut PanelCodes,
) {
    assert!(groups <= PANEL_GROUPS && first + groups <= w.tiles());
    assert!(blocks.len() <= CHUNK_BLOCKS && blocks.end <= w.blocks());
    let steps = blocks.len() * BLOCK_STEPS;
    let dst: *mut u8 = out.as_mut_ptr().cast();
    let mask = _mm256_set1_epi8(3);
    for gi in 0..groups {
        let tile = w.tile(first + gi);
        assert!(tile.len() >= blocks.end * ROW_TILE * BLOCK_BYTES);
        for (bb, b) in blocks.clone().enumerate() {
            for half in 0..2 {
                // Field `s` of a half holds 32 consecutive columns, 64·s + 32·half on: eight
                // 4-column steps, which the transpose turns from one vector per row into one
                // vector per step.
                for s in 0..4 {
                    let shift = _mm_cvtsi32_si128(2 * s as i32);
                    // SAFETY: row `r` of the tile's block `b` is the 64 bytes at
                    // `(b · 8 + r) · 64`, inside `tile` (asserted above).
                    let rows: [__m256i; 8] = std::array::from_fn(|r| unsafe {
                        let v = load(tile.as_ptr().add((b * ROW_TILE + r) * BLOCK_BYTES + 32 * half));
                        _mm256_and_si256(_mm256_srl_epi16(v, shift), mask)
                    });
                    let first_step = bb * BLOCK_STEPS + 16 * s + 8 * half;
                    for (d, v) in transpose8x8_epi32(rows).into_iter().enumerate() {
                        // SAFETY: `gi < 6` and `first_step + d < steps ≤ CHUNK_STEPS`, so the
                        // 32 bytes are inside `out`.
                        unsafe { _mm256_storeu_si256(dst.add((gi * steps + first_step + d) * 32).cast(), v) };
                    }
                }
            }
        }
    }
}

/// One unpacked K-chunk: `groups` row groups of codes for `blocks`; `first` if it starts the
/// row; `last_block_steps` the steps of its last block that hold columns of the matrix;
/// `unit_steps` the steps whose sum the microkernels hand over at once (see [`PanelSums`]).
struct Chunk<'a> {
    codes: &'a PanelCodes,
    groups: usize,
    blocks: Range<usize>,
    first: bool,
    last_block_steps: usize,
    unit_steps: usize,
}

impl Chunk<'_> {
    /// Steps that hold columns of the matrix: the last block stops after its last live column
    /// (past it the codes are 1, t = 0, against zero activations, and add nothing).
    fn live_steps(&self) -> usize {
        (self.blocks.len() * BLOCK_STEPS).saturating_sub(BLOCK_STEPS) + self.last_block_steps
    }

    /// The chunk's units, as (index along the row, steps within the chunk).
    fn units(&self) -> impl Iterator<Item = (usize, Range<usize>)> + '_ {
        let (live, n) = (self.live_steps(), self.unit_steps);
        let first_unit = self.blocks.start * BLOCK_STEPS / n;
        (0..live).step_by(n).enumerate().map(move |(u, s0)| (first_unit + u, s0..(s0 + n).min(live)))
    }
}

/// Tokens `t..t + T` against every row group of `chunk`, two groups at a time (three with
/// VNNI, whose 32 registers hold 18 accumulators), their sums handed to `sums` as token
/// `j0 + j` of its block. Returns `T`.
///
/// # Safety
/// The CPU must support AVX2 (and AVX-512 F, VL and VNNI if `VNNI`), and `chunk.codes` must
/// hold the unpacked codes of `chunk.groups` groups for `chunk.blocks` (as [`unpack_panel`]
/// leaves them).
#[target_feature(enable = "avx2")]
unsafe fn micro_tile<const VNNI: bool, const T: usize, P: PanelSums>(
    x: &QuantizedActivations,
    chunk: &Chunk,
    t: usize,
    j0: usize,
    sums: &mut P,
) -> usize {
    let steps = chunk.blocks.len() * BLOCK_STEPS;
    assert!(steps <= CHUNK_STEPS && chunk.groups <= PANEL_GROUPS && j0 + T <= TOKEN_BLOCK);
    let xs: [&[i8]; T] = std::array::from_fn(|j| &x.padded_row(t + j)[chunk.blocks.start * BLOCK_COLS..]);
    assert!(xs.iter().all(|r| r.len() >= steps * 4));
    let xp: [*const i8; T] = std::array::from_fn(|j| xs[j].as_ptr());
    let mut g = 0;
    while g < chunk.groups {
        // SAFETY: AVX2 is present and the codes are unpacked (this function's contract);
        // `g` plus the kernel's groups stay below `chunk.groups`, and every token row holds
        // `steps · 4` activations from the chunk's first column (asserted above).
        g += unsafe {
            match (VNNI, chunk.groups - g) {
                (true, 3..) => micro_kernel_vnni::<3, T, P>(&xp, chunk, g, j0, sums),
                (true, 2) => micro_kernel_vnni::<2, T, P>(&xp, chunk, g, j0, sums),
                (true, _) => micro_kernel_vnni::<1, T, P>(&xp, chunk, g, j0, sums),
                (false, MR_GROUPS..) => micro_kernel::<MR_GROUPS, T, P>(&xp, chunk, g, j0, sums),
                (false, _) => micro_kernel::<1, T, P>(&xp, chunk, g, j0, sums),
            }
        };
    }
    T
}

/// Row groups `g0..g0 + G` of `chunk` against the tokens whose activations (from the chunk's
/// first column) `xp` points at: per unit of `chunk.unit_steps` steps (at most a block, whose
/// i16 sums cannot wrap), token `j`'s `Σ u·x` for row `i` of group `g` goes to `sums` as lane
/// `i` of its vector for row `8·g` and token `j0 + j`.
///
/// # Safety
/// The CPU must support AVX2; `chunk.codes` must hold the unpacked codes of groups up to
/// `g0 + G ≤ chunk.groups` for `chunk.blocks`, and every `xp[j]` must point at
/// `64 · blocks · 4` readable activations.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn micro_kernel<const G: usize, const T: usize, P: PanelSums>(
    xp: &[*const i8; T],
    chunk: &Chunk,
    g0: usize,
    j0: usize,
    sums: &mut P,
) -> usize {
    let codes = group_codes::<G>(chunk, g0);
    let ones = _mm256_set1_epi16(1);
    for (unit, steps) in chunk.units() {
        let mut acc = [[_mm256_setzero_si256(); T]; G];
        for s in steps.clone() {
            // SAFETY: step `s < steps` of groups below `chunk.groups` and the activations of
            // columns `4s..4s + 4` are in bounds (this function's contract).
            unsafe {
                let c: [__m256i; G] = std::array::from_fn(|gi| load(codes[gi].add(32 * s)));
                for (j, &xj) in xp.iter().enumerate() {
                    let xb = _mm256_set1_epi32(xj.add(4 * s).cast::<i32>().read_unaligned());
                    for gi in 0..G {
                        acc[gi][j] = _mm256_add_epi16(acc[gi][j], _mm256_maddubs_epi16(c[gi], xb));
                    }
                }
            }
        }
        // Lanes 2i and 2i + 1 hold row i's two halves of the step: `madd` with ones adds them.
        // (A copy: the accumulators themselves must not have their address taken, or they
        // are stored to the stack at every step.)
        let mut wide = [[_mm256_setzero_si256(); T]; G];
        for gi in 0..G {
            for j in 0..T {
                wide[gi][j] = _mm256_madd_epi16(acc[gi][j], ones);
            }
        }
        sums.put(j0, g0, unit, wide, chunk.first && steps.start == 0);
    }
    G
}

/// [`micro_kernel`] on `vpdpbusd`: every step adds its four products per row straight into the
/// row's i32 lane, so a unit may be the whole chunk (the per-tensor product's), which then
/// runs in registers and reaches `sums` once. Returns `G`.
///
/// # Safety
/// As [`micro_kernel`], and the CPU must support AVX-512 F, VL and VNNI.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
unsafe fn micro_kernel_vnni<const G: usize, const T: usize, P: PanelSums>(
    xp: &[*const i8; T],
    chunk: &Chunk,
    g0: usize,
    j0: usize,
    sums: &mut P,
) -> usize {
    let codes = group_codes::<G>(chunk, g0);
    for (unit, steps) in chunk.units() {
        let mut acc = [[_mm256_setzero_si256(); T]; G];
        for s in steps.clone() {
            // SAFETY: as in `micro_kernel`.
            unsafe {
                let c: [__m256i; G] = std::array::from_fn(|gi| load(codes[gi].add(32 * s)));
                for (j, &xj) in xp.iter().enumerate() {
                    let xb = _mm256_set1_epi32(xj.add(4 * s).cast::<i32>().read_unaligned());
                    for gi in 0..G {
                        acc[gi][j] = _mm256_dpbusd_epi32(acc[gi][j], c[gi], xb);
                    }
                }
            }
        }
        sums.put(j0, g0, unit, acc, chunk.first && steps.start == 0);
    }
    G
}

/// Where the unpacked codes of row groups `g0..g0 + G` of `chunk` start.
fn group_codes<const G: usize>(chunk: &Chunk, g0: usize) -> [*const u8; G] {
    let steps = chunk.blocks.len() * BLOCK_STEPS;
    std::array::from_fn(|gi| chunk.codes.as_ptr().cast::<u8>().wrapping_add((g0 + gi) * steps * 32))
}

/// [`crate::group::combine_tile`] on AVX2: lane `ri` runs the portable loop's operations for
/// row `ri` in the same order (a multiply, then an add, group after group), so the bits are
/// the same; compiled with AVX2 so that the decode path's combination, which the GEMV kernels
/// hand a tile at a time, is one vector step per group rather than baseline x86-64 code.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn combine_tile(part: &[i32], xs: &[i32], d: &[f32]) -> [f32; ROW_TILE] {
    assert!(part.len() >= xs.len() * ROW_TILE && d.len() >= xs.len() * ROW_TILE);
    let mut acc = _mm256_setzero_ps();
    for (gi, &s) in xs.iter().enumerate() {
        // SAFETY: group `gi` has 8 sums in `part` and 8 scales in `d` (asserted above).
        unsafe {
            let p = _mm256_loadu_si256(part.as_ptr().add(gi * ROW_TILE).cast());
            let u = _mm256_cvtepi32_ps(_mm256_sub_epi32(p, _mm256_set1_epi32(s)));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(d.as_ptr().add(gi * ROW_TILE)), u));
        }
    }
    let mut out = [0.0f32; ROW_TILE];
    // SAFETY: `out` holds 8 f32.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), acc) };
    out
}

/// For each token `j`: `acc[j][row + i] += d[i] · (sums[j][i] − xs[j]) as f32` over the eight
/// rows of one row group and one group of columns: a multiply then an add, as
/// [`crate::group::combine_tile`] does them.
#[inline]
#[target_feature(enable = "avx2")]
fn add_group_terms<const T: usize>(
    acc: &mut [[f32; PANEL_ROWS]],
    row: usize,
    d: &[f32],
    sums: &[__m256i; T],
    xs: &[i32; T],
) {
    assert!(acc.len() == T && d.len() == ROW_TILE && row + ROW_TILE <= PANEL_ROWS);
    // SAFETY: `d` holds 8 f32 and each `acc[j][row..]` at least 8 (asserted above).
    unsafe {
        let d = _mm256_loadu_ps(d.as_ptr());
        for ((a, &v), &s) in acc.iter_mut().zip(sums).zip(xs) {
            let u = _mm256_cvtepi32_ps(_mm256_sub_epi32(v, _mm256_set1_epi32(s)));
            let p = a.as_mut_ptr().add(row);
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), _mm256_mul_ps(d, u)));
        }
    }
}

/// Sets (`set`) or adds to the eight i32 partial sums `p` the lanes of `sums`.
#[inline]
#[target_feature(enable = "avx2")]
fn put_partial(p: &mut [i32], sums: __m256i, set: bool) {
    assert_eq!(p.len(), 8);
    let p = p.as_mut_ptr().cast::<__m256i>();
    // SAFETY: `p` points at 8 i32 (asserted above).
    unsafe {
        let v = if set { sums } else { _mm256_add_epi32(_mm256_loadu_si256(p), sums) };
        _mm256_storeu_si256(p, v);
    }
}

/// The GEMM for fewer than [`PANEL_MIN_TOKENS`] tokens: each row's weight block is decoded in
/// registers and applied to a tile of up to eight tokens.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn ternary_gemm_rowwise<S: Sink>(
    w: &PackedTernary,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    let mut t0 = tokens.start;
    while t0 < tokens.end {
        // SAFETY: AVX2 is present (this function's contract).
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

/// Code sums per group of `G` columns (32, 64, 128 or 256) of the eight rows of tile `g` with
/// one token's padded activations `xr`: `out[gi · 8 + ri] = Σ_{c ∈ group gi} u · x` over the
/// stored codes `u ∈ {0, 1, 2}`, the same integers as the scalar `ternary_tile_group_sums`.
///
/// A row's block gives eight units of 32 columns: half `h` of its bytes, field `s`, is
/// columns `64·s + 32·h..+32`. Fields 0 and 2 are extracted at their value and fields 1 and 3
/// in place at four times their value, as in [`block_dot_x4`]; the `vpmaddwd` that widens the
/// first multiplies them by 4, so that every sum leaves at four times its value. A group's units are summed in i16 (eight
/// units of at most ±2048 fit), widened to i32 per row, and the eight rows of each group reduced
/// into one vector, a lane per row; the ×4 comes off with an exact shift.
///
/// # Safety
/// The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn ternary_tile_group_sums<const G: usize>(
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
    let (m1, m4) = (_mm256_set1_epi8(3), _mm256_set1_epi8(12));
    // `vpmaddwd` weights: ×4 for the fields taken at their value, ×1 for those taken at 4×.
    let (w4, w1) = (_mm256_set1_epi16(4), _mm256_set1_epi16(1));
    for b in 0..blocks {
        // Per group and row, the i32 sums of one row's group (eight lanes each).
        let mut rows = [[_mm256_setzero_si256(); ROW_TILE]; 8];
        // SAFETY: tile `g` holds `blocks · 8` blocks of 64 bytes and `xr` holds `blocks` blocks
        // of 256 activations (both checked above), so every offset below is in bounds.
        unsafe {
            let wb = tile.as_ptr().add(b * ROW_TILE * BLOCK_BYTES);
            let xb = xr.as_ptr().add(b * BLOCK_COLS);
            let xv: [[__m256i; 2]; 4] =
                std::array::from_fn(|s| std::array::from_fn(|h| load_i8(xb.add(64 * s + 32 * h))));
            for ri in 0..ROW_TILE {
                // A hint, never a fault: past the last tile it touches nothing we read.
                _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(GEMV_PREFETCH_BYTES + ri * BLOCK_BYTES).cast());
                // unit[s][h]: i16 pair sums of field s, half h (×1 for s even, ×4 for s odd).
                let mut unit = [[_mm256_setzero_si256(); 2]; 4];
                for h in 0..2 {
                    let v = load(wb.add(ri * BLOCK_BYTES + 32 * h));
                    let v4 = _mm256_srli_epi16::<4>(v);
                    let c = [
                        _mm256_and_si256(v, m1),
                        _mm256_and_si256(v, m4),
                        _mm256_and_si256(v4, m1),
                        _mm256_and_si256(v4, m4),
                    ];
                    for s in 0..4 {
                        unit[s][h] = _mm256_maddubs_epi16(c[s], xv[s][h]);
                    }
                }
                for (gb, slot) in rows.iter_mut().enumerate().take(per_block) {
                    slot[ri] = group_i32::<G>(&unit, gb, w4, w1);
                }
            }
        }
        for (gb, slot) in rows.iter().enumerate().take(per_block) {
            // 4·U per row, a multiple of 4.
            let sums = _mm256_srai_epi32::<2>(reduce8(slot));
            let at = (b * per_block + gb) * ROW_TILE;
            // SAFETY: `out` holds `blocks · per_block · 8` values (checked above).
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(at).cast(), sums) };
        }
    }
}

/// [`ternary_tile_group_sums`] of every tile of `tiles`, each handed to `f(g, sums)` as soon as
/// it is computed (one dispatch for the range; `f` inlines under AVX2).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn ternary_tiles_group_sums<const G: usize, F: FnMut(usize, &[i32])>(
    w: &PackedTernary,
    tiles: Range<usize>,
    xr: &[i8],
    part: &mut [i32],
    mut f: F,
) {
    for g in tiles {
        // SAFETY: AVX2 is present (this function's contract).
        unsafe { ternary_tile_group_sums::<G>(w, g, xr, part) };
        f(g, part);
    }
}

/// Four times the code sum of group `gb` (of `G` columns) of one row's block, as eight i32 lanes,
/// from the block's eight 32-column units (`unit[s][h]`, ×1 for even `s`, ×4 for odd `s`).
#[inline]
#[target_feature(enable = "avx2")]
fn group_i32<const G: usize>(unit: &[[__m256i; 2]; 4], gb: usize, w4: __m256i, w1: __m256i) -> __m256i {
    // The units of a group: 32 columns = one (s, h); 64 = one s; 128 = two; 256 = all four.
    let (s0, fields, halves) = match G {
        32 => (gb / 2, 1, gb % 2..gb % 2 + 1),
        64 => (gb, 1, 0..2),
        128 => (2 * gb, 2, 0..2),
        _ => (0, 4, 0..2),
    };
    let (mut even, mut odd) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    for (s, field) in unit.iter().enumerate().skip(s0).take(fields) {
        for &u in &field[halves.clone()] {
            // Eight units of at most ±2048 (×4 units) or ±512 (×1) stay within i16.
            if s % 2 == 0 {
                even = _mm256_add_epi16(even, u);
            } else {
                odd = _mm256_add_epi16(odd, u);
            }
        }
    }
    _mm256_add_epi32(_mm256_madd_epi16(even, w4), _mm256_madd_epi16(odd, w1))
}

/// Tokens `t0..t0 + MT` against `rows`; returns `MT`.
#[target_feature(enable = "avx2")]
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
    let xp: [*const i8; MT] = std::array::from_fn(|i| xs[i].as_ptr());
    let ones = _mm256_set1_epi16(1);
    for r in rows {
        let tile = w.tile(r / ROW_TILE);
        let wr = tile[(r % ROW_TILE) * BLOCK_BYTES..].as_ptr();
        let mut acc32 = [_mm256_setzero_si256(); 8];
        let mut b = 0;
        while b < blocks {
            let end = (b + I16_BLOCKS).min(blocks);
            let mut acc16 = [_mm256_setzero_si256(); MT];
            for bb in b..end {
                // One 32-byte half at a time: 4 code registers and MT accumulators fit the
                // 16 ymm registers.
                for half in 0..2 {
                    // SAFETY: row `r`'s block `bb` starts `bb · 8 · 64` bytes after its first
                    // block, inside `tile`; token rows hold `blocks · 256` activations.
                    unsafe {
                        let c = codes(load(wr.add(bb * ROW_TILE * BLOCK_BYTES + 32 * half)));
                        for i in 0..MT {
                            let xh = xp[i].add(bb * BLOCK_COLS + 32 * half);
                            acc16[i] = _mm256_add_epi16(acc16[i], half_dot(&c, xh));
                        }
                    }
                }
            }
            for i in 0..MT {
                acc32[i] = _mm256_add_epi32(acc32[i], _mm256_madd_epi16(acc16[i], ones));
            }
            b = end;
        }
        let dots = to_array(reduce8(&acc32));
        for (i, &d) in dots.iter().enumerate().take(MT) {
            sink.put(t0 + i, r, d - x.sum(t0 + i));
        }
    }
    MT
}

/// `x·w` pairwise for 32 int8 values as i32 lanes (8 × 4 products).
#[inline]
#[target_feature(enable = "avx2")]
fn int8_dot(w: __m256i, x: __m256i, ones: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(w, x)), ones)
}

/// Int8 GEMV (one token), eight rows at a time.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn int8_gemv<S: Sink>(
    w: &PackedInt8,
    x: &QuantizedActivations,
    groups: Range<usize>,
    sink: &S,
) {
    let stride = w.stride();
    let xr = x.padded_row(0);
    assert!(xr.len() >= stride);
    let ones = _mm256_set1_epi16(1);
    for g in groups {
        let group = w.group(g);
        let mut acc = [_mm256_setzero_si256(); ROW_TILE];
        for c in (0..stride).step_by(CHUNK) {
            // SAFETY: the group holds `stride / 64` steps of eight 64-byte chunks and `xr`
            // `stride` values; `c + 64 <= stride` because the stride is a multiple of 256.
            unsafe {
                let (x0, x1) = (load_i8(xr.as_ptr().add(c)), load_i8(xr.as_ptr().add(c + 32)));
                let step = group.as_ptr().add(c * ROW_TILE);
                for (ri, a) in acc.iter_mut().enumerate() {
                    let wc = step.add(ri * CHUNK);
                    // A hint, never a fault (see the ternary GEMV).
                    _mm_prefetch::<_MM_HINT_T0>(wc.wrapping_add(GEMV_PREFETCH_BYTES).cast());
                    let d = _mm256_add_epi32(
                        int8_dot(load_i8(wc), x0, ones),
                        int8_dot(load_i8(wc.add(32)), x1, ones),
                    );
                    *a = _mm256_add_epi32(*a, d);
                }
            }
        }
        let dots = to_array(reduce8(&acc));
        let r0 = g * ROW_TILE;
        for (ri, &d) in dots.iter().enumerate().take(w.rows() - r0) {
            sink.put(0, r0 + ri, d);
        }
    }
}

/// Int8 GEMM over `rows` × `tokens`, one row against up to eight tokens at a time.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn int8_gemm<S: Sink>(
    w: &PackedInt8,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    let mut t0 = tokens.start;
    while t0 < tokens.end {
        // SAFETY: AVX2 is present (this function's contract).
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

#[target_feature(enable = "avx2")]
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
    let ones = _mm256_set1_epi16(1);
    for r in rows {
        let (group, ri) = w.row_in_group(r);
        let mut acc = [_mm256_setzero_si256(); 8];
        for c in (0..stride).step_by(32) {
            // SAFETY: the group holds 8 rows and every token row `stride` values, and
            // `c + 32 <= stride`; 32 values from an even multiple of 32 stay in one chunk.
            unsafe {
                let wv = load_i8(group.as_ptr().add(PackedInt8::group_offset(ri, c)));
                for i in 0..MT {
                    acc[i] = _mm256_add_epi32(acc[i], int8_dot(wv, load_i8(xs[i].as_ptr().add(c)), ones));
                }
            }
        }
        let dots = to_array(reduce8(&acc));
        for (i, &d) in dots.iter().enumerate().take(MT) {
            sink.put(t0 + i, r, d);
        }
    }
    MT
}

/// The per-token activation quantizer ([`crate::quantize::quantize_activation_row`]) on 8
/// lanes: the same products `x · s_a`, rounded half to even by `vroundps`, clamped, NaN to 0.
/// The maximum is exact in any order, so the results equal the scalar ones bit for bit.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn quantize_row(x: &[f32], q: &mut [i8]) -> f32 {
    assert_eq!(x.len(), q.len());
    let n32 = x.len() / 32 * 32;
    let sign = _mm256_set1_ps(-0.0);
    let mut amax = _mm256_setzero_ps();
    for c in (0..x.len() / 8 * 8).step_by(8) {
        // SAFETY: `c + 8 <= x.len()`.
        let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(c)) };
        // max_ps returns its second operand when either is NaN, so NaN is skipped.
        amax = _mm256_max_ps(_mm256_andnot_ps(sign, v), amax);
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` has room for 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), amax) };
    let tail = x[x.len() / 8 * 8..].iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let amax = lanes.iter().fold(tail, |m, &v| m.max(v));
    let s = 127.0 / amax.max(crate::quantize::QUANT_EPS);

    let (sv, lo, hi) = (_mm256_set1_ps(s), _mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for c in (0..n32).step_by(32) {
        let mut ints = [_mm256_setzero_si256(); 4];
        for (i, v) in ints.iter_mut().enumerate() {
            // SAFETY: `c + 32 <= n32 <= x.len()`.
            let p = _mm256_mul_ps(unsafe { _mm256_loadu_ps(x.as_ptr().add(c + 8 * i)) }, sv);
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(p);
            let clamped = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
            let not_nan = _mm256_cmp_ps::<_CMP_ORD_Q>(p, p);
            *v = _mm256_cvtps_epi32(_mm256_and_ps(clamped, not_nan));
        }
        let w16a = _mm256_packs_epi32(ints[0], ints[1]);
        let w16b = _mm256_packs_epi32(ints[2], ints[3]);
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16a, w16b), order);
        // SAFETY: `c + 32 <= q.len()`.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().add(c).cast(), bytes) };
    }
    for (qi, &xi) in q[n32..].iter_mut().zip(&x[n32..]) {
        *qi = crate::quantize::round_to_i8(xi * s);
    }
    s
}

/// The offset codes `u` of one 128-column chunk of a 6-bit row ([`crate::int6`]), 32
/// columns per vector.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn int6_chunk(p: *const u8) -> [__m256i; 4] {
    let (m4, m_hi) = (_mm256_set1_epi8(15), _mm256_set1_epi8(0x30));
    // SAFETY: `p` points at a 96-byte chunk.
    let (lo0, lo1, hi) = unsafe { (load(p), load(p.add(32)), load(p.add(64))) };
    // Each high pair is shifted to bits 4–5 and masked, so what a 16-bit shift carries across
    // a byte boundary is dropped.
    let (h0, h1) = (_mm256_slli_epi16::<4>(hi), _mm256_slli_epi16::<2>(hi));
    let h3 = _mm256_srli_epi16::<2>(hi);
    [
        _mm256_or_si256(_mm256_and_si256(lo0, m4), _mm256_and_si256(h0, m_hi)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(lo0), m4), _mm256_and_si256(h1, m_hi)),
        _mm256_or_si256(_mm256_and_si256(lo1, m4), _mm256_and_si256(hi, m_hi)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(lo1), m4), _mm256_and_si256(h3, m_hi)),
    ]
}

/// `Σ u·x` over one 128-column chunk as i32 lanes, `x` pointing at its first activation.
/// `u ≤ 63` and `|x| ≤ 128`, so a `maddubs` lane is at most 16128 in magnitude and the sum of
/// two still fits i16.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn int6_chunk_dot(u: [__m256i; 4], x: *const i8, ones: __m256i) -> __m256i {
    // SAFETY: `x` points at 128 readable activations.
    unsafe {
        let p01 = _mm256_add_epi16(
            _mm256_maddubs_epi16(u[0], load_i8(x)),
            _mm256_maddubs_epi16(u[1], load_i8(x.add(32))),
        );
        let p23 = _mm256_add_epi16(
            _mm256_maddubs_epi16(u[2], load_i8(x.add(64))),
            _mm256_maddubs_epi16(u[3], load_i8(x.add(96))),
        );
        _mm256_add_epi32(_mm256_madd_epi16(p01, ones), _mm256_madd_epi16(p23, ones))
    }
}

/// 6-bit GEMV (one token), eight rows at a time: `Σ u·x − 32 · Σ x` per row.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn int6_gemv<S: Sink>(
    w: &PackedInt6,
    x: &QuantizedActivations,
    groups: Range<usize>,
    sink: &S,
) {
    let chunks = w.padded_cols() / CHUNK_COLS;
    let xr = x.padded_row(0);
    assert!(xr.len() >= w.padded_cols());
    let offset_sum = _mm256_set1_epi32(int6::OFFSET * x.sum(0));
    let ones = _mm256_set1_epi16(1);
    for g in groups {
        let group = w.group(g);
        let mut acc = [_mm256_setzero_si256(); ROW_TILE];
        for c in 0..chunks {
            // SAFETY: the group holds `chunks` steps of 8 interleaved 96-byte chunks, and `xr`
            // holds `chunks · 128` activations.
            unsafe {
                let xc = xr.as_ptr().add(c * CHUNK_COLS);
                let step = group.as_ptr().add(c * ROW_TILE * CHUNK_BYTES);
                for (ri, a) in acc.iter_mut().enumerate() {
                    // Hints at 96·ri and, for odd ri, 96·ri + 32 touch each of the step's twelve
                    // cache lines once.
                    let ahead = step.wrapping_add(GEMV_PREFETCH_BYTES + ri * CHUNK_BYTES);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                    if ri % 2 == 1 {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(32).cast());
                    }
                    let u = int6_chunk(step.add(ri * CHUNK_BYTES));
                    *a = _mm256_add_epi32(*a, int6_chunk_dot(u, xc, ones));
                }
            }
        }
        let dots = to_array(_mm256_sub_epi32(reduce8(&acc), offset_sum));
        let r0 = g * ROW_TILE;
        for (ri, &d) in dots.iter().enumerate().take(w.rows() - r0) {
            sink.put(0, r0 + ri, d);
        }
    }
}

/// 6-bit GEMM over `rows` × `tokens`: each group of eight rows is decoded once into offset
/// codes, which every token then reuses from L1.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn int6_gemm<S: Sink>(
    w: &PackedInt6,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    let (padded, chunks) = (w.padded_cols(), w.padded_cols() / CHUNK_COLS);
    let ones = _mm256_set1_epi16(1);
    let mut u = vec![0u8; ROW_TILE * padded];
    let mut r0 = rows.start;
    while r0 < rows.end {
        let n = (rows.end - r0).min(ROW_TILE);
        for ri in 0..n {
            for c in 0..chunks {
                // SAFETY: `chunk` checks its bounds; `u` has room for 8 rows.
                unsafe {
                    let v = int6_chunk(w.chunk(r0 + ri, c).as_ptr());
                    let dst = u.as_mut_ptr().add(ri * padded + c * CHUNK_COLS);
                    for (i, vi) in v.iter().enumerate() {
                        _mm256_storeu_si256(dst.add(32 * i).cast(), *vi);
                    }
                }
            }
        }
        for t in tokens.clone() {
            let xr = x.padded_row(t);
            assert!(xr.len() >= padded);
            let mut acc = [_mm256_setzero_si256(); ROW_TILE];
            for c in 0..chunks {
                // SAFETY: `xr` and each decoded row hold `chunks · 128` values.
                unsafe {
                    let xc = xr.as_ptr().add(c * CHUNK_COLS);
                    for (ri, a) in acc.iter_mut().enumerate().take(n) {
                        let p = u.as_ptr().add(ri * padded + c * CHUNK_COLS);
                        let uv = [load(p), load(p.add(32)), load(p.add(64)), load(p.add(96))];
                        *a = _mm256_add_epi32(*a, int6_chunk_dot(uv, xc, ones));
                    }
                }
            }
            let dots = to_array(_mm256_sub_epi32(reduce8(&acc), _mm256_set1_epi32(int6::OFFSET * x.sum(t))));
            for (ri, &d) in dots.iter().enumerate().take(n) {
                sink.put(t, r0 + ri, d);
            }
        }
        r0 += n;
    }
}
