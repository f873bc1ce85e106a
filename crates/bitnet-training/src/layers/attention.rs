//! Causal softmax attention with grouped-query heads (GQA).
//!
//! `scores = q·kᵀ · head_dim^-½` (future positions masked), `P = softmax(scores)`, `o = P·v`.
//! Query head `j` reads kv head `j / n_rep` (`repeat_kv` expands each kv head contiguously).
//! Work is split by (sequence, kv head): each task owns the query heads of its group, so the
//! backward's sums into `dk` and `dv` never race and always run in the same order.

use rayon::prelude::*;

use crate::linalg::{matmul_strided, SharedConst, SharedMut, Strided};
use crate::real::Real;

/// Sizes of one attention call over a batch of `batch` sequences of `seq` tokens.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
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
    let (t, d) = (s.seq, s.head_dim);
    let q_dim = s.n_heads * d;
    assert_eq!(qkv.len(), s.batch * t * lay.ld);
    assert_eq!(out.len(), s.batch * t * q_dim);
    assert_eq!(probs.len(), s.probs_len());
    let scale = T::from_f64(s.scale());
    let qkv_p = SharedConst(qkv.as_ptr());
    let probs_p = SharedMut(probs.as_mut_ptr());
    let out_p = SharedMut(out.as_mut_ptr());
    (0..s.batch * s.n_kv_heads).into_par_iter().for_each(|unit| {
        let (b, g) = (unit / s.n_kv_heads, unit % s.n_kv_heads);
        let base = qkv_p.get().wrapping_add(b * t * lay.ld);
        for r in 0..s.n_rep() {
            let h = g * s.n_rep() + r;
            // SAFETY: task (b, g) reads rows of sequence b and writes only the probabilities of
            // its own heads and the output columns of those heads in rows of sequence b.
            unsafe {
                let p = probs_p.get().add((b * s.n_heads + h) * t * t);
                let q =
                    Strided { ptr: base.add(lay.q + h * d), rows: t, cols: d, rs: lay.ld, transposed: false };
                let k =
                    Strided { ptr: base.add(lay.k + g * d), rows: t, cols: d, rs: lay.ld, transposed: true };
                matmul_strided(p, t, &q, &k, false);
                let pm = std::slice::from_raw_parts_mut(p, t * t);
                for (i, row) in pm.chunks_exact_mut(t).enumerate() {
                    causal_softmax_row(row, i, scale);
                }
                let v =
                    Strided { ptr: base.add(lay.v + g * d), rows: t, cols: d, rs: lay.ld, transposed: false };
                let pv = Strided { ptr: p as *const T, rows: t, cols: t, rs: t, transposed: false };
                matmul_strided(out_p.get().add(b * t * q_dim + h * d), q_dim, &pv, &v, false);
            }
        }
    });
}

/// Scales the row of scores, masks the positions after `i` and applies the softmax in place.
fn causal_softmax_row<T: Real>(row: &mut [T], i: usize, scale: T) {
    let (live, future) = row.split_at_mut(i + 1);
    let mut max = live[0] * scale;
    for v in live.iter_mut() {
        *v *= scale;
        if *v > max {
            max = *v;
        }
    }
    let mut sum = T::ZERO;
    for v in live.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in live.iter_mut() {
        *v /= sum;
    }
    future.fill(T::ZERO);
}

/// Backward. With `dP = dO·vᵀ` and `dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale`:
/// `dq += dS·k`, `dk += dSᵀ·q`, `dv += Pᵀ·dO`, all into `d_qkv` (layout `lay`).
pub fn attention_backward<T: Real>(
    qkv: &[T],
    lay: QkvLayout,
    s: AttentionShape,
    probs: &[T],
    d_out: &[T],
    d_qkv: &mut [T],
) {
    let (t, d) = (s.seq, s.head_dim);
    let q_dim = s.n_heads * d;
    assert_eq!(d_qkv.len(), qkv.len());
    assert_eq!(d_out.len(), s.batch * t * q_dim);
    let scale = T::from_f64(s.scale());
    let qkv_p = SharedConst(qkv.as_ptr());
    let probs_p = SharedConst(probs.as_ptr());
    let dout_p = SharedConst(d_out.as_ptr());
    let dqkv_p = SharedMut(d_qkv.as_mut_ptr());
    (0..s.batch * s.n_kv_heads).into_par_iter().for_each(|unit| {
        let (b, g) = (unit / s.n_kv_heads, unit % s.n_kv_heads);
        let mut ds = vec![T::ZERO; t * t];
        for r in 0..s.n_rep() {
            let h = g * s.n_rep() + r;
            // SAFETY: task (b, g) writes dq of its own heads and dk, dv of its kv head, all in
            // rows of sequence b; every read is of data no task writes.
            unsafe {
                let base = qkv_p.get().add(b * t * lay.ld);
                let dbase = dqkv_p.get().add(b * t * lay.ld);
                let p = probs_p.get().add((b * s.n_heads + h) * t * t);
                let pm = std::slice::from_raw_parts(p, t * t);
                let dout = Strided {
                    ptr: dout_p.get().add(b * t * q_dim + h * d),
                    rows: t,
                    cols: d,
                    rs: q_dim,
                    transposed: false,
                };
                let v_t =
                    Strided { ptr: base.add(lay.v + g * d), rows: t, cols: d, rs: lay.ld, transposed: true };
                matmul_strided(ds.as_mut_ptr(), t, &dout, &v_t, false);
                let p_t = Strided { ptr: p, rows: t, cols: t, rs: t, transposed: true };
                matmul_strided(dbase.add(lay.v + g * d), lay.ld, &p_t, &dout, true);
                for (i, (dsr, pr)) in ds.chunks_exact_mut(t).zip(pm.chunks_exact(t)).enumerate() {
                    let dot = dsr[..=i].iter().zip(&pr[..=i]).map(|(&a, &b)| a * b).sum::<T>();
                    for j in 0..=i {
                        dsr[j] = pr[j] * (dsr[j] - dot) * scale;
                    }
                    dsr[i + 1..].fill(T::ZERO);
                }
                let dsv = Strided { ptr: ds.as_ptr(), rows: t, cols: t, rs: t, transposed: false };
                let k =
                    Strided { ptr: base.add(lay.k + g * d), rows: t, cols: d, rs: lay.ld, transposed: false };
                matmul_strided(dbase.add(lay.q + h * d), lay.ld, &dsv, &k, true);
                let ds_t = Strided { ptr: ds.as_ptr(), rows: t, cols: t, rs: t, transposed: true };
                let q =
                    Strided { ptr: base.add(lay.q + h * d), rows: t, cols: d, rs: lay.ld, transposed: false };
                matmul_strided(dbase.add(lay.k + g * d), lay.ld, &ds_t, &q, true);
            }
        }
    });
}
