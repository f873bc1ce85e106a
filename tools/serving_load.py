#!/usr/bin/env python3
"""Throughput of an OpenAI-compatible server under N concurrent streaming clients.

    python3 tools/serving_load.py --url http://127.0.0.1:8080 --streams 1,4,16,32 \
        --prompt-chars 512 --max-tokens 128 [--api-key K] [--ignore-eos] [--temperature T]

Each round starts N clients at once; each sends one streaming /v1/completions request (a
distinct prompt, temperature 0 unless --temperature says otherwise) and reads the SSE stream. Printed per round: aggregate decode
tokens/s once every stream has its first token (the batched steady state), end-to-end tokens/s,
and p50/p99 time to first token and inter-token latency. Standard library only, so that the same
script drives bitnet serve and llama-server on the device machine. Refuses non-loopback URLs.
"""
import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse


def percentile(xs, q):
    if not xs:
        return 0.0
    xs = sorted(xs)
    k = max(1, min(len(xs), int(-(-q * len(xs) // 1))))
    return xs[k - 1]


def one_stream(url, prompt, max_tokens, api_key, ignore_eos, temperature, start, out):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "stream": True}
    if ignore_eos:
        body["ignore_eos"] = True
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = "Bearer " + api_key
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    resp = conn.getresponse()
    if resp.status != 200:
        out.append({"error": f"HTTP {resp.status}: {resp.read()[:200]!r}"})
        return
    arrivals = []
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        choices = chunk.get("choices") or []
        if choices and choices[0].get("text"):
            arrivals.append(time.perf_counter())
    out.append({"arrivals": arrivals})


def round_of(url, n, prompt_chars, max_tokens, api_key, ignore_eos, temperature):
    words = "the quick brown fox jumps over a lazy dog while seven bright stars rise ".split()
    results, threads = [], []
    start = time.perf_counter()
    for k in range(n):
        text = " ".join(words[(i * 7 + k * 3) % len(words)] for i in range(prompt_chars // 5))[:prompt_chars]
        t = threading.Thread(
            target=one_stream,
            args=(url, f"{k}: {text}", max_tokens, api_key, ignore_eos, temperature, start, results),
        )
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        sys.exit(f"{len(errors)} requests failed: {errors[0]}")
    streams = [r["arrivals"] for r in results if r["arrivals"]]
    firsts = [s[0] for s in streams]
    all_started = max(firsts)
    end = max(s[-1] for s in streams)
    total = sum(len(s) for s in streams)
    decoded = sum(1 for s in streams for t in s if t > all_started)
    ttft = [(f - start) * 1e3 for f in firsts]
    itl = [(b - a) * 1e3 for s in streams for a, b in zip(s, s[1:])]
    return {
        "streams": n,
        "decode_tokens_per_s": decoded / max(end - all_started, 1e-9),
        "end_to_end_tokens_per_s": total / max(end - start, 1e-9),
        "ttft_p50_ms": percentile(ttft, 0.5),
        "ttft_p99_ms": percentile(ttft, 0.99),
        "itl_p50_ms": percentile(itl, 0.5),
        "itl_p99_ms": percentile(itl, 0.99),
        "chunks": total,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--streams", default="1,4,16,32")
    ap.add_argument("--prompt-chars", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--api-key")
    ap.add_argument("--ignore-eos", action="store_true", help="llama-server's extension: decode max-tokens always")
    ap.add_argument("--temperature", type=float, default=0.0, help="sample (OpenAI's default is 1) instead of greedy")
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    host = urllib.parse.urlparse(a.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"refusing {a.url}: this load tool only targets loopback")
    print(f"| server | streams | decode tokens/s | end-to-end tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in [int(x) for x in a.streams.split(",")]:
        r = round_of(a.url, n, a.prompt_chars, a.max_tokens, a.api_key, a.ignore_eos, a.temperature)
        print(f"| {a.label} | {n} | {r['decode_tokens_per_s']:.1f} | {r['end_to_end_tokens_per_s']:.1f} | "
              f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
