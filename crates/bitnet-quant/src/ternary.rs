//! `TernaryMatrix`: a ternary weight matrix with its scale, and the ternary × int8 product.
//!
//! The integer form is the contract (bitnet-reference.md §2.3):
//! `acc = Σ q_i8 · t`, then `y = acc / s_a · mean|W|` (multiplier form) or
//! `y = acc / (s_a · weight_scale)` (BitLinear divisor form).

use rayon::prelude::*;
use std::ops::Range;

use crate::aligned::AlignedBytes;
use crate::group::{self, GroupScales, SUM_COLS};
use crate::kernels::{self, for_ranges, I32Sink, KernelPath, MapSink, SharedOut, Sink};
use crate::layout::{padded_cols, PackedTernary, ROW_TILE};
use crate::{quantize_activation_row, QuantError};

/// How the stored per-matrix scale turns an integer dot product back into a float.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WeightScale {
    /// `y = (acc / s_a) * m` with `m = mean|W|` (AutoBitLinear, 2B-4T, online masters).
    Multiply(f32),
    /// `y = acc / (s_a * d)` with `d = 1 / mean|W|` (transformers' BitLinear, HF1BitLLM).
    Divide(f32),
}

impl WeightScale {
    /// Applies the scale to one integer dot product of a token with activation scale `s_a`.
    #[inline]
    pub fn apply(self, acc: i32, s_a: f32) -> f32 {
        match self {
            WeightScale::Multiply(m) => (acc as f32 / s_a) * m,
            WeightScale::Divide(d) => acc as f32 / (s_a * d),
        }
    }

    /// Applies the scale to a float combination of integer dot products (the block-scaled
    /// path, [`TernaryMatrix::from_ternary_block_scaled`]).
    #[inline]
    pub fn apply_f32(self, acc: f32, s_a: f32) -> f32 {
        match self {
            WeightScale::Multiply(m) => (acc / s_a) * m,
            WeightScale::Divide(d) => acc / (s_a * d),
        }
    }

    /// The multiplier equivalent, `mean|W|`, whichever form is stored.
    pub fn multiplier(self) -> f32 {
        match self {
            WeightScale::Multiply(m) => m,
            WeightScale::Divide(d) => 1.0 / d,
        }
    }
}

/// Int8 activations of `m` tokens of width `k`, with one scale per token.
///
/// Allocated once for the largest batch; quantizing never allocates. Each token's row is
/// zero-padded to a whole number of 256-column kernel blocks and starts on a 64-byte boundary,
/// and carries the sum of its int8 values, which the kernels need to turn the unsigned 2-bit
/// weight codes back into {-1, 0, 1}.
#[derive(Clone, Debug)]
pub struct QuantizedActivations {
    k: usize,
    stride: usize,
    m: usize,
    max_m: usize,
    q: AlignedBytes,
    scales: Vec<f32>,
    sums: Vec<i32>,
    /// Per token, the sum of each run of 32 padded columns (the group-scaled product's shift).
    sums32: Vec<i32>,
}

impl QuantizedActivations {
    /// Room for up to `max_m` tokens of width `k`.
    pub fn new(max_m: usize, k: usize) -> Self {
        let stride = padded_cols(k);
        Self {
            k,
            stride,
            m: 0,
            max_m,
            q: AlignedBytes::zeroed(max_m * stride),
            scales: vec![0.0; max_m],
            sums: vec![0; max_m],
            sums32: vec![0; max_m * (stride / SUM_COLS)],
        }
    }

    /// Recomputes the per-32-column sums of tokens `0..m` from their int8 rows (in parallel
    /// for the large batches training loads).
    fn update_sums32(&mut self, m: usize) {
        let (stride, per) = (self.stride, self.stride / SUM_COLS);
        if per == 0 {
            return;
        }
        let q = &self.q.as_i8()[..m * stride];
        let sums = &mut self.sums32[..m * per];
        let token = |(sums, row): (&mut [i32], &[i8])| {
            for (s, run) in sums.iter_mut().zip(row.chunks_exact(SUM_COLS)) {
                *s = run.iter().map(|&v| i32::from(v)).sum();
            }
        };
        if m * stride >= 1 << 20 {
            sums.par_chunks_mut(per).zip(q.par_chunks(stride)).with_min_len(64).for_each(token);
        } else {
            sums.chunks_mut(per).zip(q.chunks(stride)).for_each(token);
        }
    }

