//! The backend conformance suite on the GPU: every operation against the CPU backend
//! (bitnet_inference::conformance). Without a usable GPU it says SKIPPED and why.

use bitnet_cuda::{CudaBackend, CudaDevice};
use bitnet_inference::conformance::check_backend;

#[test]
fn the_cuda_backend_conforms_to_the_cpu() {
    let dev = match CudaDevice::open(0) {
        Ok(d) => d,
        Err(e) => {
            skipped(&e);
            return;
        }
    };
    println!("device: {}", dev.name());
    match check_backend(|| CudaBackend::on(dev.clone())) {
        Ok(report) => println!("{} checks passed", report.checks),
        Err(failures) => {
            for f in failures.iter().take(40) {
                println!("FAILED {f}");
            }
            panic!("{} conformance failures on {}", failures.len(), dev.name());
        }
    }
}

/// Says, past the test harness's output capture, that a GPU test did not run.
fn skipped(why: &dyn std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: no CUDA device ({why})");
}
