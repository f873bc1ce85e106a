//! Products of an i16 matrix with an int8 matrix, scaled into f32: the mixed-precision
//! backward of training (`dX = dY · W_q` with ternary `W_q`, `dW = dYᵀ · X_q` with int8 `X_q`,
//! each `dY` quantized to 16 bits per row).
//!
//! `out[r, c] (+)= Σ_chunks row_scale[r] · (Σ_{k ∈ chunk} a[r, k] · b[k, c])`: the integer sums
//! run over chunks of [`K_CHUNK`] = 256 values of `k` (at most 256 · 32768 · 128 = 2^30 in
//! magnitude, so i32 never wraps, whatever the i16 and int8 inputs), and each chunk is added to
//! the f32 output with one fused multiply-add, chunk after chunk. The AVX2 and AVX-512 kernels
//! do exactly these operations, so they equal the scalar reference bit for bit.
//!
//! The int8 operand is packed once into [`PackedPairs`]: rows `2p` and `2p + 1` interleaved as
//! i16, so that `vpmaddwd` of a broadcast pair `(a[r, 2p], a[r, 2p + 1])` with 16 such i16 sums
//! both for 8 columns at once, and every lane accumulates one output.

use std::ops::Range;

use rayon::prelude::*;

use crate::kernels::{for_ranges, KernelPath, SharedOut, PARALLEL_MIN_MACS};
use crate::QuantError;

/// Values of `k` whose products are summed in i32 before they are scaled into the output.
pub const K_CHUNK: usize = 256;
/// Columns of a packed panel (two AVX2 vectors of eight i32 sums, one AVX-512 vector).
pub const PANEL_COLS: usize = 16;

/// An int8 matrix `b` (`[k, n]`) packed for [`gemm_i16_i8`] in panels of 16 columns (the last
/// padded with zeros): panel `j` holds, for each pair of rows `p` in turn, the 16 pairs
/// `(b[2p, c], b[2p + 1, c])` of its columns as i16, 64 contiguous bytes per pair, so the
/// kernel walks a panel as one stream. An odd `k` gets a zero row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackedPairs {
    k: usize,
    n: usize,
    n_padded: usize,
    data: Vec<i16>,
}

impl PackedPairs {
    /// Packs the row-major `[k, n]` matrix `b`.
    pub fn from_i8(b: &[i8], k: usize, n: usize) -> Result<Self, QuantError> {
        if b.len() != k * n {
            return Err(QuantError::Shape(format!("int8 matrix of {} values is not {k} x {n}", b.len())));
        }
        let mut packed = Self::default();
        packed.repack(k, n, |r| &b[r * n..(r + 1) * n]);
        Ok(packed)
    }

    /// Packs the `[k, n]` matrix whose row `r` is `row(r)` (`n` values) into this matrix,
    /// reusing its buffer. The panels are packed in parallel.
    pub fn repack<'r>(&mut self, k: usize, n: usize, row: impl Fn(usize) -> &'r [i8] + Sync) {
        let n_padded = n.div_ceil(PANEL_COLS) * PANEL_COLS;
        let pairs = k.div_ceil(2);
        // Every value is written below (padding and the missing odd row as zeros), so the
        // buffer keeps whatever it held: zeroing it first was a whole extra pass.
        self.data.resize(pairs * n_padded * 2, 0);
        #[cfg(target_arch = "x86_64")]
        let simd = simd_available();
        if pairs > 0 {
            self.data.par_chunks_mut(pairs * PANEL_COLS * 2).enumerate().for_each(|(j, panel)| {
                let cols = j * PANEL_COLS..((j + 1) * PANEL_COLS).min(n);
                for (p, out) in panel.chunks_exact_mut(PANEL_COLS * 2).enumerate() {
                    let even = &row(2 * p)[cols.clone()];
                    #[cfg(target_arch = "x86_64")]
                    if simd && cols.len() == PANEL_COLS && 2 * p + 1 < k {
                        let odd = &row(2 * p + 1)[cols.clone()];
                        // SAFETY: AVX2 is present (`simd_available`); 16 values each.
                        unsafe { interleave16_avx2(even, odd, out) };
                        continue;
                    }
                    let (live, padding) = out.split_at_mut(2 * cols.len());
                    padding.fill(0);
                    let pairs_out = live.chunks_exact_mut(2);
                    if 2 * p + 1 < k {
                        let odd = &row(2 * p + 1)[cols.clone()];
                        for ((pair, &e), &o) in pairs_out.zip(even).zip(odd) {
                            pair[0] = e as i16;
                            pair[1] = o as i16;
                        }
                    } else {
                        for (pair, &e) in pairs_out.zip(even) {
                            pair[0] = e as i16;
                            pair[1] = 0;
                        }
                    }
                }
            });
        }
        (self.k, self.n, self.n_padded) = (k, n, n_padded);
    }

    /// Where `b[2p, c]` sits in `data` (`b[2p + 1, c]` follows it).
    fn index(&self, p: usize, c: usize) -> usize {
        ((c / PANEL_COLS * self.pairs() + p) * PANEL_COLS + c % PANEL_COLS) * 2
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Pairs of rows (`k` rounded up to even, halved).
    pub fn pairs(&self) -> usize {
        self.k.div_ceil(2)
    }

    /// Value `b[r, c]` (for tests and the reference).
    pub fn get(&self, r: usize, c: usize) -> i16 {
        assert!(r < self.k && c < self.n);
        self.data[self.index(r / 2, c) + r % 2]
    }
}

