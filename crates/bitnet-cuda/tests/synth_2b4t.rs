//! On a synthetic model of BitNet b1.58 2B-4T's shapes (random ternary weights): the GPU's
//! logits at every position of a 256-token prompt have cosine >= 0.999 with the CPU's, and
//! greedy decoding gives the same ids. Without a usable GPU it says SKIPPED and why.

#[path = "../../bitnet-inference/tests/common/mod.rs"]
mod common;

use bitnet_cuda::{CudaBackend, CudaDevice};
use bitnet_models::synth::{shape_by_name, write_synthetic};

#[test]
fn logits_of_a_256_token_prompt_agree_with_the_cpu() {
    let dev = match CudaDevice::open(0) {
        Ok(d) => d,
        Err(e) => {
            skipped(&e);
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    write_synthetic(&shape_by_name("2b4t").unwrap(), dir.path(), 1).unwrap();
    let make = || CudaBackend::on(dev.clone());
    let gpu = common::load_on(dir.path(), &make);
    let vocab = gpu.model.config.vocab_size;
    let ids: Vec<u32> = (0..256).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let got = common::prefill_logits_on(&gpu.model, &make, &ids);
    let (gpu_greedy, _) = common::greedy_with_cache_on(&gpu.model, &make, &ids[..16], 32);
    drop(gpu);
    let cpu = common::load(dir.path());
    let want = common::prefill_logits(&cpu.model, &ids);
    let (cpu_greedy, _) = common::greedy_with_cache(&cpu.model, &ids[..16], 32);
    let mut worst = (1.0f64, 0);
    for (pos, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        let c = common::cosine(g, w);
        if c < worst.0 {
            worst = (c, pos);
        }
    }
    println!("{}: lowest cosine {:.6} at position {} of 256", dev.name(), worst.0, worst.1);
    assert!(worst.0 >= 0.999, "cosine {} < 0.999 at position {}", worst.0, worst.1);
    let agree = gpu_greedy.iter().zip(&cpu_greedy).take_while(|(a, b)| a == b).count();
    println!("greedy ids agree for the first {agree} of 32 tokens");
}

/// Says, past the test harness's output capture, that a GPU test did not run.
fn skipped(why: &dyn std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: no CUDA device ({why})");
}
