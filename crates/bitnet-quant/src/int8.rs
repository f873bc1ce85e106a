//! `Int8Matrix`: a dense matrix of small integers with one f32 scale per row, for an lm_head
//! that the user chooses to run in int8 (or 6 bits) instead of float.
//!
//! `W[r, c] ≈ q[r, c] · scale[r]` with `q ∈ [-127, 127]` (symmetric; -128 is refused because
//! the AVX2 kernel negates weights), stored in 8 bits, or `q ∈ [-31, 31]` stored in 6
//! ([`crate::int6`]). The product with int8 activations is `acc = Σ_c x[c] · q[r, c]` in i32,
//! and the float output is `(acc / s_a) · scale[r]`.

use crate::aligned::AlignedBytes;
use crate::int6::{self, PackedInt6};
use crate::kernels::{self, for_ranges, I32Sink, KernelPath, MapSink, SharedOut, Sink};
use crate::layout::{padded_cols, ROW_TILE};
use crate::quantize::{quantize_symmetric, Granularity};
use crate::{QuantError, QuantizedActivations};

/// Int8 weights, each row zero-padded to the activations' padded width (a multiple of 256) and
/// the row count padded to a multiple of 8. Each group of eight rows is stored
/// chunk-interleaved: columns 0..64 of rows 0–7, then columns 64..128 of rows 0–7, and so on,
/// so the GEMV, which runs eight rows at a time, reads one sequential stream (eight separate
/// row streams kept the hardware prefetcher behind: see KERNELS.md).
#[derive(Clone, Debug)]
pub(crate) struct PackedInt8 {
    rows: usize,
    cols: usize,
    stride: usize,
    data: AlignedBytes,
}

/// Columns of one row stored together.
pub(crate) const CHUNK: usize = 64;

impl PackedInt8 {
    /// All-zero storage for `[rows, cols]`, filled by [`PackedInt8::pack_rows`].
    fn zeroed(rows: usize, cols: usize) -> Self {
        let stride = padded_cols(cols);
        let data = AlignedBytes::zeroed(rows.div_ceil(ROW_TILE) * ROW_TILE * stride);
        Self { rows, cols, stride, data }
    }

    fn pack(q: &[i8], rows: usize, cols: usize) -> Self {
        let mut p = Self::zeroed(rows, cols);
        let stride = p.stride;
        Self::pack_rows(q, cols, stride, p.data.as_i8_mut());
        p
    }

    /// Bytes of one group of [`ROW_TILE`] rows.
    fn group_bytes(&self) -> usize {
        ROW_TILE * self.stride
    }

    /// Writes the row-major rows `q` (of `cols`) into `groups`, the storage of the groups that
    /// hold them, starting at the first row of a group.
    fn pack_rows(q: &[i8], cols: usize, stride: usize, groups: &mut [i8]) {
        for (r, row) in q.chunks_exact(cols.max(1)).enumerate() {
            let group = r / ROW_TILE * ROW_TILE * stride;
            for (c, part) in row.chunks(CHUNK).enumerate() {
                let at = group + Self::group_offset(r % ROW_TILE, c * CHUNK);
                groups[at..at + part.len()].copy_from_slice(part);
            }
        }
    }

    /// Where column `c` of a group's row `ri` sits inside the group; the values up to the
    /// next multiple of 64 columns follow it.
    #[inline(always)]
    pub(crate) fn group_offset(ri: usize, c: usize) -> usize {
        (c / CHUNK * ROW_TILE + ri) * CHUNK + c % CHUNK
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }
    /// Padded columns per row (`padded_cols(cols)`).
    pub(crate) fn stride(&self) -> usize {
        self.stride
    }
    /// Rows `8g..8g+8` (padding rows included), chunk-interleaved: `8 · stride` values.
    pub(crate) fn group(&self, g: usize) -> &[i8] {
        let len = ROW_TILE * self.stride;
        &self.data.as_i8()[g * len..(g + 1) * len]
    }
    /// Row `r`'s group and its place in it: `(group, r % 8)`.
    pub(crate) fn row_in_group(&self, r: usize) -> (&[i8], usize) {
        (self.group(r / ROW_TILE), r % ROW_TILE)
    }
    /// Row `r` with its zero padding, `stride` values.
    pub(crate) fn row_to(&self, r: usize, out: &mut Vec<i8>) {
        let (group, ri) = self.row_in_group(r);
        for c in (0..self.stride).step_by(CHUNK) {
            let at = Self::group_offset(ri, c);
            out.extend_from_slice(&group[at..at + CHUNK]);
        }
    }
    fn groups(&self) -> usize {
        self.rows.div_ceil(ROW_TILE)
    }
}

