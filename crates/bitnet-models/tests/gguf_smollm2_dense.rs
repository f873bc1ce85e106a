//! The real llama.cpp-written SmolLM2-135M-Instruct Q4_1 GGUF loads with its projections dense
//! in Q4_1 (not ternarized), its embeddings in Q8_0, and a projection's product equals the
//! dequantized rows' dot with the input within the bound its int8 activations allow.
//!
//! The file comes through BITNET_SMOLLM2_GGUF (`tools/fetch-test-models.sh` prints its path);
//! without it each test prints a SKIPPED line where `cargo test` shows it and passes, except
//! under `CI=true`, where it fails.

mod gguf_support;

use bitnet_models::gguf::GgufFile;
use bitnet_models::gguf_model::tensor_plans;
use bitnet_models::weights::{LinearWeight, TensorPlan, WeightOptions};
use bitnet_models::{Architecture, ModelWeights};
use bitnet_quant::dense::{DenseActivations, DenseFormat};
use bitnet_quant::formats::{self, float};

fn model(test: &str) -> Option<GgufFile> {
    let path = gguf_support::smollm2_gguf(test)?;
    Some(GgufFile::open(&path).expect("BITNET_SMOLLM2_GGUF names a readable GGUF"))
}

#[test]
fn smollm2_projections_load_dense_q4_1() {
    let Some(file) = model("smollm2_projections_load_dense_q4_1") else { return };
    let w = ModelWeights::from_gguf(&file).unwrap();
    assert_eq!(w.config.architecture, Architecture::Llama158);
    let mut n = 0;
    for (name, p) in w.projections() {
        let d = p.weight.dense().unwrap_or_else(|| panic!("{name} is not dense"));
        assert_eq!(d.format(), DenseFormat::Q4_1, "{name}");
        n += 1;
    }
    assert_eq!(n, 7 * 30);
    assert_eq!(w.embed_tokens.format(), DenseFormat::Q8_0);
    assert_eq!((w.embed_tokens.rows(), w.embed_tokens.cols()), (49152, 576));
    assert!(w.lm_head.is_none(), "SmolLM2 ties its head to the embeddings");
    // The stored bytes are kept: the Q4_1 projections take 20 bytes per 32 weights.
    let q = &w.layers[0].q_proj.weight;
    assert_eq!(q.bytes(), 576 * 576 / 32 * 20);
}

#[test]
fn smollm2_ternarize_option_ternarizes() {
    let Some(file) = model("smollm2_ternarize_option_ternarizes") else { return };
    let w = ModelWeights::from_gguf_with(&file, WeightOptions { ternarize: true }).unwrap();
    assert!(w.projections().all(|(_, p)| matches!(p.weight, LinearWeight::Ternary(_))));
}

#[test]
fn smollm2_tensor_plans_say_how_each_tensor_runs() {
    let Some(file) = model("smollm2_tensor_plans_say_how_each_tensor_runs") else { return };
    let plans = tensor_plans(&file, WeightOptions::default()).unwrap();
    assert_eq!(plans.len(), file.tensors().len());
    let plan = |name: &str| plans.iter().find(|(n, _)| n == name).map(|(_, p)| *p).unwrap();
    assert_eq!(plan("blk.0.attn_q.weight"), TensorPlan::Dense { format: DenseFormat::Q4_1 });
    assert_eq!(plan("blk.0.attn_q.weight").to_string(), "dense Q4_1 (int8 dot)");
    assert_eq!(plan("token_embd.weight"), TensorPlan::Embedding { format: DenseFormat::Q8_0 });
    assert_eq!(plan("output_norm.weight").to_string(), "f32 vector (from F32)");
    let ternarized = tensor_plans(&file, WeightOptions { ternarize: true }).unwrap();
    let (_, p) = ternarized.iter().find(|(n, _)| n == "blk.3.ffn_down.weight").unwrap();
    assert_eq!(p.to_string(), "ternarized from Q4_1");
}

/// `DenseLinear::forward` against the f64 dot of the file's dequantized rows with the float
/// input: the difference is what quantizing the activations costs, which is bounded by
/// `Σ_c |W_c| · |x_c − x̂_c|` (x̂ the dequantized int8 activations) plus, for Q4_1, the f16
/// rounding of Q8_1's block sums, `Σ_b |m_b| · |s_b − d_b · Σ q_b|`, plus f32 rounding.
#[test]
fn smollm2_dense_rows_match_the_dequantized_dot() {
    let Some(file) = model("smollm2_dense_rows_match_the_dequantized_dot") else { return };
    let w = ModelWeights::from_gguf(&file).unwrap();
    let cfg = &w.config;
    for (gname, p) in
        [("blk.0.attn_q.weight", &w.layers[0].q_proj), ("blk.17.ffn_down.weight", &w.layers[17].down_proj)]
    {
        let d = p.weight.dense().unwrap();
        let (rows, cols) = (d.rows(), d.cols());
        let info = file.tensor(gname).unwrap();
        let mut dense =
            formats::dequantize(info.ggml_type(), file.tensor_data(gname).unwrap(), rows * cols).unwrap();
        // The loader undid llama.cpp's q/k row order; so does the reference.
        dense = bitnet_models::convert::llama_rope_rows(&dense, cols, gname, cfg, true);
        let m = 2;
        let x: Vec<f32> = (0..m * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.3).collect();
        let mut out = vec![0.0f32; m * rows];
        d.forward(&x, m, &mut out).unwrap();
        let mut a = DenseActivations::new();
        a.quantize(d.activation_kind(), &x, m, cols).unwrap();
        for t in 0..m {
            let xt = &x[t * cols..(t + 1) * cols];
            let (q, ds, s, sums) = (a.values(t), a.scales(t), a.scaled_sums(t), a.sums(t));
            for r in 0..rows {
                let row = &dense[r * cols..(r + 1) * cols];
                let want: f64 = row.iter().zip(xt).map(|(&w, &v)| f64::from(w) * f64::from(v)).sum();
                let mut bound = 0.0f64;
                let mut mag = 0.0f64;
                for c in 0..cols {
                    let x_hat = f64::from(q[c]) * f64::from(ds[c / 32]);
                    bound += f64::from(row[c]).abs() * (f64::from(xt[c]) - x_hat).abs();
                    mag += (f64::from(row[c]) * x_hat).abs();
                }
                // The rows' Q4_1 mins m_b, read from the stored bytes of row r.
                let stored = d.as_bytes();
                let row_bytes = &stored[r * d.row_bytes()..(r + 1) * d.row_bytes()];
                for (b, blk) in row_bytes.chunks_exact(20).enumerate() {
                    let m_b = float::f16_bits_to_f32(u16::from_le_bytes([blk[2], blk[3]]));
                    let exact_sum = f64::from(ds[b]) * f64::from(sums[b]);
                    bound += f64::from(m_b).abs() * (f64::from(s[b]) - exact_sum).abs();
                    mag += f64::from(m_b).abs() * f64::from(s[b]).abs();
                }
                bound += 1e-5 * mag;
                let got = f64::from(out[t * rows + r]);
                assert!(
                    (got - want).abs() <= bound,
                    "{gname} t{t} r{r}: {got} vs dequantized dot {want} (bound {bound:e})"
                );
            }
        }
    }
}