/// The i16 operand `a` (`[m, k]`) of [`gemm_i16_i8`]. Its values at `k` and beyond up to the
/// next even index (when `k` is odd) must be readable; any value does, as it meets the zero row
/// of the packed pairs.
#[derive(Clone, Copy, Debug)]
pub struct I16Rows<'a> {
    pub data: &'a [i16],
    pub m: usize,
    pub layout: ALayout,
}

/// How the i16 operand is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ALayout {
    /// `a[r, j]` at `r · lda + j`.
    RowMajor { lda: usize },
    /// Rows pairwise interleaved along `k`, as [`PackedPairs`] stores its matrix but without
    /// panels: `a[r, 2p + h]` at `(p · ld + r) · 2 + h`, `ld ≥ m`. A gradient quantized by
    /// columns comes out this way without a transpose: pairs of tokens, feature by feature.
    PairInterleaved { ld: usize },
}

impl I16Rows<'_> {
    /// Offsets (in values) of the next row and of the next pair of `k`.
    fn strides(&self) -> (usize, usize) {
        match self.layout {
            ALayout::RowMajor { lda } => (lda, 2),
            ALayout::PairInterleaved { ld } => (2, 2 * ld),
        }
    }

    /// `a[r, j]`.
    fn at(&self, r: usize, j: usize) -> i16 {
        let (row, pair) = self.strides();
        self.data[r * row + (j / 2) * pair + j % 2]
    }

    /// Whether `m` rows of `pairs` pairs fit the layout and the data.
    fn holds(&self, pairs: usize) -> bool {
        if self.m == 0 || pairs == 0 {
            return true;
        }
        let (row, pair) = self.strides();
        let fits = match self.layout {
            ALayout::RowMajor { lda } => lda >= 2 * pairs,
            ALayout::PairInterleaved { ld } => ld >= self.m,
        };
        fits && self.data.len() > (self.m - 1) * row + (pairs - 1) * pair + 1
    }
}

/// Where the product goes: `out[r · ldo + c]` for `r < m`, `c < n`, scaled per row.
pub struct ScaledOut<'a> {
    pub out: &'a mut [f32],
    pub ldo: usize,
    pub row_scale: &'a [f32],
    /// Add to what `out` holds (else overwrite it).
    pub accumulate: bool,
}

/// `out[r, c] (+)= Σ_chunks row_scale[r] · Σ_{k ∈ chunk} a[r, k] · b[k, c]` (module docs), on
/// the best kernel for this CPU, split by rows over rayon's pool.
pub fn gemm_i16_i8(a: I16Rows, b: &PackedPairs, out: ScaledOut) -> Result<(), QuantError> {
    gemm_i16_i8_with(KernelPath::active(), a, b, out)
}

