//! Q1_0 and Q2_0 files written by llama.cpp's own `llama-quantize` (tests/data/gguf/llamacpp-group,
//! README there): every tensor dequantizes to exactly llama.cpp's values, as its
//! `ggml_get_type_traits(type)->to_float` gave them (an FNV-1a hash of all the f32 bits, and
//! sampled values bit for bit); the ternary tensors read out as codes and group scales that give
//! the same values; and the model loads with its group scales.

mod gguf_support;

use bitnet_models::gguf::{Dialect, GgufFile};
use bitnet_models::ModelWeights;
use bitnet_quant::formats::GgmlType;
use gguf_support::data_dir;
use serde_json::Value;

/// FNV-1a (64 bits) over the little-endian bytes of the values.
fn fnv1a64(values: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in values.iter().flat_map(|v| v.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[test]
fn llama_cpp_q1_0_and_q2_0_files_dequantize_to_llama_cpp_values() {
    let dir = data_dir().join("llamacpp-group");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let files = expected["files"].as_array().unwrap();
    assert!(files.len() >= 2);
    let mut seen = std::collections::HashSet::new();
    for f in files {
        let name = f["file"].as_str().unwrap();
        let file = GgufFile::open(dir.join(name)).unwrap();
        assert_eq!(file.dialect(), Dialect::Upstream, "{name}: {}", file.dialect_reason());
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
        // The model loads, its projections with the file's group scales (floats quantized by
        // llama.cpp: every group has its own).
        let w = ModelWeights::from_gguf(&file).unwrap();
        let q = w.layers[0].q_proj.weight.ternary().expect("a Q1_0/Q2_0 projection loads ternary");
        let d = q.group_scales().expect("llama.cpp's quantizer gives each group its own scale");
        assert_eq!(
            d.group(),
            file.tensor("blk.0.attn_q.weight").unwrap().ggml_type().ternary_group().unwrap()
        );
    }
    assert!(seen.contains(&GgmlType::Q1_0) && seen.contains(&GgmlType::Q2_0), "{seen:?}");
}
