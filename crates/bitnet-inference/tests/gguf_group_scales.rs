//! Group-scaled ternary files (TQ1_0/TQ2_0 per 256, Q2_0 per 64, Q1_0/PQ2_0/PTQ1_0 per 128) whose
//! groups carry different scales (as llama.cpp's and PrismML's quantizers write them) run with
//! those scales honoured exactly, and `bitnet quantize` moves them between types exactly where
//! the target holds them.

mod common;

use std::path::Path;

use bitnet_inference::load::{load_gguf, LoadOptions};
use bitnet_models::convert::{convert_hf_to_gguf, llama_rope_rows, requantize_gguf, HeadType, WeightType};
use bitnet_models::gguf::GgufFile;
use bitnet_models::synth::{write_synthetic, SynthShape};
use bitnet_models::{Architecture, ModelWeights, Projection};
use bitnet_quant::formats;
use bitnet_quant::QuantizedActivations;
use common::*;

fn projections(w: &ModelWeights, l: usize) -> [(&'static str, &Projection); 7] {
    let x = &w.layers[l];
    [
        ("attn_q", &x.q_proj),
        ("attn_k", &x.k_proj),
        ("attn_v", &x.v_proj),
        ("attn_output", &x.o_proj),
        ("ffn_gate", &x.gate_proj),
        ("ffn_up", &x.up_proj),
        ("ffn_down", &x.down_proj),
    ]
}

/// Every projection of the rescaled file gives the dense product of its dequantized tensor (in
/// HF row order) with the same int8 activations, within 1e-6 of the magnitude of the terms.
fn check_projections_dense(path: &Path) {
    let file = GgufFile::open(path).unwrap();
    let w = ModelWeights::from_gguf(&file).unwrap();
    let cfg = &w.config;
    for l in 0..cfg.num_layers {
        for (name, p) in projections(&w, l) {
            let gname = format!("blk.{l}.{name}.weight");
            let t = p.weight.ternary().expect("a ternary projection loads ternary");
            let (rows, cols) = (t.rows(), t.cols());
            assert!(t.group_scales().is_some(), "{gname}: expected group scales");
            let info = file.tensor(&gname).unwrap();
            let mut dense =
                formats::dequantize(info.ggml_type(), file.tensor_data(&gname).unwrap(), rows * cols)
                    .unwrap();
            if cfg.architecture == Architecture::Llama158 {
                dense = llama_rope_rows(&dense, cols, &gname, cfg, true);
            }
            let m = 3;
            let x: Vec<f32> = (0..m * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.7).collect();
            let mut q = QuantizedActivations::new(m, cols);
            q.quantize(&x, m);
            let mut got = vec![0.0f32; m * rows];
            t.forward(&q, &mut got);
            for t in 0..m {
                let (xt, s_a) = (q.row(t), q.scale(t) as f64);
                for r in 0..rows {
                    let row = &dense[r * cols..(r + 1) * cols];
                    let want: f64 = row.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / s_a;
                    let mag: f64 =
                        row.iter().zip(xt).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum::<f64>() / s_a;
                    let g = got[t * rows + r] as f64;
                    assert!((g - want).abs() <= 1e-6 * mag + 1e-30, "{gname} t{t} r{r}: {g} vs dense {want}");
                }
            }
        }
    }
}

/// The group-scaled types the synthetic models (which have zero codes) can be written in.
const GROUPED: [WeightType; 5] =
    [WeightType::Tq2_0, WeightType::Tq1_0, WeightType::Q2_0, WeightType::Pq2_0, WeightType::Ptq1_0];

fn group_of(weight: WeightType) -> usize {
    match weight {
        WeightType::Tq2_0 | WeightType::Tq1_0 => 256,
        WeightType::Q2_0 => 64,
        _ => 128,
    }
}

#[test]
fn group_scaled_files_run_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for llama in [false, true] {
        let shape = w256_shape(llama);
        let src = dir.path().join(format!("hf-{llama}"));
        write_synthetic(&shape, &src, 5).unwrap();
        let prompt: Vec<u32> = (0..12).map(|i| (i * 23 + 1) % 298).collect();
        for weight in GROUPED {
            let one = dir.path().join(format!("{llama}-{weight:?}.gguf"));
            convert_hf_to_gguf(&src, &one, weight, HeadType::F16, |_, _| {}).unwrap();
            let blocked = dir.path().join(format!("{llama}-{weight:?}-blocks.gguf"));
            rescale_blocks(&one, &blocked);
            check_projections_dense(&blocked);
            // The whole model runs, and the scales matter.
            let base = prefill_logits(&load_gguf(&one, LoadOptions::default()).unwrap().model, &prompt);
            let m = load_gguf(&blocked, LoadOptions::default()).unwrap();
            let got = prefill_logits(&m.model, &prompt);
            assert!(got.iter().all(|v| v.is_finite()), "llama={llama} {weight:?}: non-finite logits");
            assert!(max_abs_diff(&got, &base) > 1e-3, "llama={llama} {weight:?}: group scales had no effect");
            // `bitnet quantize` keeps the group scales in a type whose groups are as small or
            // smaller (the same logits, bit for bit) and refuses the others.
            for other in GROUPED.into_iter().filter(|&o| o != weight) {
                let requantized = dir.path().join(format!("{llama}-{weight:?}-blocks-as-{other:?}.gguf"));
                let r = requantize_gguf(&blocked, &requantized, other, |_, _| {});
                if group_of(other) <= group_of(weight) {
                    r.unwrap();
                    let again = prefill_logits(
                        &load_gguf(&requantized, LoadOptions::default()).unwrap().model,
                        &prompt,
                    );
                    assert_eq!(again, got, "llama={llama} {weight:?} requantized to {other:?}");
                } else {
                    let e = r.unwrap_err().to_string();
                    assert!(e.contains("would have to merge"), "{weight:?} -> {other:?}: {e}");
                }
            }
            for single in [WeightType::I2S, WeightType::F16] {
                let e = requantize_gguf(&blocked, &dir.path().join("x.gguf"), single, |_, _| {}).unwrap_err();
                assert!(e.to_string().contains("different scales"), "{e}");
            }
            // Q1_0 holds no zeros (nor, from Q2_0's groups of 64, differing halves of its 128).
            let e = requantize_gguf(&blocked, &dir.path().join("x.gguf"), WeightType::Q1_0, |_, _| {})
                .unwrap_err()
                .to_string();
            let why = if group_of(weight) < 128 { "would have to merge" } else { "no zero" };
            assert!(e.contains(why), "{weight:?} -> Q1_0: {e}");
            // Generation with the KV cache agrees with re-running the whole sequence.
            let (new, _) = greedy_with_cache(&m.model, &prompt, 6);
            let mut seq = prompt.clone();
            let fresh = load_gguf(&blocked, LoadOptions::default()).unwrap();
            for &id in &new {
                let logits = prefill_logits(&fresh.model, &seq);
                let vocab = shape.vocab_size;
                assert_eq!(top_k(&logits[logits.len() - vocab..], 1)[0] as u32, id);
                seq.push(id);
            }
        }
    }
}