/// [`gemm_i16_i8`] on a chosen kernel path: the AVX2 kernel on x86-64 paths that have AVX2 and
/// FMA, the scalar reference otherwise.
pub fn gemm_i16_i8_with(
    path: KernelPath,
    a: I16Rows,
    b: &PackedPairs,
    out: ScaledOut,
) -> Result<(), QuantError> {
    let (m, k, n) = (a.m, b.k, b.n);
    if !a.holds(b.pairs()) {
        return Err(QuantError::Shape(format!(
            "i16 operand of {} values ({:?}) does not hold {m} rows of {} pairs",
            a.data.len(),
            a.layout,
            b.pairs()
        )));
    }
    if m > 0 && n > 0 && (out.ldo < n || out.out.len() < (m - 1) * out.ldo + n) {
        return Err(QuantError::Shape(format!(
            "output of {} values with stride {} does not hold {m} x {n}",
            out.out.len(),
            out.ldo
        )));
    }
    if out.row_scale.len() < m {
        return Err(QuantError::Shape(format!("{} row scales for {m} rows", out.row_scale.len())));
    }
    if k == 0 {
        // Empty sums: the output is zero, or unchanged.
        if !out.accumulate {
            for r in 0..m {
                out.out[r * out.ldo..r * out.ldo + n].fill(0.0);
            }
        }
        return Ok(());
    }
    let simd = Simd::for_path(path);
    let (row_scale, accumulate, ldo) = (out.row_scale, out.accumulate, out.ldo);
    let shared = SharedOut::new(out.out, ldo);
    // Row tiles of 6 (the kernel's height): a split never changes what a row computes.
    let tiles = m.div_ceil(ROWS);
    for_ranges(tiles, m * k.max(1) * n, PARALLEL_MIN_MACS, |t: Range<usize>| {
        let rows = t.start * ROWS..(t.end * ROWS).min(m);
        let task = Task { a, b, row_scale, accumulate, out: &shared, rows };
        match simd {
            // SAFETY (all three): `Simd::for_path` confirmed the CPU features; the shapes were
            // checked above.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { avx2::gemm(&task) },
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512Bw => unsafe { avx512::gemm::<false>(&task) },
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512Vnni => unsafe { avx512::gemm::<true>(&task) },
            Simd::None => scalar_gemm(&task),
        }
    });
    Ok(())
}

/// Largest 16-bit code: the range is kept symmetric.
const I16_MAX: f32 = 32767.0;

/// `round(v)` (ties to even) of `v` clamped to ±32767. Adding 1.5·2^23 to a float below 2^22 in
/// magnitude leaves the rounded integer in the low bits of the sum, which an integer
/// subtraction reads off: all of it vectorizes, where `round_ties_even` is a libm call on
/// baseline x86-64 and a saturating `as i32` is a scalar loop.
#[inline(always)]
fn round_i16(v: f32) -> i16 {
    const ROUND: f32 = 12_582_912.0;
    let shifted = v.clamp(-I16_MAX, I16_MAX) + ROUND;
    (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32) as i16
}

/// `32767 / amax`, or 0 for an all-zero (or non-finite) range.
fn inverse(amax: f32) -> f32 {
    if amax > 0.0 && amax.is_finite() {
        I16_MAX / amax
    } else {
        0.0
    }
}

/// Rows per task of the quantizers.
const QUANT_ROWS: usize = 16;

/// Quantizes each row of `x ⊙ mul` (`[rows, n]`, `mul` per column) to 16 bits:
/// `q[r·lda + j] = round(x[r, j] · mul[j] · 32767 / amax_r)` with `amax_r = max_j |x[r, j] · mul[j]|`,
/// the values from `n` to `lda` set to 0, and `scale[r] = amax_r / 32767`. The row-major operand
/// of a product that sums along the row (`dX = dY · W`).
pub fn quantize_rows_i16(x: &[f32], n: usize, mul: &[f32], q: &mut [i16], lda: usize, scale: &mut [f32]) {
    let rows = scale.len();
    assert!(
        x.len() == rows * n && mul.len() == n && lda >= n && q.len() == rows * lda,
        "quantize_rows_i16 shapes"
    );
    if n == 0 {
        q.fill(0);
        scale.fill(0.0);
        return;
    }
    let simd = simd_available();
    q.par_chunks_mut(lda * QUANT_ROWS)
        .zip(x.par_chunks(n * QUANT_ROWS))
        .zip(scale.par_chunks_mut(QUANT_ROWS))
        .for_each(|((qc, xc), sc)| {
            let mut scaled = vec![0f32; n];
            for ((qr, xr), s) in qc.chunks_exact_mut(lda).zip(xc.chunks_exact(n)).zip(sc) {
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: AVX2 is present (`simd_available`).
                    *s = unsafe { quantize_row_avx2(&xr[..n], mul, &mut scaled, qr) };
                    continue;
                }
                let _ = simd;
                *s = quantize_row(&xr[..n], mul, &mut scaled, qr);
            }
        });
}

