//! Every layer's backward against central finite differences, in f64 on tiny shapes.
//!
//! Each check contracts the layer's output with a fixed random tensor `r` (so the scalar is
//! `L = Σ r ⊙ f(x)`), runs the backward with `dy = r`, and compares every input and parameter
//! gradient with `(L(x + h) − L(x − h)) / 2h`. BitLinear's STE is checked against its float
//! surrogate `(X + ΔX)·(W + ΔW)ᵀ` with `ΔX = X_q − X`, `ΔW = W_q − W` frozen (what `detach` does).

use bitnet_models::{Activation, Architecture, ModelConfig, QuantForm};
use bitnet_training::layers::attention::{attention_backward, attention_forward, AttentionShape, QkvLayout};
use bitnet_training::layers::bitlinear::{
    bitlinear_backward, bitlinear_forward, quantize_input, Precision, WeightGroup,
};
use bitnet_training::layers::cross_entropy::{
    head_backward, head_forward, softmax_cross_entropy, softmax_cross_entropy_grad,
};
use bitnet_training::layers::embedding::{embedding_backward, embedding_forward};
use bitnet_training::layers::gate::{gate_backward, gate_forward};
use bitnet_training::layers::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use bitnet_training::layers::rope::{rope_backward, rope_forward, HeadsView, RopeTable};
use bitnet_training::rng::Rng;
use bitnet_training::{Model, Params};

const H: f64 = 1e-6;

