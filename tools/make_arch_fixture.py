#!/usr/bin/env python3
"""Tiny random models of the non-BitNet-layout architectures, with transformers' outputs.

Writes one fixture directory (tests/fixtures/<name>/) per run, in the golden format the parity
tests read (crates/bitnet-inference/tests/common/parity.rs; tests/fixtures/README.md):
<form>/{config.json, generation_config.json, tokenizer.json, model.safetensors} and
golden/<form>_f32.safetensors with input_ids, logits, hidden_states.{0..L}, greedy_ids,
greedy_full_logits, greedy_step_logits (and layer0.<proj>.{input,output} where the projections
are BitLinears), plus golden/golden.json.

Kinds (first argument):
  qwen3   Qwen3ForCausalLM: per-head q/k RMSNorm, head_dim from the config (not hidden/heads),
          SwiGLU, no BOS. Forms:
            dense   fp16 weights as stored (no quantization_config), tied head. Also written as
                    dense.gguf: llama.cpp's qwen3 names and keys, F16 matrices, F32 vectors
                    (what llama.cpp's converter writes for the same checkpoint).
            yarn    the dense weights with `rope_scaling: {"rope_type": "yarn", "factor": 4.0,
                    "original_max_position_embeddings": 64}` (transformers applies YaRN at every
                    position: scaled frequencies, cos and sin times 0.1 ln 4 + 1).
            bonsai  PrismML Ternary-Bonsai's form: every matrix (embeddings and the untied head
                    too) is ternary codes times one fp16 scale per group of FIX_GROUP input
                    columns, stored as fp16 (the "unpacked" checkpoints). The float model holding
                    exactly these values is the reference.
  gemma3  Gemma3ForCausalLM (model_type gemma3_text, google/gemma-3-270m's layout): embeddings times
          sqrt(hidden), Gemma RMSNorms (x · (1 + w)), four norms per layer (the attention and MLP
          outputs normed before their residual adds), per-head q/k norms, GeGLU (gelu_pytorch_tanh),
          scores scaled by query_pre_attn_scalar^-0.5, sliding-window attention on the layers
          layer_types names sliding (window FIX_WINDOW, shorter than the prompt) with RoPE base
          rope_local_base_freq, full attention with rope_theta and linear rope_scaling on the others,
          head_dim from the config, tied head, BOS prepended. Forms:
            dense   bf16 weights as stored (no quantization_config).
            master  the same layout with quantization_config autobitlinear/online: every projection a
                    BitLinear over bf16 master weights (embeddings, norms and head stay float).
  falcon  Falcon3-*-1.58bit / Falcon-E layout: LlamaForCausalLM with quantization_config
          {"modules_to_not_convert": ["lm_head"], "quant_method": "bitnet"} (BitLinear offline: U8 [out/4, in] codes, weight_scale a
          divisor), head_dim given in the config, rope_theta 1000042, untied bf16 lm_head that is
          never quantized. Form: packed_bitlinear.
  embed   A BitNet-embedding model on a Qwen3 backbone: Qwen3Model (what AutoModel loads, tensor
          names without "model."), quantization_config autobitlinear/online with use_rms_norm (an
          RMSNorm with a stored gain before every projection), tied embeddings. Form: master.
          Golden: golden/embed_f32.safetensors with input_ids.<i>, last_hidden_state.<i> and
          embedding.<i> (the last token's final-normed hidden state, L2-normalized: last-token
          pooling) for each text of EMBED_TEXTS; the tokenizer appends <|endoftext|>.

The reference is transformers itself: from_pretrained(form dir, dtype=float32,
attn_implementation="eager"), then .to(float32); greedy ids from generate() with the KV cache,
asserted equal to a loop without cache.

Usage (repository root):
  TORCHDYNAMO_DISABLE=1 /work/venv-torch/bin/python tools/make_arch_fixture.py KIND OUT_DIR
Environment (defaults per kind): FIX_SEED FIX_VOCAB FIX_HIDDEN FIX_INTER FIX_LAYERS FIX_HEADS FIX_KV
FIX_HEAD_DIM FIX_THETA FIX_NEW FIX_GROUP (bonsai group, 32) FIX_PROMPT; gemma3 also FIX_WINDOW
(sliding_window, 6), FIX_QPAS (query_pre_attn_scalar, 24), FIX_LOCAL_THETA (10000).
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from safetensors.torch import save_file

import transformers
from transformers import (AutoModel, AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3Model)
from transformers.integrations.bitnet import pack_weights

KIND = sys.argv[1]
OUT = Path(sys.argv[2])
assert KIND in ("qwen3", "falcon", "embed", "gemma3"), KIND
ENV = os.environ.get
DEFAULTS = {
    # vocab, hidden, inter, layers, heads, kv, head_dim, theta, seed
    "qwen3": (512, 64, 128, 2, 4, 2, 32, 1_000_000.0, 20260801),
    "falcon": (512, 128, 256, 2, 2, 1, 128, 1_000_042.0, 20260801),
    "embed": (512, 64, 128, 2, 4, 2, 32, 1_000_000.0, 20260801),
    # hidden 48: sqrt(48) is not a round number, and 4 heads of 16 are not hidden / heads (12).
    "gemma3": (512, 48, 64, 4, 4, 2, 16, 1_000_000.0, 20260809),
}[KIND]
TOKENIZER = OUT / "tokenizer.json.tmp"  # copied into every form, then removed
VOCAB = int(ENV("FIX_VOCAB", DEFAULTS[0]))
HIDDEN = int(ENV("FIX_HIDDEN", DEFAULTS[1]))
INTER = int(ENV("FIX_INTER", DEFAULTS[2]))
LAYERS = int(ENV("FIX_LAYERS", DEFAULTS[3]))
HEADS = int(ENV("FIX_HEADS", DEFAULTS[4]))
KV = int(ENV("FIX_KV", DEFAULTS[5]))
HEAD_DIM = int(ENV("FIX_HEAD_DIM", DEFAULTS[6]))
THETA = float(ENV("FIX_THETA", DEFAULTS[7]))
SEED = int(ENV("FIX_SEED", DEFAULTS[8]))
N_NEW = int(ENV("FIX_NEW", "16"))
GROUP = int(ENV("FIX_GROUP", "32"))
PROMPT = ENV("FIX_PROMPT", "The license grants you the freedom to")
EMBED_TEXTS = [
    "The license grants you the freedom to",
    "You may convey verbatim copies of the Program's source code as you receive it.",
    "Redistribution and use in source and binary forms",
    "patent",
]
MAX_POS = 256
# The qwen3 fixture's YaRN form: a factor of 4 over an original context of 64 positions.
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
# gemma3: the window of the sliding layers (shorter than the prompt, so that the mask cuts keys
# off), the attention scale's query_pre_attn_scalar (not head_dim), the sliding layers' RoPE base,
# which layers attend globally, and the global layers' RoPE scaling.
WINDOW = int(ENV("FIX_WINDOW", "6"))
QPAS = int(ENV("FIX_QPAS", "24"))
LOCAL_THETA = float(ENV("FIX_LOCAL_THETA", "10000"))
EMBED_STD = float(ENV("FIX_EMBED_STD", "0.1"))
GEMMA_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
GEMMA_ROPE_SCALING = {"rope_type": "linear", "factor": 2.0}
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

torch.manual_seed(SEED)
torch.set_num_threads(2)
OUT.mkdir(parents=True, exist_ok=True)
(OUT / "golden").mkdir(exist_ok=True)


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------ tokenizer
def make_tokenizer():
    """A byte-level BPE trained on local license texts. Qwen-style (qwen3, embed): no BOS, the
    ChatML markers and think tags as special tokens, and for `embed` a post-processor that appends
    <|endoftext|> (last-token pooling reads the state of that token). Falcon: <|endoftext|> is
    BOS and EOS, and BOS is prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = [Path(p).read_text(errors="ignore") for p in
             ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0",
              "/usr/share/common-licenses/BSD"] if os.path.exists(p)]
    assert texts, "needs /usr/share/common-licenses"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    if KIND == "gemma3":  # Gemma's ids: pad 0, eos 1, bos 2
        specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=specials,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    eot = tok.token_to_id("<|endoftext|>")
    if KIND == "embed":
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A <|endoftext|> $B <|endoftext|>",
            special_tokens=[("<|endoftext|>", eot)])
    elif KIND == "gemma3":
        bos = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    elif KIND == "falcon":
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B",
            special_tokens=[("<|endoftext|>", eot)])
    tok.save(str(TOKENIZER))
    return tok, eot, tok.token_to_id("<|im_end|>")


