//! AVX2 kernels for the dense products, eight weight rows and up to four tokens at a time.
//!
//! Each of the eight rows is one lane of the float accumulators. Per block, each row's integer
//! products come from `vpmaddubsw` (unsigned weight codes × signed activations, or the sign trick
//! for Q8_0's signed codes; every pair sum is below 2¹⁵, so nothing saturates) and `vpmaddwd`
//! (with ones, or with the K-quants' sub-block scales), which are exact; eight rows' vectors are
//! reduced to one vector of per-row block sums by a `vphaddd` tree. The block's term is then
//! `(d_w · d_a) · isum` and is added to the row's accumulator, exactly the operations of the
//! scalar definition ([`super::scalar`]) in the same order, so the outputs are equal bit for
//! bit. Rows past the end of the range repeat the last row and are not written.
//!
//! Each block of the eight rows is loaded and decoded (nibbles, 6-bit codes, K-quant scales)
//! once for a tile of up to four tokens, whose products then follow one another: a token's
//! integers and its float terms are those it gets alone, so batching changes no bit. Q6_K's
//! `− 32 · Σ sc · bsum` correction is subtracted from the lanes before the reduction (one
//! `vpmaddwd` of the sixteen scales with the token's sixteen block sums), which gives the same
//! integer as subtracting it after.
//!
//! Eight rows at once are eight memory streams per thread, more than the hardware prefetcher
//! follows well (decode is memory-bound): every block kernel prefetches the same block of the
//! next group's rows (rows are contiguous, so a group ahead), which took SmolLM2's decode from
//! 56 to 82 tokens/s (Q4_1) on two cores of an Intel Xeon (docs/performance.md). The block
//! formats' eight f16 headers (`d`, and `m` for Q4_1) come from one gather.
//!
//! The float formats take a plain fused-multiply-add dot product per row instead (eight lanes,
//! four accumulators), within [`super::float_dot_bound`] of the reference.

use std::arch::x86_64::*;
use std::ops::Range;

use super::scalar::scale_min_k4;
use super::{DenseActivations, DenseFormat, DenseLinear, QK, QK_K, ROW_GROUP};
use crate::kernels::SharedOut;

/// Tokens that share each decoded block of a group of eight rows.
const TOKEN_TILE: usize = 4;

/// Whether this CPU has what these kernels use (AVX2 for the integers, F16C for the scales, FMA
/// for the float formats).
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// `rows` of `w` for every token of `a`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn run_rows(
    w: &DenseLinear,
    a: &DenseActivations,
    rows: Range<usize>,
    out: &SharedOut<'_, f32>,
) {
    // SAFETY (all arms): the caller guarantees the features; each kernel reads inside the rows
    // and tokens it is given.
    unsafe {
        match w.format() {
            DenseFormat::F32 | DenseFormat::F16 | DenseFormat::BF16 => float_rows(w, a, rows, out),
            DenseFormat::Q8_0 => block32_rows::<Q8_0>(w, a, rows, out),
            DenseFormat::Q4_0 => block32_rows::<Q4_0>(w, a, rows, out),
            DenseFormat::Q4_1 => block32_rows::<Q4_1>(w, a, rows, out),
            DenseFormat::Q4_K => q4_k_rows(w, a, rows, out),
            DenseFormat::Q6_K => q6_k_rows(w, a, rows, out),
            // Ternary tables (looked up, not run: heads run on the ternary kernels).
            _ => super::scalar::run_rows(w, a, rows, out),
        }
    }
}

const Q8_0: u8 = 0;
const Q4_0: u8 = 1;
const Q4_1: u8 = 2;

/// Pointers to the stored rows `r0..r0 + 8`, the ones past `end` repeating row `end - 1`.
fn row_ptrs(w: &DenseLinear, r0: usize, end: usize) -> [*const u8; ROW_GROUP] {
    std::array::from_fn(|i| w.row((r0 + i).min(end - 1)).as_ptr())
}

/// Lane `i` = the sum of the eight lanes of `v[i]`.
#[inline]
#[target_feature(enable = "avx2")]
fn reduce8(v: &[__m256i; 8]) -> __m256i {
    let s01 = _mm256_hadd_epi32(v[0], v[1]);
    let s23 = _mm256_hadd_epi32(v[2], v[3]);
    let s45 = _mm256_hadd_epi32(v[4], v[5]);
    let s67 = _mm256_hadd_epi32(v[6], v[7]);
    // Low 128 bits: rows 0–3 (resp. 4–7) over their low four lanes; high 128: the high four.
    let s0123 = _mm256_hadd_epi32(s01, s23);
    let s4567 = _mm256_hadd_epi32(s45, s67);
    let lo = _mm256_permute2x128_si256(s0123, s4567, 0x20);
    let hi = _mm256_permute2x128_si256(s0123, s4567, 0x31);
    _mm256_add_epi32(lo, hi)
}

