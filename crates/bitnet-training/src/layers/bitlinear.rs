//! BitLinear with the straight-through estimator (STE).
//!
//! Forward (b1.58): the latent weights are absmean-ternarized per matrix and the input is
//! absmax-quantized to int8 per token; the product runs on the integer codes and is scaled
//! back as `y = (Σ q·t) / s_a · mean|W|`, the same arithmetic as the inference kernels. The
//! integer sums come from `bitnet_quant`'s ternary × int8 kernels; they are exact, so `y` is the
//! same as a float product of the codes would give, in `f32` and `f64` alike.
//! Backward (STE, `w + (q(w) − w).detach()`): quantization counts as the identity, so
//! `dX = dY · W_q` and `dW = dYᵀ · X_q`, with `W_q`, `X_q` the dequantized values.
//!
//! Projections that read the same input (q, k, v; gate, up) form one [`WeightGroup`]: their
//! weights are stacked by output rows so one matrix product serves all of them, while each keeps
//! its own scale.
//!
//! The backward's two products are f32 GEMMs by default ([`Backward::F32`], the exact STE
//! gradients). [`Backward::Int16`] runs them on integers instead: `dY` is quantized to 16 bits
//! per token for `dX = dY · W_q` (the ternary codes are integers already) and `dY / s_a` to 16
//! bits per output feature for `dW = dYᵀ · X_q` (the int8 codes are integers already), and
//! `bitnet_quant::int16` multiplies them with `vpmaddwd` (16 multiply-adds per instruction,
//! against 8 per f32 FMA). Each gradient then carries a relative error of about 2⁻¹⁶ of its
//! row's (or column's) largest magnitude: finer than the bf16 of the usual mixed-precision
//! training, whose 8-bit mantissa rounds every element.

use bitnet_quant::int16::{
    gemm_i16_i8, quantize_columns_i16, quantize_rows_i16, ALayout, I16Rows, PackedPairs, ScaledOut,
};
use bitnet_quant::{QuantizedActivations, TernaryMatrix, WeightScale};
use rayon::prelude::*;

use crate::layers::rmsnorm::{rmsnorm_forward, rmsnorm_row};
use crate::linalg::{add_into, matmul, Operand, Scratch, ROW_CHUNK};
use crate::real::{wide, Real};

/// How the backward's BitLinear products are computed (module docs).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Backward {
    /// f32 GEMMs: the exact STE gradients.
    #[default]
    F32,
    /// 16-bit gradients times the integer codes, summed in i32: faster, within ~2⁻¹⁶ of each
    /// row's largest gradient. For ternary f32 models (`bitnet train` refuses it with `--fp`;
    /// the f64 models of the gradient tests take the f32 path).
    Int16,
}

impl Backward {
    /// Whether the products of a `precision` model of `T` really run on 16-bit integers: the
    /// ternary f32 models only (the f64 ones of the gradient tests take the f32 path).
    pub fn is_int16<T: Real>(self, precision: Precision) -> bool {
        self == Backward::Int16 && precision == Precision::Ternary && T::as_f32(&[]).is_some()
    }
}

/// Whether the linears are quantized (the b1.58 model) or full-precision (the `--fp` baseline).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Precision {
    Ternary,
    Full,
}

/// The weights of one or more projections that share an input, as the product uses them.
#[derive(Clone, Debug)]
pub struct WeightGroup<T> {
    /// Output features of each projection, in stacking order.
    pub out_sizes: Vec<usize>,
    pub in_features: usize,
    /// `[Σ out, in]`: ternary codes (as floats) or, in full precision, the weights. Empty under
    /// the 16-bit backward, which reads `packed` and `pairs` only.
    pub codes: Vec<T>,
    /// `[Σ out, in]`: `codes · scale`, the weights the f32 backward multiplies by (empty under
    /// the 16-bit backward).
    pub dequant: Vec<T>,
    /// `mean|W|` per projection (1 in full precision).
    pub scales: Vec<T>,
    /// The ternary codes of every projection, packed for the integer forward (`None` in full
    /// precision). The integer sums do not depend on the scales, so one matrix serves the
    /// group; its own scale is never applied.
    pub packed: Option<TernaryMatrix>,
    /// The ternary codes `[Σ out, in]` as row pairs for the 16-bit backward's `dX` (`None`
    /// unless [`WeightGroup::quantize_for`] was asked for them).
    pub pairs: Option<PackedPairs>,
}

