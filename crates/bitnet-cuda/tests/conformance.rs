//! The backend conformance suite on the GPU: every operation against the CPU backend
//! (bitnet_inference::conformance). Without a usable GPU it says SKIPPED and why.

use bitnet_cuda::{CudaBackend, CudaDevice};
use bitnet_inference::conformance::check_backend;

#[test]
fn the_cuda_backend_conforms_to_the_cpu() {
    let dev = match CudaDevice::open(0) {
        Ok(d) => d,
        Err(e) if e.is_unavailable() => {
            skipped(&e);
            return;
        }
        Err(e) => panic!("the GPU is there but the backend does not open: {e}"),
    };
    println!("device: {}", dev.name());
    // Prefill products on the int8 tensor cores (where the chip has them) and on dp4a tiles;
    // every sequence launch by launch and through CUDA graphs; kernels launched as programmatic
    // dependents (Hopper) and strictly in order.
    let mut failed = 0;
    for (tensor_cores, graphs, programmatic) in
        [(true, true, true), (false, false, false), (true, false, true)]
    {
        let make = || {
            let mut b = CudaBackend::on(dev.clone());
            b.set_tensor_cores(tensor_cores);
            b.set_graphs(graphs);
            b.set_programmatic_launch(programmatic);
            b
        };
        let setting =
            format!("tensor cores {tensor_cores}, graphs {graphs}, programmatic launch {programmatic}");
        match check_backend(make) {
            Ok(report) => println!("{setting}: {} checks passed", report.checks),
            Err(failures) => {
                for f in failures.iter().take(40) {
                    println!("FAILED ({setting}) {f}");
                }
                failed += failures.len();
            }
        }
    }
    assert_eq!(failed, 0, "{failed} conformance failures on {}", dev.name());
}

/// Says, past the test harness's output capture, that a GPU test did not run.
fn skipped(why: &dyn std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: no CUDA device ({why})");
}