tok, EOT, IM_END = make_tokenizer()
assert tok.get_vocab_size() <= VOCAB

# ------------------------------------------------------------------------------------ configs
common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM, hidden_act="silu",
              max_position_embeddings=MAX_POS, rope_theta=THETA, attention_bias=False,
              initializer_range=0.02, pad_token_id=None)
if KIND == "falcon":
    cfg = LlamaConfig(rms_norm_eps=1e-6, bos_token_id=EOT, eos_token_id=EOT, tie_word_embeddings=False,
                      mlp_bias=False, **common)
    model = LlamaForCausalLM(cfg)
elif KIND == "gemma3":
    gemma = {k: v for k, v in common.items() if k not in ("hidden_act", "rope_theta")}
    gemma["pad_token_id"] = tok.token_to_id("<pad>")
    cfg = Gemma3TextConfig(rms_norm_eps=1e-6, bos_token_id=tok.token_to_id("<bos>"),
                           eos_token_id=[tok.token_to_id("<eos>"), tok.token_to_id("<end_of_turn>")],
                           tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
                           query_pre_attn_scalar=QPAS, sliding_window=WINDOW, layer_types=GEMMA_LAYER_TYPES,
                           final_logit_softcapping=None, attn_logit_softcapping=None,
                           rope_parameters={"full_attention": dict(GEMMA_ROPE_SCALING, rope_theta=THETA),
                                            "sliding_attention": {"rope_type": "default",
                                                                  "rope_theta": LOCAL_THETA}},
                           **gemma)
    model = Gemma3ForCausalLM(cfg)