/// Eight f16 values (little-endian bits) widened to f32.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn widen_f16(bits: &[u16; 8]) -> __m256 {
    // SAFETY: `bits` holds 16 bytes.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(bits.as_ptr().cast()) })
}

/// Writes the first `n` lanes of `v` to rows `r0..r0 + n` of token `t`.
#[inline]
#[target_feature(enable = "avx2")]
fn put_lanes(out: &SharedOut<'_, f32>, t: usize, r0: usize, n: usize, v: __m256) {
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    for (i, &y) in lanes.iter().enumerate().take(n) {
        out.write(t, r0 + i, y);
    }
}

/// The 32 nibbles of a Q4 block's 16 bytes at `p` as bytes: elements 0–15 (low nibbles) in the
/// low half, 16–31 (high nibbles) in the high half.
///
/// # Safety
/// `p` must point to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 bytes at `p`.
    let raw = unsafe { _mm_loadu_si128(p.cast()) };
    let m4 = _mm_set1_epi8(0x0F);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), _mm_and_si128(raw, m4))
}

/// Runs `tile::<T>(t0)` over the tokens of `a` in tiles of [`TOKEN_TILE`] (the last one
/// shorter); `T` is the tile's token count.
macro_rules! token_tiles {
    ($a:expr, |$t0:ident, $T:ident| $body:expr) => {{
        let mut $t0 = 0;
        while $t0 < $a.m() {
            let n = ($a.m() - $t0).min(TOKEN_TILE);
            match n {
                4 => {
                    const $T: usize = 4;
                    $body
                }
                3 => {
                    const $T: usize = 3;
                    $body
                }
                2 => {
                    const $T: usize = 2;
                    $body
                }
                _ => {
                    const $T: usize = 1;
                    $body
                }
            }
            $t0 += n;
        }
    }};
}

/// Q8_0, Q4_0 and Q4_1 rows (`F` picks the format).
///
/// # Safety
/// AVX2 and F16C; `a` holds Q8 blocks of `w.cols()` values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block32_rows<const F: u8>(
    w: &DenseLinear,
    a: &DenseActivations,
    rows: Range<usize>,
    out: &SharedOut<'_, f32>,
) {
    // The eight rows' block headers are gathered with 32-bit offsets from the group's first row.
    if w.row_bytes().checked_mul(ROW_GROUP).is_none_or(|span| span > i32::MAX as usize) {
        // Rows too long for the gather's offsets: the portable path (same bits).
        return super::scalar::run_rows(w, a, rows, out);
    }
    let mut r0 = rows.start;
    while r0 < rows.end {
        let ptrs = row_ptrs(w, r0, rows.end);
        let live = (rows.end - r0).min(ROW_GROUP);
        let offsets = row_offsets(w, live);
        // SAFETY: the caller's features and activations; the pointers and offsets are the group's rows.
        token_tiles!(a, |t0, T| unsafe { block32_tile::<F, T>(w, a, &ptrs, offsets, t0, out, r0, live) });
        r0 += ROW_GROUP;
    }
}

/// Byte offsets of the group's rows from its first, rows past `live` repeating the last.
#[inline]
#[target_feature(enable = "avx2")]
fn row_offsets(w: &DenseLinear, live: usize) -> __m256i {
    let at = |i: usize| (i.min(live - 1) * w.row_bytes()) as i32;
    _mm256_setr_epi32(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7))
}

/// Prefetches bytes `range` of each of the next group's rows (rows are contiguous, so row `i`
/// of the next group starts `next_group` bytes after row `i` of this one): eight rows are eight
/// streams at once, more than the hardware prefetcher follows well. A hint: addresses past the
/// matrix are harmless.
#[inline(always)]
fn prefetch_next_group(ptrs: &[*const u8; ROW_GROUP], next_group: usize, range: Range<usize>) {
    for p in ptrs {
        let (start, end) = (p.wrapping_add(next_group + range.start), p.wrapping_add(next_group + range.end));
        let mut line = start.wrapping_sub(start as usize % 64);
        while line < end {
            // SAFETY: a prefetch never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line.cast()) };
            line = line.wrapping_add(64);
        }
    }
}