impl<T: Real> WeightGroup<T> {
    /// Quantizes latent weights (`[out_p, in]` each) for one step.
    pub fn quantize(weights: &[&[T]], out_sizes: &[usize], in_features: usize, precision: Precision) -> Self {
        Self::quantize_for(weights, out_sizes, in_features, precision, Backward::F32)
    }

    /// [`WeightGroup::quantize`], with the codes also packed for the 16-bit backward when
    /// `backward` asks for it (ternary weights only: full precision keeps the f32 products).
    pub fn quantize_for(
        weights: &[&[T]],
        out_sizes: &[usize],
        in_features: usize,
        precision: Precision,
        backward: Backward,
    ) -> Self {
        let total: usize = out_sizes.iter().sum();
        // The 16-bit backward never reads the float codes: making them is a third of this step.
        let int16 = backward.is_int16::<T>(precision);
        let mut codes = Vec::with_capacity(if int16 { 0 } else { total * in_features });
        let mut ternary = Vec::new();
        let mut scales = Vec::with_capacity(weights.len());
        for (w, &n) in weights.iter().zip(out_sizes) {
            assert_eq!(w.len(), n * in_features, "weight does not have its declared shape");
            match precision {
                Precision::Ternary => {
                    let (t, mean) = T::absmean_ternary(w);
                    if !int16 {
                        codes.extend(t.iter().map(|&c| T::from_f64(c as f64)));
                    }
                    ternary.extend_from_slice(&t);
                    scales.push(mean);
                }
                Precision::Full => {
                    codes.extend_from_slice(w);
                    scales.push(T::ONE);
                }
            }
        }
        let packed = (precision == Precision::Ternary).then(|| pack_ternary(&ternary, total, in_features));
        let mut group = Self::with_packed(codes, scales, out_sizes, in_features, packed);
        if int16 {
            let pairs =
                PackedPairs::from_i8(&ternary, total, in_features).expect("codes fill the group's shape");
            group.pairs = Some(pairs);
        }
        group
    }

    /// A group from stored ternary codes and scales (a loaded packed checkpoint).
    pub fn from_codes(codes: Vec<T>, scales: Vec<T>, out_sizes: &[usize], in_features: usize) -> Self {
        let ternary: Vec<i8> = codes.iter().map(|&c| c.to_f64() as i8).collect();
        let packed = pack_ternary(&ternary, out_sizes.iter().sum(), in_features);
        Self::with_packed(codes, scales, out_sizes, in_features, Some(packed))
    }

    fn with_packed(
        codes: Vec<T>,
        scales: Vec<T>,
        out_sizes: &[usize],
        in_features: usize,
        packed: Option<TernaryMatrix>,
    ) -> Self {
        let mut dequant = codes.clone();
        let mut offset = 0;
        // No float codes (the 16-bit backward), no dequantized weights.
        for (&n, &s) in out_sizes.iter().zip(&scales).filter(|_| !codes.is_empty()) {
            for v in &mut dequant[offset * in_features..(offset + n) * in_features] {
                *v *= s;
            }
            offset += n;
        }
        Self { out_sizes: out_sizes.to_vec(), in_features, codes, dequant, scales, packed, pairs: None }
    }

    /// Σ of the projections' output features.
    pub fn out_features(&self) -> usize {
        self.out_sizes.iter().sum()
    }

    /// The scale of output column `c`'s projection, per column.
    fn column_scales(&self) -> Vec<T> {
        let mut v = Vec::with_capacity(self.out_features());
        for (&n, &s) in self.out_sizes.iter().zip(&self.scales) {
            v.extend(std::iter::repeat_n(s, n));
        }
        v
    }
}

/// Packs the stacked `[rows, cols]` ternary codes of a group for the integer kernels.
fn pack_ternary(ternary: &[i8], rows: usize, cols: usize) -> TernaryMatrix {
    // Only `matmul_i32` reads this matrix, and integer sums carry no scale: the forward applies
    // each projection's own `mean|W|` to them, so the matrix's scale is 1 and never used.
    TernaryMatrix::from_ternary(ternary, rows, cols, WeightScale::Multiply(1.0))
        .expect("a group's codes are ternary and fill its shape")
}

