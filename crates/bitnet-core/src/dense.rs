//! Row-major float matrices kept in the dtype they were stored in (embeddings, lm_head).
//!
//! bf16 and f16 widen to f32 exactly, so computing from the narrow copy gives the same
//! numbers as widening the whole matrix first, at half the memory traffic.

use half::{bf16, f16};
use rayon::prelude::*;

#[derive(Clone, Debug)]
pub enum DenseData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// A `[rows, cols]` float matrix.
#[derive(Clone, Debug)]
pub struct DenseMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: DenseData,
}

/// Rows per parallel task in the matrix-vector product: big enough to amortize scheduling.
const ROWS_PER_TASK: usize = 256;

impl DenseMatrix {
    pub fn bytes(&self) -> usize {
        match &self.data {
            DenseData::F32(v) => v.len() * 4,
            DenseData::Bf16(v) => v.len() * 2,
            DenseData::F16(v) => v.len() * 2,
        }
    }

    /// Writes row `r` widened to f32 into `out` (`cols` long).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            DenseData::F32(v) => out.copy_from_slice(&v[range]),
            DenseData::Bf16(v) => out.iter_mut().zip(&v[range]).for_each(|(o, w)| *o = w.to_f32()),
            DenseData::F16(v) => out.iter_mut().zip(&v[range]).for_each(|(o, w)| *o = w.to_f32()),
        }
    }

    /// The whole matrix widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.row_f32(r, row);
        }
        out
    }

    /// `out[t, r] = Σ_c x[t, c] · W[r, c]` for `tokens` rows of `x`: a float linear layer.
    /// Threads split the weight rows; nothing is allocated.
    pub fn matmul(&self, x: &[f32], tokens: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(x.len() >= tokens * cols && out.len() >= tokens * rows);
        for t in 0..tokens {
            let xt = &x[t * cols..(t + 1) * cols];
            out[t * rows..(t + 1) * rows].par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(b, o)| {
                let r0 = b * ROWS_PER_TASK;
                for (i, y) in o.iter_mut().enumerate() {
                    let range = (r0 + i) * cols..(r0 + i + 1) * cols;
                    *y = match &self.data {
                        DenseData::F32(v) => dot_f32(&v[range], xt),
                        DenseData::Bf16(v) => dot_widen(&v[range], xt, |w| w.to_f32()),
                        DenseData::F16(v) => dot_widen(&v[range], xt, |w| w.to_f32()),
                    };
                }
            });
        }
    }
}

/// Dot product of a narrow-float row and an f32 vector, widening on the fly.
#[inline]
fn dot_widen<T: Copy>(a: &[T], b: &[f32], widen: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for j in 0..8 {
            acc[j] += widen(a[i * 8 + j]) * b[i * 8 + j];
        }
    }
    let mut s = 0.0f32;
    for i in chunks * 8..a.len() {
        s += widen(a[i]) * b[i];
    }
    acc.iter().sum::<f32>() + s
}

/// f32 dot product with eight partial sums, so the compiler vectorizes it.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for j in 0..8 {
            acc[j] += a[i * 8 + j] * b[i * 8 + j];
        }
    }
    let mut s = 0.0f32;
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    acc.iter().sum::<f32>() + s
}
