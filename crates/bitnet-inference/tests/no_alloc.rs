//! Decoding a token allocates nothing: a counting global allocator watches the decode loop
//! (forward of one token through every layer, lm_head, sampling) after a warm-up.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

mod common;

use bitnet_inference::load::{load_dir_with, load_gguf, LoadOptions};
use bitnet_inference::HeadFormat;
use bitnet_models::convert::{convert_hf_to_gguf, HeadType, WeightType};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; it only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decoding_a_token_allocates_nothing() {
    use bitnet_inference::{Logits, SamplingParams, Sequence};
    // A GGUF file whose TQ2_0 blocks carry different scales runs the block-scaled product.
    let dir = tempfile::tempdir().unwrap();
    let (plain, blocks) = (dir.path().join("tq2_0.gguf"), dir.path().join("tq2_0-blocks.gguf"));
    convert_hf_to_gguf(
        &common::fixtures().join("trained-llama158"),
        &plain,
        WeightType::Tq2_0,
        HeadType::F16,
        |_, _| {},
    )
    .unwrap();
    common::rescale_blocks(&plain, &blocks);
    let models = ["hf-bitnet-tiny/packed", "llama158/packed_bitlinear", "userms/packed_bitlinear"]
        .into_iter()
        .map(|f| (f.to_string(), common::load(&common::fixtures().join(f))))
        .chain(std::iter::once((
            "trained-llama158 as TQ2_0 with block scales".to_string(),
            load_gguf(&blocks, LoadOptions::default()).unwrap(),
        )))
        .chain([HeadFormat::Int8, HeadFormat::Int6].map(|head| {
            let dir = common::fixtures().join("hf-bitnet-tiny/packed");
            (
                format!("hf-bitnet-tiny with a {head:?} head"),
                load_dir_with(&dir, LoadOptions { head, ..Default::default() }).unwrap(),
            )
        }));
    for (fixture, loaded) in models {
        let model = &loaded.model;
        let vocab = model.config.vocab_size;
        let steps = 40;
        let mut ctx = common::context(model, 8 + steps, 64);
        let prompt = [0u32, 5, 9, 2, 7, 3, 11, 4];
        let params = SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            repeat_penalty: 1.1,
            frequency_penalty: 0.2,
            seed: 1,
            ..Default::default()
        };
        let mut seq = Sequence::with_sampling(params, vocab);
        model.forward(&mut ctx, &mut seq, &prompt, Logits::Last).unwrap();
        // Warm-up: the attention scratch grows with the context, so run to the end once.
        for _ in 0..steps {
            let next = ctx.sample(0, &mut seq).unwrap();
            model.forward(&mut ctx, &mut seq, &[next], Logits::Last).unwrap();
        }
        // Started again, the sequence's blocks come back from the pool (the prefix cache holds
        // the prompt's block, so no prefix is shared: the prompt is shorter than a block).
        ctx.release(&mut seq);
        model.forward(&mut ctx, &mut seq, &prompt, Logits::Last).unwrap();
        // As `generate` does: the loop runs on a pool worker (see its doc).
        rayon::scope(|_| {
            ALLOCATIONS.store(0, Ordering::SeqCst);
            COUNTING.store(true, Ordering::SeqCst);
            for _ in 0..steps {
                let next = ctx.sample(0, &mut seq).unwrap();
                model.forward(&mut ctx, &mut seq, &[next], Logits::Last).unwrap();
            }
            COUNTING.store(false, Ordering::SeqCst);
        });
        let n = ALLOCATIONS.load(Ordering::SeqCst);
        assert_eq!(n, 0, "{fixture}: {n} heap allocations in {steps} decoded tokens");
    }
}