/// A BitLinear input as the product sees it: int8 codes per token (held as floats) and the
/// per-token scale `s_a`. In full precision the codes are the input itself and `s_a = 1`.
#[derive(Clone, Debug)]
pub struct QuantizedInput<T> {
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<T>,
    pub scale: Vec<T>,
    /// The same codes as int8, laid out for the integer kernels (`None` in full precision).
    /// Only the codes are read from it: its f32 scales are `scale` rounded, and unused.
    pub int8: Option<QuantizedActivations>,
}

/// Quantizes `x` (`[rows, cols]`) per token (`ActQuant`), or keeps it as is in full precision.
pub fn quantize_input<T: Real>(x: &[T], rows: usize, cols: usize, precision: Precision) -> QuantizedInput<T> {
    quantize_input_in(x, rows, cols, precision, Backward::F32, &Scratch::default())
}

/// [`quantize_input`] with its buffers taken from `scratch`, for a layer whose backward is
/// `backward` (the 16-bit one reads only the int8 codes: the float codes are left empty).
pub fn quantize_input_in<T: Real>(
    x: &[T],
    rows: usize,
    cols: usize,
    precision: Precision,
    backward: Backward,
    scratch: &Scratch<T>,
) -> QuantizedInput<T> {
    let _t = crate::profile::section("quantize_input");
    assert_eq!(x.len(), rows * cols);
    if precision == Precision::Full {
        let mut scale = scratch.empty(rows);
        scale.resize(rows, T::ONE);
        return QuantizedInput { rows, cols, codes: scratch.copy_of(x), scale, int8: None };
    }
    // The per-row extra output of `quantize_rows` is not needed here.
    let mut unused = scratch.dirty(rows);
    let float_codes = !backward.is_int16::<T>(precision);
    let q = quantize_rows(rows, cols, float_codes, &mut unused, scratch, |first, _buf, q, s, _| {
        let x_rows = x[first * cols..].chunks_exact(cols);
        for ((xr, qr), s) in x_rows.zip(q.chunks_exact_mut(cols)).zip(s) {
            *s = T::quantize_activation_row(xr, qr);
        }
    });
    scratch.recycle(unused);
    q
}

/// `quantize_input(rmsnorm(x))` without the normalized rows in between: each token is normalized
/// into a small buffer and quantized at once (the sub-norms and pre-norms feed only their
/// BitLinear). The same arithmetic as [`rmsnorm_forward`] then [`quantize_input_in`], so the same
/// bits; `rstd` is written as the norm would write it. Full precision takes those two steps.
///
/// [`rmsnorm_forward`]: crate::layers::rmsnorm::rmsnorm_forward
#[allow(clippy::too_many_arguments)]
pub fn norm_quantize_input_in<T: Real>(
    x: &[T],
    norm_weight: &[T],
    eps: T,
    rows: usize,
    precision: Precision,
    backward: Backward,
    rstd: &mut [T],
    scratch: &Scratch<T>,
) -> QuantizedInput<T> {
    let cols = norm_weight.len();
    assert_eq!(x.len(), rows * cols);
    assert_eq!(rstd.len(), rows);
    if precision == Precision::Full {
        let mut normed = scratch.dirty(rows * cols);
        rmsnorm_forward(x, norm_weight, eps, &mut normed, rstd);
        let q = quantize_input_in(&normed, rows, cols, precision, backward, scratch);
        scratch.recycle(normed);
        return q;
    }
    let _t = crate::profile::section("norm_quantize_input");
    let float_codes = !backward.is_int16::<T>(precision);
    quantize_rows(rows, cols, float_codes, rstd, scratch, |first, buf, q, s, rstd| {
        let x_rows = x[first * cols..].chunks_exact(cols);
        for (((xr, qr), s), r) in x_rows.zip(q.chunks_exact_mut(cols)).zip(s).zip(rstd) {
            *r = wide(|| rmsnorm_row(xr, norm_weight, eps, buf));
            *s = T::quantize_activation_row(buf, qr);
        }
    })
}