    /// Quantizes `x` (`m` rows of `k` floats) per token. Panics if `m` exceeds the capacity,
    /// which is a programming error, not bad input.
    pub fn quantize(&mut self, x: &[f32], m: usize) {
        assert!(m <= self.max_m && x.len() == m * self.k, "activation buffer too small");
        self.m = m;
        let (k, stride) = (self.k, self.stride);
        let q = self.q.as_i8_mut();
        for (i, row) in x.chunks_exact(k.max(1)).take(m).enumerate() {
            // The padding past `k` is zero from `new` and is never written.
            let qi = &mut q[i * stride..i * stride + k];
            self.scales[i] = quantize_activation_row(row, qi);
            self.sums[i] = qi.iter().map(|&v| v as i32).sum();
        }
        if k == 0 {
            self.scales[..m].fill(127.0 / crate::quantize::QUANT_EPS);
            self.sums[..m].fill(0);
        }
        self.update_sums32(m);
    }

    /// Quantizes `m` tokens that `fill(i, row)` writes one at a time into `row` (`k` floats of
    /// caller-owned scratch): the producer of the floats (a norm, a gate) and the quantizer
    /// share one cache-resident row, and the `m × k` floats are never stored. Equal to
    /// [`Self::quantize`] of the same rows.
    pub fn quantize_each(&mut self, m: usize, row: &mut [f32], mut fill: impl FnMut(usize, &mut [f32])) {
        assert!(m <= self.max_m && row.len() == self.k, "activation buffer too small");
        self.m = m;
        let (k, stride) = (self.k, self.stride);
        let q = self.q.as_i8_mut();
        for i in 0..m {
            fill(i, row);
            let qi = &mut q[i * stride..i * stride + k];
            self.scales[i] =
                if k == 0 { 127.0 / crate::quantize::QUANT_EPS } else { quantize_activation_row(row, qi) };
            self.sums[i] = qi.iter().map(|&v| v as i32).sum();
        }
        self.update_sums32(m);
    }

    /// Loads already-quantized tokens: `q` holds `m` rows of `k` int8 values, `scales` their
    /// `s_a`. For callers with their own activation quantizer, and for tests.
    pub fn set_int8(&mut self, q: &[i8], scales: &[f32], m: usize) -> Result<(), QuantError> {
        if m > self.max_m || q.len() != m * self.k || scales.len() != m {
            return Err(QuantError::Shape(format!(
                "{} int8 values and {} scales are not {m} tokens of width {} (capacity {})",
                q.len(),
                scales.len(),
                self.k,
                self.max_m
            )));
        }
        self.m = m;
        let (k, stride) = (self.k, self.stride);
        if k == 0 {
            self.sums[..m].fill(0);
        } else {
            // Row by row in parallel: a training step loads a few MB per projection here.
            let rows = self.q.as_i8_mut()[..m * stride].par_chunks_mut(stride).zip(q.par_chunks(k));
            rows.zip(self.sums[..m].par_iter_mut()).with_min_len(64).for_each(|((dst, src), sum)| {
                dst[..k].copy_from_slice(src);
                *sum = src.iter().map(|&v| v as i32).sum();
            });
        }
        self.scales[..m].copy_from_slice(scales);
        self.update_sums32(m);
        Ok(())
    }

    pub fn m(&self) -> usize {
        self.m
    }
    pub fn k(&self) -> usize {
        self.k
    }
    /// The most tokens this buffer holds.
    pub fn capacity(&self) -> usize {
        self.max_m
    }
    /// The int8 values of token `i`.
    pub fn row(&self, i: usize) -> &[i8] {
        &self.q.as_i8()[i * self.stride..i * self.stride + self.k]
    }
    /// Token `i` with its zero padding: `padded_cols(k)` values, 64-byte aligned.
    pub fn padded_row(&self, i: usize) -> &[i8] {
        &self.q.as_i8()[i * self.stride..(i + 1) * self.stride]
    }
    /// The scale `s_a` of token `i`.
    pub fn scale(&self, i: usize) -> f32 {
        self.scales[i]
    }
    /// The scales of the `m` current tokens.
    pub fn scales(&self) -> &[f32] {
        &self.scales[..self.m]
    }
    /// `Σ_c q[i, c]`, the sum of token `i`'s int8 values.
    pub fn sum(&self, i: usize) -> i32 {
        self.sums[i]
    }
    /// The sums of token `i`'s int8 values over each run of 32 padded columns.
    pub fn sums32(&self, i: usize) -> &[i32] {
        let per = self.stride / SUM_COLS;
        &self.sums32[i * per..(i + 1) * per]
    }
}

