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

/// Greedy ids of the CPU and the GPU agree on every fixture, token for token.
#[test]
fn greedy_ids_equal_the_cpu_backend() {
    let dev = match CudaDevice::open(0) {
        Ok(d) => d,
        Err(e) => {
            skipped(&e);
            return;
        }
    };
    for (fixture, form, _) in PARITY_CASES {
        let dir = common::fixtures().join(fixture).join(form);
        let golden = common::Golden::open(
            &common::fixtures().join(fixture).join(format!("golden/{form}_f32.safetensors")),
        );
        let prompt = golden.u32s("input_ids");
        let cpu = common::load(&dir);
        let make = || CudaBackend::on(dev.clone());
        let gpu = common::load_on(&dir, &make);
        let (want, _) = common::greedy_with_cache(&cpu.model, &prompt, 24);
        let (got, _) = common::greedy_with_cache_on(&gpu.model, &make, &prompt, 24);
        assert_eq!(got, want, "{fixture}/{form}: greedy ids differ between the CPU and {}", dev.name());
    }
}

/// Says, past the test harness's output capture, that a GPU test did not run.
fn skipped(why: &dyn std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: no CUDA device ({why})");
}
