//! Many sequences in one forward call give each sequence's results alone: batched decoding,
//! prefill chunks mixed with decode rows, the paged KV cache in every element type, prefix
//! sharing, and the continuous-batching scheduler with preemption and cancellation.

mod common;

use std::sync::{mpsc, Arc};

use bitnet_inference::scheduler::{Event, FinishReason, Request, Scheduler, SchedulerOptions, SubmitError};
use bitnet_inference::{
    Context, ContextOptions, CpuBackend, KvType, Logits, Model, SamplingParams, Segment, Sequence,
    BLOCK_TOKENS,
};

const FIXTURES: [&str; 3] =
    ["hf-bitnet-tiny/packed", "llama158/packed_bitlinear", "gqa3-odd/packed_bitlinear"];

/// Eight prompts of different lengths (1 to 70 tokens: inside, at and across block boundaries).
fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    [5, 1, 33, 12, 70, 32, 9, 47]
        .iter()
        .enumerate()
        .map(|(k, &n)| (0..n).map(|i| ((i * 37 + k * 101 + 3) as u32) % vocab).collect())
        .collect()
}

fn context(
    model: &Model<CpuBackend>,
    kv_tokens: usize,
    max_batch: usize,
    kv_type: KvType,
) -> Context<CpuBackend> {
    let opts = ContextOptions { max_batch, kv_type, ..ContextOptions::new(kv_tokens) };
    Context::new(model, CpuBackend::new(), &opts).unwrap()
}

/// Greedy ids of `prompt` decoded alone.
fn alone(model: &Model<CpuBackend>, prompt: &[u32], n: usize, kv_type: KvType) -> Vec<u32> {
    let mut ctx = context(model, prompt.len() + n, 512, kv_type);
    let mut seq = Sequence::new();
    model.forward(&mut ctx, &mut seq, prompt, Logits::Last).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let next = ctx.sample(0, &mut seq).unwrap();
        out.push(next);
        model.forward(&mut ctx, &mut seq, &[next], Logits::Last).unwrap();
    }
    out
}

/// Sequence `k` joins at step `k` with its whole prompt as one segment beside the decode rows
/// of the sequences already running; every sequence decodes `n` tokens.
fn together(model: &Model<CpuBackend>, prompts: &[Vec<u32>], n: usize, kv_type: KvType) -> Vec<Vec<u32>> {
    let total: usize = prompts.iter().map(|p| p.len() + n).sum();
    let mut ctx = context(model, total + prompts.len() * BLOCK_TOKENS, 512, kv_type);
    let mut seqs: Vec<Sequence> = prompts.iter().map(|_| Sequence::new()).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut step = 0;
    while out.iter().any(|o| o.len() < n) {
        let mut inputs: Vec<(usize, Vec<u32>)> = Vec::new();
        for (k, o) in out.iter().enumerate() {
            if k == step {
                inputs.push((k, prompts[k].clone()));
            } else if k < step && o.len() < n {
                inputs.push((k, vec![*o.last().unwrap()]));
            }
        }
        // Segments in a shuffled order: a sequence's rows need not come in any place.
        inputs.reverse();
        let mut batch: Vec<Segment> = Vec::new();
        let mut order = Vec::new();
        for (seq, (k, tokens)) in
            seqs.iter_mut().enumerate().filter_map(|(k, s)| inputs.iter().find(|i| i.0 == k).map(|i| (s, i)))
        {
            // Odd sequences ask for the greedy choice only (it stays where the head computed
            // it); even ones for their logits: the two kinds interleave in the batch.
            let logits = if k % 2 == 1 { Logits::Greedy } else { Logits::Last };
            batch.push(Segment { seq, tokens, logits });
            order.push(*k);
        }
        if !batch.is_empty() {
            model.forward_batch(&mut ctx, &mut batch).unwrap();
            drop(batch);
            for (i, &k) in order.iter().enumerate() {
                let vocab = model.config.vocab_size;
                assert_eq!(ctx.logits_of(i).len(), if k % 2 == 1 { 0 } else { vocab });
                assert_eq!(ctx.greedy_of(i).is_some(), k % 2 == 1);
                let next = ctx.sample(i, &mut seqs[k]).unwrap();
                out[k].push(next);
            }
        }
        step += 1;
    }
    for s in &mut seqs {
        ctx.release(s);
    }
    assert_eq!(ctx.kv_stats().used, 0);
    out
}