/// Ternary weights in no kernel's layout: row-major codes in {-1, 0, 1}, the matrix's scale and,
/// for weights quantized group by group, one multiplier per (row, group of `group` columns).
///
/// The product it defines is [`TernaryMatrix::forward`]'s: per token with activation scale
/// `s_a`, `y[r] = scale(Σ_c t[r, c] · q[c], s_a)`, or with group scales
/// `y[r] = scale(Σ_g d[r, g] · P[r, g], s_a)` summed in group order ([`crate::group`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TernaryCodes {
    pub rows: usize,
    pub cols: usize,
    /// `rows × cols` codes, row-major.
    pub codes: Vec<i8>,
    pub scale: WeightScale,
    /// The groups' multipliers, if they carry their own.
    pub group_scales: Option<GroupScaleRows>,
}

/// One multiplier per (row, group of `group` columns), row-major: `scales[r · groups + g]` with
/// `groups = cols.div_ceil(group)`; `group` is 32, 64, 128 or 256.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupScaleRows {
    pub group: usize,
    pub scales: Vec<f32>,
}

/// A ternary weight matrix `[rows = out_features, cols = in_features]` and its scale, packed
/// at construction into the kernels' layout ([`crate::layout`]).
///
/// Optionally it also carries one f32 multiplier per (row, group of G columns), for weights
/// whose groups were quantized with their own scales (llama.cpp's TQ1_0/TQ2_0, Q1_0, Q2_0,
/// PrismML's PQ2_0/PTQ1_0): see [`TernaryMatrix::from_ternary_group_scaled`] and
/// [`crate::group`].
#[derive(Clone, Debug)]
pub struct TernaryMatrix {
    packed: PackedTernary,
    scale: WeightScale,
    group_scales: Option<GroupScales>,
}

impl TernaryMatrix {
    /// Builds the matrix from row-major ternary codes.
    pub fn from_ternary(
        codes: &[i8],
        rows: usize,
        cols: usize,
        scale: WeightScale,
    ) -> Result<Self, QuantError> {
        if rows.checked_mul(cols) != Some(codes.len()) {
            return Err(QuantError::Shape(format!(
                "{} ternary codes cannot form a [{rows}, {cols}] matrix",
                codes.len()
            )));
        }
        if let Some(bad) = codes.iter().find(|&&c| !(-1..=1).contains(&c)) {
            return Err(QuantError::Shape(format!("ternary code {bad} is not in {{-1, 0, 1}}")));
        }
        Ok(Self { packed: PackedTernary::pack(codes, rows, cols), scale, group_scales: None })
    }

    /// Builds the matrix a block of rows at a time, so that the row-major codes never exist
    /// whole: `fill(first, codes)` writes the codes of rows `first..first + codes.len() / cols`
    /// (a few hundred KB at a time, decoded from a checkpoint's packed bytes, say) or fails.
    /// Blocks run in parallel on rayon's pool; a code outside {-1, 0, 1} is an error naming its
    /// row and column.
    pub fn from_row_blocks<E: From<QuantError> + Send>(
        rows: usize,
        cols: usize,
        scale: WeightScale,
        fill: impl Fn(usize, &mut [i8]) -> Result<(), E> + Sync,
    ) -> Result<Self, E> {
        if rows.checked_mul(cols).is_none() {
            let e = QuantError::Shape(format!("a [{rows}, {cols}] matrix overflows the address space"));
            return Err(e.into());
        }
        // Whole row tiles, about 256 KiB of codes per block.
        let block_rows = ((256 << 10) / cols.max(1)).max(1).next_multiple_of(ROW_TILE);
        let mut packed = PackedTernary::padding(rows, cols);
        let (blocks, tile_bytes) = (packed.blocks(), packed.tile_bytes());
        packed
            .tiles_mut()
            .par_chunks_mut(block_rows / ROW_TILE * tile_bytes.max(1))
            .enumerate()
            .try_for_each(|(i, tiles)| -> Result<(), E> {
                let first = i * block_rows;
                let mut codes = vec![0i8; block_rows.min(rows - first) * cols];
                fill(first, &mut codes)?;
                if let Some(at) = codes.iter().position(|&c| !(-1..=1).contains(&c)) {
                    return Err(QuantError::Shape(format!(
                        "ternary code {} at row {}, column {} is not in {{-1, 0, 1}}",
                        codes[at],
                        first + at / cols,
                        at % cols
                    ))
                    .into());
                }
                PackedTernary::pack_rows(&codes, cols, blocks, tiles);
                Ok(())
            })?;
        Ok(Self { packed, scale, group_scales: None })
    }