/// A dense integer matrix `[rows, cols]` with a per-row f32 scale (a multiplier), stored in
/// 8 or 6 bits per weight.
#[derive(Clone, Debug)]
pub struct Int8Matrix {
    packed: Storage,
    scales: Vec<f32>,
}

#[derive(Clone, Debug)]
enum Storage {
    Int8(PackedInt8),
    Int6(PackedInt6),
}

impl Int8Matrix {
    /// Quantizes float weights per row: `scale[r] = max|W[r]| / 127`,
    /// `q = round_half_even(W / scale[r])` ([`crate::quantize::quantize_symmetric`], 8 bits).
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Result<Self, QuantError> {
        if rows.checked_mul(cols) != Some(w.len()) {
            return Err(QuantError::Shape(format!(
                "{} weights cannot form a [{rows}, {cols}] matrix",
                w.len()
            )));
        }
        let q = quantize_symmetric(w, 8, Granularity::PerRow { cols })?;
        Self::from_int8(&q.values, &q.scales, rows, cols)
    }

    /// Builds the matrix from row-major int8 weights in [-127, 127] and one scale per row.
    pub fn from_int8(q: &[i8], scales: &[f32], rows: usize, cols: usize) -> Result<Self, QuantError> {
        Self::check_codes(q, scales, rows, cols, 127)?;
        Ok(Self { packed: Storage::Int8(PackedInt8::pack(q, rows, cols)), scales: scales.to_vec() })
    }

    /// Builds the matrix from row-major weights in [-31, 31], stored in 6 bits each, and one
    /// scale per row.
    pub fn from_int6(q: &[i8], scales: &[f32], rows: usize, cols: usize) -> Result<Self, QuantError> {
        Self::check_codes(q, scales, rows, cols, int6::MAX_ABS)?;
        Ok(Self { packed: Storage::Int6(PackedInt6::pack(q, rows, cols)), scales: scales.to_vec() })
    }