elif KIND == "qwen3":
    cfg = Qwen3Config(rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=[IM_END, EOT],
                      tie_word_embeddings=True, use_sliding_window=False, **common)
    model = Qwen3ForCausalLM(cfg)
else:
    cfg = Qwen3Config(rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=EOT, tie_word_embeddings=True,
                      use_sliding_window=False, **common)
    model = Qwen3Model(cfg)
model = model.to(torch.float32).eval()

# ------------------------------------------------------------------------------------ weights
g = torch.Generator().manual_seed(SEED)


def fp16_exact(t):
    return t.to(torch.float16).to(torch.float32)


def bf16_exact(t):
    return t.to(torch.bfloat16).to(torch.float32)


ROUND = bf16_exact if KIND in ("falcon", "embed", "gemma3") else fp16_exact
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight") and KIND == "gemma3":
            # Gemma multiplies the rows by sqrt(hidden): smaller rows keep the residual stream
            # from being the token's own row (the tied head would then repeat the input).
            v = torch.randn(p.shape, generator=g) * EMBED_STD
        elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            v = torch.randn(p.shape, generator=g) * 0.5
        elif "norm" in name and KIND == "gemma3":  # Gemma's norms multiply by 1 + w
            v = 0.25 * torch.randn(p.shape, generator=g)
        elif "norm" in name:
            v = 1.0 + 0.25 * torch.randn(p.shape, generator=g)
        else:
            v = torch.randn(p.shape, generator=g) * 0.2
        p.copy_(ROUND(v))
    if cfg.tie_word_embeddings and KIND != "embed":
        model.tie_weights()


