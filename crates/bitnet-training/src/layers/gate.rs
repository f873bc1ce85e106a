//! The gated MLP's nonlinearity: `m = act(gate) ⊙ up` with `act` = ReLU² (BitNet) or SiLU (LLaMA).

use bitnet_models::Activation;
use rayon::prelude::*;

use crate::linalg::ROW_CHUNK;
use crate::real::Real;

#[inline]
fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// `act(g)` and `act'(g)`.
#[inline]
fn act_and_slope<T: Real>(act: Activation, g: T) -> (T, T) {
    match act {
        // relu2 = square(relu(x)): slope 2·relu(x)
        Activation::Relu2 => {
            let r = g.max(T::ZERO);
            (r * r, T::from_f64(2.0) * r)
        }
        Activation::Silu => {
            let s = sigmoid(g);
            (g * s, s * (T::ONE + g * (T::ONE - s)))
        }
    }
}

/// `gate_up` holds `[rows, 2·width]`: the gate in the first `width` columns, up in the rest.
/// Writes `m = act(gate) ⊙ up` (`[rows, width]`).
pub fn gate_forward<T: Real>(act: Activation, gate_up: &[T], width: usize, m: &mut [T]) {
    m.par_chunks_mut(width * ROW_CHUNK).zip(gate_up.par_chunks(2 * width * ROW_CHUNK)).for_each(
        |(mc, gc)| {
            for (mr, gr) in mc.chunks_exact_mut(width).zip(gc.chunks_exact(2 * width)) {
                let (g, u) = gr.split_at(width);
                for ((o, &gi), &ui) in mr.iter_mut().zip(g).zip(u) {
                    *o = act_and_slope(act, gi).0 * ui;
                }
            }
        },
    );
}

/// Backward of [`gate_forward`]: `dgate += dm ⊙ up ⊙ act'(gate)`, `dup += dm ⊙ act(gate)`,
/// both into `d_gate_up` (`[rows, 2·width]`).
pub fn gate_backward<T: Real>(act: Activation, gate_up: &[T], dm: &[T], width: usize, d_gate_up: &mut [T]) {
    d_gate_up
        .par_chunks_mut(2 * width * ROW_CHUNK)
        .zip(gate_up.par_chunks(2 * width * ROW_CHUNK))
        .zip(dm.par_chunks(width * ROW_CHUNK))
        .for_each(|((dc, gc), dmc)| {
            for ((dr, gr), dmr) in
                dc.chunks_exact_mut(2 * width).zip(gc.chunks_exact(2 * width)).zip(dmc.chunks_exact(width))
            {
                let (g, u) = gr.split_at(width);
                let (dg, du) = dr.split_at_mut(width);
                for i in 0..width {
                    let (a, slope) = act_and_slope(act, g[i]);
                    dg[i] += dmr[i] * u[i] * slope;
                    du[i] += dmr[i] * a;
                }
            }
        });
}