fn randn(rng: &mut Rng, n: usize, std: f64) -> Vec<f64> {
    (0..n).map(|_| rng.normal() * std).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compares `analytic` with central differences of `f` around `x`, on at most `max_checks`
/// evenly spread entries. Passes when `|a − n| ≤ tol · max(1, |n|)` for every entry.
fn check(name: &str, x: &[f64], analytic: &[f64], max_checks: usize, tol: f64, f: impl Fn(&[f64]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient has the wrong length");
    let step = (x.len() / max_checks).max(1);
    let mut worst = 0.0f64;
    let mut xp = x.to_vec();
    for i in (0..x.len()).step_by(step) {
        xp[i] = x[i] + H;
        let up = f(&xp);
        xp[i] = x[i] - H;
        let down = f(&xp);
        xp[i] = x[i];
        let numeric = (up - down) / (2.0 * H);
        let err = (analytic[i] - numeric).abs() / numeric.abs().max(1.0);
        worst = worst.max(err);
        assert!(err <= tol, "{name}[{i}]: analytic {} vs numeric {numeric} (rel err {err:e})", analytic[i]);
    }
    eprintln!("{name}: worst relative error {worst:e}");
}

#[test]
fn embedding_backward_matches_finite_differences() {
    let mut rng = Rng::new(1, 0);
    let (vocab, hidden) = (7, 5);
    let ids = [3u32, 0, 3, 6, 2];
    let table = randn(&mut rng, vocab * hidden, 1.0);
    let r = randn(&mut rng, ids.len() * hidden, 1.0);
    let loss = |t: &[f64]| {
        let mut x = vec![0.0; ids.len() * hidden];
        embedding_forward(t, &ids, hidden, &mut x);
        dot(&x, &r)
    };
    let mut d = vec![0.0; table.len()];
    embedding_backward(&r, &ids, hidden, &mut d);
    check("embedding.table", &table, &d, 1000, 1e-7, loss);
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let mut rng = Rng::new(2, 0);
    let (rows, width, eps) = (37, 6, 1e-5);
    let x = randn(&mut rng, rows * width, 1.0);
    let w: Vec<f64> = (0..width).map(|_| 1.0 + 0.3 * rng.normal()).collect();
    let r = randn(&mut rng, rows * width, 1.0);
    let f = |x: &[f64], w: &[f64]| {
        let mut y = vec![0.0; x.len()];
        let mut rstd = vec![0.0; rows];
        rmsnorm_forward(x, w, eps, &mut y, &mut rstd);
        dot(&y, &r)
    };
    let mut y = vec![0.0; x.len()];
    let mut rstd = vec![0.0; rows];
    rmsnorm_forward(&x, &w, eps, &mut y, &mut rstd);
    // Written into a NaN buffer, and added to one that holds 1.5 everywhere.
    let mut dx = vec![f64::NAN; x.len()];
    let mut dw = vec![0.0; width];
    rmsnorm_backward(&x, &w, &rstd, &r, &mut dx, false, &mut dw);
    let mut dx_added = vec![1.5; x.len()];
    rmsnorm_backward(&x, &w, &rstd, &r, &mut dx_added, true, &mut vec![0.0; width]);
    assert!(dx.iter().zip(&dx_added).all(|(a, b)| (a + 1.5 - b).abs() <= 1e-12), "add_dx adds");
    check("rmsnorm.x", &x, &dx, 1000, 1e-7, |xp| f(xp, &w));
    check("rmsnorm.w", &w, &dw, 1000, 1e-7, |wp| f(&x, wp));
}

fn check_gate(act: Activation) {
    let mut rng = Rng::new(3, 0);
    let (rows, width) = (5, 7);
    let gu = randn(&mut rng, rows * 2 * width, 1.0);
    let r = randn(&mut rng, rows * width, 1.0);
    let f = |gu: &[f64]| {
        let mut m = vec![0.0; rows * width];
        gate_forward(act, gu, width, &mut m);
        dot(&m, &r)
    };
    // The backward overwrites its output: what the buffer held must not matter.
    let mut d = vec![f64::NAN; gu.len()];
    gate_backward(act, &gu, &r, width, &mut d);
    check(&format!("{act:?}.gate_up"), &gu, &d, 1000, 1e-7, f);
}

#[test]
fn relu2_gate_backward_matches_finite_differences() {
    check_gate(Activation::Relu2);
}

#[test]
fn silu_gate_backward_matches_finite_differences() {
    check_gate(Activation::Silu);
}

#[test]
fn rope_backward_matches_finite_differences() {
    let mut rng = Rng::new(4, 0);
    let (seq, batch, heads, head_dim) = (6, 2, 3, 8);
    let ld = heads * head_dim + 5; // heads start at column 5 of wider rows
    let view = HeadsView { ld, offset: 5, n_heads: heads };
    let table = RopeTable::<f64>::new(head_dim, 16, 10_000.0);
    let x = randn(&mut rng, batch * seq * ld, 1.0);
    let r = randn(&mut rng, x.len(), 1.0);
    let f = |x: &[f64]| {
        let mut y = x.to_vec();
        rope_forward(&mut y, view, seq, &table);
        dot(&y, &r)
    };
    let mut d = r.clone();
    rope_backward(&mut d, view, seq, &table);
    check("rope.x", &x, &d, 1000, 1e-7, f);
}

#[test]
fn attention_backward_matches_finite_differences() {
    let mut rng = Rng::new(5, 0);
    let s = AttentionShape { batch: 2, seq: 5, n_heads: 4, n_kv_heads: 2, head_dim: 4 };
    let (qd, kvd) = (16, 8);
    let lay = QkvLayout { ld: qd + 2 * kvd, q: 0, k: qd, v: qd + kvd };
    let qkv = randn(&mut rng, s.batch * s.seq * lay.ld, 1.0);
    let r = randn(&mut rng, s.batch * s.seq * qd, 1.0);
    let f = |qkv: &[f64]| {
        let mut probs = vec![0.0; s.probs_len()];
        let mut out = vec![0.0; s.batch * s.seq * qd];
        attention_forward(qkv, lay, s, &mut probs, &mut out);
        dot(&out, &r)
    };
    let mut probs = vec![0.0; s.probs_len()];
    let mut out = vec![0.0; s.batch * s.seq * qd];
    attention_forward(&qkv, lay, s, &mut probs, &mut out);
    // causality: the first position of each sequence only sees itself
    assert!((probs[0] - 1.0).abs() < 1e-15 && probs[1] == 0.0);
    let mut d = vec![0.0; qkv.len()];
    attention_backward(&qkv, lay, s, &probs, &r, &mut d);
    check("attention.qkv", &qkv, &d, 1000, 1e-7, f);
}

/// `[rows, n] = x · wᵀ` in plain loops (the float surrogate).
fn linear(x: &[f64], w: &[f64], rows: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0; rows * n];
    for i in 0..rows {
        for j in 0..n {
            y[i * n + j] = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
        }
    }
    y
}

#[test]
fn bitlinear_full_precision_backward_matches_finite_differences() {
    let mut rng = Rng::new(6, 0);
    let (rows, k, sizes) = (4, 6, [3usize, 2]);
    let n: usize = sizes.iter().sum();
    let x = randn(&mut rng, rows * k, 1.0);
    let w = randn(&mut rng, n * k, 0.5);
    let r = randn(&mut rng, rows * n, 1.0);
    let f = |x: &[f64], w: &[f64]| {
        let g = WeightGroup::quantize(&[&w[..3 * k], &w[3 * k..]], &sizes, k, Precision::Full);
        let mut y = vec![0.0; rows * n];
        bitlinear_forward(&quantize_input(x, rows, k, Precision::Full), &g, &mut y);
        dot(&y, &r)
    };
    let g = WeightGroup::quantize(&[&w[..3 * k], &w[3 * k..]], &sizes, k, Precision::Full);
    let xq = quantize_input(&x, rows, k, Precision::Full);
    let mut dx = vec![f64::NAN; x.len()]; // overwritten
    let mut dw = vec![0.0; w.len()];
    {
        let (a, b) = dw.split_at_mut(3 * k);
        bitlinear_backward(&xq, &g, &r, Some(&mut dx), &mut [a, b]);
    }
    check("linear.x", &x, &dx, 1000, 1e-7, |xp| f(xp, &w));
    check("linear.w", &w, &dw, 1000, 1e-7, |wp| f(&x, wp));
}

#[test]
fn bitlinear_ste_backward_matches_its_float_surrogate() {
    let mut rng = Rng::new(7, 0);
    let (rows, k, sizes) = (5, 16, [8usize, 4, 4]);
    let n: usize = sizes.iter().sum();
    let x0 = randn(&mut rng, rows * k, 1.0);
    let w0 = randn(&mut rng, n * k, 0.2);
    let r = randn(&mut rng, rows * n, 1.0);
    let parts = |w: &[f64]| -> [Vec<f64>; 3] {
        [w[..8 * k].to_vec(), w[8 * k..12 * k].to_vec(), w[12 * k..].to_vec()]
    };
    let p0 = parts(&w0);
    let g = WeightGroup::quantize(&[&p0[0], &p0[1], &p0[2]], &sizes, k, Precision::Ternary);
    let xq = quantize_input(&x0, rows, k, Precision::Ternary);

    // The quantized forward equals the surrogate at the evaluation point.
    let x_deq = xq.dequantized();
    let mut y = vec![0.0; rows * n];
    bitlinear_forward(&xq, &g, &mut y);
    let y_sur = linear(&x_deq, &g.dequant, rows, k, n);
    for (a, b) in y.iter().zip(&y_sur) {
        assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "forward {a} vs surrogate {b}");
    }
    // Codes are ternary and int8.
    assert!(g.codes.iter().all(|&c| c == -1.0 || c == 0.0 || c == 1.0));
    assert!(xq.codes.iter().all(|&c| c.fract() == 0.0 && (-128.0..=127.0).contains(&c)));

    // The surrogate: (X + ΔX)·(W + ΔW)ᵀ with the deltas frozen at (x0, w0).
    let dxq: Vec<f64> = x_deq.iter().zip(&x0).map(|(q, x)| q - x).collect();
    let dwq: Vec<f64> = g.dequant.iter().zip(&w0).map(|(q, w)| q - w).collect();
    let surrogate = |x: &[f64], w: &[f64]| {
        let xs: Vec<f64> = x.iter().zip(&dxq).map(|(a, b)| a + b).collect();
        let ws: Vec<f64> = w.iter().zip(&dwq).map(|(a, b)| a + b).collect();
        dot(&linear(&xs, &ws, rows, k, n), &r)
    };
    let mut dx = vec![0.0; x0.len()];
    let mut dw = vec![0.0; w0.len()];
    {
        let (a, rest) = dw.split_at_mut(8 * k);
        let (b, c) = rest.split_at_mut(4 * k);
        bitlinear_backward(&xq, &g, &r, Some(&mut dx), &mut [a, b, c]);
    }
    check("bitlinear_ste.x", &x0, &dx, 1000, 1e-7, |xp| surrogate(xp, &w0));
    check("bitlinear_ste.w", &w0, &dw, 1000, 1e-7, |wp| surrogate(&x0, wp));
}

