//! AVX2 kernels for the dense products, eight weight rows at a time.
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
//! The float formats take a plain fused-multiply-add dot product per row instead (eight lanes,
//! four accumulators), within [`super::float_dot_bound`] of the reference.

use std::arch::x86_64::*;
use std::ops::Range;

use super::scalar::scale_min_k4;
use super::{DenseActivations, DenseFormat, DenseLinear, QK, QK_K, ROW_GROUP};
use crate::kernels::SharedOut;

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
    let (nb, bb) = (w.cols() / QK, w.format().block_bytes());
    let ones = _mm256_set1_epi16(1);
    let mut r0 = rows.start;
    while r0 < rows.end {
        let n = (rows.end - r0).min(ROW_GROUP);
        let ptrs = row_ptrs(w, r0, rows.end);
        for t in 0..a.m() {
            let (q, d, s, sums) = (a.values(t), a.scales(t), a.scaled_sums(t), a.sums(t));
            let (mut acc, mut acc_min) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for b in 0..nb {
                // SAFETY: block `b` of the token lies inside its `cols` values.
                let av = unsafe { _mm256_loadu_si256(q.as_ptr().add(QK * b).cast()) };
                let mut prods = [_mm256_setzero_si256(); 8];
                let (mut dw, mut mw) = ([0u16; 8], [0u16; 8]);
                for i in 0..ROW_GROUP {
                    // SAFETY: block `b` of each row lies inside the row's bytes.
                    unsafe {
                        let blk = ptrs[i].add(b * bb);
                        dw[i] = blk.cast::<u16>().read_unaligned();
                        let p16 = match F {
                            Q8_0 => {
                                let wv = _mm256_loadu_si256(blk.add(2).cast());
                                _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(av, wv))
                            }
                            Q4_0 => _mm256_maddubs_epi16(nibbles(blk.add(2)), av),
                            _ => {
                                mw[i] = blk.add(2).cast::<u16>().read_unaligned();
                                _mm256_maddubs_epi16(nibbles(blk.add(4)), av)
                            }
                        };
                        prods[i] = _mm256_madd_epi16(p16, ones);
                    }
                }
                let mut isum = reduce8(&prods);
                if F == Q4_0 {
                    // Σ (q − 8)·a = Σ q·a − 8·Σ a.
                    isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * sums[b]));
                }
                let scale = _mm256_mul_ps(widen_f16(&dw), _mm256_set1_ps(d[b]));
                acc = _mm256_add_ps(acc, _mm256_mul_ps(scale, _mm256_cvtepi32_ps(isum)));
                if F == Q4_1 {
                    acc_min = _mm256_add_ps(acc_min, _mm256_mul_ps(widen_f16(&mw), _mm256_set1_ps(s[b])));
                }
            }
            let y = if F == Q4_1 { _mm256_add_ps(acc, acc_min) } else { acc };
            put_lanes(out, t, r0, n, y);
        }
        r0 += ROW_GROUP;
    }
}

