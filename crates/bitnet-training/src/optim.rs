//! AdamW, global-norm gradient clipping, and the learning-rate / weight-decay schedules.

use rayon::prelude::*;

use crate::model::{Layout, ParamKind, Params};
use crate::real::{lanes, wide};

/// AdamW (decoupled weight decay, as `torch.optim.AdamW`), with its moments.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Updates made so far (the bias corrections use it).
    pub step: u64,
    pub m: Params<f32>,
    pub v: Params<f32>,
    /// Whether each tensor takes weight decay (matrices do; norm gains do not).
    pub decay: Vec<bool>,
}

/// Elements updated together (a fixed size, so results do not depend on the thread count).
const CHUNK: usize = 4096;

impl AdamW {
    pub fn new(params: &Params<f32>, layout: &Layout) -> Self {
        let decay = (0..params.tensors.len()).map(|i| layout.kind(i) != ParamKind::Norm).collect();
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            step: 0,
            m: Params::zeros_like(params),
            v: Params::zeros_like(params),
            decay,
        }
    }

    /// One update: `p ← p·(1 − lr·wd) − lr · m̂ / (√v̂ + eps)`.
    pub fn update(&mut self, params: &mut Params<f32>, grads: &Params<f32>, lr: f32, weight_decay: f32) {
        self.step += 1;
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let bc1 = 1.0 - (b1 as f64).powi(self.step as i32);
        let bc2 = 1.0 - (b2 as f64).powi(self.step as i32);
        let step_size = (lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        for (i, p) in params.tensors.iter_mut().enumerate() {
            let wd = if self.decay[i] { weight_decay } else { 0.0 };
            let shrink = 1.0 - lr * wd;
            p.data
                .par_chunks_mut(CHUNK)
                .zip(grads.tensors[i].data.par_chunks(CHUNK))
                .zip(self.m.tensors[i].data.par_chunks_mut(CHUNK))
                .zip(self.v.tensors[i].data.par_chunks_mut(CHUNK))
                .for_each(|(((pc, gc), mc), vc)| {
                    wide(|| {
                        for (((p, &g), m), v) in pc.iter_mut().zip(gc).zip(mc).zip(vc) {
                            *p *= shrink;
                            *m = b1 * *m + (1.0 - b1) * g;
                            *v = b2 * *v + (1.0 - b2) * g * g;
                            *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
                        }
                    })
                });
        }
    }
}

/// The L2 norm of all gradients together (summed in f64, in a fixed order: eight lanes per
/// chunk, the chunks in turn).
pub fn global_norm(grads: &Params<f32>) -> f64 {
    let mut total = 0.0f64;
    for t in &grads.tensors {
        let parts: Vec<f64> = t
            .data
            .par_chunks(CHUNK)
            .map(|c| wide(|| lanes(c.len(), |j| (c[j] as f64) * (c[j] as f64))))
            .collect();
        total += parts.iter().sum::<f64>();
    }
    total.sqrt()
}

/// Scales the gradients so that their global norm is at most `max_norm`; returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut Params<f32>, max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    if max_norm > 0.0 && norm > max_norm {
        let s = (max_norm / (norm + 1e-6)) as f32;
        for t in &mut grads.tensors {
            t.data.par_chunks_mut(CHUNK).for_each(|c| wide(|| c.iter_mut().for_each(|g| *g *= s)));
        }
    }
    norm
}

/// The shape of the learning-rate curve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum ScheduleKind {
    /// BitNet b1.58 two-stage: warmup, a high peak decaying linearly to half of it at the
    /// half-way point, where it drops to `stage2_ratio · peak` and decays linearly to 0;
    /// weight decay on in the first half, 0 in the second.
    Bitnet,
    /// Warmup, then cosine from the peak to `min_lr_ratio · peak`.
    Cosine,
    /// Warmup, then the peak.
    Constant,
}

/// Learning rate and weight decay as functions of the step.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub warmup: u64,
    pub total: u64,
    pub weight_decay: f64,
    /// Cosine's floor, as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// The BitNet schedule's second-stage start, as a fraction of the peak.
    pub stage2_ratio: f64,
}