    /// The same matrix with another scale.
    pub fn with_scale(self, scale: WeightScale) -> Self {
        Self { scale, ..self }
    }

    /// Whether each (row, 256-column block) holds only zero codes, `[rows, blocks]` row-major:
    /// a block scale there multiplies nothing.
    pub fn zero_blocks(&self) -> Vec<bool> {
        let (rows, blocks) = (self.rows(), self.packed.blocks());
        let mut zero = Vec::with_capacity(rows * blocks);
        for r in 0..rows {
            zero.extend((0..blocks).map(|b| self.packed.block_is_zero(r, b)));
        }
        zero
    }

    /// The same matrix with a multiplier per (row, group of `group` columns), as
    /// [`TernaryMatrix::from_ternary_group_scaled`] builds it.
    pub fn with_group_scales(mut self, group: usize, scales: &[f32]) -> Result<Self, QuantError> {
        self.group_scales = Some(GroupScales::new(group, self.rows(), self.cols(), scales)?);
        Ok(self)
    }

    /// Builds a matrix whose groups of `group` consecutive columns (32, 64, 128 or 256) carry
    /// their own multipliers: `scales[r · groups + g]` scales columns `group·g..group·(g + 1)`
    /// of row `r` (`groups = cols.div_ceil(group)`).
    ///
    /// [`TernaryMatrix::forward`] then computes, for a token with activation scale `s_a`,
    /// `y[r] = scale(Σ_g d[r, g] · P[r, g], s_a)` where `P[r, g] = Σ_{c ∈ g} t[r, c] · x[c]` is
    /// the exact i32 partial of group `g`, converted to f32 (exact: |P| ≤ 256 · 128) and
    /// combined in the order g = 0, 1, … on every kernel path, so all paths give the same bits
    /// ([`crate::group`]).
    pub fn from_ternary_group_scaled(
        codes: &[i8],
        rows: usize,
        cols: usize,
        group: usize,
        scales: &[f32],
        scale: WeightScale,
    ) -> Result<Self, QuantError> {
        let d = GroupScales::new(group, rows, cols, scales)?;
        let mut m = Self::from_ternary(codes, rows, cols, scale)?;
        m.group_scales = Some(d);
        Ok(m)
    }

    /// [`TernaryMatrix::from_ternary_group_scaled`] with groups of 256 columns (TQ1_0/TQ2_0's
    /// blocks): `block_scales[r · blocks + b]`, `blocks = cols.div_ceil(256)`.
    pub fn from_ternary_block_scaled(
        codes: &[i8],
        rows: usize,
        cols: usize,
        block_scales: Vec<f32>,
        scale: WeightScale,
    ) -> Result<Self, QuantError> {
        Self::from_ternary_group_scaled(codes, rows, cols, crate::layout::BLOCK_COLS, &block_scales, scale)
    }

    pub fn rows(&self) -> usize {
        self.packed.rows()
    }
    pub fn cols(&self) -> usize {
        self.packed.cols()
    }
    pub fn scale(&self) -> WeightScale {
        self.scale
    }
    /// The per-(row, group) multipliers, if any.
    pub fn group_scales(&self) -> Option<&GroupScales> {
        self.group_scales.as_ref()
    }
    /// Bytes the packed weights (2 bits per weight, plus padding) and any group scales take.
    pub fn bytes(&self) -> usize {
        self.packed.bytes() + self.group_scales.as_ref().map_or(0, GroupScales::bytes)
    }

    /// The row-major ternary codes (for export and tests).
    pub fn to_ternary(&self) -> Vec<i8> {
        self.packed.unpack()
    }

    /// The weights independent of this crate's kernel layout: codes, scale and group scales,
    /// what a device backend receives to lay out for its own kernels.
    pub fn to_codes(&self) -> TernaryCodes {
        TernaryCodes {
            rows: self.rows(),
            cols: self.cols(),
            codes: self.packed.unpack(),
            scale: self.scale,
            group_scales: self
                .group_scales
                .as_ref()
                .map(|d| GroupScaleRows { group: d.group(), scales: d.to_row_major() }),
        }
    }

    /// Packs layout-neutral weights into the CPU kernels' layout (the inverse of
    /// [`TernaryMatrix::to_codes`]).
    pub fn from_codes(c: &TernaryCodes) -> Result<Self, QuantError> {
        match &c.group_scales {
            None => Self::from_ternary(&c.codes, c.rows, c.cols, c.scale),
            Some(d) => Self::from_ternary_group_scaled(&c.codes, c.rows, c.cols, d.group, &d.scales, c.scale),
        }
    }

