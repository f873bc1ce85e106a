//! The int8 lm_head stays close to the float one: same argmax almost everywhere, and every
//! position's logits nearly parallel to the float logits.

mod common;

use bitnet_inference::{load_dir_with, HeadFormat, LoadOptions};
use common::*;

#[test]
fn int8_head_tracks_the_float_head() {
    for fixture in ["hf-bitnet-tiny/packed", "llama158/packed_bitlinear", "gqa1-theta1e4/master"] {
        let dir = fixtures().join(fixture);
        let ids: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 500).collect();
        let mut float = load(&dir);
        let mut int8 = load_dir_with(&dir, LoadOptions { head: HeadFormat::Int8 }).unwrap();
        let (a, b) = (prefill_logits(&mut float.model, &ids), prefill_logits(&mut int8.model, &ids));
        let vocab = float.model.config.vocab_size;
        let mut agree = 0;
        for (pos, (x, y)) in a.chunks(vocab).zip(b.chunks(vocab)).enumerate() {
            let c = cosine(x, y);
            assert!(c > 0.999, "{fixture} position {pos}: cosine {c}");
            agree += (top_k(x, 1) == top_k(y, 1)) as usize;
        }
        assert!(agree >= 36, "{fixture}: argmax agrees at only {agree} of 40 positions");
        assert!(int8.model.weight_bytes_per_token < float.model.weight_bytes_per_token);
    }
}
