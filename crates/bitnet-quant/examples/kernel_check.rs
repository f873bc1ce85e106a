//! Runs the kernel equality suite on every path this CPU has and says which ones it ran.
//! Build it once and copy the binary to a machine with other instructions (AVX-512, VNNI):
//! `cargo build --release -p bitnet-quant --example kernel_check`.
//! Exits 1 if any product differs from the scalar reference.

use bitnet_quant::selftest::check_path;
use bitnet_quant::KernelPath;

fn main() {
    let available = KernelPath::available();
    let missing: Vec<_> = KernelPath::ALL.into_iter().filter(|p| !available.contains(p)).collect();
    println!("best path: {}; active path: {}", KernelPath::best(), KernelPath::active());
    println!("not available here: {}", names(&missing));
    let mut failed = false;
    for path in &available {
        match check_path(*path) {
            Ok(n) => println!("PASS {path}: {n} products equal to the scalar reference"),
            Err(failures) => {
                failed = true;
                println!("FAIL {path}: {} mismatches", failures.len());
                for f in failures.iter().take(10) {
                    println!("  {f}");
                }
            }
        }
    }
    println!("paths exercised: {}", names(&available));
    if failed {
        std::process::exit(1);
    }
}

fn names(paths: &[KernelPath]) -> String {
    if paths.is_empty() {
        return "none".into();
    }
    paths.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
}