    /// Integer products of each group of `group` columns (32, 64, 128 or 256) of the padded rows:
    /// `out[(i · rows + r) · groups + g] = Σ_{c ∈ group g} x[i, c] · W[r, c]` for every token `i`,
    /// `groups = padded_cols(cols) / group` (the partials the group-scaled forward combines; any
    /// matrix has them).
    pub fn matmul_group_i32_with(
        &self,
        path: KernelPath,
        group: usize,
        x: &QuantizedActivations,
        out: &mut [i32],
    ) -> Result<(), QuantError> {
        if !group::GROUP_SIZES.contains(&group) {
            return Err(QuantError::Shape(format!("groups of {group} columns are not supported")));
        }
        let (rows, groups) = (self.rows(), group::padded_groups(self.cols(), group));
        if x.k() != self.cols() || out.len() < x.m() * rows * groups {
            return Err(QuantError::Shape(format!(
                "{} tokens of width {} into {} partials for a [{rows}, {}] matrix in groups of {group}",
                x.m(),
                x.k(),
                out.len(),
                self.cols()
            )));
        }
        let path = path.or_best();
        let mut part = vec![0i32; groups * ROW_TILE];
        let mut xs = vec![0i32; groups];
        for t in 0..x.m() {
            group::group_x_sums(x, t, group, &mut xs);
            let tiles = 0..self.packed.tiles();
            group::tiles_group_sums(
                path,
                &self.packed,
                tiles,
                x.padded_row(t),
                group,
                &mut part,
                |g, part| {
                    for ri in 0..ROW_TILE.min(rows - g * ROW_TILE) {
                        let r = g * ROW_TILE + ri;
                        for gi in 0..groups {
                            out[(t * rows + r) * groups + gi] = part[gi * ROW_TILE + ri] - xs[gi];
                        }
                    }
                },
            );
        }
        Ok(())
    }

    /// Integer products `out[i * rows + r] = Σ_c x[i, c] · W[r, c]` for every token `i`.
    /// Block scales, if any, are not applied: these are the products of the codes.
    pub fn matmul_i32(&self, x: &QuantizedActivations, out: &mut [i32]) {
        self.matmul_i32_with(KernelPath::active(), x, out)
    }

    /// [`TernaryMatrix::matmul_i32`] on a chosen kernel path (the best one if this CPU
    /// cannot run `path`).
    pub fn matmul_i32_with(&self, path: KernelPath, x: &QuantizedActivations, out: &mut [i32]) {
        self.check(x, out.len());
        self.run(path, x, &I32Sink(SharedOut::new(out, self.rows())));
    }

    /// `out[i * rows + r] = (Σ_c x[i, c] · W[r, c]) as f32 / div[i] · mul[r]`, each product
    /// scaled as it leaves the kernel: training's BitLinear output, with its own per-token
    /// `div` (`s_a`) and per-row `mul` (the weight scale of each fused projection), and no
    /// `[tokens, rows]` buffer of i32 sums to write and read back.
    pub fn matmul_div_mul(&self, x: &QuantizedActivations, div: &[f32], mul: &[f32], out: &mut [f32]) {
        self.check(x, out.len());
        assert!(div.len() >= x.m() && mul.len() >= self.rows(), "matmul_div_mul scales");
        let sink = MapSink(SharedOut::new(out, self.rows()), move |acc: i32, t: usize, r: usize| {
            acc as f32 / div[t] * mul[r]
        });
        self.run(KernelPath::active(), x, &sink);
    }

    /// `out[i * rows + r] = scale(Σ_c x[i, c] · W[r, c], s_a[i])`: the BitLinear output.
    pub fn forward(&self, x: &QuantizedActivations, out: &mut [f32]) {
        self.forward_with(KernelPath::active(), x, out)
    }

    /// [`TernaryMatrix::forward`] on a chosen kernel path (the best one if this CPU cannot
    /// run `path`).
    pub fn forward_with(&self, path: KernelPath, x: &QuantizedActivations, out: &mut [f32]) {
        self.check(x, out.len());
        if let Some(d) = &self.group_scales {
            return self.forward_group_scaled(path, x, d, out);
        }
        let (scale, s_a) = (self.scale, x.scales());
        let sink = MapSink(SharedOut::new(out, self.rows()), move |acc, t, _r| scale.apply(acc, s_a[t]));
        self.run(path, x, &sink);
    }