def group_ternary(w, group):
    """Codes × one fp16 scale per group of `group` consecutive input columns: each group's scale
    is its mean |w| (rounded to fp16), its codes round(w / scale) clamped to [-1, 1]."""
    rows, cols = w.shape
    assert cols % group == 0, (cols, group)
    wg = w.reshape(rows, cols // group, group)
    scale = wg.abs().mean(-1, keepdim=True).clamp(min=1e-5).to(torch.float16).to(torch.float32)
    codes = (wg / scale).round().clamp(-1, 1)
    return (codes * scale).reshape(rows, cols)


def save_checkpoint(form, state, config_dict, dtype):
    d = OUT / form
    d.mkdir(exist_ok=True)
    save_file({k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in state.items()}, d / "model.safetensors", metadata={"format": "pt"})
    write_json(d / "config.json", config_dict)
    gen = {"eos_token_id": config_dict.get("eos_token_id"), "do_sample": False}
    if config_dict.get("bos_token_id") is not None:
        gen["bos_token_id"] = config_dict["bos_token_id"]
    write_json(d / "generation_config.json", gen)
    (d / "tokenizer.json").write_text(TOKENIZER.read_text())
    return d


ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "falcon": "LlamaForCausalLM", "embed": "Qwen3Model",
                 "gemma3": "Gemma3ForCausalLM"}[KIND]


def config_dict(extra=None):
    """config.json as the released checkpoints write it: `architectures` named and rope_theta at
    the top level too (transformers 5 keeps it only under rope_parameters)."""
    c = cfg.to_dict()
    for k in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "id2label", "label2id"):
        c.pop(k, None)
    c.update({"architectures": [ARCHITECTURES]})
    if KIND != "gemma3":  # Gemma3's two bases live under rope_parameters
        c["rope_theta"] = THETA
    c.update(extra or {})
    return c


FORMS = {}  # form -> checkpoint dir
state = {k: v.detach().clone() for k, v in model.state_dict().items()}
if KIND == "qwen3":
    dense_state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    FORMS["dense"] = save_checkpoint("dense", dense_state, config_dict({"dtype": "float16"}), torch.float16)
    # bonsai: untied, every matrix ternary x group scale
    bonsai = {}
    for k, v in state.items():
        bonsai[k] = group_ternary(v, GROUP) if v.dim() == 2 else v
    head = torch.randn(VOCAB, HIDDEN, generator=g) * 0.5
    bonsai["lm_head.weight"] = group_ternary(fp16_exact(head), GROUP)
    FORMS["bonsai"] = save_checkpoint(
        "bonsai", bonsai, config_dict({"dtype": "float16", "tie_word_embeddings": False}), torch.float16)
    # yarn: the dense weights under YaRN RoPE scaling, written as transformers 4 (and Qwen's
    # model cards) write it: `rope_scaling` beside a top-level rope_theta.
    yarn = config_dict({"dtype": "float16", "rope_scaling": YARN})
    yarn.pop("rope_parameters", None)
    FORMS["yarn"] = save_checkpoint("yarn", dense_state, yarn, torch.float16)
elif KIND == "falcon":
    packed = {}
    for k, v in state.items():
        if any(k.endswith(l + ".weight") for l in LINEARS):
            scale = 1.0 / v.abs().mean().clamp(min=1e-5)  # BitLinear's weight_scale: 1/mean|W|
            codes = (v * scale).round().clamp(-1, 1)
            packed[k] = pack_weights(codes.to(torch.int8).clone())
            packed[k[: -len("weight")] + "weight_scale"] = bf16_exact(scale.reshape(1))
        else:
            packed[k] = v
    # As tiiuae/Falcon3-*-1.58bit's config.json has it (plus their marker key).
    qc = {"modules_to_not_convert": ["lm_head"], "quant_method": "bitnet"}
    FORMS["packed_bitlinear"] = save_checkpoint(
        "packed_bitlinear", packed,
        config_dict({"quantization_config": qc, "is_bitnet_config": True, "dtype": "bfloat16"}), torch.bfloat16)
elif KIND == "gemma3":
    dense_state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    FORMS["dense"] = save_checkpoint("dense", dense_state, config_dict({"dtype": "bfloat16"}), torch.bfloat16)
    qc = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
    FORMS["master"] = save_checkpoint(
        "master", dense_state, config_dict({"quantization_config": qc, "dtype": "bfloat16"}), torch.bfloat16)
