//! Causal softmax attention with grouped-query heads (GQA).
//!
//! `scores = q·kᵀ · head_dim^-½` (future positions masked), `P = softmax(scores)`, `o = P·v`.
//! Query head `j` reads kv head `j / n_rep` (`repeat_kv` expands each kv head contiguously).
//! Work is split by (sequence, kv head): each task owns the query heads of its group, so the
//! backward's sums into `dk` and `dv` never race and always run in the same order.
//!
//! The products are tiled into blocks of `BLOCK` positions so that they cover only the causal
//! half: a block of queries meets the keys up to its last row, a block of keys the queries from
//! its first row on. What the tiles leave out is exactly zero (masked probabilities and their
//! gradients), so only the order of the float sums changes.

use rayon::prelude::*;

use crate::linalg::{matmul_strided, SharedConst, SharedMut, Strided};
use crate::real::{dot_lanes, max_lanes, sum_lanes, wide, Real};

/// Sizes of one attention call over a batch of `batch` sequences of `seq` tokens.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Positions per tile of the causal products.
const BLOCK: usize = 64;

/// The tiles `(start, end)` of `0..t`.
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(BLOCK).map(move |start| (start, (start + BLOCK).min(t)))
}

/// `rows` rows of `cols` from row `r` on, of a row-major matrix at `ptr` with row stride `rs`.
fn rows_at<T>(ptr: *const T, rs: usize, r: usize, rows: usize, cols: usize) -> Strided<T> {
    Strided { ptr: ptr.wrapping_add(r * rs), rows, cols, rs, transposed: false }
}

/// The transpose of `m`.
fn transposed<T>(m: Strided<T>) -> Strided<T> {
    Strided { transposed: true, ..m }
}

/// Writes the transpose of the `t × d` head at `src` (row stride `ld`) into `dst` (`[d, t]`).
/// `gemm` multiplies by a row-major `[d, t]` operand about 2.5× faster than by the transposed
/// view of the rows (`q·kᵀ`, `dO·vᵀ`), which it packs on every call: one transpose per kv head
/// serves both of its query heads and all their tiles.
///
/// # Safety
/// `src` must point at `t` readable rows of `d` values, `ld` apart.
unsafe fn transpose_kv_head<T: Real>(src: *const T, ld: usize, t: usize, d: usize, dst: &mut [T]) {
    assert_eq!(dst.len(), d * t);
    for j in 0..t {
        // SAFETY: row `j < t` holds `d` values (this function's contract).
        let row = unsafe { std::slice::from_raw_parts(src.add(j * ld), d) };
        for (c, &v) in row.iter().enumerate() {
            dst[c * t + j] = v;
        }
    }
}

/// Where q, k and v sit in the fused `[rows, ld]` projection output.
#[derive(Clone, Copy, Debug)]
pub struct QkvLayout {
    pub ld: usize,
    pub q: usize,
    pub k: usize,
    pub v: usize,
}

impl AttentionShape {
    fn n_rep(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
    /// Floats of the attention probabilities `[batch, n_heads, seq, seq]`.
    pub fn probs_len(&self) -> usize {
        self.batch * self.n_heads * self.seq * self.seq
    }
    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }
}

/// Forward. `qkv` holds the rotated q and k and v (layout `lay`); writes the probabilities
/// `probs` and the concatenated head outputs `out` (`[rows, n_heads·head_dim]`).
pub fn attention_forward<T: Real>(
    qkv: &[T],
    lay: QkvLayout,
    s: AttentionShape,
    probs: &mut [T],
    out: &mut [T],
) {
    let _t = crate::profile::section("attention_forward");
    let (t, d) = (s.seq, s.head_dim);
    let q_dim = s.n_heads * d;
    assert_eq!(qkv.len(), s.batch * t * lay.ld);
    assert_eq!(out.len(), s.batch * t * q_dim);
    assert_eq!(probs.len(), s.probs_len());
    let scale = T::from_f64(s.scale());
    let qkv_p = SharedConst(qkv.as_ptr());
    let probs_p = SharedMut(probs.as_mut_ptr());
    let out_p = SharedMut(out.as_mut_ptr());
    (0..s.batch * s.n_kv_heads).into_par_iter().for_each_init(
        || vec![T::ZERO; d * t],
        |k_t, unit| {
            let (b, g) = (unit / s.n_kv_heads, unit % s.n_kv_heads);
            let base = qkv_p.get().wrapping_add(b * t * lay.ld);
            // SAFETY: the kv head's rows of sequence b are inside `qkv`.
            unsafe { transpose_kv_head(base.add(lay.k + g * d), lay.ld, t, d, k_t) };
            for r in 0..s.n_rep() {
                let h = g * s.n_rep() + r;
                // SAFETY: task (b, g) reads rows of sequence b and writes only the probabilities of
                // its own heads and the output columns of those heads in rows of sequence b.
                unsafe {
                    let p = probs_p.get().add((b * s.n_heads + h) * t * t);
                    let (q, v) = (base.add(lay.q + h * d), base.add(lay.v + g * d));
                    // Query rows r0..r1 see keys 0..r1: their scores, softmax and P·v.
                    for (r0, r1) in blocks(t) {
                        let scores = p.add(r0 * t);
                        let q_rows = rows_at(q, lay.ld, r0, r1 - r0, d);
                        matmul_strided(scores, t, &q_rows, &rows_at(k_t.as_ptr(), t, 0, d, r1), false);
                        let pm = std::slice::from_raw_parts_mut(scores, (r1 - r0) * t);
                        wide(|| {
                            for (i, row) in (r0..r1).zip(pm.chunks_exact_mut(t)) {
                                causal_softmax_row(row, i, scale);
                            }
                        });
                        let p_rows = rows_at(scores as *const T, t, 0, r1 - r0, r1);
                        let o = out_p.get().add((b * t + r0) * q_dim + h * d);
                        matmul_strided(o, q_dim, &p_rows, &rows_at(v, lay.ld, 0, r1, d), false);
                    }
                }
            }
        },
    );
}

