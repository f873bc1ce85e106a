//! Rotary position embedding, NeoX half-split style (`rotate_half`):
//! `y = x·cos + cat(−x₂, x₁)·sin` with `x₁, x₂` the two halves of a head.

use rayon::prelude::*;

use crate::linalg::ROW_CHUNK;
use crate::real::{wide, Real};

/// cos and sin for every position and frequency, `[max_pos, head_dim/2]`.
/// Computed in f32 as transformers does (`inv_freq` and the angles in float32), then widened.
#[derive(Clone, Debug)]
pub struct RopeTable<T> {
    pub half: usize,
    pub max_pos: usize,
    cos: Vec<T>,
    sin: Vec<T>,
}

impl<T: Real> RopeTable<T> {
    pub fn new(head_dim: usize, max_pos: usize, theta: f32) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for &f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(T::from_f64(angle.cos() as f64));
                sin.push(T::from_f64(angle.sin() as f64));
            }
        }
        Self { half, max_pos, cos, sin }
    }
}

/// Where the heads sit in a row: `n_heads` heads of `head_dim` starting at column `offset` of
/// rows `ld` wide.
#[derive(Clone, Copy, Debug)]
pub struct HeadsView {
    pub ld: usize,
    pub offset: usize,
    pub n_heads: usize,
}

/// Rotates the heads of every row in place; row `i` is at position `i % seq_len`.
pub fn rope_forward<T: Real>(x: &mut [T], view: HeadsView, seq_len: usize, table: &RopeTable<T>) {
    rotate(x, view, seq_len, table, false);
}

/// Backward of [`rope_forward`], in place on the gradient: the rotation by `−angle`.
/// `dx₁ = dy₁·cos + dy₂·sin`, `dx₂ = dy₂·cos − dy₁·sin`.
pub fn rope_backward<T: Real>(dx: &mut [T], view: HeadsView, seq_len: usize, table: &RopeTable<T>) {
    rotate(dx, view, seq_len, table, true);
}

fn rotate<T: Real>(x: &mut [T], view: HeadsView, seq_len: usize, table: &RopeTable<T>, inverse: bool) {
    let _t = crate::profile::section("rope");
    let half = table.half;
    assert!(seq_len <= table.max_pos, "sequence longer than the RoPE table");
    // The inverse rotation is the rotation by −angle: sin times −1, which is exact.
    let sign = if inverse { -T::ONE } else { T::ONE };
    x.par_chunks_mut(view.ld * ROW_CHUNK).enumerate().for_each(|(chunk, xc)| {
        wide(|| {
            for (r, row) in xc.chunks_exact_mut(view.ld).enumerate() {
                let pos = (chunk * ROW_CHUNK + r) % seq_len;
                let cos = &table.cos[pos * half..(pos + 1) * half];
                let sin = &table.sin[pos * half..(pos + 1) * half];
                let heads = &mut row[view.offset..view.offset + view.n_heads * 2 * half];
                for head in heads.chunks_exact_mut(2 * half) {
                    let (x1, x2) = head.split_at_mut(half);
                    for (((a, b), &c), &s) in x1.iter_mut().zip(x2.iter_mut()).zip(cos).zip(sin) {
                        let (xa, xb, s) = (*a, *b, s * sign);
                        *a = xa * c - xb * s;
                        *b = xb * c + xa * s;
                    }
                }
            }
        })
    });
}