#[test]
fn eight_sequences_joining_at_different_steps_decode_as_each_alone() {
    for fixture in FIXTURES {
        let loaded = common::load(&common::fixtures().join(fixture));
        let model = &loaded.model;
        let prompts = prompts(model.config.vocab_size as u32);
        for kv_type in [KvType::F32, KvType::Bf16, KvType::F16] {
            let want: Vec<Vec<u32>> = prompts.iter().map(|p| alone(model, p, 12, kv_type)).collect();
            let got = together(model, &prompts, 12, kv_type);
            assert_eq!(got, want, "{fixture} {kv_type:?}");
        }
    }
}

/// A bad batch fails before anything changes; a full pool says so.
#[test]
fn bad_batches_are_refused_without_side_effects() {
    let loaded = common::load(&common::fixtures().join(FIXTURES[0]));
    let model = &loaded.model;
    let mut ctx = context(model, 2 * BLOCK_TOKENS, 8, KvType::F32);
    let (mut a, mut b) = (Sequence::new(), Sequence::new());
    let long: Vec<u32> = (0..40).collect();
    // More rows than the context's batch.
    let mut batch = [Segment { seq: &mut a, tokens: &long[..9], logits: Logits::Last }];
    let e = model.forward_batch(&mut ctx, &mut batch).unwrap_err();
    assert!(e.to_string().contains("batch of 9 rows"), "{e}");
    // A token outside the vocabulary, in the second segment: the first is not run either.
    let bad = [1u32, 99_999];
    let mut batch = [
        Segment { seq: &mut a, tokens: &long[..2], logits: Logits::Last },
        Segment { seq: &mut b, tokens: &bad, logits: Logits::Last },
    ];
    assert!(model.forward_batch(&mut ctx, &mut batch).is_err());
    assert!(a.is_empty() && b.is_empty() && ctx.kv_stats().used == 0);
    // Two blocks in the pool: 40 tokens take both, so the next sequence's block is refused.
    model.forward(&mut ctx, &mut a, &long, Logits::Last).unwrap();
    let e = model.forward(&mut ctx, &mut b, &[1], Logits::Last).unwrap_err();
    assert!(e.to_string().contains("KV cache is full"), "{e}");
    assert!(b.is_empty());
    ctx.release(&mut a);
    model.forward(&mut ctx, &mut b, &[1], Logits::Last).unwrap();
}

#[test]
fn a_shared_prefix_is_computed_once_and_gives_the_same_logits() {
    let loaded = common::load(&common::fixtures().join(FIXTURES[0]));
    let model = &loaded.model;
    let vocab = model.config.vocab_size;
    let mut ctx = context(model, 8 * BLOCK_TOKENS, 512, KvType::F32);
    let system: Vec<u32> = (0..2 * BLOCK_TOKENS as u32 + 5).map(|i| (i * 7 + 1) % vocab as u32).collect();
    let mut first = Sequence::new();
    let mut p1 = system.clone();
    p1.extend([3, 4, 5]);
    model.forward(&mut ctx, &mut first, &p1, Logits::Last).unwrap();
    let used = ctx.kv_stats().used;
    ctx.release(&mut first);
    // The second prompt starts with the same two blocks: they are taken, not computed.
    let mut p2 = system.clone();
    p2.extend([9, 8]);
    let mut second = Sequence::new();
    let taken = ctx.share_prefix(&mut second, &p2);
    assert_eq!(taken, 2 * BLOCK_TOKENS);
    model.forward(&mut ctx, &mut second, &p2[taken..], Logits::Last).unwrap();
    let shared = ctx.logits().to_vec();
    assert!(ctx.kv_stats().used <= used);
    let mut fresh_ctx = context(model, 8 * BLOCK_TOKENS, 512, KvType::F32);
    model.forward(&mut fresh_ctx, &mut Sequence::new(), &p2, Logits::Last).unwrap();
    assert_eq!(shared, fresh_ctx.logits());
    // Truncating into a shared block drops that block instead of overwriting it.
    let kept = ctx.truncate(&mut second, BLOCK_TOKENS + 3);
    assert_eq!(kept, BLOCK_TOKENS);
}