/// The int8 quantization of `rows` rows of `cols`, [`ROW_CHUNK`] rows per task:
/// `fill(first, buf, q, s, extra)` writes the codes `q` and scales `s` of the chunk's rows from
/// `first` on, and may write their `extra` (a per-row output of the caller's); `buf` is a
/// row-sized scratch of the task's own. Gives the codes laid out for the kernels, and as floats
/// when `float_codes` (an empty `codes` otherwise).
fn quantize_rows<T: Real>(
    rows: usize,
    cols: usize,
    float_codes: bool,
    extra: &mut [T],
    scratch: &Scratch<T>,
    fill: impl Fn(usize, &mut [T], &mut [i8], &mut [T], &mut [T]) + Sync,
) -> QuantizedInput<T> {
    assert_eq!(extra.len(), rows);
    // Every code and scale is written below.
    let mut codes = if float_codes { scratch.dirty(rows * cols) } else { Vec::new() };
    let mut scale = scratch.dirty(rows);
    let mut int8 = scratch.int8(rows * cols);
    int8.par_chunks_mut(cols * ROW_CHUNK)
        .zip(scale.par_chunks_mut(ROW_CHUNK))
        .zip(extra.par_chunks_mut(ROW_CHUNK))
        .enumerate()
        .for_each_init(
            || vec![T::ZERO; cols],
            |buf, (chunk, ((qc, sc), ec))| {
                fill(chunk * ROW_CHUNK, buf, qc, sc, ec);
            },
        );
    if float_codes {
        codes.par_chunks_mut(cols * ROW_CHUNK).zip(int8.par_chunks(cols * ROW_CHUNK)).for_each(|(cc, qc)| {
            for (c, &v) in cc.iter_mut().zip(qc) {
                *c = T::from_f64(v as f64);
            }
        });
    }
    let mut acts = scratch.activations(rows, cols);
    let scale_f32: Vec<f32> = scale.iter().map(|s| s.to_f64() as f32).collect();
    acts.set_int8(&int8, &scale_f32, rows).expect("codes and scales have the input's shape");
    scratch.recycle_int8(int8);
    QuantizedInput { rows, cols, codes, scale, int8: Some(acts) }
}

impl<T: Real> QuantizedInput<T> {
    /// Gives the buffers back to `scratch`.
    pub fn recycle(self, scratch: &Scratch<T>) {
        scratch.recycle(self.codes);
        scratch.recycle(self.scale);
        if let Some(acts) = self.int8 {
            scratch.recycle_activations(acts);
        }
    }

    /// The dequantized input `q / s_a` (what the STE's surrogate multiplies).
    pub fn dequantized(&self) -> Vec<T> {
        let mut v = self.codes.clone();
        for (row, &s) in v.chunks_exact_mut(self.cols).zip(&self.scale) {
            for x in row {
                *x /= s;
            }
        }
        v
    }
}

/// `y[i, c] = (Σ_k x_q[i, k] · t[c, k]) / s_a[i] · scale(c)`: `y` is `[rows, Σ out]`.
pub fn bitlinear_forward<T: Real>(x: &QuantizedInput<T>, w: &WeightGroup<T>, y: &mut [T]) {
    bitlinear_forward_in(x, w, y, &Scratch::default())
}