else:  # embed
    emb = {}
    for k, v in state.items():
        emb[k] = v
        if any(k.endswith(l + ".weight") for l in LINEARS):
            emb[k[: -len("weight")] + "rms_norm.weight"] = bf16_exact(
                1.0 + 0.25 * torch.randn(v.shape[1], generator=g))
    qc = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online",
          "use_rms_norm": True, "rms_norm_eps": 1e-6}
    FORMS["master"] = save_checkpoint(
        "master", emb, config_dict({"quantization_config": qc, "dtype": "bfloat16"}), torch.bfloat16)


# ------------------------------------------------------------------------------------ GGUF (qwen3 dense)
def write_qwen3_gguf(path, st, c):
    """The dense checkpoint as llama.cpp's converter writes a Qwen3 model: arch `qwen3`, q/k rows
    in their HF order (NeoX RoPE: no permutation), per-head norms as attn_q_norm/attn_k_norm."""
    import gguf
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_name("tiny-qwen3")
    w.add_context_length(MAX_POS)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tj = json.loads(TOKENIZER.read_text())
    toks = [""] * VOCAB
    types = [gguf.TokenType.NORMAL] * VOCAB
    for t, i in tj["model"]["vocab"].items():
        toks[i] = t
    for a in tj["added_tokens"]:
        toks[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL
    for i, t in enumerate(toks):
        if not t:
            toks[i] = f"[PAD{i}]"
            types[i] = gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(EOT)
    w.add_add_bos_token(False)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for k, v in st.items():
        if k == "model.embed_tokens.weight":
            n = "token_embd.weight"
        elif k == "model.norm.weight":
            n = "output_norm.weight"
        elif k == "lm_head.weight":
            n = "output.weight"
        else:
            parts = k.split(".")  # model.layers.N.<module...>.weight
            n = f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.weight"
        a = v.to(torch.float32).numpy()
        w.add_tensor(n, a.astype(np.float16) if a.ndim == 2 else a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if KIND == "qwen3":
    write_qwen3_gguf(OUT / "dense.gguf", dense_state, config_dict())


# ------------------------------------------------------------------------------------ references
def load_reference(d, auto=AutoModelForCausalLM):
    m = auto.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").to(torch.float32).eval()
    for mod in m.modules():  # transformers' BitLinear computes in its own dtype attribute
        if type(mod).__name__ == "BitLinear":
            mod.dtype = torch.float32
    return m


def causal_reference(form, d):
    m = load_reference(d)
    kinds = sorted({type(mod).__name__ for n, mod in m.named_modules() if any(n.endswith(l) for l in LINEARS)})
    ids = torch.tensor([tok.encode(PROMPT).ids], dtype=torch.long)
    assert ids.shape[1] + N_NEW < MAX_POS
    cap, hooks = {}, []
    if kinds != ["Linear"]:  # BitLinear units: layer-0 inputs and outputs
        for name in LINEARS:
            mod = m.get_submodule(f"model.layers.0.{name}")
            hooks.append(mod.register_forward_hook(lambda mod, i, o, name=name: cap.update({
                f"layer0.{name}.input": i[0].detach().float().clone(),
                f"layer0.{name}.output": o.detach().float().clone()})))
    with torch.no_grad():
        out = m(ids, output_hidden_states=True, use_cache=False)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        # An explicit mask: generate() would otherwise mask every token equal to pad_token_id (BOS
        # is <|endoftext|> in the falcon fixture).
        gen = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, num_beams=1,
                         eos_token_id=None, pad_token_id=EOT, use_cache=True)
        seq, margins, steps = ids.clone(), [], []
        for _ in range(N_NEW):
            lg = m(seq, use_cache=False).logits[0, -1].float()
            top2 = torch.topk(lg, 2).values
            margins.append(float(top2[0] - top2[1]))
            steps.append(lg.clone())
            seq = torch.cat([seq, lg.argmax().view(1, 1)], dim=1)
        full = m(seq, use_cache=False).logits.float()
    assert gen[0].tolist() == seq[0].tolist(), (
        f"generate with a cache differs from the no-cache loop (an int8 flip; try another FIX_SEED): "
        f"{gen[0, ids.shape[1]:].tolist()} vs {seq[0, ids.shape[1]:].tolist()}, margins {margins}")
    extra = {}
    if KIND == "gemma3":
        # The window must matter: the prompt is longer than it, and the same model with every
        # layer attending to the whole context gives other logits.
        assert ids.shape[1] > WINDOW, (ids.shape, WINDOW)
        m.config.sliding_window = MAX_POS
        with torch.no_grad():
            unwindowed = m(ids, use_cache=False).logits.float()
        m.config.sliding_window = WINDOW
        extra["logits_max_abs_diff_without_sliding_window"] = round(float((unwindowed - out.logits).abs().max()), 5)
        assert extra["logits_max_abs_diff_without_sliding_window"] > 0.1, extra
    tensors = {"input_ids": ids, "logits": out.logits.float(), "greedy_ids": seq,
               "greedy_full_logits": full, "greedy_step_logits": torch.stack(steps)}
    tensors.update({f"hidden_states.{i}": h.float() for i, h in enumerate(out.hidden_states)})
    tensors.update(cap)
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "golden" / f"{form}_f32.safetensors")
    return {"model_class": type(m).__name__, "linear_module_class": kinds,
            "lm_head_tied": m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(),
            "prompt_ids": ids[0].tolist(), "greedy_new_ids": seq[0, ids.shape[1]:].tolist(),
            "greedy_top1_top2_margins": [round(x, 5) for x in margins],
            "min_greedy_margin": round(min(margins), 5), **extra}