/// Collects a request's events.
fn drain(rx: mpsc::Receiver<Event>) -> (Vec<u32>, String, Option<bitnet_inference::scheduler::Finish>) {
    let (mut ids, mut text, mut done) = (Vec::new(), String::new(), None);
    for e in rx {
        match e {
            Event::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            Event::Text(t) => text.push_str(&t),
            Event::Done(f) => done = Some(f),
            Event::Error(m) => panic!("request failed: {m}"),
        }
    }
    (ids, text, done)
}

fn scheduler(
    model: Arc<Model<CpuBackend>>,
    tok: Arc<bitnet_models::tokenizer::Tokenizer>,
    kv_tokens: usize,
) -> Scheduler {
    let opts = ContextOptions { max_batch: 64, ..ContextOptions::new(kv_tokens) };
    let ctx = Context::new(&model, CpuBackend::new(), &opts).unwrap();
    let sched = SchedulerOptions { max_seqs: 8, max_queue: 16, prefill_chunk: 24 };
    Scheduler::start(model, ctx, Some(tok), sched).unwrap()
}

#[test]
fn the_scheduler_serves_many_requests_as_each_alone_even_when_preempting() {
    let mut loaded = common::load(&common::fixtures().join(FIXTURES[0]));
    let tok = Arc::new(loaded.tokenizer.take().unwrap());
    let model = Arc::new(loaded.model);
    let prompts = prompts(model.config.vocab_size as u32);
    let n = 20;
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| alone(&model, p, n, KvType::F32)).collect();
    // Room for everything, then a cache of 12 blocks: 8 sequences of up to 90 tokens do not fit
    // at once, so the scheduler must preempt and recompute.
    for kv_tokens in [4096, 12 * BLOCK_TOKENS] {
        let s = scheduler(model.clone(), tok.clone(), kv_tokens);
        let rxs: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (tx, rx) = mpsc::channel();
                let req = Request { prompt_ids: p.clone(), max_tokens: n, ..Default::default() };
                s.submit(req, Box::new(tx)).unwrap();
                rx
            })
            .collect();
        for (k, rx) in rxs.into_iter().enumerate() {
            let (ids, _, done) = drain(rx);
            let done = done.unwrap();
            assert_eq!(ids, want[k], "kv {kv_tokens} request {k}");
            assert_eq!((done.reason, done.completion_tokens), (FinishReason::Length, n));
        }
        let stats = s.stats();
        assert_eq!((stats.running, stats.queued, stats.kv.used), (0, 0, 0), "{stats:?}");
        if kv_tokens < 1000 {
            assert!(stats.preemptions > 0, "a cache of 12 blocks should have forced preemption: {stats:?}");
        }
        s.shutdown(false);
    }
}