#[inline(always)]
fn quantize_row(x: &[f32], mul: &[f32], scaled: &mut [f32], q: &mut [i16]) -> f32 {
    for ((v, &a), &m) in scaled.iter_mut().zip(x).zip(mul) {
        *v = a * m;
    }
    // Eight running maxima, so the loop vectorizes (a float max reduction would not).
    let mut lanes = [0f32; 8];
    let mut chunks = scaled.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v.abs());
        }
    }
    let amax =
        chunks.remainder().iter().fold(lanes.iter().fold(0f32, |m, &l| m.max(l)), |m, &v| m.max(v.abs()));
    let inv = inverse(amax);
    for (c, &v) in q.iter_mut().zip(scaled.iter()) {
        *c = round_i16(v * inv);
    }
    q[x.len()..].fill(0);
    amax / I16_MAX
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(x: &[f32], mul: &[f32], scaled: &mut [f32], q: &mut [i16]) -> f32 {
    quantize_row(x, mul, scaled, q)
}

/// Quantizes each column of `x / div` (`[rows, n]`, `div` per row) to 16 bits, into the
/// [`ALayout::PairInterleaved`] layout with `ld = n`: `q[(p·n + o)·2 + h] = round(x[2p + h, o] /
/// div[2p + h] · 32767 / amax_o)` (0 for the missing row of an odd count), with
/// `amax_o = max_t |x[t, o] / div[t]|` and `scale[o] = amax_o / 32767`. The operand of a
/// product that sums along the column (`dW = (dY / s_a)ᵀ · X`), with no transpose.
pub fn quantize_columns_i16(x: &[f32], div: &[f32], q: &mut [i16], scale: &mut [f32]) {
    let (rows, n) = (div.len(), scale.len());
    assert!(x.len() == rows * n && q.len() == rows.div_ceil(2) * n * 2, "quantize_columns_i16 shapes");
    if n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    let simd = simd_available();
    // Column maxima: partial maxima per chunk of rows, then their maximum (exact in any order).
    let amax = x
        .par_chunks(n * QUANT_ROWS)
        .enumerate()
        .fold(
            || vec![0f32; n],
            |mut m, (c, xc)| {
                let div = &div[c * QUANT_ROWS..];
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: AVX2 is present (`simd_available`).
                    unsafe { column_max_avx2(xc, div, &mut m) };
                    return m;
                }
                column_max(xc, div, &mut m);
                m
            },
        )
        .reduce(|| vec![0f32; n], |a, b| a.iter().zip(&b).map(|(x, y)| x.max(*y)).collect());
    let inv: Vec<f32> = amax.iter().map(|&m| inverse(m)).collect();
    for (s, &m) in scale.iter_mut().zip(&amax) {
        *s = m / I16_MAX;
    }
    q.par_chunks_mut(2 * n).enumerate().for_each(|(p, qp)| {
        let even = (&x[2 * p * n..][..n], div[2 * p]);
        let odd = (2 * p + 1 < rows).then(|| (&x[(2 * p + 1) * n..][..n], div[2 * p + 1]));
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX2 is present (`simd_available`).
            unsafe { interleave_pair_avx2(even, odd, &inv, qp) };
            return;
        }
        interleave_pair(even, odd, &inv, qp);
    });
}