/// The two f16 values at the start of block `b` of each of the group's rows (`d`, and `m` for
/// Q4_1; for Q8_0/Q4_0 the second is the first codes and goes unused), widened to f32: one
/// gather of eight 32-bit words instead of sixteen scalar loads and inserts.
///
/// # Safety
/// `first` points at block `b` of the group's first row; `first + offsets[i]` at the same
/// block of row `i`, with at least four readable bytes (every block holds more).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn block_headers(first: *const u8, offsets: __m256i) -> (__m256, __m256) {
    // SAFETY: the caller guarantees four bytes at each address.
    let words = unsafe { _mm256_i32gather_epi32::<1>(first.cast(), offsets) };
    let low = _mm256_and_si256(words, _mm256_set1_epi32(0xFFFF));
    let high = _mm256_srli_epi32::<16>(words);
    // Per 128-bit half: four low halves then four high halves (all fit u16: nothing saturates);
    // the permute puts the eight low halves below the eight high ones.
    let halves = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(low, high));
    (_mm256_cvtph_ps(_mm256_castsi256_si128(halves)), _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(halves)))
}

/// Eight rows (`ptrs`, the first `live` of them written from `r0`) against tokens
/// `t0..t0 + T`: each block of each row loaded and decoded once for the `T` tokens.
///
/// # Safety
/// As [`block32_rows`]; `t0 + T <= a.m()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn block32_tile<const F: u8, const T: usize>(
    w: &DenseLinear,
    a: &DenseActivations,
    ptrs: &[*const u8; ROW_GROUP],
    offsets: __m256i,
    t0: usize,
    out: &SharedOut<'_, f32>,
    r0: usize,
    live: usize,
) {
    let (nb, bb) = (w.cols() / QK, w.format().block_bytes());
    let next_group = ROW_GROUP * w.row_bytes();
    let ones = _mm256_set1_epi16(1);
    let (mut acc, mut acc_min) = ([_mm256_setzero_ps(); T], [_mm256_setzero_ps(); T]);
    for b in 0..nb {
        // SAFETY: block `b` of each token lies inside its `cols` values.
        let av: [__m256i; T] = std::array::from_fn(|t| unsafe {
            _mm256_loadu_si256(a.values(t0 + t).as_ptr().add(QK * b).cast())
        });
        let mut prods = [[_mm256_setzero_si256(); ROW_GROUP]; T];
        // The same block of the next group's rows, once per 64-byte line of a row.
        if (b * bb) / 64 != ((b + 1) * bb) / 64 {
            prefetch_next_group(ptrs, next_group, (b + 1) * bb..(b + 1) * bb + 1);
        }
        // SAFETY: block `b` of each row lies inside the row's bytes.
        let (dwf, mwf) = unsafe { block_headers(ptrs[0].add(b * bb), offsets) };
        for i in 0..ROW_GROUP {
            // SAFETY: block `b` of each row lies inside the row's bytes.
            unsafe {
                let blk = ptrs[i].add(b * bb);
                match F {
                    Q8_0 => {
                        let wv = _mm256_loadu_si256(blk.add(2).cast());
                        let magnitude = _mm256_sign_epi8(wv, wv);
                        for t in 0..T {
                            let p16 = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(av[t], wv));
                            prods[t][i] = _mm256_madd_epi16(p16, ones);
                        }
                    }
                    Q4_0 => {
                        let codes = nibbles(blk.add(2));
                        for t in 0..T {
                            prods[t][i] = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, av[t]), ones);
                        }
                    }
                    _ => {
                        let codes = nibbles(blk.add(4));
                        for t in 0..T {
                            prods[t][i] = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, av[t]), ones);
                        }
                    }
                }
            }
        }
        for t in 0..T {
            let mut isum = reduce8(&prods[t]);
            if F == Q4_0 {
                // Σ (q − 8)·a = Σ q·a − 8·Σ a.
                isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * a.sums(t0 + t)[b]));
            }
            let scale = _mm256_mul_ps(dwf, _mm256_set1_ps(a.scales(t0 + t)[b]));
            acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(scale, _mm256_cvtepi32_ps(isum)));
            if F == Q4_1 {
                acc_min[t] =
                    _mm256_add_ps(acc_min[t], _mm256_mul_ps(mwf, _mm256_set1_ps(a.scaled_sums(t0 + t)[b])));
            }
        }
    }
    for t in 0..T {
        let y = if F == Q4_1 { _mm256_add_ps(acc[t], acc_min[t]) } else { acc[t] };
        put_lanes(out, t0 + t, r0, live, y);
    }
}

