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