/// [`bitlinear_forward`] with its temporaries taken from (and given back to) `scratch`.
///
/// Ternary weights on int8 inputs take the integer kernels, anything else (full precision) the
/// float product. The integer sums are what a float product of the codes gave before, bit for
/// bit: every partial sum is an integer far below 2^24, so that product was exact too.
pub fn bitlinear_forward_in<T: Real>(
    x: &QuantizedInput<T>,
    w: &WeightGroup<T>,
    y: &mut [T],
    scratch: &Scratch<T>,
) {
    let _t = crate::profile::section("bitlinear_forward");
    assert_eq!(x.cols, w.in_features, "BitLinear input width does not match the weights");
    let n = w.out_features();
    let col_scale = w.column_scales();
    match (&w.packed, &x.int8) {
        (Some(packed), Some(acts)) if T::as_f32(&x.scale).is_some() => {
            // f32: scaled as the kernel hands each run of sums over; the same operations as
            // the two-pass form below (an i32 converts to f32 in one rounding either way).
            let (Some(s_a), Some(m), Some(y)) =
                (T::as_f32(&x.scale), T::as_f32(&col_scale), T::as_f32_mut(y))
            else {
                unreachable!("T is f32")
            };
            packed.matmul_div_mul(acts, s_a, m, y);
        }
        (Some(packed), Some(acts)) => {
            let mut sums = scratch.sums(x.rows * n);
            packed.matmul_i32(acts, &mut sums);
            y.par_chunks_mut(n * ROW_CHUNK)
                .zip(sums.par_chunks(n * ROW_CHUNK))
                .zip(x.scale.par_chunks(ROW_CHUNK))
                .for_each(|((yc, ic), sc)| {
                    for ((yr, ir), &s_a) in yc.chunks_exact_mut(n).zip(ic.chunks_exact(n)).zip(sc) {
                        for ((v, &acc), &m) in yr.iter_mut().zip(ir).zip(&col_scale) {
                            *v = T::from_f64(acc as f64) / s_a * m;
                        }
                    }
                });
            scratch.recycle_sums(sums);
        }
        _ => {
            matmul(y, Operand::n(&x.codes, x.rows, x.cols), Operand::t(&w.codes, n, x.cols), false, true);
            y.par_chunks_mut(n * ROW_CHUNK).zip(x.scale.par_chunks(ROW_CHUNK)).for_each(|(yc, sc)| {
                for (yr, &s_a) in yc.chunks_exact_mut(n).zip(sc) {
                    for (v, &m) in yr.iter_mut().zip(&col_scale) {
                        *v = *v / s_a * m;
                    }
                }
            });
        }
    }
}

/// Backward of [`bitlinear_forward`] under the STE.
/// Writes `dx = dy · W_q` (skipped when `dx` is `None`), and for each projection `p` adds
/// `dw[p] += dy_pᵀ · X_q` with `X_q = q / s_a`.
pub fn bitlinear_backward<T: Real>(
    x: &QuantizedInput<T>,
    w: &WeightGroup<T>,
    dy: &[T],
    dx: Option<&mut [T]>,
    dw: &mut [&mut [T]],
) {
    bitlinear_backward_in(x, w, dy, dx, dw, &Scratch::default())
}

/// [`bitlinear_backward`] with its temporaries taken from (and given back to) `scratch`.
pub fn bitlinear_backward_in<T: Real>(
    x: &QuantizedInput<T>,
    w: &WeightGroup<T>,
    dy: &[T],
    dx: Option<&mut [T]>,
    dw: &mut [&mut [T]],
    scratch: &Scratch<T>,
) {
    let _t = crate::profile::section("bitlinear_backward");
    let n = w.out_features();
    let k = w.in_features;
    if let (Some(pairs), Some(acts), Some(dy32), Some(s_a)) =
        (&w.pairs, &x.int8, T::as_f32(dy), T::as_f32(&x.scale))
    {
        let dx = dx.map(|d| T::as_f32_mut(d).expect("dx has the type of dy"));
        let mut dw: Vec<&mut [f32]> =
            dw.iter_mut().map(|g| T::as_f32_mut(g).expect("dw has the type of dy")).collect();
        let col_scale: Vec<f32> = w.column_scales().iter().map(|s| s.to_f64() as f32).collect();
        let ops = Int16Operands { acts, s_a, col_scale: &col_scale, pairs, out_sizes: &w.out_sizes };
        backward_int16(&ops, dy32, dx, &mut dw, scratch);
        return;
    }
    if let Some(dx) = dx {
        matmul(dx, Operand::n(dy, x.rows, n), Operand::n(&w.dequant, n, k), false, true);
    }
    // dy / s_a per row, so that the product with the integer codes gives dYᵀ · (q / s_a).
    let mut dy_scaled = scratch.dirty(dy.len());
    dy_scaled
        .par_chunks_mut(n * ROW_CHUNK)
        .zip(dy.par_chunks(n * ROW_CHUNK))
        .zip(x.scale.par_chunks(ROW_CHUNK))
        .for_each(|((dc, yc), sc)| {
            for ((dr, yr), &s_a) in dc.chunks_exact_mut(n).zip(yc.chunks_exact(n)).zip(sc) {
                for (v, &y) in dr.iter_mut().zip(yr) {
                    *v = y / s_a;
                }
            }
        });
    assert_eq!(dw.len(), w.out_sizes.len());
    if dw.len() == 1 {
        matmul(dw[0], Operand::t(&dy_scaled, x.rows, n), Operand::n(&x.codes, x.rows, k), true, true);
        scratch.recycle(dy_scaled);
        return;
    }
    let mut dw_all = scratch.dirty(n * k);
    matmul(&mut dw_all, Operand::t(&dy_scaled, x.rows, n), Operand::n(&x.codes, x.rows, k), false, true);
    let mut offset = 0;
    for (g, &np) in dw.iter_mut().zip(&w.out_sizes) {
        add_into(g, &dw_all[offset * k..(offset + np) * k]);
        offset += np;
    }
    scratch.recycle(dy_scaled);
    scratch.recycle(dw_all);
}

