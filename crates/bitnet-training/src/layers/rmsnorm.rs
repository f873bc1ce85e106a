//! RMSNorm: `y = w ⊙ x / sqrt(mean(x²) + eps)` per token (no bias, no `1 + w` offset).

use rayon::prelude::*;

use crate::linalg::ROW_CHUNK;
use crate::real::{dot_lanes, lanes, Real};

/// Normalizes each row of `x` (`[rows, width]`) into `y`; keeps `rstd = 1/sqrt(mean(x²)+eps)`.
pub fn rmsnorm_forward<T: Real>(x: &[T], w: &[T], eps: T, y: &mut [T], rstd: &mut [T]) {
    let _t = crate::profile::section("rmsnorm_forward");
    let width = w.len();
    y.par_chunks_mut(width * ROW_CHUNK)
        .zip(x.par_chunks(width * ROW_CHUNK))
        .zip(rstd.par_chunks_mut(ROW_CHUNK))
        .for_each(|((yc, xc), rc)| {
            for ((yr, xr), r) in yc.chunks_exact_mut(width).zip(xc.chunks_exact(width)).zip(rc) {
                *r = rmsnorm_row(xr, w, eps, yr);
            }
        });
}

/// One token of [`rmsnorm_forward`]: writes `y` and returns `rstd`.
#[inline(always)]
pub fn rmsnorm_row<T: Real>(x: &[T], w: &[T], eps: T, y: &mut [T]) -> T {
    let ms = dot_lanes(x, x) / T::from_f64(w.len() as f64);
    let rstd = (ms + eps).sqrt().recip();
    for ((o, &v), &g) in y.iter_mut().zip(x).zip(w) {
        *o = g * (v * rstd);
    }
    rstd
}

/// Backward of [`rmsnorm_forward`]. With `x̂ = x·rstd` and `g = w ⊙ dy`:
/// `dx (+)= rstd · (g − x̂ · mean(g ⊙ x̂))` (added to `dx` if `add_dx`, the residual stream's
/// gradient; else written, so that a fresh buffer needs no zeroing), `dw += Σ_rows dy ⊙ x̂`.
///
/// One pass over the rows does both (the pass is bound by memory): each chunk of [`ROW_CHUNK`]
/// rows sums its share of `dw` in row order, and the shares are added in chunk order, so the
/// sum's order does not depend on the thread count.
pub fn rmsnorm_backward<T: Real>(
    x: &[T],
    w: &[T],
    rstd: &[T],
    dy: &[T],
    dx: &mut [T],
    add_dx: bool,
    dw: &mut [T],
) {
    let _t = crate::profile::section("rmsnorm_backward");
    let width = w.len();
    let shares: Vec<Vec<T>> = dx
        .par_chunks_mut(width * ROW_CHUNK)
        .zip(x.par_chunks(width * ROW_CHUNK))
        .zip(dy.par_chunks(width * ROW_CHUNK))
        .zip(rstd.par_chunks(ROW_CHUNK))
        .map(|(((dxc, xc), dyc), rc)| {
            let mut share = vec![T::ZERO; width];
            for (((dxr, xr), dyr), &r) in
                dxc.chunks_exact_mut(width).zip(xc.chunks_exact(width)).zip(dyc.chunks_exact(width)).zip(rc)
            {
                let (xr, dyr, w) = (&xr[..width], &dyr[..width], &w[..width]);
                let dot = lanes(width, |j| w[j] * dyr[j] * xr[j] * r);
                let mean = dot / T::from_f64(width as f64);
                for ((((o, s), &v), &d), &g) in dxr.iter_mut().zip(share.iter_mut()).zip(xr).zip(dyr).zip(w) {
                    let dxv = r * (g * d - v * r * mean);
                    *o = if add_dx { *o + dxv } else { dxv };
                    *s += d * v * r;
                }
            }
            share
        })
        .collect();
    for share in shares {
        for (o, v) in dw.iter_mut().zip(share) {
            *o += v;
        }
    }
}