/// Q4_K rows against Q8_K activations.
///
/// # Safety
/// AVX2 and F16C; `a` holds Q8_K blocks of `w.cols()` values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_rows(w: &DenseLinear, a: &DenseActivations, rows: Range<usize>, out: &SharedOut<'_, f32>) {
    let mut r0 = rows.start;
    while r0 < rows.end {
        let ptrs = row_ptrs(w, r0, rows.end);
        let live = (rows.end - r0).min(ROW_GROUP);
        // SAFETY: the caller's features and activations; the pointers are the group's rows.
        token_tiles!(a, |t0, T| unsafe { q4_k_tile::<T>(w, a, &ptrs, t0, out, r0, live) });
        r0 += ROW_GROUP;
    }
}

/// Eight Q4_K rows against tokens `t0..t0 + T`, each super-block's codes and scales decoded
/// once for the `T` tokens.
///
/// # Safety
/// As [`q4_k_rows`]; `t0 + T <= a.m()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_tile<const T: usize>(
    w: &DenseLinear,
    a: &DenseActivations,
    ptrs: &[*const u8; ROW_GROUP],
    t0: usize,
    out: &SharedOut<'_, f32>,
    r0: usize,
    live: usize,
) {
    let nb = w.cols() / QK_K;
    let next_group = ROW_GROUP * w.row_bytes();
    let m4 = _mm256_set1_epi8(0x0F);
    let (mut acc, mut acc_min) = ([_mm256_setzero_ps(); T], [_mm256_setzero_ps(); T]);
    for b in 0..nb {
        prefetch_next_group(ptrs, next_group, b * 144..(b + 1) * 144);
        let ab: [&[i8]; T] = std::array::from_fn(|t| &a.values(t0 + t)[QK_K * b..QK_K * (b + 1)]);
        let bs: [&[i32]; T] = std::array::from_fn(|t| &a.sums(t0 + t)[16 * b..16 * (b + 1)]);
        let mut prods = [[_mm256_setzero_si256(); ROW_GROUP]; T];
        let mut msum = [[0i32; ROW_GROUP]; T];
        let (mut dw, mut dmin) = ([0u16; 8], [0u16; 8]);
        for i in 0..ROW_GROUP {
            // SAFETY: super-block `b` of each row lies inside the row's bytes.
            let blk = unsafe { std::slice::from_raw_parts(ptrs[i].add(b * 144), 144) };
            dw[i] = u16::from_le_bytes([blk[0], blk[1]]);
            dmin[i] = u16::from_le_bytes([blk[2], blk[3]]);
            let scales = &blk[4..16];
            let mut acc32 = [_mm256_setzero_si256(); T];
            for c in 0..4 {
                let (sc_lo, m_lo) = scale_min_k4(2 * c, scales);
                let (sc_hi, m_hi) = scale_min_k4(2 * c + 1, scales);
                for t in 0..T {
                    let bs = &bs[t][4 * c..4 * c + 4];
                    msum[t][i] += i32::from(m_lo) * (bs[0] + bs[1]) + i32::from(m_hi) * (bs[2] + bs[3]);
                }
                // SAFETY: 32 code bytes and 64 activations of chunk `c` are in range.
                unsafe {
                    let codes = _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * c).cast());
                    let lo = _mm256_and_si256(codes, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), m4);
                    let (s_lo, s_hi) =
                        (_mm256_set1_epi16(i16::from(sc_lo)), _mm256_set1_epi16(i16::from(sc_hi)));
                    for t in 0..T {
                        let a_lo = _mm256_loadu_si256(ab[t].as_ptr().add(64 * c).cast());
                        let a_hi = _mm256_loadu_si256(ab[t].as_ptr().add(64 * c + 32).cast());
                        let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a_lo), s_lo);
                        let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a_hi), s_hi);
                        acc32[t] = _mm256_add_epi32(acc32[t], _mm256_add_epi32(p_lo, p_hi));
                    }
                }
            }
            for t in 0..T {
                prods[t][i] = acc32[t];
            }
        }
        let (dwf, dminf) = (widen_f16(&dw), widen_f16(&dmin));
        for t in 0..T {
            let isum = reduce8(&prods[t]);
            let da = _mm256_set1_ps(a.scales(t0 + t)[b]);
            let scale = _mm256_mul_ps(dwf, da);
            acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(scale, _mm256_cvtepi32_ps(isum)));
            // SAFETY: `msum[t]` holds 8 i32.
            let msum = unsafe { _mm256_loadu_si256(msum[t].as_ptr().cast()) };
            let scale_min = _mm256_mul_ps(dminf, da);
            acc_min[t] = _mm256_add_ps(acc_min[t], _mm256_mul_ps(scale_min, _mm256_cvtepi32_ps(msum)));
        }
    }
    for t in 0..T {
        put_lanes(out, t0 + t, r0, live, _mm256_sub_ps(acc[t], acc_min[t]));
    }
}

