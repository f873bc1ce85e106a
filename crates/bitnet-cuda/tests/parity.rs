//! The transformers parity checks of bitnet-inference's golden tests, on the GPU: every
//! fixture's prompt logits against transformers, greedy ids, and KV-cache decoding against a
//! full recompute. Without a usable GPU it says SKIPPED and why.

#[path = "../../bitnet-inference/tests/common/mod.rs"]
mod common;

use bitnet_cuda::{CudaBackend, CudaDevice};
use common::parity::{run_fixture_on, PARITY_CASES};

#[test]
fn every_fixture_matches_transformers_on_the_gpu() {
    let dev = match CudaDevice::open(0) {
        Ok(d) => d,
        Err(e) => {
            skipped(&e);
            return;
        }
    };
    for (fixture, form, check) in PARITY_CASES {
        run_fixture_on(&|| CudaBackend::on(dev.clone()), fixture, form, check);
        println!("{fixture}/{form}: ok on {}", dev.name());
    }
}

/// Greedy ids of the CPU and the GPU agree on every fixture, token for token, up to a step
/// where the CPU's two best logits lie within [`NEAR_TIE`] of each other: the backends sum floats
/// in different orders (norms, attention, the float head), so a near-tie may go either way, and
/// after that the two continuations are different texts. A split at a clear margin fails.
#[test]
fn greedy_ids_equal_the_cpu_backend() {
    let dev = match CudaDevice::open(0) {
        Ok(d) => d,
        Err(e) => {
            skipped(&e);
            return;
        }
    };
    let mut failures = Vec::new();
    for (fixture, form, _) in PARITY_CASES {
        let dir = common::fixtures().join(fixture).join(form);
        let golden = common::Golden::open(
            &common::fixtures().join(fixture).join(format!("golden/{form}_f32.safetensors")),
        );
        let prompt = golden.u32s("input_ids");
        let cpu = common::load(&dir);
        let make = || CudaBackend::on(dev.clone());
        let gpu = common::load_on(&dir, &make);
        let (want, cpu_steps) = common::greedy_with_cache(&cpu.model, &prompt, 24);
        let (got, gpu_steps) = common::greedy_with_cache_on(&gpu.model, &make, &prompt, 24);
        let Some(at) = want.iter().zip(&got).position(|(a, b)| a != b) else {
            println!("{fixture}/{form}: 24 of 24 greedy ids equal");
            continue;
        };
        let margin = top2_margin(&cpu_steps[at]);
        let diff = common::max_abs_diff(&cpu_steps[at], &gpu_steps[at]);
        let line = format!(
            "{fixture}/{form}: greedy ids split at step {at} of 24 (CPU {} vs {} {}), CPU top-2 margin              {margin:.2e}, largest logit difference there {diff:.2e}",
            want[at],
            dev.name(),
            got[at]
        );
        println!("{line}");
        if margin >= NEAR_TIE {
            failures.push(line);
        }
    }
    assert!(failures.is_empty(), "greedy ids split at a clear margin:\n{}", failures.join("\n"));
}

/// A top-2 logit margin below which the backends may pick different tokens.
const NEAR_TIE: f32 = 1e-3;

/// The gap between the largest and the second-largest value.
fn top2_margin(x: &[f32]) -> f32 {
    let top = common::top_k(x, 2);
    x[top[0]] - x[top[1]]
}

/// Says, past the test harness's output capture, that a GPU test did not run.
fn skipped(why: &dyn std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: no CUDA device ({why})");
}
