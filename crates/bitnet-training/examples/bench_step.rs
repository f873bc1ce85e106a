//! Training throughput on random tokens, no data preparation: the `small` preset's model
//! (4.3 M parameters, batch 16 × 256) by default, the same shapes as bench/pytorch_qat_bench.py.
//! `bench_step [threads] [steps] [--fp] [--int16]` (`--int16`: the 16-bit backward).
//! `bitnet bench --train small` times the same steps from the command line.

use bitnet_training::bench::{preset_model, time_steps};
use bitnet_training::{Backward, Preset};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
    let fp = args.iter().any(|a| a == "--fp");
    let backward = if args.iter().any(|a| a == "--int16") { Backward::Int16 } else { Backward::F32 };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    pool.install(|| {
        let (mut model, batch, seq) = preset_model(Preset::Small, fp, backward)?;
        let t = time_steps(&mut model, batch, seq, steps, 1)?;
        let ms = |s: f64| s * 1e3 / steps as f64;
        println!(
            "bitnet-training threads={threads} params={} {:?} backward={backward:?} tokens/s={:.0} per_thread={:.0} \
             ms/step: prepare={:.1} fwd+bwd={:.1} clip+adamw={:.1}",
            model.params.count(),
            model.precision,
            t.tokens_per_s(),
            t.tokens_per_s() / threads as f64,
            ms(t.prepare_s),
            ms(t.forward_backward_s),
            ms(t.update_s),
        );
        // With BITNET_TRAIN_PROFILE=1: inclusive wall time per layer function, per step.
        for (name, secs, calls) in bitnet_training::profile::take() {
            println!("  {name:<28} {:>8.1} ms/step {:>6} calls/step", ms(secs), calls / steps as u64);
        }
        Ok(())
    })
}
