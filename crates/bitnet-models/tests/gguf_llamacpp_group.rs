//! Q1_0, Q2_0, Q4_K and Q6_K files written by llama.cpp's own `llama-quantize`
//! (tests/data/gguf/llamacpp-group, README there): every tensor dequantizes to exactly llama.cpp's
//! values, as its `ggml_get_type_traits(type)->to_float` gave them (an FNV-1a hash of all the f32
//! bits, and sampled values bit for bit); the ternary tensors read out as codes and group scales
//! that give the same values; the models load, the ternary ones with their group scales, the
//! K-quant ones dense in their stored format.

mod gguf_support;

use bitnet_models::gguf::{Dialect, GgufFile};
use bitnet_models::ModelWeights;
use bitnet_quant::formats::GgmlType;
use gguf_support::data_dir;
use serde_json::Value;
use std::collections::HashSet;

/// FNV-1a (64 bits) over the little-endian bytes of the values.
fn fnv1a64(values: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in values.iter().flat_map(|v| v.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Checks every file listed in `expected` (a JSON file of the folder) against llama.cpp's values
/// and hands each opened file to `then`; returns the tensor types seen.
fn check_llama_cpp_values(expected: &str, mut then: impl FnMut(&str, &GgufFile)) -> HashSet<GgmlType> {
    let dir = data_dir().join("llamacpp-group");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(expected)).unwrap()).unwrap();
    let files = expected["files"].as_array().unwrap();
    assert!(files.len() >= 2);
    let mut seen = HashSet::new();
    for f in files {
        let name = f["file"].as_str().unwrap();
        let file = GgufFile::open(dir.join(name)).unwrap();
        // Type ids above 35 tell the upstream dialect from bitnet.cpp's; the K-quants' do not.
        let ids_tell = file.tensors().iter().any(|t| t.ggml_type().is_ternary());
        let dialect = if ids_tell { Dialect::Upstream } else { Dialect::Common };
        assert_eq!(file.dialect(), dialect, "{name}: {}", file.dialect_reason());
        let tensors = f["tensors"].as_array().unwrap();
        assert_eq!(tensors.len(), file.tensors().len(), "{name}");
        for t in tensors {
            let tname = t["name"].as_str().unwrap();
            let info = file.tensor(tname).unwrap();
            assert_eq!(info.ggml_type().name().to_lowercase(), t["type"].as_str().unwrap(), "{name} {tname}");
            seen.insert(info.ggml_type());
            let values = file.dequantize(tname).unwrap();
            assert_eq!(values.len() as u64, t["n"].as_u64().unwrap(), "{name} {tname}");
            for s in t["samples"].as_array().unwrap() {
                let (i, bits) = (s[0].as_u64().unwrap() as usize, s[1].as_u64().unwrap() as u32);
                assert_eq!(
                    values[i].to_bits(),
                    bits,
                    "{name} {tname}[{i}]: {} vs llama.cpp {}",
                    values[i],
                    f32::from_bits(bits)
                );
            }
            let hash = u64::from_str_radix(t["fnv1a64"].as_str().unwrap(), 16).unwrap();
            assert_eq!(fnv1a64(&values), hash, "{name} {tname}: dequantized values differ from llama.cpp's");
            // The ternary types: codes times group scales are the same values.
            if let Some(group) = info.ggml_type().ternary_group() {
                let c = file.ternary_codes(tname).unwrap();
                assert_eq!(c.block_len, group);
                let again: Vec<f32> = c.dequantize();
                assert!(again.iter().zip(&values).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} {tname}");
            }
        }
        then(name, &file);
    }
    seen
}

#[test]
fn llama_cpp_q1_0_and_q2_0_files_dequantize_to_llama_cpp_values() {
    let seen = check_llama_cpp_values("expected.json", |_, file| {
        // The model loads, its projections with the file's group scales (floats quantized by
        // llama.cpp: every group has its own).
        let w = ModelWeights::from_gguf(file).unwrap();
        let q = w.layers[0].q_proj.weight.ternary().expect("a Q1_0/Q2_0 projection loads ternary");
        let d = q.group_scales().expect("llama.cpp's quantizer gives each group its own scale");
        assert_eq!(
            d.group(),
            file.tensor("blk.0.attn_q.weight").unwrap().ggml_type().ternary_group().unwrap()
        );
    });
    assert!(seen.contains(&GgmlType::Q1_0) && seen.contains(&GgmlType::Q2_0), "{seen:?}");
}

/// The K-quant files: llama.cpp's values, and the models load dense in the stored format (a
/// dense model's weights are never ternarized unless asked), every projection's rows equal to
/// the file's dequantized values.
#[test]
fn llama_cpp_q4_k_and_q6_k_files_dequantize_to_llama_cpp_values() {
    let seen = check_llama_cpp_values("expected-kquants.json", |name, file| {
        let w = ModelWeights::from_gguf(file).unwrap();
        let q = w.layers[0].q_proj.weight.dense().expect("a K-quant projection loads dense");
        let stored = file.tensor("blk.0.attn_q.weight").unwrap().ggml_type();
        assert_eq!(q.format().ggml(), stored, "{name}");
        let values = file.dequantize("blk.0.attn_q.weight").unwrap();
        let mut row = vec![0.0f32; q.cols()];
        for r in [0, q.rows() / 2, q.rows() - 1] {
            q.dequantize_row(r, &mut row).unwrap();
            assert_eq!(&row[..], &values[r * q.cols()..(r + 1) * q.cols()], "{name} row {r}");
        }
    });
    assert!(seen.contains(&GgmlType::Q4_K) && seen.contains(&GgmlType::Q6_K), "{seen:?}");
}

/// This engine's Q4_K and Q6_K quantizers (what `bitnet quantize --type q4_k|q6_k` and `convert
/// --lm-head-type` write) give `llama-quantize`'s bytes: the float source of the files' token
/// embedding table (kept here, 64 KB) encodes to the very blocks the files hold.
#[test]
fn q4_k_and_q6_k_quantizers_write_llama_quantize_bytes() {
    let dir = data_dir().join("llamacpp-group");
    let bytes = std::fs::read(dir.join("src256-token_embd.f32")).unwrap();
    let source: Vec<f32> =
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert_eq!(source.len(), 64 * 256);
    for (ty, name) in [(GgmlType::Q4_K, "tiny-q4_k.gguf"), (GgmlType::Q6_K, "tiny-q6_k.gguf")] {
        let file = GgufFile::open(dir.join(name)).unwrap();
        let theirs = file.tensor_data("token_embd.weight").unwrap();
        let ours = bitnet_quant::formats::quantize(ty, &source).unwrap();
        assert_eq!(ours.len(), theirs.len(), "{name}");
        let block = ty.block_geometry().1 as usize;
        let differing = ours.chunks(block).zip(theirs.chunks(block)).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing,
            0,
            "{name}: {differing} of {} blocks differ from llama-quantize's",
            ours.len() / block
        );
    }
}
