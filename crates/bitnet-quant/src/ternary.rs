//! `TernaryMatrix`: a ternary weight matrix with its scale, and the ternary × int8 product.
//!
//! The integer form is the contract (bitnet-reference.md §2.3):
//! `acc = Σ q_i8 · t`, then `y = acc / s_a · mean|W|` (multiplier form) or
//! `y = acc / (s_a · weight_scale)` (BitLinear divisor form).

use rayon::prelude::*;
use std::ops::Range;

use crate::aligned::AlignedBytes;
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
}

/// Ternary weights in no kernel's layout: row-major codes in {-1, 0, 1}, the matrix's scale and,
/// for weights quantized block by block, one multiplier per (row, 256-column block).
///
/// The product it defines is [`TernaryMatrix::forward`]'s: per token with activation scale
/// `s_a`, `y[r] = scale(Σ_c t[r, c] · q[c], s_a)`, or with block scales
/// `y[r] = scale(Σ_b d[r, b] · P[r, b], s_a)` summed in block order.
#[derive(Clone, Debug, PartialEq)]
pub struct TernaryCodes {
    pub rows: usize,
    pub cols: usize,
    /// `rows × cols` codes, row-major.
    pub codes: Vec<i8>,
    pub scale: WeightScale,
    /// `[rows, cols.div_ceil(256)]` row-major, if the blocks carry their own multipliers.
    pub block_scales: Option<Vec<f32>>,
}

/// A ternary weight matrix `[rows = out_features, cols = in_features]` and its scale, packed
/// at construction into the kernels' layout ([`crate::layout`]).
///
/// Optionally it also carries one f32 multiplier per (row, 256-column block), for weights
/// whose blocks were quantized with their own scales (llama.cpp's TQ1_0/TQ2_0): see
/// [`TernaryMatrix::from_ternary_block_scaled`].
#[derive(Clone, Debug)]
pub struct TernaryMatrix {
    packed: PackedTernary,
    scale: WeightScale,
    /// `[rows, blocks]` row-major multipliers `d[r, b]` of the 256-column blocks.
    block_scales: Option<Vec<f32>>,
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
        Ok(Self { packed: PackedTernary::pack(codes, rows, cols), scale, block_scales: None })
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
        Ok(Self { packed, scale, block_scales: None })
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

    /// The same matrix with a multiplier per (row, 256-column block), as
    /// [`TernaryMatrix::from_ternary_block_scaled`] builds it.
    pub fn with_block_scales(mut self, block_scales: Vec<f32>) -> Result<Self, QuantError> {
        let (rows, cols) = (self.rows(), self.cols());
        let blocks = cols.div_ceil(crate::layout::BLOCK_COLS);
        if rows.checked_mul(blocks) != Some(block_scales.len()) {
            return Err(QuantError::Shape(format!(
                "{} block scales are not one per (row, 256-column block) of a [{rows}, {cols}] matrix",
                block_scales.len()
            )));
        }
        self.block_scales = Some(block_scales);
        Ok(self)
    }

