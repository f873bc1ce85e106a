//! Copies a GGUF file with the scale of every group of every group-scaled ternary tensor (TQ1_0,
//! TQ2_0, Q1_0, Q2_0, PQ2_0, PTQ1_0) multiplied by a factor that cycles through 1, 1.25, 0.75,
//! 2, 0.5: the codes stay, the groups' scales all differ, as in a file llama.cpp's quantizer
//! wrote from float weights. For measuring the group-scaled product on real shapes
//! (docs/performance.md); a converted BitNet model has one scale per matrix and would run on
//! the one-scale kernels.
//!
//! `cargo run --release -p bitnet-models --example vary_group_scales -- IN.gguf OUT.gguf`

use bitnet_models::gguf::{GgufFile, GgufWriter, TensorSpec};
use bitnet_quant::formats;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, src, dst] = args.as_slice() else {
        return Err("usage: vary_group_scales IN.gguf OUT.gguf".into());
    };
    let file = GgufFile::open(src)?;
    let specs: Vec<TensorSpec> =
        file.tensors().iter().map(|t| TensorSpec::new(t.name(), t.ggml_type(), t.shape())).collect();
    let mut md = file.metadata().clone();
    md.remove("general.alignment");
    let mut w = GgufWriter::create(dst, &md, specs.clone())?;
    let mut varied = 0;
    for spec in &specs {
        if spec.ggml_type.ternary_group().is_some() {
            let mut t = file.ternary_codes(&spec.name)?;
            for (b, s) in t.scales.iter_mut().enumerate() {
                *s *= [1.0, 1.25, 0.75, 2.0, 0.5][b % 5];
            }
            w.write_tensor(&spec.name, &formats::pack_ternary(spec.ggml_type, &t.codes, &t.scales)?)?;
            varied += 1;
        } else {
            w.write_tensor(&spec.name, file.tensor_data(&spec.name)?)?;
        }
    }
    w.finish()?;
    eprintln!("{dst}: {varied} tensors with varied group scales");
    Ok(())
}