def embed_reference(d):
    m = load_reference(d, AutoModel)
    kinds = sorted({type(mod).__name__ for n, mod in m.named_modules() if any(n.endswith(l) for l in LINEARS)})
    assert kinds == ["AutoBitLinear"], kinds
    norms = [mod.rms_norm for n, mod in m.named_modules() if type(mod).__name__ == "AutoBitLinear"]
    assert all(n is not None and not torch.all(n.weight == 1) for n in norms), "gains did not load"
    tensors, rec = {}, {"model_class": type(m).__name__, "linear_module_class": kinds, "texts": EMBED_TEXTS}
    for i, text in enumerate(EMBED_TEXTS):
        ids = torch.tensor([tok.encode(text).ids], dtype=torch.long)
        assert ids[0, -1].item() == EOT
        with torch.no_grad():
            h = m(ids).last_hidden_state.float()
        pooled = h[0, -1]
        tensors[f"input_ids.{i}"] = ids
        tensors[f"last_hidden_state.{i}"] = h[0]
        tensors[f"embedding.{i}"] = torch.nn.functional.normalize(pooled, dim=-1)
    e = torch.stack([tensors[f"embedding.{i}"] for i in range(len(EMBED_TEXTS))])
    rec["cosine_matrix"] = [[round(float(x), 5) for x in row] for row in e @ e.T]
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "golden" / "embed_f32.safetensors")
    return rec


summary = {"generator": "tools/make_arch_fixture.py", "kind": KIND, "seed": SEED,
           "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FIX_")},
           "torch": torch.__version__, "transformers": transformers.__version__, "forms": {}}
for form, d in FORMS.items():
    rec = embed_reference(d) if KIND == "embed" else causal_reference(form, d)
    if form == "yarn":  # the scaling must have reached transformers' rotary embedding
        from safetensors.torch import load_file
        g = OUT / "golden"
        diff = (load_file(g / "yarn_f32.safetensors")["logits"] - load_file(g / "dense_f32.safetensors")["logits"])
        rec["logits_max_abs_diff_from_dense"] = float(diff.abs().max())
        assert rec["logits_max_abs_diff_from_dense"] > 0.1, rec
    summary["forms"][form] = rec
    print(form, json.dumps({k: rec.get(k) for k in ("linear_module_class", "greedy_new_ids", "min_greedy_margin")}))
write_json(OUT / "golden" / "golden.json", summary)
TOKENIZER.unlink()
