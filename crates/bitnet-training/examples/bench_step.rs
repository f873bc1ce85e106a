//! Training throughput on random tokens, no data preparation: the `small` preset's model
//! (4.3 M parameters) by default, the same shapes as bench/pytorch_qat_bench.py.
//! `bench_step [threads] [steps] [--fp] [--int16]` (`--int16`: the 16-bit backward)

use std::time::Instant;

use bitnet_models::{Activation, Architecture, ModelConfig, QuantForm};
use bitnet_training::optim::{clip_grad_norm, AdamW};
use bitnet_training::rng::Rng;
use bitnet_training::{Model, Params, Precision};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
    let precision = if args.iter().any(|a| a == "--fp") { Precision::Full } else { Precision::Ternary };
    let (batch, seq) = (16, 256);
    let cfg = ModelConfig {
        architecture: Architecture::BitNet,
        vocab_size: 4096,
        hidden_size: 256,
        intermediate_size: 800,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        max_position_embeddings: seq,
        tie_word_embeddings: true,
        activation: Activation::Relu2,
        sub_norms: true,
        quant_form: QuantForm::PackedMultiply,
        bitlinear_input_norm: None,
        bos_token_id: None,
        eos_token_ids: vec![],
    };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let mut model = Model::<f32>::init(cfg, precision, 0);
        if args.iter().any(|a| a == "--int16") {
            model.backward = bitnet_training::Backward::Int16;
        }
        let mut opt = AdamW::new(&model.params, &model.layout);
        let mut grads = Params::zeros_like(&model.params);
        let mut rng = Rng::new(1, 2);
        let mut t0 = Instant::now();
        // Seconds in: preparing the weights, forward + backward, clipping + AdamW.
        let mut phases = [0.0f64; 3];
        for step in 0..=steps {
            if step == 1 {
                t0 = Instant::now(); // the first step warms up
                phases = [0.0; 3];
                bitnet_training::profile::take();
            }
            let tokens: Vec<u32> = (0..batch * (seq + 1)).map(|_| rng.below(4096) as u32).collect();
            let t = Instant::now();
            let w = model.prepare();
            grads.fill_zero();
            phases[0] += t.elapsed().as_secs_f64();
            let t = Instant::now();
            model.loss_and_grads(&w, &tokens, batch, seq, &mut grads, 1.0);
            phases[1] += t.elapsed().as_secs_f64();
            let t = Instant::now();
            clip_grad_norm(&mut grads, 1.0);
            opt.update(&mut model.params, &grads, 1e-3, 0.1);
            phases[2] += t.elapsed().as_secs_f64();
        }
        let tps = (steps * batch * seq) as f64 / t0.elapsed().as_secs_f64();
        let ms = |s: f64| s * 1e3 / steps as f64;
        println!(
            "bitnet-training threads={threads} params={} {precision:?} backward={:?} tokens/s={tps:.0} per_thread={:.0} \
             ms/step: prepare={:.1} fwd+bwd={:.1} clip+adamw={:.1}",
            model.params.count(),
            model.backward,
            tps / threads as f64,
            ms(phases[0]),
            ms(phases[1]),
            ms(phases[2]),
        );
        // With BITNET_TRAIN_PROFILE=1: inclusive wall time per layer function, per step.
        for (name, secs, calls) in bitnet_training::profile::take() {
            println!("  {name:<28} {:>8.1} ms/step {:>6} calls/step", ms(secs), calls / steps as u64);
        }
    });
}
