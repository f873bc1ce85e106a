#!/usr/bin/env python3
"""RoPE scaling as transformers computes it: inverse frequencies and attention factor of a few
linear, llama3 and yarn configurations, for the engine's `RopeScaling::inv_freq` test
(crates/bitnet-models/tests/rope_scaling.rs).

Usage (repository root):
  TORCHDYNAMO_DISABLE=1 /work/venv-torch/bin/python tools/make_rope_scaling_fixture.py \
      tests/data/rope-scaling/cases.json
"""
import json
import sys

import transformers
from transformers import LlamaConfig, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

CASES = [
    # (config class, head_dim, rope_theta, max_position_embeddings, rope_scaling as config.json writes it)
    ("qwen3", 128, 1_000_000.0, 131072, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    ("qwen3", 128, 1_000_000.0, 65536, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32768}),
    ("qwen3", 32, 1_000_000.0, 256, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    ("qwen3", 64, 10_000.0, 4096, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512,
                                   "beta_fast": 16, "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0}),
    ("qwen3", 64, 10_000.0, 4096, {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 1024,
                                   "truncate": False, "attention_factor": 1.25}),
    ("llama", 128, 500_000.0, 131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    ("llama", 64, 500_000.0, 131072, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    ("llama", 64, 10_000.0, 8192, {"rope_type": "linear", "factor": 2.0}),
]

out = []
for arch, head_dim, theta, max_pos, scaling in CASES:
    cls = Qwen3Config if arch == "qwen3" else LlamaConfig
    cfg = cls(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=4, head_dim=head_dim,
              max_position_embeddings=max_pos, rope_theta=theta, rope_scaling=dict(scaling))
    inv_freq, attention = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
    config_json = {"model_type": arch, "head_dim": head_dim, "rope_theta": theta,
                   "max_position_embeddings": max_pos, "rope_scaling": scaling}
    out.append({"config": config_json, "inv_freq": [float(x) for x in inv_freq.tolist()],
                "attention_factor": float(attention)})
with open(sys.argv[1], "w") as f:
    json.dump({"generator": "tools/make_rope_scaling_fixture.py", "transformers": transformers.__version__,
               "cases": out}, f, indent=1)
    f.write("\n")
print(len(out), "cases")