/// Q6_K rows against Q8_K activations.
///
/// # Safety
/// AVX2 and F16C; `a` holds Q8_K blocks of `w.cols()` values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_rows(w: &DenseLinear, a: &DenseActivations, rows: Range<usize>, out: &SharedOut<'_, f32>) {
    let mut r0 = rows.start;
    while r0 < rows.end {
        let ptrs = row_ptrs(w, r0, rows.end);
        let live = (rows.end - r0).min(ROW_GROUP);
        // SAFETY: the caller's features and activations; the pointers are the group's rows.
        token_tiles!(a, |t0, T| unsafe { q6_k_tile::<T>(w, a, &ptrs, t0, out, r0, live) });
        r0 += ROW_GROUP;
    }
}

/// Eight Q6_K rows against tokens `t0..t0 + T`, each super-block's 6-bit codes decoded once for
/// the `T` tokens.
///
/// # Safety
/// As [`q6_k_rows`]; `t0 + T <= a.m()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_tile<const T: usize>(
    w: &DenseLinear,
    a: &DenseActivations,
    ptrs: &[*const u8; ROW_GROUP],
    t0: usize,
    out: &SharedOut<'_, f32>,
    r0: usize,
    live: usize,
) {
    let nb = w.cols() / QK_K;
    let next_group = ROW_GROUP * w.row_bytes();
    let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        prefetch_next_group(ptrs, next_group, b * 210..(b + 1) * 210);
        let ab: [&[i8]; T] = std::array::from_fn(|t| &a.values(t0 + t)[QK_K * b..QK_K * (b + 1)]);
        // Each token's 16 block sums as i16 (each at most 16 · 128), in order.
        // SAFETY: 16 sums per super-block.
        let bs16: [__m256i; T] = std::array::from_fn(|t| unsafe {
            let p = a.sums(t0 + t)[16 * b..16 * (b + 1)].as_ptr();
            let packed =
                _mm256_packs_epi32(_mm256_loadu_si256(p.cast()), _mm256_loadu_si256(p.add(8).cast()));
            _mm256_permute4x64_epi64::<0xD8>(packed)
        });
        let mut prods = [[_mm256_setzero_si256(); ROW_GROUP]; T];
        let mut dw = [0u16; 8];
        for i in 0..ROW_GROUP {
            // SAFETY: super-block `b` of each row lies inside the row's bytes.
            let blk = unsafe { std::slice::from_raw_parts(ptrs[i].add(b * 210), 210) };
            dw[i] = u16::from_le_bytes([blk[208], blk[209]]);
            // The 16 sub-block scales as i16, lanes 0–7 in the low half, 8–15 in the high.
            // SAFETY: the 16 scales at byte 192.
            let sc16 = unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.as_ptr().add(192).cast())) };
            let mut acc32 = [_mm256_setzero_si256(); T];
            for h in 0..2 {
                // Half `h`'s eight scales in both 128-bit halves, for the in-lane shuffles below.
                let sc_half = match h {
                    0 => _mm256_permute2x128_si256::<0x00>(sc16, sc16),
                    _ => _mm256_permute2x128_si256::<0x11>(sc16, sc16),
                };
                // SAFETY: the 64 + 32 code bytes of half `h` and its 128 activations are in
                // range.
                unsafe {
                    let ql0 = _mm256_loadu_si256(blk.as_ptr().add(64 * h).cast());
                    let ql1 = _mm256_loadu_si256(blk.as_ptr().add(64 * h + 32).cast());
                    let qh = _mm256_loadu_si256(blk.as_ptr().add(128 + 32 * h).cast());
                    // The two high bits of each part, moved to bits 4–5.
                    let high = [
                        _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4),
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4),
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4),
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4),
                    ];
                    let parts = [
                        _mm256_or_si256(_mm256_and_si256(ql0, m4), high[0]),
                        _mm256_or_si256(_mm256_and_si256(ql1, m4), high[1]),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), high[2]),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), high[3]),
                    ];
                    for (k, codes) in parts.into_iter().enumerate() {
                        // Scale 8h + 2k in the low half, 8h + 2k + 1 in the high half.
                        let scales = _mm256_shuffle_epi8(sc_half, Q6K_SCALE_PAIRS[k]);
                        for t in 0..T {
                            let av = _mm256_loadu_si256(ab[t].as_ptr().add(128 * h + 32 * k).cast());
                            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, av), scales);
                            acc32[t] = _mm256_add_epi32(acc32[t], p);
                        }
                    }
                }
            }
            // Σ (q − 32)·a·sc = Σ q·a·sc − 32 · Σ_g sc_g · bsum_g: the correction's lanes come
            // off before the reduction, which sums them with the rest (the same integer).
            for t in 0..T {
                let corr = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs16[t]), 5);
                prods[t][i] = _mm256_sub_epi32(acc32[t], corr);
            }
        }
        let dwf = widen_f16(&dw);
        for t in 0..T {
            let isum = reduce8(&prods[t]);
            let scale = _mm256_mul_ps(dwf, _mm256_set1_ps(a.scales(t0 + t)[b]));
            acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(scale, _mm256_cvtepi32_ps(isum)));
        }
    }
    for (t, &y) in acc.iter().enumerate() {
        put_lanes(out, t0 + t, r0, live, y);
    }
}