/// Q4_K rows against Q8_K activations.
///
/// # Safety
/// AVX2 and F16C; `a` holds Q8_K blocks of `w.cols()` values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_rows(w: &DenseLinear, a: &DenseActivations, rows: Range<usize>, out: &SharedOut<'_, f32>) {
    let nb = w.cols() / QK_K;
    let m4 = _mm256_set1_epi8(0x0F);
    let mut r0 = rows.start;
    while r0 < rows.end {
        let n = (rows.end - r0).min(ROW_GROUP);
        let ptrs = row_ptrs(w, r0, rows.end);
        for t in 0..a.m() {
            let (q, d, bsums) = (a.values(t), a.scales(t), a.sums(t));
            let (mut acc, mut acc_min) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for b in 0..nb {
                let ab = &q[QK_K * b..QK_K * (b + 1)];
                let bs = &bsums[16 * b..16 * (b + 1)];
                let mut prods = [_mm256_setzero_si256(); 8];
                let (mut dw, mut dmin, mut msum) = ([0u16; 8], [0u16; 8], [0i32; 8]);
                for i in 0..ROW_GROUP {
                    // SAFETY: super-block `b` of each row lies inside the row's bytes.
                    let blk = unsafe { std::slice::from_raw_parts(ptrs[i].add(b * 144), 144) };
                    dw[i] = u16::from_le_bytes([blk[0], blk[1]]);
                    dmin[i] = u16::from_le_bytes([blk[2], blk[3]]);
                    let scales = &blk[4..16];
                    let mut acc32 = _mm256_setzero_si256();
                    for c in 0..4 {
                        let (sc_lo, m_lo) = scale_min_k4(2 * c, scales);
                        let (sc_hi, m_hi) = scale_min_k4(2 * c + 1, scales);
                        msum[i] += i32::from(m_lo) * (bs[4 * c] + bs[4 * c + 1])
                            + i32::from(m_hi) * (bs[4 * c + 2] + bs[4 * c + 3]);
                        // SAFETY: 32 code bytes and 64 activations of chunk `c` are in range.
                        unsafe {
                            let codes = _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * c).cast());
                            let lo = _mm256_and_si256(codes, m4);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), m4);
                            let a_lo = _mm256_loadu_si256(ab.as_ptr().add(64 * c).cast());
                            let a_hi = _mm256_loadu_si256(ab.as_ptr().add(64 * c + 32).cast());
                            let p_lo = _mm256_madd_epi16(
                                _mm256_maddubs_epi16(lo, a_lo),
                                _mm256_set1_epi16(i16::from(sc_lo)),
                            );
                            let p_hi = _mm256_madd_epi16(
                                _mm256_maddubs_epi16(hi, a_hi),
                                _mm256_set1_epi16(i16::from(sc_hi)),
                            );
                            acc32 = _mm256_add_epi32(acc32, _mm256_add_epi32(p_lo, p_hi));
                        }
                    }
                    prods[i] = acc32;
                }
                let isum = reduce8(&prods);
                let da = _mm256_set1_ps(d[b]);
                let scale = _mm256_mul_ps(widen_f16(&dw), da);
                acc = _mm256_add_ps(acc, _mm256_mul_ps(scale, _mm256_cvtepi32_ps(isum)));
                // SAFETY: `msum` holds 8 i32.
                let msum = unsafe { _mm256_loadu_si256(msum.as_ptr().cast()) };
                let scale_min = _mm256_mul_ps(widen_f16(&dmin), da);
                acc_min = _mm256_add_ps(acc_min, _mm256_mul_ps(scale_min, _mm256_cvtepi32_ps(msum)));
            }
            put_lanes(out, t, r0, n, _mm256_sub_ps(acc, acc_min));
        }
        r0 += ROW_GROUP;
    }
}

/// Q6_K rows against Q8_K activations.
///
/// # Safety
/// AVX2 and F16C; `a` holds Q8_K blocks of `w.cols()` values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_rows(w: &DenseLinear, a: &DenseActivations, rows: Range<usize>, out: &SharedOut<'_, f32>) {
    let nb = w.cols() / QK_K;
    let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
    let mut r0 = rows.start;
    while r0 < rows.end {
        let n = (rows.end - r0).min(ROW_GROUP);
        let ptrs = row_ptrs(w, r0, rows.end);
        for t in 0..a.m() {
            let (q, d, bsums) = (a.values(t), a.scales(t), a.sums(t));
            let mut acc = _mm256_setzero_ps();
            for b in 0..nb {
                let ab = &q[QK_K * b..QK_K * (b + 1)];
                let bs = &bsums[16 * b..16 * (b + 1)];
                let mut prods = [_mm256_setzero_si256(); 8];
                let (mut dw, mut corr) = ([0u16; 8], [0i32; 8]);
                for i in 0..ROW_GROUP {
                    // SAFETY: super-block `b` of each row lies inside the row's bytes.
                    let blk = unsafe { std::slice::from_raw_parts(ptrs[i].add(b * 210), 210) };
                    dw[i] = u16::from_le_bytes([blk[208], blk[209]]);
                    let sc = |g: usize| i16::from(blk[192 + g] as i8);
                    // Σ (q − 32)·a·sc = Σ q·a·sc − 32 · Σ_g sc_g · bsum_g.
                    corr[i] = 32 * (0..16).map(|g| i32::from(sc(g)) * bs[g]).sum::<i32>();
                    let mut acc32 = _mm256_setzero_si256();
                    for h in 0..2 {
                        // SAFETY: the 64 + 32 code bytes of half `h` and its 128 activations are
                        // in range.
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
                                let g = 8 * h + 2 * k;
                                let av = _mm256_loadu_si256(ab.as_ptr().add(128 * h + 32 * k).cast());
                                let scales =
                                    _mm256_set_m128i(_mm_set1_epi16(sc(g + 1)), _mm_set1_epi16(sc(g)));
                                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, av), scales);
                                acc32 = _mm256_add_epi32(acc32, p);
                            }
                        }
                    }
                    prods[i] = acc32;
                }
                // SAFETY: `corr` holds 8 i32.
                let corr = unsafe { _mm256_loadu_si256(corr.as_ptr().cast()) };
                let isum = _mm256_sub_epi32(reduce8(&prods), corr);
                let scale = _mm256_mul_ps(widen_f16(&dw), _mm256_set1_ps(d[b]));
                acc = _mm256_add_ps(acc, _mm256_mul_ps(scale, _mm256_cvtepi32_ps(isum)));
            }
            put_lanes(out, t, r0, n, acc);
        }
        r0 += ROW_GROUP;
    }
}

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