    /// The group-scaled forward ([`crate::group`]): per row tile and token, the kernel gives
    /// the code sums of every group, and [`group::combine_tile`] scales and sums them in group
    /// order.
    fn forward_group_scaled(
        &self,
        path: KernelPath,
        x: &QuantizedActivations,
        d: &GroupScales,
        out: &mut [f32],
    ) {
        let path = path.or_best();
        let (w, m) = (&self.packed, x.m());
        let (rows, scale, group) = (w.rows(), self.scale, d.group());
        let (padded, real) = (group::padded_groups(w.cols(), group), d.groups_per_row());
        if w.blocks() == 0 {
            out[..m * rows].fill(0.0);
            return;
        }
        let sink = SharedOut::new(out, rows);
        let macs = m * w.tiles() * ROW_TILE * padded_cols(w.cols());
        let min_macs = if m == 1 { kernels::PARALLEL_MIN_MACS_GEMV } else { kernels::PARALLEL_MIN_MACS };
        #[cfg(target_arch = "x86_64")]
        if let Some(vnni) = grouped_panels(path, m) {
            // Enough tokens to share unpacked panels: every token's group activation sums once,
            // then the panel GEMM hands each group's code sums to the same f32 combination.
            let mut xs = vec![0i32; m * real];
            for (t, xs_t) in xs.chunks_exact_mut(real.max(1)).enumerate() {
                group::group_x_sums(x, t, group, xs_t);
            }
            for_ranges(w.tiles(), macs, min_macs, |tiles| {
                let rows = tiles.start * ROW_TILE..(tiles.end * ROW_TILE).min(rows);
                // SAFETY: `grouped_panels` chose a path whose features this CPU has.
                unsafe {
                    if vnni {
                        kernels::avx2::ternary_gemm_grouped::<true>(w, x, rows, 0..m, d, &xs, scale, &sink)
                    } else {
                        kernels::avx2::ternary_gemm_grouped::<false>(w, x, rows, 0..m, d, &xs, scale, &sink)
                    }
                }
            });
            return;
        }
        for_ranges(w.tiles(), macs, min_macs, |tiles| {
            // The sums of one tile and token, on the stack up to STACK_GROUPS groups (16384
            // columns in groups of 32), and the tokens' group activation sums: on the stack for
            // one token, so that decoding allocates nothing.
            let mut stack = [0i32; STACK_GROUPS * ROW_TILE];
            let mut stack_xs = [0i32; STACK_GROUPS];
            let (mut heap, mut heap_xs) = (Vec::new(), Vec::new());
            let part: &mut [i32] = if padded <= STACK_GROUPS {
                &mut stack[..padded * ROW_TILE]
            } else {
                heap.resize(padded * ROW_TILE, 0);
                &mut heap
            };
            let xs: &mut [i32] = if m * real <= STACK_GROUPS {
                &mut stack_xs[..m * real]
            } else {
                heap_xs.resize(m * real, 0);
                &mut heap_xs
            };
            for (t, xs_t) in xs.chunks_exact_mut(real.max(1)).enumerate().take(m) {
                group::group_x_sums(x, t, group, xs_t);
            }
            // A chunk of tiles at a time, every token: the chunk's weights (about 128 KiB) stay
            // in cache across the tokens.
            let chunk = ((128 << 10) / (w.blocks() * ROW_TILE * crate::layout::BLOCK_BYTES)).max(1);
            let mut start = tiles.start;
            while start < tiles.end {
                let end = (start + chunk).min(tiles.end);
                for t in 0..m {
                    let (xs_t, s_a) = (&xs[t * real..(t + 1) * real], x.scale(t));
                    group::tiles_group_combined(
                        path,
                        w,
                        start..end,
                        x.padded_row(t),
                        xs_t,
                        d,
                        part,
                        |g, acc| {
                            let r0 = g * ROW_TILE;
                            for (ri, &a) in acc.iter().enumerate().take(rows - r0) {
                                sink.write(t, r0 + ri, scale.apply_f32(a, s_a));
                            }
                        },
                    );
                }
                start = end;
            }
        });
    }

    fn check(&self, x: &QuantizedActivations, out_len: usize) {
        assert_eq!(x.k(), self.cols(), "activation width does not match the matrix");
        assert!(out_len >= x.m() * self.rows(), "output buffer too small");
    }