#[test]
fn head_cross_entropy_backward_matches_finite_differences() {
    let mut rng = Rng::new(8, 0);
    let (rows, hidden, vocab) = (6, 5, 11);
    let x = randn(&mut rng, rows * hidden, 1.0);
    let head = randn(&mut rng, vocab * hidden, 0.7);
    let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u64) as u32).collect();
    let scale = 1.0 / rows as f64;
    let f = |x: &[f64], head: &[f64]| {
        let mut logits = vec![0.0; rows * vocab];
        head_forward(x, head, rows, hidden, vocab, &mut logits);
        softmax_cross_entropy(&mut logits, &targets, vocab) * scale
    };
    let mut dlogits = vec![0.0; rows * vocab];
    head_forward(&x, &head, rows, hidden, vocab, &mut dlogits);
    let loss = softmax_cross_entropy_grad(&mut dlogits, &targets, vocab, scale);
    assert_eq!(loss * scale, f(&x, &head), "the gradient pass's loss is the loss");
    let mut dx = vec![f64::NAN; x.len()]; // overwritten
    let mut dhead = vec![0.0; head.len()];
    head_backward(&x, &head, &dlogits, rows, hidden, vocab, &mut dx, &mut dhead);
    check("head_ce.x", &x, &dx, 1000, 1e-7, |xp| f(xp, &head));
    check("head_ce.head", &head, &dhead, 1000, 1e-7, |hp| f(&x, hp));
}

