//! Training throughput without data: optimizer steps of a model on random tokens, as
//! `bitnet bench --train` and `examples/bench_step.rs` time them.

use anyhow::{bail, Result};
use clap::Parser;

use crate::layers::bitlinear::{Backward, Precision};
use crate::model::{Model, Params};
use crate::optim::{clip_grad_norm, AdamW};
use crate::rng::Rng;
use crate::train::{Preset, RunSettings, TrainArgs};

/// Where the time of the timed steps went.
#[derive(Clone, Copy, Debug)]
pub struct StepTimes {
    pub steps: usize,
    /// Tokens per step (`batch · seq`).
    pub tokens_per_step: usize,
    /// Wall time of all the timed steps.
    pub seconds: f64,
    /// Of which quantizing the weights and zeroing the gradients,
    pub prepare_s: f64,
    /// the forward and backward passes,
    pub forward_backward_s: f64,
    /// and gradient clipping plus AdamW.
    pub update_s: f64,
}

impl StepTimes {
    pub fn tokens_per_s(&self) -> f64 {
        (self.steps * self.tokens_per_step) as f64 / self.seconds
    }
}

/// The model of `preset` as `bitnet train --preset …` builds it with no other flags (`fp`: as
/// with `--fp`), its backward set to `backward`, and the preset's `(batch, seq)`. Errors on
/// what `bitnet train` refuses (the 16-bit backward of a full-precision model).
pub fn preset_model(preset: Preset, fp: bool, backward: Backward) -> Result<(Model<f32>, usize, usize)> {
    // The command line's own defaults, so that a benchmark runs exactly what `train` would.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }
    let name = format!("{preset:?}").to_lowercase();
    let mut args = Cli::try_parse_from(["train", "--data", "-", "--out", "-", "--preset", &name])?.args;
    args.fp = fp;
    args.backward = backward;
    let settings = RunSettings::from_args(&args, 1);
    let config = settings.model_config()?;
    let precision = if fp { Precision::Full } else { Precision::Ternary };
    let mut model = Model::init(config, precision, settings.seed);
    model.backward = backward;
    Ok((model, settings.batch, settings.seq))
}

/// Runs one untimed warm-up step, then times `steps` optimizer steps of `model` (weights
/// prepared, forward, backward, clipping to norm 1, AdamW) on uniformly random tokens, in the
/// current rayon pool. Deterministic in `seed`; the model's weights are updated. With
/// `BITNET_TRAIN_PROFILE` set, `profile::take()` afterwards gives the timed steps' sections.
pub fn time_steps(
    model: &mut Model<f32>,
    batch: usize,
    seq: usize,
    steps: usize,
    seed: u64,
) -> Result<StepTimes> {
    if steps == 0 || batch == 0 || seq < 2 {
        bail!("a timing needs at least one step, one sequence and two positions");
    }
    let vocab = model.config.vocab_size as u64;
    let mut opt = AdamW::new(&model.params, &model.layout);
    let mut grads = Params::zeros_like(&model.params);
    let mut rng = Rng::new(seed, 2);
    let mut times = StepTimes {
        steps,
        tokens_per_step: batch * seq,
        seconds: 0.0,
        prepare_s: 0.0,
        forward_backward_s: 0.0,
        update_s: 0.0,
    };
    for step in 0..=steps {
        if step == 1 {
            crate::profile::take(); // the warm-up's section times are not the steady state's
        }
        let tokens: Vec<u32> = (0..batch * (seq + 1)).map(|_| rng.below(vocab) as u32).collect();
        let t = std::time::Instant::now();
        let w = model.prepare();
        grads.fill_zero();
        let prepared = t.elapsed().as_secs_f64();
        model.loss_and_grads(&w, &tokens, batch, seq, &mut grads, 1.0);
        let computed = t.elapsed().as_secs_f64();
        clip_grad_norm(&mut grads, 1.0);
        opt.update(&mut model.params, &grads, 1e-3, 0.1);
        let done = t.elapsed().as_secs_f64();
        if step > 0 {
            times.seconds += done;
            times.prepare_s += prepared;
            times.forward_backward_s += computed - prepared;
            times.update_s += done - computed;
        }
    }
    Ok(times)
}
