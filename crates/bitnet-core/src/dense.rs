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
            DenseData::Bf16(v) => out.iter_mut().zip(&v[range]).for_each(|(o, &w)| *o = bf16_to_f32(w)),
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
    /// Threads split the weight rows, and each task runs every token over its rows, so the
    /// weights are read once per call however many tokens there are (a batch of decoded
    /// sequences); each value is the same dot product whatever the number of tokens. Nothing is
    /// allocated.
    pub fn matmul(&self, x: &[f32], tokens: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(x.len() >= tokens * cols && out.len() >= tokens * rows);
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c");
        let dot = |r: usize, xt: &[f32]| -> f32 {
            let range = r * cols..(r + 1) * cols;
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                match &self.data {
                    // SAFETY: avx2, fma and f16c were detected at run time.
                    DenseData::Bf16(v) => return unsafe { avx2::dot_bf16(&v[range], xt) },
                    // SAFETY: as above.
                    DenseData::F16(v) => return unsafe { avx2::dot_f16(&v[range], xt) },
                    DenseData::F32(_) => {}
                }
            }
            match &self.data {
                DenseData::F32(v) => dot_f32(&v[range], xt),
                DenseData::Bf16(v) => dot_widen(&v[range], xt, bf16_to_f32),
                DenseData::F16(v) => dot_widen(&v[range], xt, |w| w.to_f32()),
            }
        };
        let out_ptr = SharedRows(out.as_mut_ptr());
        let row_block = |b: usize| {
            let r0 = b * ROWS_PER_TASK;
            let r1 = (r0 + ROWS_PER_TASK).min(rows);
            for t in 0..tokens {
                let xt = &x[t * cols..(t + 1) * cols];
                // SAFETY: out holds tokens × rows values (asserted above); this task alone
                // writes rows r0..r1 of each token.
                let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(t * rows + r0), r1 - r0) };
                for (i, y) in o.iter_mut().enumerate() {
                    *y = dot(r0 + i, xt);
                }
            }
        };
        let blocks = rows.div_ceil(ROWS_PER_TASK);
        if crate::threads::parallel_threads() == 1 {
            (0..blocks).for_each(row_block);
        } else {
            (0..blocks).into_par_iter().for_each(row_block);
        }
    }
}

/// The output of [`DenseMatrix::matmul`], written by tasks at disjoint rows.
struct SharedRows(*mut f32);
// SAFETY: tasks write disjoint rows through it (see `DenseMatrix::matmul`).
unsafe impl Sync for SharedRows {}
unsafe impl Send for SharedRows {}

impl SharedRows {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// bf16 → f32 is a shift of the bits (NaN payloads included), which vectorizes; `half`'s
/// conversion checks for NaN first and does not.
#[inline(always)]
fn bf16_to_f32(w: bf16) -> f32 {
    f32::from_bits((w.to_bits() as u32) << 16)
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    /// bf16 · f32 dot product: widen 8 bf16 by a 16-bit shift, fused multiply-add into four
    /// accumulators to hide the FMA latency.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(a: &[bf16], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr() as *const u16, b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let off = i + 8 * j;
                // SAFETY: off + 8 <= n, inside both slices.
                let w16 = unsafe { _mm_loadu_si128(pa.add(off) as *const __m128i) };
                let w = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w16), 16));
                let x = unsafe { _mm256_loadu_ps(pb.add(off)) };
                *acc = _mm256_fmadd_ps(w, x, *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            let w16 = unsafe { _mm_loadu_si128(pa.add(i) as *const __m128i) };
            let w = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w16), 16));
            acc[0] = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(pb.add(i)) }, acc[0]);
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0.0f32; 8];
        // SAFETY: lanes holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        let mut s: f32 = lanes.iter().sum();
        for k in i..n {
            s += f32::from_bits((a[k].to_bits() as u32) << 16) * b[k];
        }
        s
    }

    /// f16 · f32 dot product: widen 8 f16 with `vcvtph2ps`, then as [`dot_bf16`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr() as *const u16, b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut i = 0;
        while i + 16 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let off = i + 8 * j;
                // SAFETY: off + 8 <= n, inside both slices.
                let w = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(pa.add(off) as *const __m128i) });
                *acc = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(pb.add(off)) }, *acc);
            }
            i += 16;
        }
        let sum = _mm256_add_ps(acc[0], acc[1]);
        let mut lanes = [0.0f32; 8];
        // SAFETY: lanes holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        let mut s: f32 = lanes.iter().sum();
        for k in i..n {
            s += a[k].to_f32() * b[k];
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn bf16_matmul_matches_the_plain_loop_on_ragged_shapes() {
        for &(rows, cols) in &[(1, 1), (3, 7), (5, 33), (300, 130), (17, 2560)] {
            let w: Vec<bf16> =
                (0..rows * cols).map(|i| bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 25.0)).collect();
            let x: Vec<f32> = (0..2 * cols).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
            let m = DenseMatrix { rows, cols, data: DenseData::Bf16(w.clone()) };
            let mut out = vec![0.0; 2 * rows];
            m.matmul(&x, 2, &mut out);
            let h = DenseMatrix {
                rows,
                cols,
                data: DenseData::F16(w.iter().map(|v| f16::from_f32(v.to_f32())).collect()),
            };
            let mut out16 = vec![0.0; 2 * rows];
            h.matmul(&x, 2, &mut out16);
            for (a, b) in out.iter().zip(&out16) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "f16 path: {a} vs {b}");
            }
            // A token's logits do not depend on the other tokens of the call (batch exactness).
            for (t, xt) in x.chunks_exact(cols).enumerate() {
                let mut alone = vec![0.0; rows];
                m.matmul(xt, 1, &mut alone);
                assert_eq!(alone, out[t * rows..(t + 1) * rows], "[{rows}x{cols}] token {t} alone");
            }
            for t in 0..2 {
                for r in 0..rows {
                    let want: f64 =
                        (0..cols).map(|c| w[r * cols + c].to_f64() * x[t * cols + c] as f64).sum();
                    let got = out[t * rows + r] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "[{rows}x{cols}] t{t} r{r}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