fn tiny_config(arch: Architecture) -> ModelConfig {
    let bitnet = arch == Architecture::BitNet;
    ModelConfig {
        architecture: arch,
        vocab_size: 13,
        hidden_size: 8,
        intermediate_size: 12,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: Default::default(),
        max_position_embeddings: 16,
        tie_word_embeddings: bitnet,
        activation: if bitnet { Activation::Relu2 } else { Activation::Silu },
        sub_norms: bitnet,
        quant_form: QuantForm::PackedMultiply,
        bitlinear_input_norm: None,
        bos_token_id: None,
        eos_token_ids: vec![],
        query_pre_attn_scalar: None,
        sliding: None,
    }
}

/// The whole model in full precision: every parameter tensor against finite differences of the
/// real loss (mean cross-entropy).
fn check_whole_model(arch: Architecture) {
    let cfg = tiny_config(arch);
    let mut model = Model::<f64>::init(cfg, Precision::Full, 11);
    // larger weights than the default init so that every path carries signal
    let mut rng = Rng::new(12, 0);
    for t in &mut model.params.tensors {
        for v in &mut t.data {
            *v = if t.name.ends_with("norm.weight") { 1.0 + 0.2 * rng.normal() } else { 0.4 * rng.normal() };
        }
    }
    let (batch, seq) = (2, 5);
    let tokens: Vec<u32> = (0..batch * (seq + 1)).map(|_| rng.below(13) as u32).collect();
    let mut grads = Params::zeros_like(&model.params);
    let w = model.prepare();
    let loss = model.loss_and_grads(&w, &tokens, batch, seq, &mut grads, 1.0);
    assert!((loss - model.loss(&w, &tokens, batch, seq)).abs() < 1e-12);
    for (ti, g) in grads.tensors.iter().enumerate() {
        let x0 = model.params.tensors[ti].data.clone();
        let name = g.name.clone();
        let probe = model.clone();
        check(&format!("{arch:?}.{name}"), &x0, &g.data, 40, 1e-6, |xp| {
            let mut m = probe.clone();
            m.params.tensors[ti].data.copy_from_slice(xp);
            let w = m.prepare();
            m.loss(&w, &tokens, batch, seq)
        });
    }
}

#[test]
fn bitnet_model_backward_matches_finite_differences() {
    check_whole_model(Architecture::BitNet);
}

#[test]
fn llama158_model_backward_matches_finite_differences() {
    check_whole_model(Architecture::Llama158);
}

#[test]
fn gradient_accumulation_sums_scaled_micro_batches() {
    let cfg = tiny_config(Architecture::BitNet);
    let model = Model::<f64>::init(cfg, Precision::Ternary, 3);
    let mut rng = Rng::new(13, 0);
    let (batch, seq) = (2, 4);
    let tokens: Vec<u32> = (0..2 * batch * (seq + 1)).map(|_| rng.below(13) as u32).collect();
    let w = model.prepare();
    let mut whole = Params::zeros_like(&model.params);
    model.loss_and_grads(&w, &tokens, 2 * batch, seq, &mut whole, 1.0);
    let mut parts = Params::zeros_like(&model.params);
    let half = tokens.len() / 2;
    model.loss_and_grads(&w, &tokens[..half], batch, seq, &mut parts, 0.5);
    model.loss_and_grads(&w, &tokens[half..], batch, seq, &mut parts, 0.5);
    for (a, b) in whole.tensors.iter().zip(&parts.tensors) {
        for (x, y) in a.data.iter().zip(&b.data) {
            assert!((x - y).abs() <= 1e-12 * x.abs().max(1e-3), "{}: {x} vs {y}", a.name);
        }
    }
}
