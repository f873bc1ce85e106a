#!/usr/bin/env python3
"""Tokens/s and CPU time of a generation from Python (the `bitnet` module) against the CLI.

Alternates CLI and Python runs (A B, then B A, ...) with the same model, prompt, token count and
threads, and prints the medians and the machine's load average around each run (the numbers of
docs/python.md). The model is loaded once in Python; the CLI loads it on every run, which is
outside its timings.

    python tools/python_overhead.py --bin target/release/bitnet --model /tmp/bitnet-2b4t \
        --threads 2 -n 64 --rounds 9

Per run:
  decode   : tokens/s after the first (the engine's own timing: the CLI's JSON, Generation)
  total    : generated tokens / wall time: the CLI's prompt + decode time; for Python the
             wall time of the model.generate() call as Python sees it
  stream   : generated tokens / wall time of list(model.generate(..., stream=True))
  cpu/tok  : CPU time (user + system, every thread) per decoded token: the CPU time of an
             n-token run less that of a 1-token run, over n - 1 tokens (getrusage: the CLI's
             as a child process, Python's own). Contention changes wall times far more
             than the work done, so this shows overhead on a loaded machine best.
"""

import argparse
import json
import resource
import statistics
import subprocess
import time

import bitnet


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cpu_seconds(who) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def cli_generate(args, n) -> tuple:
    cmd = [args.bin, "generate", "--model", args.model, "--json", "-n", str(n), "-t", str(args.threads)]
    before = cpu_seconds(resource.RUSAGE_CHILDREN)
    out = subprocess.run([*cmd, "--prompt", args.prompt], capture_output=True, text=True, check=True)
    return json.loads(out.stdout), cpu_seconds(resource.RUSAGE_CHILDREN) - before


def cli_run(args) -> dict:
    _, cpu_one = cli_generate(args, 1)
    j, cpu_n = cli_generate(args, args.n)
    generated = len(j["generated"])
    prompt_s = len(j["tokens"]) / j["prompt_tokens_per_s"]
    decode_s = (generated - 1) / j["decode_tokens_per_s"]
    return {
        "decode": j["decode_tokens_per_s"],
        "total": generated / (prompt_s + decode_s),
        "cpu": (cpu_n - cpu_one) / (generated - 1),
        "n": generated,
    }


def python_run(model, args) -> dict:
    before = cpu_seconds(resource.RUSAGE_SELF)
    model.generate(args.prompt, max_tokens=1)
    cpu_one = cpu_seconds(resource.RUSAGE_SELF) - before
    before = cpu_seconds(resource.RUSAGE_SELF)
    started = time.perf_counter()
    g = model.generate(args.prompt, max_tokens=args.n)
    call_s = time.perf_counter() - started
    cpu_n = cpu_seconds(resource.RUSAGE_SELF) - before
    started = time.perf_counter()
    pieces = list(model.generate(args.prompt, max_tokens=args.n, stream=True))
    stream_s = time.perf_counter() - started
    assert "".join(pieces) == g.text
    n = len(g.token_ids)
    return {
        "decode": g.decode_tokens_per_s,
        "total": n / call_s,
        "stream": n / stream_s,
        "cpu": (cpu_n - cpu_one) / (n - 1),
        "n": n,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True, help="the bitnet CLI binary")
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--prompt", default="The capital of France is")
    args = p.parse_args()

    model = bitnet.Model.load(args.model, threads=args.threads)
    model.generate(args.prompt, max_tokens=4)  # warm the context pool
    cli, py, loads = [], [], []
    for r in range(args.rounds):
        # A B in even rounds, B A in odd ones: neither side always runs right after the other.
        for side in ("cli", "py") if r % 2 == 0 else ("py", "cli"):
            loads.append(loadavg())
            if side == "cli":
                cli.append(cli_run(args))
            else:
                py.append(python_run(model, args))
        a, b = cli[-1], py[-1]
        print(
            f"round {r + 1}: load {loads[-2]:.2f}/{loads[-1]:.2f} | cli decode {a['decode']:.2f} "
            f"total {a['total']:.2f} cpu/tok {a['cpu'] * 1e3:.0f} ms | py decode {b['decode']:.2f} "
            f"total {b['total']:.2f} stream {b['stream']:.2f} cpu/tok {b['cpu'] * 1e3:.0f} ms "
            f"({a['n']}/{b['n']} tokens)",
            flush=True,
        )

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    print(f"medians over {args.rounds} rounds, {args.threads} threads, -n {args.n}:")
    for key, what in [("decode", "decode tokens/s"), ("total", "whole call tokens/s")]:
        c, q = med(cli, key), med(py, key)
        print(f"  {what:<22} cli {c:6.2f}  python {q:6.2f}  ({q / c - 1:+.1%})")
    c, q = med(cli, "total"), med(py, "stream")
    print(f"  {'streamed tokens/s':<22} cli {c:6.2f}  python {q:6.2f}  ({q / c - 1:+.1%}, against the CLI's whole call)")
    c, q = med(cli, "cpu") * 1e3, med(py, "cpu") * 1e3
    print(f"  {'CPU ms per token':<22} cli {c:6.1f}  python {q:6.1f}  ({q / c - 1:+.1%})")
    print(f"  load average: median {statistics.median(loads):.2f}, min {min(loads):.2f}, max {max(loads):.2f}")


if __name__ == "__main__":
    main()