    /// Splits the product by row tiles over the thread pool and runs `path`'s kernels.
    fn run<S: Sink>(&self, path: KernelPath, x: &QuantizedActivations, sink: &S) {
        let path = path.or_best();
        let w = &self.packed;
        if w.blocks() == 0 {
            // K = 0: every dot product is empty.
            (0..x.m()).for_each(|t| (0..w.rows()).for_each(|r| sink.put(t, r, 0)));
            return;
        }
        for_ranges(w.tiles(), self.macs(x), Self::parallel_min(x), |tiles| {
            self.run_tiles(path, x, tiles, sink)
        });
    }

    /// Multiply-adds of the product with `x`, padding included.
    fn macs(&self, x: &QuantizedActivations) -> usize {
        x.m() * self.packed.tiles() * ROW_TILE * padded_cols(self.packed.cols())
    }

    fn parallel_min(x: &QuantizedActivations) -> usize {
        if x.m() == 1 {
            kernels::PARALLEL_MIN_MACS_GEMV
        } else {
            kernels::PARALLEL_MIN_MACS
        }
    }

    /// The row tiles `tiles` of the product, on the calling thread.
    fn run_tiles<S: Sink>(&self, path: KernelPath, x: &QuantizedActivations, tiles: Range<usize>, sink: &S) {
        let (w, m) = (&self.packed, x.m());
        if m == 1 {
            ternary_gemv(path, w, x, tiles, sink);
            return;
        }
        // Rows per cache block: about 96 KiB of weights, which stay in L2 while every token
        // tile streams past them.
        // The AVX2 kernel blocks itself (it unpacks row panels), so it takes the whole range.
        let row_bytes = padded_cols(w.cols()) / 4;
        let block_rows = if path == KernelPath::Avx2 {
            w.rows()
        } else {
            ((96 << 10) / row_bytes.max(1)).clamp(ROW_TILE, 512) / ROW_TILE * ROW_TILE
        };
        let end = (tiles.end * ROW_TILE).min(w.rows());
        let mut r = tiles.start * ROW_TILE;
        while r < end {
            let rows = r..(r + block_rows).min(end);
            ternary_gemm(path, w, x, rows.clone(), 0..m, sink);
            r = rows.end;
        }
    }

    /// [`TernaryMatrix::forward`] of `N` matrices of the same width on the same activations
    /// (q, k and v; gate and up) in one parallel region: one hand-off to the thread pool
    /// instead of `N`, and small products (the k/v projections) share the threads rather
    /// than run on the caller alone. Allocates nothing.
    pub fn forward_many<const N: usize>(
        mats: [&TernaryMatrix; N],
        x: &QuantizedActivations,
        outs: [&mut [f32]; N],
    ) {
        if mats.iter().any(|w| w.group_scales.is_some()) {
            // Per-group scales have their own product.
            for (w, out) in mats.into_iter().zip(outs) {
                w.forward(x, out);
            }
            return;
        }
        let path = KernelPath::active().or_best();
        let s_a = x.scales();
        let mut outs = outs.map(Some);
        let sinks: [_; N] = std::array::from_fn(|i| {
            let (w, out) = (mats[i], outs[i].take().expect("each output is taken once"));
            w.check(x, out.len());
            let scale = w.scale;
            MapSink(SharedOut::new(out, w.rows()), move |acc, t, _r| scale.apply(acc, s_a[t]))
        });
        if mats.iter().any(|w| w.packed.blocks() == 0) {
            // K = 0 (all matrices share it): nothing to split.
            mats.iter().zip(&sinks).for_each(|(w, sink)| w.run(path, x, sink));
            return;
        }
        let tiles: [usize; N] = std::array::from_fn(|i| mats[i].packed.tiles());
        let macs = mats.iter().map(|w| w.macs(x)).sum();
        for_ranges(tiles.iter().sum(), macs, Self::parallel_min(x), |range| {
            // `range` counts the tiles of all matrices one after another.
            let mut first = 0;
            for i in 0..N {
                let (lo, hi) = (range.start.max(first), range.end.min(first + tiles[i]));
                if lo < hi {
                    mats[i].run_tiles(path, x, lo - first..hi - first, &sinks[i]);
                }
                first += tiles[i];
            }
        });
    }
}

/// Groups whose sums the group-scaled forward keeps on the stack.
const STACK_GROUPS: usize = 512;