    /// Builds a matrix whose 256-column blocks carry their own multipliers:
    /// `block_scales[r · blocks + b]` scales columns `256b..256b + 256` of row `r`
    /// (`blocks = cols.div_ceil(256)`, the kernels' block, which is also TQ1_0/TQ2_0's).
    ///
    /// [`TernaryMatrix::forward`] then computes, for a token with activation scale `s_a`,
    /// `y[r] = scale(Σ_b d[r, b] · P[r, b], s_a)` where `P[r, b] = Σ_{c ∈ b} t[r, c] · x[c]` is the
    /// exact i32 partial of block `b`, converted to f32 (exact: |P| ≤ 256 · 128) and combined in
    /// the order b = 0, 1, … on every kernel path, so all paths give the same bits. This is slower
    /// than the one-scale kernels and is meant only for weights that need it.
    pub fn from_ternary_block_scaled(
        codes: &[i8],
        rows: usize,
        cols: usize,
        block_scales: Vec<f32>,
        scale: WeightScale,
    ) -> Result<Self, QuantError> {
        Self::from_ternary(codes, rows, cols, scale)?.with_block_scales(block_scales)
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
    /// The per-(row, 256-column block) multipliers, `[rows, blocks]` row-major, if any.
    pub fn block_scales(&self) -> Option<&[f32]> {
        self.block_scales.as_deref()
    }
    /// Bytes the packed weights (2 bits per weight, plus padding) and any block scales take.
    pub fn bytes(&self) -> usize {
        self.packed.bytes() + self.block_scales.as_ref().map_or(0, |d| d.len() * 4)
    }

    /// The row-major ternary codes (for export and tests).
    pub fn to_ternary(&self) -> Vec<i8> {
        self.packed.unpack()
    }

    /// The weights independent of this crate's kernel layout: codes, scale and block scales,
    /// what a device backend receives to lay out for its own kernels.
    pub fn to_codes(&self) -> TernaryCodes {
        TernaryCodes {
            rows: self.rows(),
            cols: self.cols(),
            codes: self.packed.unpack(),
            scale: self.scale,
            block_scales: self.block_scales.clone(),
        }
    }

    /// Packs layout-neutral weights into the CPU kernels' layout (the inverse of
    /// [`TernaryMatrix::to_codes`]).
    pub fn from_codes(c: &TernaryCodes) -> Result<Self, QuantError> {
        match &c.block_scales {
            None => Self::from_ternary(&c.codes, c.rows, c.cols, c.scale),
            Some(d) => Self::from_ternary_block_scaled(&c.codes, c.rows, c.cols, d.clone(), c.scale),
        }
    }

    /// Integer products of each 256-column block:
    /// `out[(i * rows + r) * blocks + b] = Σ_{c ∈ block b} x[i, c] · W[r, c]` for every token
    /// `i` (the partials the block-scaled forward combines; any matrix has them).
    pub fn matmul_block_i32_with(&self, path: KernelPath, x: &QuantizedActivations, out: &mut [i32]) {
        let (rows, blocks) = (self.rows(), self.packed.blocks());
        assert_eq!(x.k(), self.cols(), "activation width does not match the matrix");
        assert!(out.len() >= x.m() * rows * blocks, "output buffer too small");
        let path = path.or_best();
        let mut part = vec![0i32; blocks * ROW_TILE];
        for t in 0..x.m() {
            for g in 0..self.packed.tiles() {
                tile_block_dots(path, &self.packed, g, x.padded_row(t), &mut part);
                for ri in 0..ROW_TILE.min(rows - g * ROW_TILE) {
                    let r = g * ROW_TILE + ri;
                    for b in 0..blocks {
                        out[(t * rows + r) * blocks + b] = part[b * ROW_TILE + ri];
                    }
                }
            }
        }
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
        if let Some(d) = &self.block_scales {
            return self.forward_block_scaled(path, x, d, out);
        }
        let (scale, s_a) = (self.scale, x.scales());
        let sink = MapSink(SharedOut::new(out, self.rows()), move |acc, t, _r| scale.apply(acc, s_a[t]));
        self.run(path, x, &sink);
    }

    /// The block-scaled forward (see [`TernaryMatrix::from_ternary_block_scaled`]): per row
    /// tile and token, the kernel gives the i32 partial of every block, then the partials are
    /// scaled and summed in block order.
    fn forward_block_scaled(&self, path: KernelPath, x: &QuantizedActivations, d: &[f32], out: &mut [f32]) {
        let path = path.or_best();
        let (w, m) = (&self.packed, x.m());
        let (rows, blocks, scale) = (w.rows(), w.blocks(), self.scale);
        if blocks == 0 {
            out[..m * rows].fill(0.0);
            return;
        }
        let sink = SharedOut::new(out, rows);
        let macs = m * w.tiles() * ROW_TILE * padded_cols(w.cols());
        let min_macs = if m == 1 { kernels::PARALLEL_MIN_MACS_GEMV } else { kernels::PARALLEL_MIN_MACS };
        for_ranges(w.tiles(), macs, min_macs, |tiles| {
            // The partials of one tile and token; on the stack up to 64 blocks (16384 columns),
            // so that decoding allocates nothing.
            let mut stack = [0i32; STACK_BLOCKS * ROW_TILE];
            let mut heap = Vec::new();
            let part: &mut [i32] = if blocks <= STACK_BLOCKS {
                &mut stack[..blocks * ROW_TILE]
            } else {
                heap.resize(blocks * ROW_TILE, 0);
                &mut heap
            };
            for g in tiles {
                for t in 0..m {
                    tile_block_dots(path, w, g, x.padded_row(t), part);
                    for ri in 0..ROW_TILE.min(rows - g * ROW_TILE) {
                        let r = g * ROW_TILE + ri;
                        let dr = &d[r * blocks..(r + 1) * blocks];
                        let mut acc = 0.0f32;
                        for (b, &db) in dr.iter().enumerate() {
                            acc += db * part[b * ROW_TILE + ri] as f32;
                        }
                        sink.write(t, r, scale.apply_f32(acc, x.scale(t)));
                    }
                }
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
        if mats.iter().any(|w| w.block_scales.is_some()) {
            // Per-block scales have their own product (rare: TQ files whose blocks differ).
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

/// Blocks whose partials the block-scaled forward keeps on the stack.
const STACK_BLOCKS: usize = 64;

/// Per-block dot products of tile `g` with one token on `path` (AVX2 on x86-64 CPUs that have
/// it, the scalar kernel elsewhere; both give the same integers).
fn tile_block_dots(path: KernelPath, w: &PackedTernary, g: usize, xr: &[i8], out: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if path != KernelPath::Scalar && KernelPath::Avx2.is_available() {
        // SAFETY: AVX2 is available (checked just above).
        unsafe { kernels::avx2::ternary_tile_block_dots(w, g, xr, out) };
        return;
    }
    let _ = path;
    kernels::scalar::ternary_tile_block_dots(w, g, xr, out);
}

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
