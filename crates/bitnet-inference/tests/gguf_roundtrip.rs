//! HF checkpoints converted to GGUF run here exactly as the HF checkpoint does.

mod common;

use std::path::Path;

use bitnet_inference::load::{load_gguf, LoadOptions, LoadedModel};
use bitnet_models::convert::{convert_hf_to_gguf, requantize_gguf, HeadType, WeightType};
use bitnet_models::synth::write_synthetic;
use common::*;

fn convert(src: &Path, dst: &Path, weight: WeightType) {
    convert_hf_to_gguf(src, dst, weight, HeadType::F16, |_, _| {})
        .unwrap_or_else(|e| panic!("{weight:?}: {e}"));
}

/// Converts each HF form of the transformers fixture `fixture` to each GGUF type of `weights`,
/// checks that it decodes transformers' greedy ids, and hands `check` the form, the type, the
/// loaded model, the prompt, its prefill logits and the HF path's.
fn through_gguf(
    fixture: &str,
    weights: &[WeightType],
    mut check: impl FnMut(&str, WeightType, &LoadedModel, &[u32], &[f32], &[f32]),
) {
    let dir = tempfile::tempdir().unwrap();
    for form in ["master", "packed", "packed_bitlinear"] {
        let src = fixtures().join(fixture).join(form);
        let golden = Golden::open(&fixtures().join(format!("{fixture}/golden/{form}_f32.safetensors")));
        let prompt = golden.u32s("input_ids");
        let want = golden.u32s("greedy_ids");
        let hf_logits = prefill_logits(&load(&src).model, &prompt);
        for &weight in weights {
            let dst = dir.path().join(format!("{form}-{weight:?}.gguf"));
            convert(&src, &dst, weight);
            let m = load_gguf(&dst, LoadOptions::default()).unwrap();
            let (new, _) = greedy_with_cache(&m.model, &prompt, want.len() - prompt.len());
            assert_eq!(new, want[prompt.len()..], "{form} as {weight:?}: greedy ids");
            let got = prefill_logits(&m.model, &prompt);
            check(form, weight, &m, &prompt, &got, &hf_logits);
        }
    }
}

/// Where a GGUF type rounds a scale, logits move a little: per position, cosine > 0.99 with
/// the HF path, and the argmax agrees at `min_agree` positions or more.
fn same_direction(got: &[f32], want: &[f32], vocab: usize, min_agree: usize, what: &str) {
    let mut agree = 0;
    for (pos, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        agree += (top_k(g, 1) == top_k(w, 1)) as usize;
        assert!(cosine(g, w) > 0.99, "{what}: cosine at {pos}");
    }
    let positions = got.len() / vocab;
    assert!(agree >= min_agree, "{what}: argmax agrees at {agree} of {positions} positions");
}

/// The tiny fixture's three forms as I2_S and F16 GGUF: transformers' greedy ids, and logits
/// within 1e-3 of the HF path (the embeddings go through f16, exact for these bf16 values),
/// except in F16 (see below).
#[test]
fn tiny_fixture_through_gguf_keeps_transformers_greedy_ids() {
    through_gguf(
        "hf-bitnet-tiny",
        &[WeightType::I2S, WeightType::F16],
        |form, weight, m, prompt, got, hf_logits| {
            if weight == WeightType::F16 {
                // F16 rounds a scale that is not f16-exact (the master mean, a bitlinear 1/d) to 10 bits: the shifted
                // activations flip int8 roundings, so compare argmax and direction per position.
                same_direction(got, hf_logits, m.model.config.vocab_size, 14, &format!("{form} as F16"));
            } else {
                let d = max_abs_diff(got, hf_logits);
                assert!(d <= 1e-3, "{form} as {weight:?}: logits differ from the HF path by {d}");
            }
            let tok = m.tokenizer.as_ref().expect("the GGUF carries the vocabulary");
            assert_eq!(
                tok.encode("The license grants you the freedom to").unwrap(),
                prompt,
                "{form}: GGUF tokenizer"
            );
        },
    );
}

/// TQ formats need rows of 256: a synthetic model of that width, through TQ2_0, TQ1_0 and I2_S,
/// gives bit-identical logits to its HF checkpoint (same codes, same f16-exact scale).
#[test]
fn ternary_gguf_types_are_exact() {
    ternary_types_exact_for(false);
}

/// The llama layout also reorders q/k rows for llama.cpp's interleaved RoPE, and back on load.
#[test]
fn ternary_gguf_types_are_exact_for_the_llama_layout() {
    ternary_types_exact_for(true);
}