#[test]
fn the_scheduler_refuses_bad_requests_and_frees_cancelled_ones() {
    let mut loaded = common::load(&common::fixtures().join(FIXTURES[0]));
    let tok = Arc::new(loaded.tokenizer.take().unwrap());
    let model = Arc::new(loaded.model);
    let s = scheduler(model.clone(), tok, 4096);
    let submit = |prompt: Vec<u32>, sampling: SamplingParams| {
        let (tx, rx) = mpsc::channel();
        let r = s.submit(
            Request { prompt_ids: prompt, max_tokens: 400, sampling, ..Default::default() },
            Box::new(tx),
        );
        (r, rx)
    };
    assert_eq!(submit(vec![], SamplingParams::default()).0, Err(SubmitError::EmptyPrompt));
    let too_long = vec![1; model.config.max_position_embeddings];
    assert!(matches!(submit(too_long, SamplingParams::default()).0, Err(SubmitError::PromptTooLong { .. })));
    assert!(matches!(
        submit(vec![1, 100_000], SamplingParams::default()).0,
        Err(SubmitError::TokenOutOfRange { .. })
    ));
    let hot = SamplingParams { temperature: -1.0, ..Default::default() };
    assert!(matches!(submit(vec![1], hot).0, Err(SubmitError::Sampling(_))));
    // A client that goes away mid-stream: its request ends and its blocks come back.
    let (r, rx) = submit(vec![1, 2, 3], SamplingParams { temperature: 1.0, seed: 4, ..Default::default() });
    r.unwrap();
    let first = rx.recv().unwrap();
    assert!(matches!(first, Event::Token { .. }));
    drop(rx);
    // A request after it still runs to the end; by then the cancelled one has been dropped.
    let (r, rx) = submit(vec![4, 5], SamplingParams::default());
    r.unwrap();
    let (_, _, done) = drain(rx);
    // 400 new tokens do not fit a 256-token model: max_tokens is cut to the room left.
    let done = done.unwrap();
    assert_eq!((done.reason, done.completion_tokens), (FinishReason::Length, 254));
    s.shutdown(false);
    let stats = s.stats();
    assert_eq!(stats.kv.used, 0, "{stats:?}");
    // After shutdown nothing is accepted.
    assert_eq!(submit(vec![1], SamplingParams::default()).0, Err(SubmitError::ShuttingDown));
}

#[test]
fn a_second_turn_computes_only_its_new_tokens_and_answers_as_from_scratch() {
    use bitnet_inference::{generate, GenerateOptions};
    let mut loaded = common::load(&common::fixtures().join(FIXTURES[0]));
    let tok = loaded.tokenizer.take().unwrap();
    let model = &loaded.model;
    let opts = GenerateOptions { max_new_tokens: 8, ..Default::default() };
    let mut ctx = context(model, 512, 512, KvType::F32);
    let mut seq = Sequence::new();
    let turn1: Vec<u32> = (0..40).map(|i| (i * 13 + 2) % 500).collect();
    let g1 =
        generate(model, &mut ctx, &mut seq, &tok, &turn1, &opts, |_| std::ops::ControlFlow::Continue(()))
            .unwrap();
    // The next turn: the history, the reply, and a new user message.
    let mut turn2 = turn1.clone();
    turn2.extend(&g1.generated);
    turn2.extend([7, 8, 9]);
    let g2 =
        generate(model, &mut ctx, &mut seq, &tok, &turn2, &opts, |_| std::ops::ControlFlow::Continue(()))
            .unwrap();
    // Everything but the last generated token (never fed) was cached.
    assert_eq!(g2.cached_prompt_tokens, turn1.len() + g1.generated.len() - 1);
    let mut fresh_ctx = context(model, 512, 512, KvType::F32);
    let fresh = generate(model, &mut fresh_ctx, &mut Sequence::new(), &tok, &turn2, &opts, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(g2.generated, fresh.generated);
    // A callback that breaks stops the generation at once.
    let mut n = 0;
    let g3 = generate(model, &mut ctx, &mut seq, &tok, &turn1, &opts, |_| {
        n += 1;
        std::ops::ControlFlow::Break(())
    })
    .unwrap();
    assert_eq!((g3.stop_reason, n), (bitnet_inference::StopReason::Cancelled, 1));
}