/// What the 16-bit backward multiplies: the input's int8 codes and scales `s_a`, the weights'
/// codes as pairs and the scale of each output feature.
struct Int16Operands<'a> {
    acts: &'a QuantizedActivations,
    s_a: &'a [f32],
    col_scale: &'a [f32],
    pairs: &'a PackedPairs,
    out_sizes: &'a [usize],
}

/// [`bitlinear_backward`] under [`Backward::Int16`] (module docs), for f32 models.
fn backward_int16<T: Real>(
    ops: &Int16Operands,
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [&mut [f32]],
    scratch: &Scratch<T>,
) {
    let (rows, n, k) = (ops.s_a.len(), ops.col_scale.len(), ops.pairs.n());
    let shapes = "the backward's operands have their layer's shapes";
    // dX = dY · W_q = (dY ⊙ scale) · codes, with each row of dY ⊙ scale in 16 bits.
    if let Some(dx) = dx {
        let lda = n.next_multiple_of(2);
        let mut a = scratch.int16(rows * lda);
        let mut row_scale = vec![0f32; rows];
        let q = crate::profile::section("int16 dY rows");
        quantize_rows_i16(dy, n, ops.col_scale, &mut a, lda, &mut row_scale);
        drop(q);
        let out = ScaledOut { out: dx, ldo: k, row_scale: &row_scale, accumulate: false };
        let _t = crate::profile::section("int16 gemm");
        let a_rows = I16Rows { data: &a, m: rows, layout: ALayout::RowMajor { lda } };
        gemm_i16_i8(a_rows, ops.pairs, out).expect(shapes);
        scratch.recycle_int16(a);
    }
    // dW = (dY / s_a)ᵀ · codes, with each column of dY / s_a in 16 bits: pairs of tokens
    // interleaved feature by feature, the layout the product reads without a transpose.
    let mut a = scratch.int16(rows.div_ceil(2) * n * 2);
    let mut row_scale = vec![0f32; n];
    let q = crate::profile::section("int16 dY columns");
    quantize_columns_i16(dy, ops.s_a, &mut a, &mut row_scale);
    drop(q);
    let q = crate::profile::section("int16 pack x");
    let mut codes = scratch.pairs();
    codes.repack(rows, k, |t| ops.acts.row(t));
    drop(q);
    let q = crate::profile::section("int16 gemm");
    let a_cols = I16Rows { data: &a, m: n, layout: ALayout::PairInterleaved { ld: n } };
    if dw.len() == 1 {
        let out = ScaledOut { out: dw[0], ldo: k, row_scale: &row_scale, accumulate: true };
        gemm_i16_i8(a_cols, &codes, out).expect(shapes);
    } else {
        let mut dw_all = scratch.dirty(n * k);
        let all = T::as_f32_mut(&mut dw_all).expect("the 16-bit backward runs on f32");
        let out = ScaledOut { out: all, ldo: k, row_scale: &row_scale, accumulate: false };
        gemm_i16_i8(a_cols, &codes, out).expect(shapes);
        let mut offset = 0;
        for (g, &np) in dw.iter_mut().zip(ops.out_sizes) {
            add_into(g, &all[offset * k..(offset + np) * k]);
            offset += np;
        }
        scratch.recycle(dw_all);
    }
    drop(q);
    scratch.recycle_pairs(codes);
    scratch.recycle_int16(a);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The forward as a float product of the codes, `(x_q · tᵀ) / s_a · m` (the path the
    /// integer kernels replaced).
    fn float_forward<T: Real>(x: &QuantizedInput<T>, w: &WeightGroup<T>) -> Vec<T> {
        let n = w.out_features();
        let mut y = vec![T::ZERO; x.rows * n];
        matmul(&mut y, Operand::n(&x.codes, x.rows, x.cols), Operand::t(&w.codes, n, x.cols), false, false);
        let col_scale = w.column_scales();
        for (yr, &s_a) in y.chunks_exact_mut(n).zip(&x.scale) {
            for (v, &m) in yr.iter_mut().zip(&col_scale) {
                *v = *v / s_a * m;
            }
        }
        y
    }

    fn integer_forward_is_the_float_product_bit_for_bit<T: Real>() {
        let mut rng = Rng::new(7, 3);
        // Groups of one and of three projections; widths below, at and past a 256-column block;
        // token counts on both sides of the panel GEMM's 24 and past its 128-token block.
        for (rows, k, sizes) in
            [(1, 5, vec![3]), (37, 256, vec![16, 8, 8]), (70, 800, vec![40, 40]), (300, 256, vec![24, 57])]
        {
            let weights: Vec<Vec<T>> = sizes
                .iter()
                .map(|&n| (0..n * k).map(|_| T::from_f64(rng.normal() * 0.02)).collect())
                .collect();
            let refs: Vec<&[T]> = weights.iter().map(|w| w.as_slice()).collect();
            let w = WeightGroup::quantize(&refs, &sizes, k, Precision::Ternary);
            let x: Vec<T> = (0..rows * k).map(|_| T::from_f64(rng.normal())).collect();
            let xq = quantize_input(&x, rows, k, Precision::Ternary);
            let mut y = vec![T::ZERO; rows * w.out_features()];
            bitlinear_forward(&xq, &w, &mut y);
            let want = float_forward(&xq, &w);
            assert!(y.iter().zip(&want).all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits()));
        }
    }

    #[test]
    fn integer_forward_is_the_float_product_bit_for_bit_f32() {
        integer_forward_is_the_float_product_bit_for_bit::<f32>();
    }

    #[test]
    fn integer_forward_is_the_float_product_bit_for_bit_f64() {
        integer_forward_is_the_float_product_bit_for_bit::<f64>();
    }

    /// The fused norm + quantize gives the bits of the two steps, in both precisions, on row
    /// counts that end in a partial task chunk.
    #[test]
    fn fused_norm_quantize_equals_norm_then_quantize() {
        let mut rng = Rng::new(5, 1);
        for (rows, k) in [(1, 7), (ROW_CHUNK * 2 + 3, 256), (50, 800)] {
            let x: Vec<f32> = (0..rows * k).map(|_| rng.normal() as f32 * 3.0).collect();
            let w: Vec<f32> = (0..k).map(|_| 1.0 + rng.normal() as f32 * 0.1).collect();
            for precision in [Precision::Ternary, Precision::Full] {
                let mut normed = vec![0.0; rows * k];
                let mut want_rstd = vec![0.0; rows];
                rmsnorm_forward(&x, &w, 1e-5, &mut normed, &mut want_rstd);
                let want = quantize_input(&normed, rows, k, precision);
                let mut rstd = vec![f32::NAN; rows];
                let got = norm_quantize_input_in(
                    &x,
                    &w,
                    1e-5,
                    rows,
                    precision,
                    Backward::F32,
                    &mut rstd,
                    &Scratch::default(),
                );
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&rstd), bits(&want_rstd), "rstd, {rows}x{k} {precision:?}");
                assert_eq!(bits(&got.codes), bits(&want.codes), "codes, {rows}x{k} {precision:?}");
                assert_eq!(bits(&got.scale), bits(&want.scale), "scales, {rows}x{k} {precision:?}");
                let int8 = |q: &QuantizedInput<f32>| {
                    q.int8.as_ref().map(|a| (0..rows).map(|t| a.row(t).to_vec()).collect::<Vec<_>>())
                };
                assert_eq!(int8(&got), int8(&want), "int8 codes, {rows}x{k} {precision:?}");
            }
        }
    }
}
