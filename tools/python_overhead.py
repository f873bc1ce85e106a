#!/usr/bin/env python3
"""Tokens/s of a generation from Python (the `bitnet` module) against the `bitnet` CLI.

Alternates CLI and Python runs (A B A B ...) with the same model, prompt, token count and
threads, and prints the medians and the machine's load average around each run (the numbers of
docs/python.md). The model is loaded once in Python; the CLI loads it on every run, which is
outside its timings.

    python tools/python_overhead.py --bin target/release/bitnet --model /tmp/bitnet-2b4t \
        --threads 2 -n 64 --rounds 7

Per run:
  cli decode     : the CLI's own decode tokens/s (tokens after the first / decode time)
  py decode      : the same figure measured by the engine inside the Python process
  cli total      : generated tokens / (prompt time + decode time), from the CLI's JSON
  py call        : generated tokens / wall time of the model.generate() call, as Python sees it
  py stream      : generated tokens / wall time of list(model.generate(..., stream=True))
"""

import argparse
import json
import statistics
import subprocess
import time

import bitnet


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cli_run(args) -> dict:
    cmd = [args.bin, "generate", "--model", args.model, "--json", "-n", str(args.n), "-t", str(args.threads)]
    out = subprocess.run([*cmd, "--prompt", args.prompt], capture_output=True, text=True, check=True)
    j = json.loads(out.stdout)
    generated = len(j["generated"])
    prompt_s = len(j["tokens"]) / j["prompt_tokens_per_s"]
    decode_s = (generated - 1) / j["decode_tokens_per_s"]
    return {"decode": j["decode_tokens_per_s"], "total": generated / (prompt_s + decode_s), "n": generated}


def python_run(model, args) -> dict:
    started = time.perf_counter()
    g = model.generate(args.prompt, max_tokens=args.n)
    call_s = time.perf_counter() - started
    started = time.perf_counter()
    pieces = list(model.generate(args.prompt, max_tokens=args.n, stream=True))
    stream_s = time.perf_counter() - started
    assert "".join(pieces) == g.text
    n = len(g.token_ids)
    return {"decode": g.decode_tokens_per_s, "call": n / call_s, "stream": n / stream_s, "n": n}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True, help="the bitnet CLI binary")
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--prompt", default="The capital of France is")
    args = p.parse_args()

    model = bitnet.Model.load(args.model, threads=args.threads)
    model.generate(args.prompt, max_tokens=4)  # warm the context pool
    rows = []
    for r in range(args.rounds):
        load_a = loadavg()
        a = cli_run(args)
        load_b = loadavg()
        b = python_run(model, args)
        rows.append((a, b, load_a, load_b))
        print(
            f"round {r + 1}: load {load_a:.2f} cli decode {a['decode']:.2f} total {a['total']:.2f} | "
            f"load {load_b:.2f} py decode {b['decode']:.2f} call {b['call']:.2f} stream {b['stream']:.2f} "
            f"({a['n']}/{b['n']} tokens)",
            flush=True,
        )
    med = lambda xs: statistics.median(xs)  # noqa: E731
    cli_decode = med([a["decode"] for a, _, _, _ in rows])
    py_decode = med([b["decode"] for _, b, _, _ in rows])
    cli_total = med([a["total"] for a, _, _, _ in rows])
    py_call = med([b["call"] for _, b, _, _ in rows])
    py_stream = med([b["stream"] for _, b, _, _ in rows])
    loads = [l for _, _, la, lb in rows for l in (la, lb)]
    print(f"medians over {args.rounds} rounds, {args.threads} threads, -n {args.n}:")
    print(f"  decode tokens/s   cli {cli_decode:.2f}  python {py_decode:.2f}  ({py_decode / cli_decode - 1:+.1%})")
    print(f"  whole call        cli {cli_total:.2f}  python {py_call:.2f}  ({py_call / cli_total - 1:+.1%})")
    print(f"  streamed          python {py_stream:.2f}  ({py_stream / cli_total - 1:+.1%} vs cli)")
    print(f"  load average      median {med(loads):.2f}, min {min(loads):.2f}, max {max(loads):.2f}")


if __name__ == "__main__":
    main()
