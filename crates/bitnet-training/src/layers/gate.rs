//! The gated MLP's nonlinearity: `m = act(gate) ⊙ up` with `act` = ReLU² (BitNet) or SiLU (LLaMA).

use bitnet_models::Activation;
use rayon::prelude::*;

use crate::linalg::ROW_CHUNK;
use crate::real::{wide, Real};

/// The trainer's layouts are bitnet and llama: Gemma3 (GeGLU) checkpoints are refused where
/// they enter it (`export::load_hf`), and its own configs choose ReLU² or SiLU.
const GELU_NOT_TRAINED: &str = "the trainer runs ReLU² and SiLU gates; Gemma3's GeGLU is refused at load";

#[inline(always)]
fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// `m = act(g) ⊙ u` over one row.
#[inline(always)]
fn forward_row<T: Real>(act: Activation, g: &[T], u: &[T], m: &mut [T]) {
    // One loop per activation, so that the ReLU² loop has no exp in it and vectorizes.
    match act {
        Activation::Relu2 => {
            for ((o, &gi), &ui) in m.iter_mut().zip(g).zip(u) {
                let r = gi.max(T::ZERO);
                *o = r * r * ui;
            }
        }
        Activation::Silu => {
            for ((o, &gi), &ui) in m.iter_mut().zip(g).zip(u) {
                *o = gi * sigmoid(gi) * ui;
            }
        }
        Activation::GeluTanh => unreachable!("{GELU_NOT_TRAINED}"),
    }
}

/// `dg = dm ⊙ u ⊙ act'(g)`, `du = dm ⊙ act(g)` over one row.
#[inline(always)]
fn backward_row<T: Real>(act: Activation, g: &[T], u: &[T], dm: &[T], dg: &mut [T], du: &mut [T]) {
    let rows = dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dm);
    match act {
        // relu2 = square(relu(x)): slope 2·relu(x)
        Activation::Relu2 => {
            for ((((dgi, dui), &gi), &ui), &d) in rows {
                let r = gi.max(T::ZERO);
                *dgi = d * ui * (r + r);
                *dui = d * (r * r);
            }
        }
        // silu' = s·(1 + x·(1 − s)) with s = sigmoid(x)
        Activation::Silu => {
            for ((((dgi, dui), &gi), &ui), &d) in rows {
                let s = sigmoid(gi);
                *dgi = d * ui * (s * (T::ONE + gi * (T::ONE - s)));
                *dui = d * (gi * s);
            }
        }
        Activation::GeluTanh => unreachable!("{GELU_NOT_TRAINED}"),
    }
}

/// `gate_up` holds `[rows, 2·width]`: the gate in the first `width` columns, up in the rest.
/// Writes `m = act(gate) ⊙ up` (`[rows, width]`).
pub fn gate_forward<T: Real>(act: Activation, gate_up: &[T], width: usize, m: &mut [T]) {
    let _t = crate::profile::section("gate_forward");
    m.par_chunks_mut(width * ROW_CHUNK).zip(gate_up.par_chunks(2 * width * ROW_CHUNK)).for_each(
        |(mc, gc)| {
            wide(|| {
                for (mr, gr) in mc.chunks_exact_mut(width).zip(gc.chunks_exact(2 * width)) {
                    let (g, u) = gr.split_at(width);
                    forward_row(act, g, u, mr);
                }
            })
        },
    );
}

/// Backward of [`gate_forward`]: writes `dgate = dm ⊙ up ⊙ act'(gate)` and `dup = dm ⊙ act(gate)`
/// into `d_gate_up` (`[rows, 2·width]`), overwriting it.
pub fn gate_backward<T: Real>(act: Activation, gate_up: &[T], dm: &[T], width: usize, d_gate_up: &mut [T]) {
    let _t = crate::profile::section("gate_backward");
    d_gate_up
        .par_chunks_mut(2 * width * ROW_CHUNK)
        .zip(gate_up.par_chunks(2 * width * ROW_CHUNK))
        .zip(dm.par_chunks(width * ROW_CHUNK))
        .for_each(|((dc, gc), dmc)| {
            wide(|| {
                for ((dr, gr), dmr) in dc
                    .chunks_exact_mut(2 * width)
                    .zip(gc.chunks_exact(2 * width))
                    .zip(dmc.chunks_exact(width))
                {
                    let (g, u) = gr.split_at(width);
                    let (dg, du) = dr.split_at_mut(width);
                    backward_row(act, g, u, dmr, dg, du);
                }
            })
        });
}
