//! Decoding a token allocates nothing: a counting global allocator watches the decode loop
//! (forward of one token through every layer, lm_head, sampling) after a warm-up.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

mod common;

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
    use bitnet_inference::{Logits, Sampler, SamplingParams};
    for fixture in ["hf-bitnet-tiny/packed", "llama158/packed_bitlinear", "userms/packed_bitlinear"] {
        let mut loaded = common::load(&common::fixtures().join(fixture));
        let model = &mut loaded.model;
        let vocab = model.config.vocab_size;
        let steps = 40;
        let mut session = model.session(8 + steps, 64);
        let mut history: Vec<u32> = Vec::with_capacity(8 + steps);
        history.extend([0u32, 5, 9, 2, 7, 3, 11, 4]);
        let params = SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            repeat_penalty: 1.1,
            seed: 1,
            ..Default::default()
        };
        let mut sampler = Sampler::new(params, vocab);
        model.forward(&mut session, &history, Logits::Last).unwrap();
        // Warm-up: the attention scratch grows with the context, so run to the end once.
        for _ in 0..steps {
            let next = sampler.sample(&mut session.logits[..vocab], &history);
            history.push(next);
            model.forward(&mut session, &[next], Logits::Last).unwrap();
        }
        session.reset();
        history.truncate(8);
        model.forward(&mut session, &history, Logits::Last).unwrap();
        // As `generate` does: the loop runs on a pool worker (see its doc).
        rayon::scope(|_| {
            ALLOCATIONS.store(0, Ordering::SeqCst);
            COUNTING.store(true, Ordering::SeqCst);
            for _ in 0..steps {
                let next = sampler.sample(&mut session.logits[..vocab], &history);
                history.push(next);
                model.forward(&mut session, &[next], Logits::Last).unwrap();
            }
            COUNTING.store(false, Ordering::SeqCst);
        });
        let n = ALLOCATIONS.load(Ordering::SeqCst);
        assert_eq!(n, 0, "{fixture}: {n} heap allocations in {steps} decoded tokens");
    }
}
