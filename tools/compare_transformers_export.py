#!/usr/bin/env python3
"""Loads a model exported by `bitnet train` with transformers and compares its logits with
bitnet-training's own forward over the same checkpoint (examples/export_logits.rs).

    cargo build --release -p bitnet-training --example export_logits
    TORCHDYNAMO_DISABLE=1 python3 tools/compare_transformers_export.py assets/default-model \
        --engine target/release/examples/export_logits

For each prompt: transformers greedily continues it by --new tokens; both engines then score the
whole sequence, and the script reports the largest and mean absolute logit difference and how
often the two argmaxes agree. Exit status 1 if any argmax differs where transformers' top-1 /
top-2 margin is above --margin (a near-tie can legitimately flip on float noise).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("model_dir")
p.add_argument("--engine", default="target/release/examples/export_logits")
p.add_argument("--new", type=int, default=24)
p.add_argument("--margin", type=float, default=0.05)
p.add_argument("--prompts", nargs="*", default=[
    "The king said", "It is a truth universally acknowledged", "And God said unto Moses"])
a = p.parse_args()

tok = Tokenizer.from_file(os.path.join(a.model_dir, "tokenizer.json"))
model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="eager")
model = model.to(torch.float32).eval()  # transformers keeps bf16 embeddings/norms of quantized checkpoints
kinds = sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith("q_proj")})
report = {"model": a.model_dir, "linear_class": kinds, "prompts": []}
bad = 0
for prompt in a.prompts:
    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                             eos_token_id=None, pad_token_id=1)
        theirs = model(gen, use_cache=False).logits[0].float().numpy()
    seq = gen[0].tolist()
    with tempfile.NamedTemporaryFile(suffix=".f32") as f:
        subprocess.run([a.engine, a.model_dir, f.name] + [str(i) for i in seq], check=True)
        ours = np.fromfile(f.name, dtype="<f4").reshape(len(seq), -1)
    diff = np.abs(ours - theirs)
    top2 = np.sort(theirs, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    agree = ours.argmax(-1) == theirs.argmax(-1)
    flips = int((~agree & (margin > a.margin)).sum())
    bad += flips
    report["prompts"].append({
        "prompt": prompt, "tokens": len(seq), "text": tok.decode(seq),
        "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
        "logit_abs_max": float(np.abs(theirs).max()),
        "argmax_agreement": float(agree.mean()), "argmax_flips_above_margin": flips})
print(json.dumps(report, indent=2))
sys.exit(1 if bad else 0)
