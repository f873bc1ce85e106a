//! A whole model in llama.cpp's Q2_0 (and Q1_0 and PrismML's types): projections with group
//! scales that differ, the embedding table and the head ternary too (as Ternary-Bonsai ships
//! them). It runs with the head on the ternary kernels and the embedding rows decoded from the
//! stored bytes, and its logits agree with those of its dequantized float equivalent (the same
//! values as F16, run on the float path) within the parity bar of the transformers tests.

mod common;

use std::path::Path;

use bitnet_inference::load::{load_gguf, LoadOptions};
use bitnet_inference::HeadFormat;
use bitnet_models::convert::{convert_hf_to_gguf, HeadType, WeightType};
use bitnet_models::gguf::{GgufFile, GgufWriter, TensorSpec};
use bitnet_models::gguf_model::tensor_plans;
use bitnet_models::synth::write_synthetic;
use bitnet_models::weights::{TensorPlan, WeightOptions};
use bitnet_quant::dense::DenseFormat;
use bitnet_quant::formats::{self, GgmlType};
use common::*;

/// Copies `src` with the embedding table and head re-encoded in `table` by its reference
/// quantizer (llama.cpp's, so their group scales differ), and the projections' group scales
/// varied.
fn ternary_tables(src: &Path, dst: &Path, table: GgmlType) {
    let varied = dst.with_extension("varied.gguf");
    rescale_blocks(src, &varied);
    let file = GgufFile::open(&varied).unwrap();
    let retype = |name: &str| matches!(name, "token_embd.weight" | "output.weight");
    let specs: Vec<TensorSpec> = file
        .tensors()
        .iter()
        .map(|t| TensorSpec::new(t.name(), if retype(t.name()) { table } else { t.ggml_type() }, t.shape()))
        .collect();
    let mut md = file.metadata().clone();
    md.remove("general.alignment");
    let mut w = GgufWriter::create(dst, &md, specs.clone()).unwrap();
    for spec in &specs {
        if retype(&spec.name) {
            let bytes = formats::quantize(table, &file.dequantize(&spec.name).unwrap()).unwrap();
            w.write_tensor(&spec.name, &bytes).unwrap();
        } else {
            w.write_tensor(&spec.name, file.tensor_data(&spec.name).unwrap()).unwrap();
        }
    }
    w.finish().unwrap();
}

/// The same model with every ternary tensor stored as the F16 of its dequantized values (exact:
/// each value is a code times an f16 scale): under `llama` the projections run dense in f32.
fn dequantized_f16(src: &Path, dst: &Path) {
    let file = GgufFile::open(src).unwrap();
    let ternary = |t: GgmlType| t.ternary_group().is_some();
    let specs: Vec<TensorSpec> = file
        .tensors()
        .iter()
        .map(|t| {
            TensorSpec::new(
                t.name(),
                if ternary(t.ggml_type()) { GgmlType::F16 } else { t.ggml_type() },
                t.shape(),
            )
        })
        .collect();
    let mut md = file.metadata().clone();
    md.remove("general.alignment");
    let mut w = GgufWriter::create(dst, &md, specs.clone()).unwrap();
    for (spec, info) in specs.iter().zip(file.tensors()) {
        if ternary(info.ggml_type()) {
            let values = file.dequantize(&spec.name).unwrap();
            let bytes = formats::float::quantize_f16(&values);
            assert_eq!(
                formats::dequantize(GgmlType::F16, &bytes, values.len()).unwrap(),
                values,
                "{}",
                spec.name
            );
            w.write_tensor(&spec.name, &bytes).unwrap();
        } else {
            w.write_tensor(&spec.name, file.tensor_data(&spec.name).unwrap()).unwrap();
        }
    }
    w.finish().unwrap();
}

#[test]
fn ternary_models_match_their_dequantized_float_equivalent() {
    let dir = tempfile::tempdir().unwrap();
    let shape = w256_shape(true);
    let src = dir.path().join("hf");
    write_synthetic(&shape, &src, 21).unwrap();
    let prompt: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % shape.vocab_size as u32).collect();
    for (weight, table) in [
        (WeightType::Q2_0, GgmlType::Q2_0),
        (WeightType::Pq2_0, GgmlType::PQ2_0),
        (WeightType::Ptq1_0, GgmlType::PTQ1_0),
        (WeightType::Tq2_0, GgmlType::Q1_0),
    ] {
        let converted = dir.path().join(format!("{weight:?}.gguf"));
        convert_hf_to_gguf(&src, &converted, weight, HeadType::F16, |_, _| {}).unwrap();
        let model = dir.path().join(format!("{weight:?}-{table}.gguf"));
        ternary_tables(&converted, &model, table);
        let file = GgufFile::open(&model).unwrap();

        // How each tensor runs: group-scaled projections, the head ternary, the table as stored.
        let plans = tensor_plans(&file, WeightOptions::default()).unwrap();
        let plan = |name: &str| plans.iter().find(|(n, _)| n == name).unwrap().1;
        let group = weight_group(weight);
        assert_eq!(
            plan("blk.0.ffn_up.weight"),
            TensorPlan::Ternary {
                stored: file.tensor("blk.0.ffn_up.weight").unwrap().ggml_type(),
                group: Some(group)
            }
        );
        assert!(
            matches!(plan("output.weight"), TensorPlan::Ternary { stored, group: Some(_) } if stored == table)
        );
        assert_eq!(
            plan("token_embd.weight"),
            TensorPlan::Embedding { format: DenseFormat::from_ggml(table).unwrap() }
        );

        let m = load_gguf(&model, LoadOptions::default()).unwrap();
        // The head runs as stored: a token reads fewer bytes than with the int8 head (one byte a
        // weight), let alone a widened one.
        let int8 =
            load_gguf(&model, LoadOptions { head: HeadFormat::Int8, ..LoadOptions::default() }).unwrap();
        let head_weights = shape.vocab_size * shape.hidden_size;
        let saved = int8.model.weight_bytes_per_token as i64 - m.model.weight_bytes_per_token as i64;
        assert!(
            saved > head_weights as i64 / 2,
            "{weight:?}/{table}: the head is not read as stored ({saved})"
        );
        let got = prefill_logits(&m.model, &prompt);
        let float = dir.path().join(format!("{weight:?}-{table}-f16.gguf"));
        dequantized_f16(&model, &float);
        let want = prefill_logits(&load_gguf(&float, LoadOptions::default()).unwrap().model, &prompt);

        // The parity bar: cosine ≥ 0.99 per position, top-1 agreement ≥ 0.9.
        let vocab = shape.vocab_size;
        let mut agree = 0;
        for (p, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
            let c = cosine(g, w);
            assert!(c >= 0.99, "{weight:?}/{table}: position {p}: cosine {c}");
            agree += usize::from(top_k(g, 1) == top_k(w, 1));
        }
        let rate = agree as f64 / prompt.len() as f64;
        assert!(rate >= 0.9, "{weight:?}/{table}: top-1 agreement {rate}");
        // And it generates, the KV cache agreeing with a full recompute.
        let (new, _) = greedy_with_cache(&m.model, &prompt, 4);
        let mut seq = prompt.clone();
        for &id in &new {
            let logits = prefill_logits(&m.model, &seq);
            assert_eq!(top_k(&logits[logits.len() - vocab..], 1)[0] as u32, id, "{weight:?}/{table}");
            seq.push(id);
        }
    }
}

fn weight_group(weight: WeightType) -> usize {
    match weight {
        WeightType::Q2_0 => 64,
        WeightType::Pq2_0 | WeightType::Ptq1_0 | WeightType::Q1_0 => 128,
        _ => 256,
    }
}