impl Schedule {
    /// The learning rate of the update made at 0-based step `step`; past `total` steps, the
    /// schedule's final rate.
    pub fn lr(&self, step: u64) -> f64 {
        let (s, n, peak) = (step as f64, self.total.max(1) as f64, self.peak_lr);
        if step < self.warmup {
            return peak * (s + 1.0) / self.warmup as f64;
        }
        match self.kind {
            ScheduleKind::Constant => peak,
            ScheduleKind::Cosine => {
                let span = (n - self.warmup as f64).max(1.0);
                let progress = ((s - self.warmup as f64) / span).clamp(0.0, 1.0);
                let floor = peak * self.min_lr_ratio;
                floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            ScheduleKind::Bitnet => {
                let half = (n / 2.0).floor();
                if s < half {
                    let span = (half - self.warmup as f64).max(1.0);
                    let progress = (s - self.warmup as f64) / span;
                    peak * (1.0 - 0.5 * progress)
                } else {
                    // Past the schedule's end (a run extended beyond it) the rate stays at its
                    // final value, 0, never below.
                    let progress = ((s - half) / (n - half).max(1.0)).min(1.0);
                    peak * self.stage2_ratio * (1.0 - progress)
                }
            }
        }
    }

    /// The weight decay of the update at step `step`.
    pub fn weight_decay(&self, step: u64) -> f64 {
        match self.kind {
            ScheduleKind::Bitnet if step as f64 >= (self.total as f64 / 2.0).floor() => 0.0,
            _ => self.weight_decay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            peak_lr: 1e-2,
            warmup: 10,
            total: 100,
            weight_decay: 0.1,
            min_lr_ratio: 0.1,
            stage2_ratio: 0.25,
        }
    }

    #[test]
    fn bitnet_schedule_drops_at_half_way() {
        let s = sched(ScheduleKind::Bitnet);
        assert!((s.lr(0) - 1e-3).abs() < 1e-12);
        assert!((s.lr(9) - 1e-2).abs() < 1e-12);
        assert!((s.lr(10) - 1e-2).abs() < 1e-12);
        assert!(s.lr(49) > 0.5e-2 && s.lr(49) < 0.52e-2);
        assert!((s.lr(50) - 0.25e-2).abs() < 1e-12);
        assert!(s.lr(99) < 1e-4);
        assert_eq!(s.weight_decay(49), 0.1);
        assert_eq!(s.weight_decay(50), 0.0);
        // an extended run past the schedule's end keeps its final rate instead of going negative
        assert_eq!(s.lr(100), 0.0);
        assert_eq!(s.lr(150), 0.0);
        assert!((sched(ScheduleKind::Cosine).lr(150) - 1e-3).abs() < 1e-12);
    }

    #[test]
    fn cosine_and_constant() {
        let c = sched(ScheduleKind::Cosine);
        assert!((c.lr(10) - 1e-2).abs() < 1e-12);
        assert!((c.lr(100) - 1e-3).abs() < 1e-12);
        assert!((c.lr(55) - 5.5e-3).abs() < 1e-9);
        let k = sched(ScheduleKind::Constant);
        assert_eq!(k.lr(80), 1e-2);
        assert_eq!(k.weight_decay(80), 0.1);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        use crate::model::{Params, Tensor};
        let mut p =
            Params { tensors: vec![Tensor { name: "w".into(), shape: vec![2], data: vec![1.0, -1.0] }] };
        let g = Params { tensors: vec![Tensor { name: "w".into(), shape: vec![2], data: vec![0.5, -2.0] }] };
        let mut opt = AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            step: 0,
            m: Params::zeros_like(&p),
            v: Params::zeros_like(&p),
            decay: vec![true],
        };
        opt.update(&mut p, &g, 0.1, 0.0);
        // the bias-corrected first step is lr · sign(g)
        assert!((p.tensors[0].data[0] - 0.9).abs() < 1e-6);
        assert!((p.tensors[0].data[1] + 0.9).abs() < 1e-6);
        let mut g2 = g.clone();
        let n = clip_grad_norm(&mut g2, 1.0);
        assert!((n - (0.25f64 + 4.0).sqrt()).abs() < 1e-9);
        assert!((global_norm(&g2) - 1.0).abs() < 1e-5);
    }
}