/// `vpshufb` masks that broadcast, from eight i16 scales held in both halves of a register,
/// scale `2k` over the low half and scale `2k + 1` over the high half.
const Q6K_SCALE_PAIRS: [__m256i; 4] = {
    const fn pair(k: usize) -> __m256i {
        let mut bytes = [0u8; 32];
        let mut i = 0;
        while i < 32 {
            let scale = if i < 16 { 2 * k } else { 2 * k + 1 };
            bytes[i] = (2 * scale + i % 2) as u8;
            i += 1;
        }
        // SAFETY: 32 bytes are one __m256i.
        unsafe { std::mem::transmute::<[u8; 32], __m256i>(bytes) }
    }
    [pair(0), pair(1), pair(2), pair(3)]
};

/// Eight weights of a float format at `p` widened to f32.
///
/// # Safety
/// AVX2 and F16C; eight weights readable at `p`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load8(format: DenseFormat, p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees eight weights at `p`.
    unsafe {
        match format {
            DenseFormat::F32 => _mm256_loadu_ps(p.cast()),
            DenseFormat::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            _ => _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())), 16)),
        }
    }
}

/// Float rows: a fused-multiply-add dot product per row and token.
///
/// # Safety
/// AVX2, FMA and F16C; `a` holds F32 activations of `w.cols()` values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_rows(w: &DenseLinear, a: &DenseActivations, rows: Range<usize>, out: &SharedOut<'_, f32>) {
    let (format, cols) = (w.format(), w.cols());
    let size = format.block_bytes();
    for r in rows {
        let row = w.row(r).as_ptr();
        for t in 0..a.m() {
            let x = a.floats(t);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            // SAFETY: every load reads columns below `cols` of the row and of the token.
            unsafe {
                while c + 32 <= cols {
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let at = c + 8 * j;
                        let wv = load8(format, row.add(at * size));
                        *acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(at)), *acc);
                    }
                    c += 32;
                }
                while c + 8 <= cols {
                    acc[0] = _mm256_fmadd_ps(
                        load8(format, row.add(c * size)),
                        _mm256_loadu_ps(x.as_ptr().add(c)),
                        acc[0],
                    );
                    c += 8;
                }
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut lanes = [0.0f32; 8];
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
            let mut y: f32 = lanes.iter().sum();
            let tail = &w.row(r)[c * size..];
            y += match format {
                DenseFormat::F32 => super::scalar::dot_f32(tail, &x[c..]),
                DenseFormat::F16 => super::scalar::dot_f16(tail, &x[c..]),
                _ => super::scalar::dot_bf16(tail, &x[c..]),
            };
            out.write(t, r, y);
        }
    }
}
