#!/usr/bin/env python3
"""Per-kernel GPU time of the last decode steps, from an Nsight Compute CSV.

    ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \\
        bitnet bench --model M --device cuda -p 8 -n 8 -r 1 --no-probe > ncu.csv
    python3 tools/ncu_summary.py ncu.csv --steps 8

A forward step starts with the `embedding` kernel; the last --steps steps are the timed
decode steps of the bench's tg row. Prints, per kernel, launches and microseconds per step,
the grid of its first launch, and the step's total kernel time (which leaves out launch gaps:
ncu runs kernels one at a time).
"""
import argparse
import csv
import io
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    text = open(a.csv, encoding="utf-8", errors="replace").read()
    start = text.find('"ID"')
    rows = [r for r in csv.DictReader(io.StringIO(text[start:])) if r.get("Metric Name") == "gpu__time_duration.sum"]
    launches = [(r["Kernel Name"].split("(")[0], float(r["Metric Value"].replace(",", "")), r.get("Grid Size", "")) for r in rows]
    starts = [i for i, (name, _, _) in enumerate(launches) if name == "embedding"]
    if len(starts) < a.steps:
        raise SystemExit(f"{len(starts)} forward steps in the profile, fewer than --steps {a.steps}")
    steps = launches[starts[-a.steps]:]
    per = defaultdict(lambda: [0, 0.0, ""])
    for name, ns, grid in steps:
        p = per[name]
        p[0] += 1
        p[1] += ns
        p[2] = p[2] or grid
    total = sum(p[1] for p in per.values()) / a.steps
    print(f"{len(launches)} kernels profiled; the last {a.steps} steps: {total / 1e3:.1f} us of kernel time a step")
    print(f"{'kernel':<28}{'launches/step':>14}{'us/step':>10}{'us/launch':>11}{'share':>8}  grid")
    for name, (n, ns, grid) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:<28}{n / a.steps:>14.1f}{ns / a.steps / 1e3:>10.1f}{ns / n / 1e3:>11.2f}{100 * ns / a.steps / total:>7.1f}%  {grid}")


if __name__ == "__main__":
    main()