/// Scales the row of scores, masks the positions after `i` and applies the softmax in place.
/// Reads only `row[..=i]`; the rest need not have been written.
#[inline(always)]
fn causal_softmax_row<T: Real>(row: &mut [T], i: usize, scale: T) {
    let (live, future) = row.split_at_mut(i + 1);
    for v in live.iter_mut() {
        *v *= scale;
    }
    let max = max_lanes(live);
    for v in live.iter_mut() {
        *v -= max;
    }
    T::exp_in_place(live);
    let sum = sum_lanes(live);
    for v in live.iter_mut() {
        *v /= sum;
    }
    future.fill(T::ZERO);
}

/// Backward. With `dP = dO·vᵀ` and `dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale`:
/// `dq = dS·k`, `dk = Σ_heads dSᵀ·q`, `dv = Σ_heads Pᵀ·dO`, all WRITTEN into `d_qkv` (layout
/// `lay`, every element): each tile of dq is one product, and the first query head of a kv
/// group overwrites dk and dv, so the buffer needs no zeroing first.
pub fn attention_backward<T: Real>(
    qkv: &[T],
    lay: QkvLayout,
    s: AttentionShape,
    probs: &[T],
    d_out: &[T],
    d_qkv: &mut [T],
) {
    let _t = crate::profile::section("attention_backward");
    let (t, d) = (s.seq, s.head_dim);
    let q_dim = s.n_heads * d;
    assert_eq!(d_qkv.len(), qkv.len());
    assert_eq!(d_out.len(), s.batch * t * q_dim);
    let scale = T::from_f64(s.scale());
    let qkv_p = SharedConst(qkv.as_ptr());
    let probs_p = SharedConst(probs.as_ptr());
    let dout_p = SharedConst(d_out.as_ptr());
    let dqkv_p = SharedMut(d_qkv.as_mut_ptr());
    (0..s.batch * s.n_kv_heads).into_par_iter().for_each_init(
        || (vec![T::ZERO; t * t], vec![T::ZERO; d * t]),
        |(ds, v_t), unit| {
            let (b, g) = (unit / s.n_kv_heads, unit % s.n_kv_heads);
            // SAFETY: the kv head's rows of sequence b are inside `qkv`.
            unsafe { transpose_kv_head(qkv_p.get().add(b * t * lay.ld + lay.v + g * d), lay.ld, t, d, v_t) };
            for r in 0..s.n_rep() {
                let h = g * s.n_rep() + r;
                // SAFETY: task (b, g) writes dq of its own heads and dk, dv of its kv head, all in
                // rows of sequence b; every read is of data no task writes.
                unsafe {
                    let base = qkv_p.get().add(b * t * lay.ld);
                    let dbase = dqkv_p.get().add(b * t * lay.ld);
                    let p = probs_p.get().add((b * s.n_heads + h) * t * t);
                    let pm = std::slice::from_raw_parts(p, t * t);
                    let dout = dout_p.get().add(b * t * q_dim + h * d);
                    let (q, k) = (base.add(lay.q + h * d), base.add(lay.k + g * d));
                    // dP = dO·vᵀ, for query rows r0..r1 and keys 0..r1.
                    for (r0, r1) in blocks(t) {
                        let dout_rows = rows_at(dout, q_dim, r0, r1 - r0, d);
                        let v_t = rows_at(v_t.as_ptr(), t, 0, d, r1);
                        matmul_strided(ds.as_mut_ptr().add(r0 * t), t, &dout_rows, &v_t, false);
                    }
                    // dv += Pᵀ·dO, for keys c0..c1 and query rows c0..t.
                    for (c0, c1) in blocks(t) {
                        let p_t = transposed(rows_at(p.add(c0), t, c0, t - c0, c1 - c0));
                        let dv = dbase.add(c0 * lay.ld + lay.v + g * d);
                        matmul_strided(dv, lay.ld, &p_t, &rows_at(dout, q_dim, c0, t - c0, d), r > 0);
                    }
                    wide(|| {
                        for (i, (dsr, pr)) in ds.chunks_exact_mut(t).zip(pm.chunks_exact(t)).enumerate() {
                            let (live, future) = dsr.split_at_mut(i + 1);
                            let dot = dot_lanes(live, &pr[..=i]);
                            for (d, &p) in live.iter_mut().zip(pr) {
                                *d = p * (*d - dot) * scale;
                            }
                            future.fill(T::ZERO);
                        }
                    });
                    // dq += dS·k, for query rows r0..r1 and keys 0..r1.
                    for (r0, r1) in blocks(t) {
                        let ds_rows = rows_at(ds.as_ptr(), t, r0, r1 - r0, r1);
                        let dq = dbase.add(r0 * lay.ld + lay.q + h * d);
                        matmul_strided(dq, lay.ld, &ds_rows, &rows_at(k, lay.ld, 0, r1, d), false);
                    }
                    // dk += dSᵀ·q, for keys c0..c1 and query rows c0..t.
                    for (c0, c1) in blocks(t) {
                        let ds_t = transposed(rows_at(ds.as_ptr().add(c0), t, c0, t - c0, c1 - c0));
                        let dk = dbase.add(c0 * lay.ld + lay.k + g * d);
                        matmul_strided(dk, lay.ld, &ds_t, &rows_at(q, lay.ld, c0, t - c0, d), r > 0);
                    }
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Forward and backward in plain loops over the full `t × t` scores, masked afterwards:
    /// `(probs, out, d_qkv)`.
    fn naive(
        qkv: &[f64],
        lay: QkvLayout,
        s: AttentionShape,
        d_out: &[f64],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (t, d, scale) = (s.seq, s.head_dim, s.scale());
        let q_dim = s.n_heads * d;
        let mut probs = vec![0.0; s.probs_len()];
        let mut out = vec![0.0; s.batch * t * q_dim];
        let mut d_qkv = vec![0.0; qkv.len()];
        let at = |b: usize, i: usize, col: usize| qkv[(b * t + i) * lay.ld + col];
        for b in 0..s.batch {
            for h in 0..s.n_heads {
                let g = h / s.n_rep();
                let (qc, kc, vc) = (lay.q + h * d, lay.k + g * d, lay.v + g * d);
                let p = &mut probs[(b * s.n_heads + h) * t * t..][..t * t];
                for i in 0..t {
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| (0..d).map(|e| at(b, i, qc + e) * at(b, j, kc + e)).sum::<f64>() * scale)
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let sum: f64 = scores.iter().map(|&x| (x - max).exp()).sum();
                    for (j, &x) in scores.iter().enumerate() {
                        p[i * t + j] = (x - max).exp() / sum;
                    }
                    for e in 0..d {
                        out[(b * t + i) * q_dim + h * d + e] =
                            (0..=i).map(|j| p[i * t + j] * at(b, j, vc + e)).sum();
                    }
                }
                for i in 0..t {
                    let d_o = &d_out[(b * t + i) * q_dim + h * d..][..d];
                    let dp: Vec<f64> =
                        (0..t).map(|j| (0..d).map(|e| d_o[e] * at(b, j, vc + e)).sum()).collect();
                    let dot: f64 = (0..t).map(|j| dp[j] * p[i * t + j]).sum();
                    for j in 0..t {
                        let ds = p[i * t + j] * (dp[j] - dot) * scale;
                        for e in 0..d {
                            d_qkv[(b * t + i) * lay.ld + qc + e] += ds * at(b, j, kc + e);
                            d_qkv[(b * t + j) * lay.ld + kc + e] += ds * at(b, i, qc + e);
                            d_qkv[(b * t + j) * lay.ld + vc + e] += p[i * t + j] * d_o[e];
                        }
                    }
                }
            }
        }
        (probs, out, d_qkv)
    }

    #[test]
    fn tiled_products_equal_the_full_masked_ones() {
        let mut rng = Rng::new(11, 0);
        // One tile, a whole number of tiles, and a partial last tile.
        for seq in [5, 2 * BLOCK, 2 * BLOCK + 22] {
            let s = AttentionShape { batch: 2, seq, n_heads: 4, n_kv_heads: 2, head_dim: 8 };
            let (qd, kvd) = (32, 16);
            let lay = QkvLayout { ld: qd + 2 * kvd, q: 0, k: qd, v: qd + kvd };
            let qkv: Vec<f64> = (0..s.batch * seq * lay.ld).map(|_| rng.normal()).collect();
            let d_out: Vec<f64> = (0..s.batch * seq * qd).map(|_| rng.normal()).collect();
            let mut probs = vec![f64::NAN; s.probs_len()];
            let mut out = vec![0.0; s.batch * seq * qd];
            attention_forward(&qkv, lay, s, &mut probs, &mut out);
            // NaN first: the backward must write every element, not add to it.
            let mut d_qkv = vec![f64::NAN; qkv.len()];
            attention_backward(&qkv, lay, s, &probs, &d_out, &mut d_qkv);
            let (want_probs, want_out, want_d) = naive(&qkv, lay, s, &d_out);
            let close =
                |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-12 * (1.0 + y.abs()));
            assert!(close(&probs, &want_probs), "probabilities, seq {seq}");
            assert!(close(&out, &want_out), "outputs, seq {seq}");
            assert!(close(&d_qkv, &want_d), "gradients, seq {seq}");
        }
    }
}