    /// Builds a `[rows, cols]` matrix of `bits` per weight (8, or 6 for weights in [-31, 31])
    /// a block of rows at a time, so that no whole-matrix intermediate exists besides the
    /// packed result: `fill(first, codes, scales)` writes the row-major codes and the scales of
    /// rows `first..first + scales.len()` (`codes` holds `scales.len() · cols` values). Blocks
    /// run in parallel on rayon's pool; codes out of range are an error, as in
    /// [`Int8Matrix::from_int8`].
    pub fn from_row_blocks(
        bits: u32,
        rows: usize,
        cols: usize,
        fill: impl Fn(usize, &mut [i8], &mut [f32]) + Sync,
    ) -> Result<Self, QuantError> {
        use rayon::prelude::*;
        // Rows per block: a multiple of the row tile, so each block packs whole groups.
        const BLOCK: usize = 128 * ROW_TILE;
        let max_abs = match bits {
            8 => 127,
            6 => int6::MAX_ABS,
            _ => return Err(QuantError::Shape(format!("{bits}-bit weights: the head stores 8 or 6 bits"))),
        };
        if rows.checked_mul(cols).is_none() {
            return Err(QuantError::Shape(format!("a [{rows}, {cols}] matrix overflows the address space")));
        }
        let mut scales = vec![0f32; rows];
        let fill_block = |b: usize, sb: &mut [f32], pack: &mut dyn FnMut(&[i8])| {
            let mut q = vec![0i8; sb.len() * cols];
            fill(b * BLOCK, &mut q, sb);
            let checked = Self::check_codes(&q, sb, sb.len(), cols, max_abs);
            let located = checked.map_err(|e| match e {
                QuantError::Shape(m) => QuantError::Shape(format!("rows from {}: {m}", b * BLOCK)),
            });
            located.map(|()| pack(&q))
        };
        let packed = match bits {
            8 => {
                let mut p = PackedInt8::zeroed(rows, cols);
                let (stride, group) = (p.stride, p.group_bytes());
                p.data
                    .as_i8_mut()
                    .par_chunks_mut(BLOCK / ROW_TILE * group)
                    .zip(scales.par_chunks_mut(BLOCK))
                    .enumerate()
                    .try_for_each(|(b, (dst, sb))| {
                        fill_block(b, sb, &mut |q| PackedInt8::pack_rows(q, cols, stride, dst))
                    })?;
                Storage::Int8(p)
            }
            _ => {
                let mut p = PackedInt6::zeroed(rows, cols);
                let layout = p.layout();
                p.groups_mut()
                    .par_chunks_mut(BLOCK / ROW_TILE * layout.group_bytes())
                    .zip(scales.par_chunks_mut(BLOCK))
                    .enumerate()
                    .try_for_each(|(b, (dst, sb))| fill_block(b, sb, &mut |q| layout.pack_rows(q, dst)))?;
                Storage::Int6(p)
            }
        };
        Ok(Self { packed, scales })
    }

    fn check_codes(
        q: &[i8],
        scales: &[f32],
        rows: usize,
        cols: usize,
        max_abs: i8,
    ) -> Result<(), QuantError> {
        if rows.checked_mul(cols) != Some(q.len()) || scales.len() != rows {
            return Err(QuantError::Shape(format!(
                "{} integer weights and {} row scales cannot form a [{rows}, {cols}] matrix",
                q.len(),
                scales.len()
            )));
        }
        if let Some(i) = q.iter().position(|&v| v < -max_abs || v > max_abs) {
            return Err(QuantError::Shape(format!(
                "weight {} at row {}, column {}: this storage takes symmetric weights in [-{max_abs}, {max_abs}]",
                q[i],
                i / cols,
                i % cols
            )));
        }
        Ok(())
    }

    pub fn rows(&self) -> usize {
        match &self.packed {
            Storage::Int8(p) => p.rows,
            Storage::Int6(p) => p.rows(),
        }
    }
    pub fn cols(&self) -> usize {
        match &self.packed {
            Storage::Int8(p) => p.cols,
            Storage::Int6(p) => p.cols(),
        }
    }
    /// Bits per stored weight: 8, or 6.
    pub fn bits(&self) -> u32 {
        match &self.packed {
            Storage::Int8(_) => 8,
            Storage::Int6(_) => 6,
        }
    }
    /// The per-row multipliers: `W[r, c] ≈ q[r, c] · scales()[r]`.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// Bytes the weights take in memory (padding included, scales excluded).
    pub fn bytes(&self) -> usize {
        match &self.packed {
            Storage::Int8(p) => p.data.as_bytes().len(),
            Storage::Int6(p) => p.bytes(),
        }
    }

    /// The row-major weights, one `i8` each whatever the storage.
    pub fn to_int8(&self) -> Vec<i8> {
        let (rows, cols) = (self.rows(), self.cols());
        let mut q = Vec::with_capacity(rows * cols);
        match &self.packed {
            Storage::Int8(p) => {
                let mut row = Vec::with_capacity(p.stride());
                for r in 0..rows {
                    row.clear();
                    p.row_to(r, &mut row);
                    q.extend_from_slice(&row[..cols]);
                }
            }
            Storage::Int6(p) => {
                let mut u = vec![0u8; p.padded_cols()];
                for r in 0..rows {
                    p.decode_row(r, &mut u);
                    q.extend(u[..cols].iter().map(|&v| (v as i32 - int6::OFFSET) as i8));
                }
            }
        }
        q
    }

