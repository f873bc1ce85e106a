//! `TernaryMatrix`: a ternary weight matrix with its scale, and the ternary × int8 product.
//!
//! The integer form is the contract (bitnet-reference.md §2.3):
//! `acc = Σ q_i8 · t`, then `y = acc / s_a · mean|W|` (multiplier form) or
//! `y = acc / (s_a · weight_scale)` (BitLinear divisor form).

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

    /// The multiplier equivalent, `mean|W|`, whichever form is stored.
    pub fn multiplier(self) -> f32 {
        match self {
            WeightScale::Multiply(m) => m,
            WeightScale::Divide(d) => 1.0 / d,
        }
    }
}

/// Int8 activations of `m` tokens of width `k`, with one scale per token.
/// Allocated once for the largest batch; quantizing never allocates.
#[derive(Clone, Debug)]
pub struct QuantizedActivations {
    k: usize,
    m: usize,
    q: Vec<i8>,
    scales: Vec<f32>,
}

impl QuantizedActivations {
    /// Room for up to `max_m` tokens of width `k`.
    pub fn new(max_m: usize, k: usize) -> Self {
        Self { k, m: 0, q: vec![0; max_m * k], scales: vec![0.0; max_m] }
    }

    /// Quantizes `x` (`m` rows of `k` floats) per token. Panics if `m` exceeds the capacity,
    /// which is a programming error, not bad input.
    pub fn quantize(&mut self, x: &[f32], m: usize) {
        assert!(m * self.k <= self.q.len() && x.len() == m * self.k, "activation buffer too small");
        self.m = m;
        for ((row, q), s) in
            x.chunks_exact(self.k).zip(self.q.chunks_exact_mut(self.k)).zip(self.scales.iter_mut())
        {
            *s = quantize_activation_row(row, q);
        }
    }

    pub fn m(&self) -> usize {
        self.m
    }
    pub fn k(&self) -> usize {
        self.k
    }
    /// The int8 values of token `i`.
    pub fn row(&self, i: usize) -> &[i8] {
        &self.q[i * self.k..(i + 1) * self.k]
    }
    /// The scale `s_a` of token `i`.
    pub fn scale(&self, i: usize) -> f32 {
        self.scales[i]
    }
}

/// A ternary weight matrix `[rows = out_features, cols = in_features]` and its scale.
#[derive(Clone, Debug)]
pub struct TernaryMatrix {
    rows: usize,
    cols: usize,
    /// Row-major codes in {-1, 0, 1}.
    codes: Vec<i8>,
    scale: WeightScale,
}

impl TernaryMatrix {
    /// Builds the matrix from row-major ternary codes.
    pub fn from_ternary(
        codes: &[i8],
        rows: usize,
        cols: usize,
        scale: WeightScale,
    ) -> Result<Self, QuantError> {
        if codes.len() != rows * cols {
            return Err(QuantError::Shape(format!(
                "{} ternary codes cannot form a [{rows}, {cols}] matrix",
                codes.len()
            )));
        }
        if let Some(bad) = codes.iter().find(|&&c| !(-1..=1).contains(&c)) {
            return Err(QuantError::Shape(format!("ternary code {bad} is not in {{-1, 0, 1}}")));
        }
        Ok(Self { rows, cols, codes: codes.to_vec(), scale })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn scale(&self) -> WeightScale {
        self.scale
    }
    /// Bytes the packed weights take in memory.
    pub fn bytes(&self) -> usize {
        self.codes.len()
    }

    /// The row-major ternary codes (for export and tests).
    pub fn to_ternary(&self) -> Vec<i8> {
        self.codes.clone()
    }

    /// Integer products `out[i * rows + r] = Σ_c x[i, c] · W[r, c]` for every token `i`.
    pub fn matmul_i32(&self, x: &QuantizedActivations, out: &mut [i32]) {
        assert_eq!(x.k(), self.cols, "activation width does not match the matrix");
        assert!(out.len() >= x.m() * self.rows, "output buffer too small");
        for i in 0..x.m() {
            reference_gemv_i32(
                &self.codes,
                self.rows,
                self.cols,
                x.row(i),
                &mut out[i * self.rows..(i + 1) * self.rows],
            );
        }
    }

    /// `out[i * rows + r] = scale(Σ_c x[i, c] · W[r, c], s_a[i])`: the BitLinear output.
    pub fn forward(&self, x: &QuantizedActivations, out: &mut [f32]) {
        assert_eq!(x.k(), self.cols, "activation width does not match the matrix");
        assert!(out.len() >= x.m() * self.rows, "output buffer too small");
        for i in 0..x.m() {
            let s_a = x.scale(i);
            let xr = x.row(i);
            for (r, y) in out[i * self.rows..(i + 1) * self.rows].iter_mut().enumerate() {
                let w = &self.codes[r * self.cols..(r + 1) * self.cols];
                *y = self.scale.apply(dot_i8(w, xr), s_a);
            }
        }
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
