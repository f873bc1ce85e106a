#!/usr/bin/env python3
"""Gradient fixture for bitnet-training: the loss and every parameter's gradient of the tiny
BitNet under the straight-through estimator, from transformers' own BitNet model.

The model is transformers' `BitNetForCausalLM` (RMSNorm, NeoX RoPE, GQA, ReLU², sub-norms, tied
head) with each decoder projection's forward replaced by the STE BitLinear

    x_q = x + (actquant(x) - x).detach()      # per-token absmax int8, round half to even
    w_q = w + (weightquant(w) - w).detach()   # per-tensor absmean ternary
    y   = F.linear(x_q, w_q)

run in float64 (so float noise cannot push an activation across an int8 rounding boundary; the
smallest distance of any x·s_a to a boundary is recorded as `min_rounding_margin`).
Config: the tiny fixture (vocab 512, hidden 128, intermediate 384, 2 layers, 4 heads, 2 kv heads),
weights drawn as in make_hf_fixture.py (bf16-exact), a fixed batch of 2 x 17 token ids.

Writes OUT/grad_tiny.safetensors (input_ids; param.<name> BF16; grad.<name> F32;
codes.<projection> I8, the int8 activation codes of every projection input) and OUT/meta.json.

    TORCHDYNAMO_DISABLE=1 python3 tools/make_grad_fixture.py tests/fixtures/grad-tiny
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import transformers
from transformers import BitNetConfig, BitNetForCausalLM

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/grad-tiny")
OUT.mkdir(parents=True, exist_ok=True)
SEED = 20250416
torch.manual_seed(SEED)
torch.set_num_threads(2)

cfg = BitNetConfig(
    vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, hidden_act="relu2", max_position_embeddings=64,
    rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=True,
    rope_theta=500000.0, attention_bias=False,
)
cfg._attn_implementation = "eager"
model = BitNetForCausalLM(cfg)
g = torch.Generator().manual_seed(SEED)
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            v = torch.randn(p.shape, generator=g) * 0.5
        elif "norm" in name:
            v = 1.0 + 0.25 * torch.randn(p.shape, generator=g)
        else:
            v = torch.randn(p.shape, generator=g) * 0.2
        p.copy_(v.to(torch.bfloat16).to(torch.float32))
model.tie_weights()
model = model.double()
assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

codes = {}
margins = []


class SteBitLinear(torch.nn.Module):
    def __init__(self, linear, name):
        super().__init__()
        self.weight = linear.weight
        self.name = name

    def forward(self, x):
        s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        xs = x * s
        q = xs.round().clamp(-128, 127)
        codes[self.name] = q.detach().to(torch.int8).reshape(-1, q.shape[-1]).clone()
        margins.append(float(((xs - xs.floor()) - 0.5).abs().min().detach()))
        x_q = x + (q / s - x).detach()
        ws = 1.0 / self.weight.abs().mean().clamp(min=1e-5)
        w_q = self.weight + ((self.weight * ws).round().clamp(-1, 1) / ws - self.weight).detach()
        return F.linear(x_q, w_q)


PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
for l, layer in enumerate(model.model.layers):
    for p in PROJ:
        parent_name, attr = p.split(".")
        parent = getattr(layer, parent_name)
        setattr(parent, attr, SteBitLinear(getattr(parent, attr), f"model.layers.{l}.{p}"))

ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(7))
logits = model(input_ids=ids[:, :-1], use_cache=False).logits
loss = F.cross_entropy(logits.reshape(-1, 512), ids[:, 1:].reshape(-1))
loss.backward()

tensors = {"input_ids": ids.to(torch.int64)}
for name, p in model.named_parameters():
    tensors[f"param.{name}"] = p.detach().to(torch.bfloat16).contiguous()
    tensors[f"grad.{name}"] = p.grad.detach().to(torch.float32).contiguous()
for name, c in codes.items():
    tensors[f"codes.{name}"] = c.contiguous()
save_file(tensors, OUT / "grad_tiny.safetensors")
meta = {
    "generator": "tools/make_grad_fixture.py", "seed": SEED, "torch": torch.__version__,
    "transformers": transformers.__version__, "dtype": "float64",
    "loss": float(loss), "loss_repr": repr(float(loss)),
    "min_rounding_margin": min(margins),
    "config": {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "relu2",
               "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 64,
               "tie_word_embeddings": True},
    "batch": {"sequences": 2, "seq_len": 16, "input_ids_shape": [2, 17]},
    "parameters": sorted(n for n, _ in model.named_parameters()),
}
(OUT / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
print(json.dumps({k: meta[k] for k in ["loss", "min_rounding_margin", "torch", "transformers"]}))
