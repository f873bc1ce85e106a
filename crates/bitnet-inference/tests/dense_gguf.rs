//! A real llama.cpp GGUF with dense (Q4_1) projections and a Q8_0 embedding table, run as stored:
//! prefill and one-token decode agree, batching changes nothing, and the model answers.
//! Needs `BITNET_SMOLLM2_GGUF` (tools/fetch-test-models.sh); says SKIPPED otherwise, fails
//! under CI=true.

mod common;

use bitnet_inference::load::{load_gguf, LoadOptions};
use bitnet_inference::{Logits, Sequence};

fn smollm2() -> Option<std::path::PathBuf> {
    match std::env::var_os("BITNET_SMOLLM2_GGUF") {
        Some(p) => Some(p.into()),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("BITNET_SMOLLM2_GGUF is not set under CI=true (tools/fetch-test-models.sh)")
        }
        None => {
            eprintln!("SKIPPED dense_gguf: set BITNET_SMOLLM2_GGUF (export BITNET_SMOLLM2_GGUF=\"$(tools/fetch-test-models.sh)\")");
            None
        }
    }
}

#[test]
fn dense_prefill_equals_decode_and_batches_change_nothing() {
    let Some(path) = smollm2() else { return };
    let loaded = load_gguf(&path, LoadOptions::default()).unwrap();
    let model = &loaded.model;
    let vocab = model.config.vocab_size;
    let tok = loaded.tokenizer.as_ref().unwrap();
    let ids = tok.encode("The quick brown fox jumps over the lazy dog, and then the dog wakes up and chases the fox around the whole farm until sunset, while the farmer laughs and the cows watch from the old red barn.").unwrap();
    assert!(ids.len() > 33, "{} tokens: the prompt must cross a KV block", ids.len());
    let all = common::prefill_logits(model, &ids);
    let mut ctx = common::context(model, ids.len(), 1);
    let mut seq = Sequence::new();
    for (t, &id) in ids.iter().enumerate() {
        model.forward(&mut ctx, &mut seq, &[id], Logits::Last).unwrap();
        let step = ctx.logits();
        let want = &all[t * vocab..(t + 1) * vocab];
        let c = common::cosine(step, want);
        assert!(c > 0.99999, "position {t}: decode vs prefill cosine {c}");
        assert_eq!(common::top_k(step, 1), common::top_k(want, 1), "position {t}");
    }
}

#[test]
fn the_dense_model_knows_the_capital_of_france() {
    let Some(path) = smollm2() else { return };
    let loaded = load_gguf(&path, LoadOptions::default()).unwrap();
    let tok = loaded.tokenizer.as_ref().unwrap();
    let ids = tok.encode("The capital of France is").unwrap();
    let (new, _) = common::greedy_with_cache(&loaded.model, &ids, 3);
    let text = tok.decode(&new).unwrap();
    assert!(text.contains("Paris"), "{text:?}");
}
