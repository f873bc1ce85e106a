//! The 16-bit backward (`Backward::Int16`) against the exact f32 backward on the same model
//! and batch: the same loss, and every gradient within a small relative error, but not equal
//! (so the integer path really ran).

use bitnet_models::{Activation, Architecture, ModelConfig, QuantForm};
use bitnet_training::rng::Rng;
use bitnet_training::{Backward, Model, Params, Precision};

fn config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::BitNet,
        vocab_size: 97,
        hidden_size: 64,
        intermediate_size: 176,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: Default::default(),
        max_position_embeddings: 48,
        tie_word_embeddings: true,
        activation: Activation::Relu2,
        sub_norms: true,
        quant_form: QuantForm::PackedMultiply,
        bitlinear_input_norm: None,
        bos_token_id: None,
        eos_token_ids: vec![],
        query_pre_attn_scalar: None,
        sliding: None,
    }
}

fn grads(model: &Model<f32>, tokens: &[u32], batch: usize, seq: usize) -> (f64, Params<f32>) {
    let w = model.prepare();
    let mut g = Params::zeros_like(&model.params);
    let loss = model.loss_and_grads(&w, tokens, batch, seq, &mut g, 1.0);
    (loss, g)
}

#[test]
fn int16_gradients_are_close_to_the_exact_ones() {
    // An odd token count (5 × 47) exercises the zero row of an odd pair.
    let (batch, seq) = (5, 47);
    let mut rng = Rng::new(3, 1);
    let tokens: Vec<u32> = (0..batch * (seq + 1)).map(|_| rng.below(97) as u32).collect();
    let mut model = Model::<f32>::init(config(), Precision::Ternary, 11);
    let (loss32, g32) = grads(&model, &tokens, batch, seq);
    model.backward = Backward::Int16;
    let (loss16, g16) = grads(&model, &tokens, batch, seq);
    assert_eq!(loss32.to_bits(), loss16.to_bits(), "the forward does not change");
    let mut linear_differs = false;
    let mut worst = 0f64;
    for (a, b) in g32.tensors.iter().zip(&g16.tensors) {
        let norm = a.data.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let diff =
            a.data.iter().zip(&b.data).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 0.0, "{}: zero gradient", a.name);
        // 16-bit codes: a relative error of order 2^-15 per element, far below 1e-3 in norm.
        assert!(diff <= 1e-3 * norm, "{}: relative error {}", a.name, diff / norm);
        linear_differs |= a.name.contains("proj") && diff > 0.0;
        worst = worst.max(diff / norm);
    }
    eprintln!("largest relative error of a gradient tensor: {worst:.2e}");
    assert!(linear_differs, "the 16-bit products gave the exact gradients: were they used?");
}

#[test]
fn int16_backward_is_deterministic_across_thread_counts() {
    let (batch, seq) = (4, 40);
    let mut rng = Rng::new(4, 1);
    let tokens: Vec<u32> = (0..batch * (seq + 1)).map(|_| rng.below(97) as u32).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut model = Model::<f32>::init(config(), Precision::Ternary, 12);
            model.backward = Backward::Int16;
            grads(&model, &tokens, batch, seq).1
        })
    };
    assert_eq!(run(1), run(3));
}