#[inline(always)]
fn column_max(x: &[f32], div: &[f32], m: &mut [f32]) {
    for (xr, &d) in x.chunks_exact(m.len()).zip(div) {
        for (mo, &v) in m.iter_mut().zip(xr) {
            *mo = mo.max((v / d).abs());
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn column_max_avx2(x: &[f32], div: &[f32], m: &mut [f32]) {
    column_max(x, div, m)
}

/// One pair of rows, interleaved: `q[2o + h]` is row `h`'s code for column `o`.
#[inline(always)]
fn interleave_pair(even: (&[f32], f32), odd: Option<(&[f32], f32)>, inv: &[f32], q: &mut [i16]) {
    let (xe, de) = even;
    match odd {
        Some((xo, d_o)) => {
            for (((qo, &e), &o), &iv) in q.chunks_exact_mut(2).zip(xe).zip(xo).zip(inv) {
                qo[0] = round_i16(e / de * iv);
                qo[1] = round_i16(o / d_o * iv);
            }
        }
        None => {
            for ((qo, &e), &iv) in q.chunks_exact_mut(2).zip(xe).zip(inv) {
                qo[0] = round_i16(e / de * iv);
                qo[1] = 0;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn interleave_pair_avx2(even: (&[f32], f32), odd: Option<(&[f32], f32)>, inv: &[f32], q: &mut [i16]) {
    interleave_pair(even, odd, inv, q)
}

/// `out[2i] = even[i]`, `out[2i + 1] = odd[i]` for 16 int8 values each, widened to i16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn interleave16_avx2(even: &[i8], odd: &[i8], out: &mut [i16]) {
    use std::arch::x86_64::*;
    assert!(even.len() >= 16 && odd.len() >= 16 && out.len() >= 32);
    // SAFETY: the lengths are checked above; unaligned loads and stores.
    unsafe {
        let e = _mm_loadu_si128(even.as_ptr().cast());
        let o = _mm_loadu_si128(odd.as_ptr().cast());
        let lo = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(e, o));
        let hi = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(e, o));
        _mm256_storeu_si256(out.as_mut_ptr().cast(), lo);
        _mm256_storeu_si256(out.as_mut_ptr().add(16).cast(), hi);
    }
}

/// Whether the quantizers' AVX2 builds can run (the same arithmetic, wider vectors).
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        KernelPath::active() != KernelPath::Scalar && std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows of the kernel's register tile.
const ROWS: usize = 6;

/// The kernel a path runs: AVX-512 (`vpdpwssd` with VNNI, else `vpmaddwd` + add) on 64-byte
/// vectors, AVX2 with FMA on 32-byte ones, or the scalar reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Simd {
    None,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Bw,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Simd {
    fn for_path(path: KernelPath) -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            let path = path.or_best();
            if path == KernelPath::Avx512Vnni {
                return Simd::Avx512Vnni;
            }
            if path == KernelPath::Avx512Bw {
                return Simd::Avx512Bw;
            }
            if path == KernelPath::Avx2 && std::arch::is_x86_feature_detected!("fma") {
                return Simd::Avx2;
            }
        }
        let _ = path;
        Simd::None
    }
}

/// One task's rows of a product.
struct Task<'a, 'o> {
    a: I16Rows<'a>,
    b: &'a PackedPairs,
    row_scale: &'a [f32],
    accumulate: bool,
    out: &'a SharedOut<'o, f32>,
    rows: Range<usize>,
}

/// The scalar reference: the same chunks, the same conversions, the same fused multiply-adds.
fn scalar_gemm(task: &Task) {
    let (a, b) = (task.a, task.b);
    for r in task.rows.clone() {
        for c in 0..b.n {
            let mut acc = if task.accumulate { task.out.read(r, c) } else { 0.0 };
            for chunk in (0..b.k).step_by(K_CHUNK) {
                let sum: i32 = (chunk..(chunk + K_CHUNK).min(b.k))
                    .map(|kk| a.at(r, kk) as i32 * b.get(kk, c) as i32)
                    .sum();
                acc = task.row_scale[r].mul_add(sum as f32, acc);
            }
            task.out.write(r, c, acc);
        }
    }
}

/// Pairs of a K-block: the packed pairs of a block (`K_BLOCK · n_padded · 4` bytes, 512 KiB at
/// n = 256) are reused by every row tile of the task while they are in cache.
#[cfg(target_arch = "x86_64")]
const K_BLOCK: usize = 2 * K_CHUNK;

/// Where a tile runs: rows from `r` (their pairs of `block` packed as `[pair][6]`), columns from
/// `c0`; `first` if it overwrites the output rather than adding to it.
#[cfg(target_arch = "x86_64")]
struct At<'a> {
    packed: &'a [i32],
    r: usize,
    c0: usize,
    block: Range<usize>,
    first: bool,
}

/// The loops the SIMD kernels share: the task's rows by K-blocks, six rows at a time. A row
/// tile's i16 pairs of the block are first copied into one stream (`[pair][row]`, 24 bytes a
/// pair, whatever `a`'s layout), then `tile(at, rows)` runs them against the columns from
/// `at.c0` on and returns how many columns it covered.
#[cfg(target_arch = "x86_64")]
fn drive(task: &Task, mut tile: impl FnMut(At, usize) -> usize) {
    let pairs = task.b.pairs();
    let (row_stride, pair_stride) = task.a.strides();
    let mut packed = vec![0i32; K_BLOCK.min(pairs) * ROWS];
    let base = task.a.data.as_ptr();
    for p0 in (0..pairs).step_by(K_BLOCK) {
        let block = p0..(p0 + K_BLOCK).min(pairs);
        let first = p0 == 0 && !task.accumulate;
        let mut r = task.rows.start;
        while r < task.rows.end {
            let rows = (task.rows.end - r).min(ROWS);
            // Each pair of i16 is read as one i32 (little-endian: the even k in the low half,
            // as `vpmaddwd` pairs them).
            let last = (r + rows - 1) * row_stride + (block.end - 1) * pair_stride + 1;
            assert!(last < task.a.data.len());
            let dst = &mut packed[..block.len() * ROWS];
            match task.a.layout {
                // A pair's rows are side by side: one copy of `rows` i32 per pair.
                ALayout::PairInterleaved { .. } => {
                    for (p, d) in block.clone().zip(dst.chunks_exact_mut(ROWS)) {
                        // SAFETY: the rows' pairs end at or below `last`, inside the data; `d`
                        // has room for six.
                        unsafe {
                            let src = base.add(r * row_stride + p * pair_stride);
                            if rows == ROWS {
                                // A whole tile: a fixed-size copy (two moves), not a call.
                                let pair: [i32; ROWS] = src.cast::<[i32; ROWS]>().read_unaligned();
                                d.copy_from_slice(&pair);
                            } else {
                                std::ptr::copy_nonoverlapping(
                                    src.cast::<u8>(),
                                    d.as_mut_ptr().cast::<u8>(),
                                    4 * rows,
                                );
                            }
                        }
                    }
                }
                // A row's pairs are side by side: one strided pass per row.
                ALayout::RowMajor { .. } => {
                    for i in 0..rows {
                        let src =
                            base.wrapping_add((r + i) * row_stride + block.start * pair_stride).cast::<i32>();
                        for (j, d) in dst.iter_mut().skip(i).step_by(ROWS).enumerate() {
                            // SAFETY: pair `block.start + j` of row `r + i` is at or below `last`.
                            *d = unsafe { src.add(j).read_unaligned() };
                        }
                    }
                }
            }
            let mut c0 = 0;
            while c0 < task.b.n {
                c0 += tile(At { packed: &packed, r, c0, block: block.clone(), first }, rows);
            }
            r += rows;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{drive, At, Task, K_CHUNK, PANEL_COLS, ROWS};

    /// 16 columns per tile; see [`drive`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA, and the task's shapes must have been checked by
    /// `gemm_i16_i8_with` (with K > 0).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm(task: &Task) {
        drive(task, |at, rows| {
            // SAFETY: AVX2 and FMA are present (this function's contract).
            unsafe {
                match rows {
                    6 => tile::<6>(task, at),
                    5 => tile::<5>(task, at),
                    4 => tile::<4>(task, at),
                    3 => tile::<3>(task, at),
                    2 => tile::<2>(task, at),
                    _ => tile::<1>(task, at),
                }
            }
            PANEL_COLS
        });
    }

    /// Rows `r..r + R` (their pairs of `block` in `packed`, `[pair][6]`) × columns
    /// `c0..c0 + 16` (those below `n`): each chunk of 128 pairs is summed in i32 and added as
    /// `row_scale · sum` to the f32 partials, which start from the output (or from zero, if
    /// `first`).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(task: &Task, at: At) {
        let At { packed, r, c0, block, first } = at;
        let b = task.b;
        let pairs = b.pairs();
        assert!(
            r + R <= task.rows.end && c0 < b.n && block.end <= pairs && packed.len() >= block.len() * ROWS
        );
        let panel = b.data[b.index(0, c0)..][..pairs * PANEL_COLS * 2].as_ptr();
        let live = (b.n - c0).min(PANEL_COLS);
        let scales: [__m256; R] = std::array::from_fn(|i| _mm256_set1_ps(task.row_scale[r + i]));
        let mut part = [[0f32; PANEL_COLS]; R];
        if !first {
            for (i, p) in part.iter_mut().enumerate() {
                task.out.read_run(r + i, c0, &mut p[..live]);
            }
        }
        // Chunk boundaries fall at multiples of 128 pairs from k = 0 (the block starts on one).
        for q0 in block.clone().step_by(K_CHUNK / 2) {
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for p in q0..(q0 + K_CHUNK / 2).min(block.end) {
                // SAFETY: pair `p < pairs` of the panel is 32 values inside the panel's slice
                // above, and `packed` holds the block's pairs (asserted).
                unsafe {
                    let bp = panel.add(p * PANEL_COLS * 2);
                    let b0 = _mm256_loadu_si256(bp.cast());
                    let b1 = _mm256_loadu_si256(bp.add(16).cast());
                    let ap = packed.as_ptr().add((p - block.start) * ROWS);
                    for (i, acc_r) in acc.iter_mut().enumerate() {
                        let av = _mm256_set1_epi32(*ap.add(i));
                        acc_r[0] = _mm256_add_epi32(acc_r[0], _mm256_madd_epi16(av, b0));
                        acc_r[1] = _mm256_add_epi32(acc_r[1], _mm256_madd_epi16(av, b1));
                    }
                }
            }
            for ((p, acc_r), &scale) in part.iter_mut().zip(&acc).zip(&scales) {
                for (h, &sums) in acc_r.iter().enumerate() {
                    // SAFETY: `p` holds 16 floats and `8h + 8 ≤ 16`.
                    unsafe {
                        let o = p.as_mut_ptr().add(8 * h);
                        _mm256_storeu_ps(
                            o,
                            _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), _mm256_loadu_ps(o)),
                        );
                    }
                }
            }
        }
        for (i, p) in part.iter().enumerate() {
            task.out.write_slice(r + i, c0, &p[..live]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{drive, At, Task, K_CHUNK, PANEL_COLS};

    /// Two 16-column panels per tile (one 64-byte vector of pairs each) where two are left;
    /// see [`drive`].
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and BW (and VNNI if `VNNI`), and the task's shapes must
    /// have been checked by `gemm_i16_i8_with` (with K > 0).
    pub(super) unsafe fn gemm<const VNNI: bool>(task: &Task) {
        drive(task, |at, rows| {
            let two = at.c0 + PANEL_COLS < task.b.n;
            macro_rules! run {
                ($($r:literal),*) => {
                    match (rows, two) {
                        $(
                            ($r, true) => tile::<$r, 2, VNNI>(task, at),
                            ($r, false) => tile::<$r, 1, VNNI>(task, at),
                        )*
                        _ => unreachable!("a row tile has 1 to 6 rows"),
                    }
                };
            }
            // SAFETY: the CPU features are present (this function's contract).
            unsafe { run!(1, 2, 3, 4, 5, 6) };
            if two {
                2 * PANEL_COLS
            } else {
                PANEL_COLS
            }
        });
    }

    /// The tile on the CPU features `VNNI` asks for.
    ///
    /// # Safety
    /// As [`gemm`].
    unsafe fn tile<const R: usize, const P: usize, const VNNI: bool>(task: &Task, at: At) {
        // SAFETY: as this function's contract.
        unsafe {
            if VNNI {
                tile_vnni::<R, P>(task, at)
            } else {
                tile_bw::<R, P>(task, at)
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_vnni<const R: usize, const P: usize>(task: &Task, at: At) {
        // SAFETY: the features are enabled here.
        unsafe { tile_body::<R, P, true>(task, at) }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn tile_bw<const R: usize, const P: usize>(task: &Task, at: At) {
        // SAFETY: the features are enabled here.
        unsafe { tile_body::<R, P, false>(task, at) }
    }

    /// Rows `r..r + R` × the `P` panels from `c0` (columns below `n`), as the AVX2 tile does
    /// with 16 columns: the same chunks, conversions and fused multiply-adds, so the same bits.
    #[inline(always)]
    unsafe fn tile_body<const R: usize, const P: usize, const VNNI: bool>(task: &Task, at: At) {
        let At { packed, r, c0, block, first } = at;
        let b = task.b;
        let pairs = b.pairs();
        assert!(r + R <= task.rows.end && c0 + (P - 1) * PANEL_COLS < b.n && block.end <= pairs);
        assert!(packed.len() >= block.len() * super::ROWS);
        let panels: [*const i16; P] = std::array::from_fn(|j| {
            b.data[b.index(0, c0 + j * PANEL_COLS)..][..pairs * PANEL_COLS * 2].as_ptr()
        });
        let live: [usize; P] = std::array::from_fn(|j| (b.n - (c0 + j * PANEL_COLS)).min(PANEL_COLS));
        let scales: [__m512; R] = std::array::from_fn(|i| _mm512_set1_ps(task.row_scale[r + i]));
        let mut part = [[[0f32; PANEL_COLS]; P]; R];
        if !first {
            for (i, pr) in part.iter_mut().enumerate() {
                for (j, pj) in pr.iter_mut().enumerate() {
                    task.out.read_run(r + i, c0 + j * PANEL_COLS, &mut pj[..live[j]]);
                }
            }
        }
        for q0 in block.clone().step_by(K_CHUNK / 2) {
            let mut acc = [[_mm512_setzero_si512(); P]; R];
            for p in q0..(q0 + K_CHUNK / 2).min(block.end) {
                // SAFETY: pair `p < pairs` of each panel is 32 values inside its slice above,
                // and `packed` holds the block's pairs (asserted).
                unsafe {
                    let bv: [__m512i; P] =
                        std::array::from_fn(|j| _mm512_loadu_si512(panels[j].add(p * 32).cast()));
                    let ap = packed.as_ptr().add((p - block.start) * super::ROWS);
                    for (i, acc_r) in acc.iter_mut().enumerate() {
                        let av = _mm512_set1_epi32(*ap.add(i));
                        for (a, &bj) in acc_r.iter_mut().zip(&bv) {
                            *a = if VNNI {
                                _mm512_dpwssd_epi32(*a, av, bj)
                            } else {
                                _mm512_add_epi32(*a, _mm512_madd_epi16(av, bj))
                            };
                        }
                    }
                }
            }
            for ((pr, acc_r), &scale) in part.iter_mut().zip(&acc).zip(&scales) {
                for (pj, &sums) in pr.iter_mut().zip(acc_r) {
                    // SAFETY: `pj` holds 16 floats, one 64-byte vector.
                    unsafe {
                        let o = pj.as_mut_ptr();
                        _mm512_storeu_ps(
                            o,
                            _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums), _mm512_loadu_ps(o)),
                        );
                    }
                }
            }
        }
        for (i, pr) in part.iter().enumerate() {
            for (j, pj) in pr.iter().enumerate() {
                task.out.write_slice(r + i, c0 + j * PANEL_COLS, &pj[..live[j]]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_interleaves_row_pairs_and_pads() {
        let b: Vec<i8> = (0..3 * 5).map(|i| i as i8 - 7).collect();
        let p = PackedPairs::from_i8(&b, 3, 5).unwrap();
        assert_eq!((p.k(), p.n(), p.pairs()), (3, 5, 2));
        for r in 0..3 {
            for c in 0..5 {
                assert_eq!(p.get(r, c), b[r * 5 + c] as i16);
            }
        }
        // The odd row's partner and the padded columns are zero.
        assert!((0..16).all(|c| p.data[p.index(1, c) + 1] == 0));
        assert!((5..16).all(|c| p.data[p.index(0, c)] == 0 && p.data[p.index(1, c)] == 0));
        // A panel is one stream: pair after pair, 16 columns each.
        assert_eq!(p.index(1, 0) - p.index(0, 0), 32);
        assert!(PackedPairs::from_i8(&b, 4, 5).is_err());
    }
}