fn ternary_types_exact_for(llama: bool) {
    let dir = tempfile::tempdir().unwrap();
    let shape = w256_shape(llama);
    let src = dir.path().join("hf");
    write_synthetic(&shape, &src, 5).unwrap();
    let prompt: Vec<u32> = (0..12).map(|i| (i * 23 + 1) % 298).collect();
    let want = prefill_logits(&load(&src).model, &prompt);
    for weight in [WeightType::Tq2_0, WeightType::Tq1_0, WeightType::I2S] {
        let dst = dir.path().join(format!("{weight:?}.gguf"));
        convert(&src, &dst, weight);
        let m = load_gguf(&dst, LoadOptions::default()).unwrap();
        let d = max_abs_diff(&prefill_logits(&m.model, &prompt), &want);
        assert!(d < 1e-3, "{weight:?}: logits differ from the HF checkpoint by {d}");
    }
    // `bitnet quantize` between the types keeps the codes and the scale.
    let from = dir.path().join("Tq2_0.gguf");
    for weight in [WeightType::Tq1_0, WeightType::I2S, WeightType::F16] {
        let dst = dir.path().join(format!("requantized-{weight:?}.gguf"));
        requantize_gguf(&from, &dst, weight, |_, _| {}).unwrap();
        let m = load_gguf(&dst, LoadOptions::default()).unwrap();
        let d = max_abs_diff(&prefill_logits(&m.model, &prompt), &want);
        assert!(d < 1e-3, "TQ2_0 requantized to {weight:?}: logits differ by {d}");
    }
}

#[test]
fn tq_types_refuse_rows_that_are_not_a_multiple_of_256() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("hf-bitnet-tiny/packed");
    let e = convert_hf_to_gguf(&src, &dir.path().join("x.gguf"), WeightType::Tq2_0, HeadType::F16, |_, _| {})
        .expect_err("hidden 128 cannot be TQ2_0");
    assert!(e.to_string().contains("not a multiple of 256"), "{e}");
    assert!(!dir.path().join("x.gguf").exists());
}

/// `--lm-head-type` types the head: the tied table of a tied model, `output.weight` of an
/// untied one, whose embedding table stays f16. The untied model still runs.
#[test]
fn head_type_applies_to_the_head_only() {
    use bitnet_models::gguf::GgufFile;
    use bitnet_quant::formats::GgmlType;
    let dir = tempfile::tempdir().unwrap();
    for (fixture, tied) in [("hf-bitnet-tiny/packed", true), ("llama158/packed_bitlinear", false)] {
        let dst = dir.path().join("h.gguf");
        convert_hf_to_gguf(&fixtures().join(fixture), &dst, WeightType::I2S, HeadType::Q8_0, |_, _| {})
            .unwrap_or_else(|e| panic!("{fixture}: {e}"));
        let file = GgufFile::open(&dst).unwrap();
        let ty = |name: &str| file.header().tensor(name).map(|t| t.ggml_type());
        if tied {
            assert_eq!(ty("token_embd.weight"), Some(GgmlType::Q8_0), "{fixture}");
            assert_eq!(ty("output.weight"), None, "{fixture}");
        } else {
            assert_eq!(ty("token_embd.weight"), Some(GgmlType::F16), "{fixture}");
            assert_eq!(ty("output.weight"), Some(GgmlType::Q8_0), "{fixture}");
        }
        load_gguf(&dst, LoadOptions::default()).unwrap_or_else(|e| panic!("{fixture}: {e}"));
    }
}

/// The TQ formats need rows of 256, which the tiny fixture's width of 128 cannot give, so a
/// transformers fixture 256 wide (`w256-tq`, made by tools/make_hf_fixture.py) goes through
/// TQ2_0, TQ1_0 and I2_S in each of its three HF forms: transformers' greedy ids, and logits
/// against the HF path — within 1e-3 where the stored scale is exact (I2_S keeps an f32 scale,
/// TQ an f16 one, exact for the packed form's bf16 scale), otherwise (TQ of the master's f32
/// mean or of packed_bitlinear's 1/d, rounded to f16) argmax agreement and cosine per position.
#[test]
fn w256_fixture_through_tq_and_i2s_keeps_transformers_greedy_ids() {
    let weights = [WeightType::Tq2_0, WeightType::Tq1_0, WeightType::I2S];
    through_gguf("w256-tq", &weights, |form, weight, m, _, got, hf_logits| {
        let exact_scale = weight == WeightType::I2S || form == "packed";
        if exact_scale {
            let d = max_abs_diff(got, hf_logits);
            assert!(d <= 1e-3, "{form} as {weight:?}: logits differ from the HF path by {d}");
        } else {
            let vocab = m.model.config.vocab_size;
            let min_agree = (got.len() / vocab).saturating_sub(2);
            same_direction(got, hf_logits, vocab, min_agree, &format!("{form} as {weight:?}"));
        }
    });
}