    /// Integer products `out[i * rows + r] = Σ_c x[i, c] · q[r, c]`.
    pub fn matmul_i32(&self, x: &QuantizedActivations, out: &mut [i32]) {
        self.matmul_i32_with(KernelPath::active(), x, out)
    }

    /// [`Int8Matrix::matmul_i32`] on a chosen path (the best one if this CPU cannot run it).
    pub fn matmul_i32_with(&self, path: KernelPath, x: &QuantizedActivations, out: &mut [i32]) {
        self.check(x, out.len());
        self.run(path, x, &I32Sink(SharedOut::new(out, self.rows())));
    }

    /// `out[i * rows + r] = (Σ_c x[i, c] · q[r, c]) / s_a[i] · scale[r]`.
    pub fn forward(&self, x: &QuantizedActivations, out: &mut [f32]) {
        self.forward_with(KernelPath::active(), x, out)
    }

    /// [`Int8Matrix::forward`] on a chosen path (the best one if this CPU cannot run it).
    pub fn forward_with(&self, path: KernelPath, x: &QuantizedActivations, out: &mut [f32]) {
        self.check(x, out.len());
        let (scales, s_a) = (&self.scales, x.scales());
        let sink = MapSink(SharedOut::new(out, self.rows()), move |acc: i32, t: usize, r: usize| {
            (acc as f32 / s_a[t]) * scales[r]
        });
        self.run(path, x, &sink);
    }

    fn check(&self, x: &QuantizedActivations, out_len: usize) {
        assert_eq!(x.k(), self.cols(), "activation width does not match the matrix");
        assert!(out_len >= x.m() * self.rows(), "output buffer too small");
    }

    fn run<S: Sink>(&self, path: KernelPath, x: &QuantizedActivations, sink: &S) {
        match &self.packed {
            Storage::Int8(w) => run_int8(path.or_best(), w, x, sink),
            Storage::Int6(w) => run_int6(path.or_best(), w, x, sink),
        }
    }
}

fn run_int8<S: Sink>(path: KernelPath, w: &PackedInt8, x: &QuantizedActivations, sink: &S) {
    let m = x.m();
    let macs = m * w.groups() * ROW_TILE * w.stride();
    if w.stride() == 0 {
        // K = 0: every dot product is empty.
        (0..m).for_each(|t| (0..w.rows()).for_each(|r| sink.put(t, r, 0)));
    } else if m == 1 {
        for_ranges(w.groups(), macs, kernels::PARALLEL_MIN_MACS_GEMV, |groups| {
            int8_gemv(path, w, x, groups, sink)
        });
    } else {
        // About 96 KiB of weights per cache block, as for the ternary GEMM.
        let block_rows = ((96 << 10) / w.stride().max(1)).clamp(ROW_TILE, 512) / ROW_TILE * ROW_TILE;
        for_ranges(w.groups(), macs, kernels::PARALLEL_MIN_MACS, |groups| {
            let end = (groups.end * ROW_TILE).min(w.rows());
            let mut r = groups.start * ROW_TILE;
            while r < end {
                let rows = r..(r + block_rows).min(end);
                int8_gemm(path, w, x, rows.clone(), 0..m, sink);
                r = rows.end;
            }
        });
    }
}