/// Q1_0 (signs and a scale per 128): a model without zero codes converts to it and back exactly;
/// one with zeros is refused with a message that says why.
#[test]
fn q1_0_holds_sign_models_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let shape = SynthShape { num_layers: 1, ..w256_shape(false) };
    let src = dir.path().join("hf");
    write_synthetic(&shape, &src, 9).unwrap();
    let e = convert_hf_to_gguf(&src, &dir.path().join("q1.gguf"), WeightType::Q1_0, HeadType::F16, |_, _| {})
        .unwrap_err();
    assert!(e.to_string().contains("no zero"), "{e}");
    // A TQ2_0 file whose zero codes became +1, with scales per 128 that differ.
    let tq = dir.path().join("tq2.gguf");
    convert_hf_to_gguf(&src, &tq, WeightType::Tq2_0, HeadType::F16, |_, _| {}).unwrap();
    let pq = dir.path().join("pq2.gguf");
    requantize_gguf(&tq, &pq, WeightType::Pq2_0, |_, _| {}).unwrap();
    let signs = dir.path().join("signs.gguf");
    rewrite_ternary(&pq, &signs, |codes, scales| {
        codes.iter_mut().filter(|c| **c == 0).for_each(|c| *c = 1);
        scales.iter_mut().enumerate().for_each(|(b, s)| *s *= block_factor(b));
    });
    let prompt: Vec<u32> = (0..10).map(|i| (i * 31 + 7) % 298).collect();
    let want = prefill_logits(&load_gguf(&signs, LoadOptions::default()).unwrap().model, &prompt);
    let q1 = dir.path().join("signs-q1.gguf");
    requantize_gguf(&signs, &q1, WeightType::Q1_0, |_, _| {}).unwrap();
    let file = GgufFile::open(&q1).unwrap();
    assert!(file.tensors().iter().any(|t| t.ggml_type() == formats::GgmlType::Q1_0));
    check_projections_dense(&q1);
    let got = prefill_logits(&load_gguf(&q1, LoadOptions::default()).unwrap().model, &prompt);
    assert_eq!(got, want, "Q1_0 of a sign model");
    let back = dir.path().join("back-pq2.gguf");
    requantize_gguf(&q1, &back, WeightType::Pq2_0, |_, _| {}).unwrap();
    assert_eq!(prefill_logits(&load_gguf(&back, LoadOptions::default()).unwrap().model, &prompt), want);
}

/// A file whose blocks all share one scale still takes the one-scale kernels.
#[test]
fn equal_block_scales_keep_the_one_scale_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let shape = SynthShape { num_layers: 1, ..w256_shape(false) };
    let src = dir.path().join("hf");
    write_synthetic(&shape, &src, 7).unwrap();
    let one = dir.path().join("one.gguf");
    convert_hf_to_gguf(&src, &one, WeightType::Tq2_0, HeadType::F16, |_, _| {}).unwrap();
    let w = ModelWeights::from_gguf(&GgufFile::open(&one).unwrap()).unwrap();
    for (name, p) in projections(&w, 0) {
        assert!(p.weight.ternary().expect("ternary").group_scales().is_none(), "{name}");
    }
}
