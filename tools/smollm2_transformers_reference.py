#!/usr/bin/env python3
"""transformers' greedy ids and per-position top-1 for a llama GGUF, as test data.

    python3 tools/smollm2_transformers_reference.py MODEL.gguf OUT.json

transformers loads the GGUF itself (`from_pretrained(dir, gguf_file=...)`: every tensor
dequantized to float32) and runs it in float32. For each prompt: the prompt's ids, the prompt
followed by 32 greedy tokens, and the argmax of the logits at every position of that sequence
(teacher forcing). `crates/bitnet-inference/tests/dense_gguf.rs` compares the engine with them.
Needs torch, transformers, gguf and accelerate (pip).
"""
import json
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a little",
    "Water boils at a temperature of",
]


def main():
    path, out_path = sys.argv[1], sys.argv[2]
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    cases = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            full = model.generate(ids, max_new_tokens=32, do_sample=False)
            top1 = model(full).logits[0].argmax(-1).tolist()
        cases.append({"prompt": prompt, "input_ids": ids[0].tolist(), "greedy_ids": full[0].tolist(), "top1": top1})
        print(f"{prompt!r} -> {tok.decode(full[0][ids.shape[1]:])!r}")
    meta = {"file": name, "transformers": __import__("transformers").__version__, "torch": torch.__version__}
    with open(out_path, "w") as f:
        json.dump({"made_with": meta, "cases": cases}, f)


if __name__ == "__main__":
    main()
