#!/usr/bin/env python3
"""The dense bf16 peers of `bitnet bench --device cuda` on the 2B-4T shapes, on one GPU.

Prints, for a llama-shaped bf16 model with BitNet b1.58 2B-4T's sizes (hidden 2560,
intermediate 6912, 30 layers, 20 query / 5 kv heads of 128, vocab 128256, random weights):

* transformers decode tokens/s at batch 1 and 64, eager (dynamic cache) and compiled
  (static cache, which transformers compiles itself), each as the time of n2 - n1 extra
  generated tokens, so the prompt and start-up cancel;
* cuBLAS (torch.matmul) over the same weight matrices, batch 1 and 64: the time of one
  token's products, replayed from a CUDA graph, and the bytes it reads per second.

Run on the GPU machine: `python3 tools/cuda_peers.py [--skip-transformers]`. Nothing here is
timed on zeros; every time is the median of several runs after a warm-up.
"""
import argparse
import statistics
import time

import torch

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2560, 6912, 30, 20, 5, 128, 128256


def cublas_products(batch: int, reps: int = 20) -> tuple[float, float]:
    """(seconds per token step, GB/s) of bf16 matmuls over one step's weights."""
    qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    shapes = [(qkv, HIDDEN), (HIDDEN, HEADS * HEAD_DIM), (2 * INTER, HIDDEN), (HIDDEN, INTER)]
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [
        torch.randn(r, c, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        for _ in range(LAYERS)
        for (r, c) in shapes
    ]
    head = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    xs = {c: torch.randn(batch, c, device="cuda", dtype=torch.bfloat16, generator=g) for c in (HIDDEN, INTER)}

    def step():
        for w in weights:
            torch.matmul(xs[w.shape[1]], w.t())
        torch.matmul(xs[HIDDEN], head.t())

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    t = statistics.median(times)
    nbytes = sum(w.numel() * 2 for w in weights) + head.numel() * 2
    return t, nbytes / t / 1e9


def transformers_decode(batch: int, compiled: bool, n1: int = 16, n2: int = 80) -> float:
    """Decode tokens/s (all sequences together) of transformers' generate."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    prompt = torch.randint(0, VOCAB, (batch, 32), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if compiled:
        kw["cache_implementation"] = "static"

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        assert out.shape[1] == 32 + n, out.shape
        return time.perf_counter() - t

    run(n1)  # warm-up (and compilation)
    run(n2)
    d = [run(n2) - run(n1) for _ in range(3)]
    return batch * (n2 - n1) / statistics.median(d)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-transformers", action="store_true")
    a = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for b in (1, 64):
        t, gbs = cublas_products(b)
        print(f"cublas bf16 products, batch {b}: {t * 1e3:.3f} ms a step ({b / t:.0f} tokens/s), {gbs:.0f} GB/s")
    if a.skip_transformers:
        return
    import transformers

    print(f"transformers {transformers.__version__}")
    for compiled in (False, True):
        for b in (1, 64):
            name = "static cache, compiled" if compiled else "eager"
            try:
                print(f"transformers {name}, batch {b}: {transformers_decode(b, compiled):.1f} tokens/s")
            except Exception as e:  # report and go on: one failing mode must not hide the rest
                print(f"transformers {name}, batch {b}: failed: {type(e).__name__}: {str(e)[:200]}")


if __name__ == "__main__":
    main()
