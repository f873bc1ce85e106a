//! The integer lm_heads stay close to the float one: same argmax almost everywhere, and every
//! position's logits nearly parallel to the float logits. 6 bits are coarser than 8, so their
//! bounds are looser.

mod common;

use bitnet_inference::{load_dir_with, HeadFormat, LoadOptions, Logits};
use common::*;

/// `(format, least cosine, least argmax agreements of 40)`.
const HEADS: [(HeadFormat, f64, usize); 2] = [(HeadFormat::Int8, 0.999, 36), (HeadFormat::Int6, 0.998, 34)];

#[test]
fn integer_heads_track_the_float_head() {
    for fixture in ["hf-bitnet-tiny/packed", "llama158/packed_bitlinear", "gqa1-theta1e4/master"] {
        let dir = fixtures().join(fixture);
        let ids: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 500).collect();
        let float = load(&dir);
        let a = prefill_logits(&float.model, &ids);
        let vocab = float.model.config.vocab_size;
        let mut bytes = float.model.weight_bytes_per_token;
        for (head, min_cosine, min_agree) in HEADS {
            let int = load_dir_with(&dir, LoadOptions { head, ..Default::default() }).unwrap();
            let b = prefill_logits(&int.model, &ids);
            let mut agree = 0;
            let mut worst = 1.0f64;
            for (pos, (x, y)) in a.chunks(vocab).zip(b.chunks(vocab)).enumerate() {
                let c = cosine(x, y);
                worst = worst.min(c);
                assert!(c > min_cosine, "{fixture} {head:?} position {pos}: cosine {c}");
                agree += (top_k(x, 1) == top_k(y, 1)) as usize;
            }
            eprintln!("{fixture} {head:?}: least cosine {worst:.5}, argmax agrees at {agree} of 40");
            assert!(agree >= min_agree, "{fixture} {head:?}: argmax agrees at only {agree} of 40 positions");
            // Each narrower head reads fewer bytes per token.
            assert!(int.model.weight_bytes_per_token < bytes, "{fixture} {head:?}");
            bytes = int.model.weight_bytes_per_token;
        }
    }
}

/// Decoding one token at a time (the GEMV) gives the same logits as the prefill (the GEMM).
#[test]
fn int6_head_decode_equals_prefill() {
    let dir = fixtures().join("hf-bitnet-tiny/packed");
    let ids: Vec<u32> = (0..12).map(|i| (i * 53 + 7) % 500).collect();
    let m = load_dir_with(&dir, LoadOptions { head: HeadFormat::Int6, ..Default::default() }).unwrap();
    let vocab = m.model.config.vocab_size;
    let all = prefill_logits(&m.model, &ids);
    let mut ctx = common::context(&m.model, ids.len(), 1);
    let mut seq = bitnet_inference::Sequence::new();
    let mut step = Vec::new();
    for &id in &ids {
        m.model.forward(&mut ctx, &mut seq, &[id], Logits::Last).unwrap();
        step.extend_from_slice(&ctx.logits()[ctx.logits().len() - vocab..]);
    }
    assert_eq!(all.len(), step.len());
    for (pos, (x, y)) in all.chunks(vocab).zip(step.chunks(vocab)).enumerate() {
        let c = cosine(x, y);
        assert!(c > 0.99999, "position {pos}: cosine {c}");
    }
}