/// `W · x[0]` for the rows of `tiles` on `path`, which the caller has checked is available.
fn ternary_gemv<S: Sink>(
    path: KernelPath,
    w: &PackedTernary,
    x: &QuantizedActivations,
    tiles: Range<usize>,
    sink: &S,
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `run` passes only paths whose CPU features `is_available` confirmed.
        KernelPath::Avx2 => unsafe { kernels::avx2::ternary_gemv(w, x, tiles, sink) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        KernelPath::Avx512Bw => unsafe { kernels::avx512::ternary_gemv::<false, S>(w, x, tiles, sink) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        KernelPath::Avx512Vnni => unsafe { kernels::avx512::ternary_gemv::<true, S>(w, x, tiles, sink) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        KernelPath::NeonPlain => unsafe { kernels::neon::ternary_gemv::<false, S>(w, x, tiles, sink) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        KernelPath::NeonDotprod => unsafe { kernels::neon::ternary_gemv::<true, S>(w, x, tiles, sink) },
        _ => kernels::scalar::ternary_gemv(w, x, tiles, sink),
    }
}

/// `W · x[tokens]` for `rows` on `path`, which the caller has checked is available.
fn ternary_gemm<S: Sink>(
    path: KernelPath,
    w: &PackedTernary,
    x: &QuantizedActivations,
    rows: Range<usize>,
    tokens: Range<usize>,
    sink: &S,
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `run` passes only paths whose CPU features `is_available` confirmed.
        KernelPath::Avx2 => unsafe { kernels::avx2::ternary_gemm(w, x, rows, tokens, sink) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        KernelPath::Avx512Bw => unsafe {
            kernels::avx512::ternary_gemm::<false, S>(w, x, rows, tokens, sink)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        KernelPath::Avx512Vnni => unsafe {
            // Enough tokens to share an unpacked panel: the rows-in-lanes GEMM on `vpdpbusd`
            // (1.2–2× the 512-bit row kernel at the 2B-4T shapes on Zen 4, 2–2.6× at the
            // training shapes; crates/bitnet-quant/KERNELS.md).
            if tokens.len() >= kernels::avx2::PANEL_MIN_TOKENS
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                kernels::avx2::ternary_gemm_vnni(w, x, rows, tokens, sink)
            } else {
                kernels::avx512::ternary_gemm::<true, S>(w, x, rows, tokens, sink)
            }
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        KernelPath::NeonPlain => unsafe { kernels::neon::ternary_gemm::<false, S>(w, x, rows, tokens, sink) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        KernelPath::NeonDotprod => unsafe {
            kernels::neon::ternary_gemm::<true, S>(w, x, rows, tokens, sink)
        },
        _ => kernels::scalar::ternary_gemm(w, x, rows, tokens, sink),
    }
}

/// Whether the group-scaled product of `m` tokens takes the panel GEMM on `path` (which the
/// caller has checked is available), and with `vpdpbusd` (`Some(true)`) or without: from
/// [`kernels::avx2::PANEL_MIN_TOKENS`] tokens on, on the paths whose per-tensor products take
/// it. The others run the group kernel token by token over cached chunks of weights.
#[cfg(target_arch = "x86_64")]
fn grouped_panels(path: KernelPath, m: usize) -> Option<bool> {
    if m < kernels::avx2::PANEL_MIN_TOKENS {
        return None;
    }
    match path {
        KernelPath::Avx2 => Some(false),
        KernelPath::Avx512Vnni if std::arch::is_x86_feature_detected!("avx512vl") => Some(true),
        _ => None,
    }
}

/// The scalar reference dot product of ternary codes and int8 activations.
#[inline]
pub fn dot_i8(w: &[i8], x: &[i8]) -> i32 {
    w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// The scalar reference GEMV: `out[r] = Σ_c t[r, c] · x[c]` over row-major codes.
pub fn reference_gemv_i32(t: &[i8], rows: usize, cols: usize, x: &[i8], out: &mut [i32]) {
    for (r, o) in out.iter_mut().enumerate().take(rows) {
        *o = dot_i8(&t[r * cols..(r + 1) * cols], x);
    }
}

#[cfg(test)]
mod tests {
    use super::QuantizedActivations;

    #[test]
    fn quantize_each_equals_quantize() {
        for (m, k) in [(1, 1), (3, 257), (5, 2560), (2, 0)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
            let mut whole = QuantizedActivations::new(m, k);
            whole.quantize(&x, m);
            let mut each = QuantizedActivations::new(m, k);
            let mut row = vec![0.0; k];
            each.quantize_each(m, &mut row, |i, r| r.copy_from_slice(&x[i * k..(i + 1) * k]));
            assert_eq!(each.m(), m);
            for i in 0..m {
                assert_eq!(each.padded_row(i), whole.padded_row(i));
                assert_eq!(each.scale(i).to_bits(), whole.scale(i).to_bits());
                assert_eq!(each.sum(i), whole.sum(i));
            }
        }
    }
}