/// The 6-bit products: AVX2 on x86 (every AVX-512 CPU has it), NEON on aarch64 (the GEMV
/// once per token), the scalar reference elsewhere.
fn run_int6<S: Sink>(path: KernelPath, w: &PackedInt6, x: &QuantizedActivations, sink: &S) {
    let m = x.m();
    let macs = m * w.groups() * ROW_TILE * w.padded_cols();
    let min_macs = if m == 1 { kernels::PARALLEL_MIN_MACS_GEMV } else { kernels::PARALLEL_MIN_MACS };
    for_ranges(w.groups(), macs, min_macs, |groups| {
        let rows = groups.start * ROW_TILE..(groups.end * ROW_TILE).min(w.rows());
        match path {
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 | KernelPath::Avx512Bw | KernelPath::Avx512Vnni if m == 1 => {
                // SAFETY: the AVX-512 paths imply AVX2, and `or_best` passed only available paths.
                unsafe { kernels::avx2::int6_gemv(w, x, groups, sink) }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            KernelPath::Avx2 | KernelPath::Avx512Bw | KernelPath::Avx512Vnni => unsafe {
                kernels::avx2::int6_gemm(w, x, rows, 0..m, sink)
            },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above.
            KernelPath::NeonPlain if m == 1 => unsafe {
                kernels::neon::int6_gemv::<false, S>(w, x, 0, groups, sink)
            },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above.
            KernelPath::NeonDotprod if m == 1 => unsafe {
                kernels::neon::int6_gemv::<true, S>(w, x, 0, groups, sink)
            },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above.
            KernelPath::NeonPlain => unsafe { kernels::neon::int6_gemm::<false, S>(w, x, rows, 0..m, sink) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above.
            KernelPath::NeonDotprod => unsafe { kernels::neon::int6_gemm::<true, S>(w, x, rows, 0..m, sink) },
            _ => kernels::scalar::int6_gemm(w, x, rows, 0..m, sink),
        }
    });
}

fn int8_gemv<S: Sink>(
    path: KernelPath,
    w: &PackedInt8,
    x: &QuantizedActivations,
    groups: std::ops::Range<usize>,
    sink: &S,
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `run` passes only paths whose CPU features `is_available` confirmed.
        KernelPath::Avx2 => unsafe { kernels::avx2::int8_gemv(w, x, groups, sink) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        KernelPath::Avx512Bw => unsafe { kernels::avx512::int8_gemv::<false, S>(w, x, groups, sink) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        KernelPath::Avx512Vnni => unsafe { kernels::avx512::int8_gemv::<true, S>(w, x, groups, sink) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        KernelPath::NeonPlain => unsafe { kernels::neon::int8_gemv::<false, S>(w, x, groups, sink) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        KernelPath::NeonDotprod => unsafe { kernels::neon::int8_gemv::<true, S>(w, x, groups, sink) },
        _ => {
            let rows = groups.start * ROW_TILE..(groups.end * ROW_TILE).min(w.rows());
            kernels::scalar::int8_gemm(w, x, rows, 0..1, sink)
        }
    }
}

fn int8_gemm<S: Sink>(
    path: KernelPath,
    w: &PackedInt8,
    x: &QuantizedActivations,
    rows: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
    sink: &S,
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `run` passes only paths whose CPU features `is_available` confirmed.
        KernelPath::Avx2 => unsafe { kernels::avx2::int8_gemm(w, x, rows, tokens, sink) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        KernelPath::Avx512Bw => unsafe { kernels::avx512::int8_gemm::<false, S>(w, x, rows, tokens, sink) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        KernelPath::Avx512Vnni => unsafe { kernels::avx512::int8_gemm::<true, S>(w, x, rows, tokens, sink) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        KernelPath::NeonPlain => unsafe { kernels::neon::int8_gemm::<false, S>(w, x, rows, tokens, sink) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        KernelPath::NeonDotprod => unsafe { kernels::neon::int8_gemm::<true, S>(w, x, rows, tokens, sink) },
        _ => kernels::scalar::int8_gemm(w, x, rows, tokens, sink),
    }
}

/// The scalar reference: `out[r] = Σ_c q[r, c] · x[c]` over row-major int8 weights.
pub fn reference_gemv_i32(q: &[i8], rows: usize, cols: usize, x: &[i8], out: &mut [i32]) {
    crate::ternary::reference_gemv_i32(q, rows, cols, x, out)
}
