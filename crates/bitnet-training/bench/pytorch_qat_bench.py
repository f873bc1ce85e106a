#!/usr/bin/env python3
"""Training throughput of the same BitNet b1.58 model in PyTorch (CPU, float32, eager), the
baseline for `bitnet train`'s tokens/s.

The model is the one bitnet-training trains: LLaMA-style decoder with BitLinear (absmean ternary
weights, per-token absmax int8 activations, straight-through estimator written as
`w + (q(w) - w).detach()`), RMSNorm, NeoX RoPE, GQA, ReLU² gate, attn/ffn sub-norms, tied head,
AdamW. Attention uses torch's fused scaled_dot_product_attention (causal), so the baseline is
PyTorch at its best on CPU, not a naive loop.

    python3 pytorch_qat_bench.py --threads 1 --steps 8      # the `small` preset's shapes
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=1)
p.add_argument("--steps", type=int, default=8)
p.add_argument("--warmup-steps", type=int, default=2)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--vocab", type=int, default=4096)
p.add_argument("--hidden", type=int, default=256)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--inter", type=int, default=800)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--kv", type=int, default=2)
p.add_argument("--fp", action="store_true", help="full precision (no quantization)")
p.add_argument("--compile", action="store_true", help="torch.compile the model")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)


def act_quant(x):
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127) / s


def weight_quant(w):
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * s).round().clamp(-1, 1) / s


class BitLinear(torch.nn.Linear):
    def forward(self, x):
        if a.fp:
            return F.linear(x, self.weight)
        xq = x + (act_quant(x) - x).detach()
        wq = self.weight + (weight_quant(self.weight) - self.weight).detach()
        return F.linear(xq, wq)


class RMSNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


hd = a.hidden // a.heads
inv_freq = 1.0 / (500000.0 ** (torch.arange(0, hd, 2).float() / hd))
ang = torch.arange(a.seq).float()[:, None] * inv_freq[None]
cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)


def rope(x):  # [B, H, T, hd]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        H, kv = a.hidden, a.kv * hd
        self.n1, self.n2 = RMSNorm(H), RMSNorm(H)
        self.q, self.k, self.v, self.o = BitLinear(H, H, bias=False), BitLinear(H, kv, bias=False), BitLinear(H, kv, bias=False), BitLinear(H, H, bias=False)
        self.attn_sub = RMSNorm(H)
        self.gate, self.up, self.down = BitLinear(H, a.inter, bias=False), BitLinear(H, a.inter, bias=False), BitLinear(a.inter, H, bias=False)
        self.ffn_sub = RMSNorm(a.inter)

    def forward(self, x):
        B, T, _ = x.shape
        h = self.n1(x)
        q = self.q(h).view(B, T, a.heads, hd).transpose(1, 2)
        k = self.k(h).view(B, T, a.kv, hd).transpose(1, 2)
        v = self.v(h).view(B, T, a.kv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        rep = a.heads // a.kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
        x = x + self.o(self.attn_sub(o))
        h = self.n2(x)
        m = F.relu(self.gate(h)).square() * self.up(h)
        return x + self.down(self.ffn_sub(m))


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(a.vocab, a.hidden)
        self.layers = torch.nn.ModuleList([Layer() for _ in range(a.layers)])
        self.norm = RMSNorm(a.hidden)
        for p_ in self.parameters():
            if p_.dim() == 2:
                torch.nn.init.normal_(p_, std=0.02)

    def forward(self, ids):
        x = self.emb(ids)
        for l in self.layers:
            x = l(x)
        return F.linear(self.norm(x), self.emb.weight)


model = Model()
n_params = sum(p_.numel() for p_ in model.parameters())
step_fn = torch.compile(model) if a.compile else model
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
data = torch.randint(0, a.vocab, (a.steps + a.warmup_steps, a.batch, a.seq + 1))
t0 = None
for i in range(a.steps + a.warmup_steps):
    if i == a.warmup_steps:
        t0 = time.perf_counter()
    ids = data[i]
    logits = step_fn(ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, a.vocab), ids[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
dt = time.perf_counter() - t0
tps = a.steps * a.batch * a.seq / dt
print(f"pytorch {torch.__version__} threads={a.threads} params={n_params} fp={a.fp} "
      f"tokens/s={tps:.0f} per_thread={tps / a.threads:.0f} loss={loss.item():.4f}")
