//! The output head (a plain float linear, never quantized; tied to the embedding when the
//! config says so) and the mean cross-entropy over all tokens.

use rayon::prelude::*;

use crate::linalg::{matmul, Operand, ROW_CHUNK};
use crate::real::{max_lanes, sum_lanes, Real};

/// `logits = x · headᵀ` for `x` `[rows, hidden]` and `head` `[vocab, hidden]`.
pub fn head_forward<T: Real>(
    x: &[T],
    head: &[T],
    rows: usize,
    hidden: usize,
    vocab: usize,
    logits: &mut [T],
) {
    let _t = crate::profile::section("head_forward");
    matmul(logits, Operand::n(x, rows, hidden), Operand::t(head, vocab, hidden), false, true);
}

/// `head_t = headᵀ` (`[hidden, vocab]`), in parallel. The training step multiplies by the head
/// in this form: `gemm` runs `x · head_t` about 7 % faster than `x · headᵀ` read through the
/// transposed view, and `dhead_t += xᵀ · dlogits` about 10 % faster than `dhead += dlogitsᵀ · x`.
pub fn transpose_head<T: Real>(head: &[T], vocab: usize, hidden: usize, head_t: &mut [T]) {
    assert!(head.len() == vocab * hidden && head_t.len() == vocab * hidden, "transpose_head shapes");
    head_t.par_chunks_mut(vocab).enumerate().for_each(|(c, row)| {
        for (v, o) in row.iter_mut().enumerate() {
            *o = head[v * hidden + c];
        }
    });
}

/// [`head_forward`] from the transposed head (`head_t`, `[hidden, vocab]`): the same logits.
pub fn head_forward_t<T: Real>(
    x: &[T],
    head_t: &[T],
    rows: usize,
    hidden: usize,
    vocab: usize,
    logits: &mut [T],
) {
    let _t = crate::profile::section("head_forward");
    matmul(logits, Operand::n(x, rows, hidden), Operand::n(head_t, hidden, vocab), false, true);
}

/// [`head_backward`] with the head's gradient kept transposed: writes `dx = dlogits · head` and
/// sets (or, if `accumulate`, adds to) `dhead_t = xᵀ · dlogits` (`[hidden, vocab]`); the caller
/// adds it into the head's gradient with [`add_transposed`] once all chunks are in.
#[allow(clippy::too_many_arguments)]
pub fn head_backward_t<T: Real>(
    x: &[T],
    head: &[T],
    dlogits: &[T],
    rows: usize,
    hidden: usize,
    vocab: usize,
    dx: &mut [T],
    dhead_t: &mut [T],
    accumulate: bool,
) {
    let _t = crate::profile::section("head_backward");
    matmul(dx, Operand::n(dlogits, rows, vocab), Operand::n(head, vocab, hidden), false, true);
    matmul(dhead_t, Operand::t(x, rows, hidden), Operand::n(dlogits, rows, vocab), accumulate, true);
}

/// `dhead += dhead_tᵀ` (`dhead` `[vocab, hidden]`), in parallel.
pub fn add_transposed<T: Real>(dhead: &mut [T], dhead_t: &[T], vocab: usize, hidden: usize) {
    assert!(dhead.len() == vocab * hidden && dhead_t.len() == vocab * hidden, "add_transposed shapes");
    dhead.par_chunks_mut(hidden * ROW_CHUNK).enumerate().for_each(|(chunk, rows)| {
        for (i, row) in rows.chunks_exact_mut(hidden).enumerate() {
            let v = chunk * ROW_CHUNK + i;
            for (c, o) in row.iter_mut().enumerate() {
                *o += dhead_t[c * vocab + v];
            }
        }
    });
}

/// Turns `logits` into softmax probabilities in place and returns the SUM over rows of
/// `logsumexp(row) − row[target]` (accumulated in f64, in row order).
pub fn softmax_cross_entropy<T: Real>(logits: &mut [T], targets: &[u32], vocab: usize) -> f64 {
    let _t = crate::profile::section("softmax_cross_entropy");
    cross_entropy_rows(logits, targets, vocab, |row, _, sum| {
        for v in row.iter_mut() {
            *v /= sum;
        }
    })
}

/// [`softmax_cross_entropy`] that leaves the gradient of `scale · Σ_rows CE` instead of the
/// probabilities: `dlogits = (P − onehot) · scale`, in the same pass that normalizes.
pub fn softmax_cross_entropy_grad<T: Real>(logits: &mut [T], targets: &[u32], vocab: usize, scale: T) -> f64 {
    let _t = crate::profile::section("softmax_cross_entropy");
    cross_entropy_rows(logits, targets, vocab, |row, target, sum| {
        let at_target = (row[target] / sum - T::ONE) * scale;
        for v in row.iter_mut() {
            *v = *v / sum * scale;
        }
        row[target] = at_target;
    })
}

/// The per-row work of the two above: `finish(row, target, sum)` gets `exp(row − max)` and its
/// sum. Returns the summed losses.
fn cross_entropy_rows<T: Real>(
    logits: &mut [T],
    targets: &[u32],
    vocab: usize,
    finish: impl Fn(&mut [T], usize, T) + Sync,
) -> f64 {
    let mut losses = vec![0.0f64; targets.len()];
    logits
        .par_chunks_mut(vocab * ROW_CHUNK)
        .zip(targets.par_chunks(ROW_CHUNK))
        .zip(losses.par_chunks_mut(ROW_CHUNK))
        .for_each(|((lc, tc), oc)| {
            for ((row, &target), out) in lc.chunks_exact_mut(vocab).zip(tc).zip(oc) {
                let max = max_lanes(row);
                let target_logit = row[target as usize];
                for v in row.iter_mut() {
                    *v -= max;
                }
                T::exp_in_place(row);
                let sum = sum_lanes(row);
                *out = (sum.ln() + max - target_logit).to_f64();
                finish(row, target as usize, sum);
            }
        });
    losses.iter().sum()
}

/// Backward through the head, from `dlogits` (what [`softmax_cross_entropy_grad`] leaves):
/// writes `dx = dlogits · head` and adds `dhead += dlogitsᵀ · x`.
#[allow(clippy::too_many_arguments)]
pub fn head_backward<T: Real>(
    x: &[T],
    head: &[T],
    dlogits: &[T],
    rows: usize,
    hidden: usize,
    vocab: usize,
    dx: &mut [T],
    dhead: &mut [T],
) {
    let _t = crate::profile::section("head_backward");
    matmul(dx, Operand::n(dlogits, rows, vocab), Operand::n(head, vocab, hidden), false, true);
    matmul(dhead, Operand::t(dlogits, rows, vocab), Operand::n(x, rows, hidden), true, true);
}
