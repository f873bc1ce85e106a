#!/usr/bin/env python3
"""Writes the tiny float GGUF that llama.cpp's llama-quantize turned into the test files of
tests/data/gguf/llamacpp-group/ (README there for the rest): Q1_0/Q2_0 from the default shape,
the K-quants (whose rows are whole 256-column super-blocks) from `--hidden 256`.

A one-layer `llama` model, hidden 128 (or the given width), intermediate twice that, 2 heads,
vocabulary 64, every weight drawn from a seeded normal distribution (so that llama.cpp's
quantizers give every group of the output a scale of its own), norms 1. Needs numpy and gguf
(gguf-py from PyPI).

    python3 tools/make_group_fixture_source.py OUT.gguf [--hidden 256]
"""
import sys

import numpy as np
import gguf

HEADS, VOCAB, CTX = 2, 64, 64


def main(out: str, hidden: int = 128) -> None:
    HIDDEN, FFN = hidden, 2 * hidden
    rng = np.random.default_rng(20261207)
    w = gguf.GGUFWriter(out, "llama")
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(1)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(VOCAB)])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([gguf.TokenType.NORMAL] * VOCAB)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(VOCAB, HIDDEN))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", mat(HIDDEN, HIDDEN))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    w.add_tensor("blk.0.ffn_gate.weight", mat(FFN, HIDDEN))
    w.add_tensor("blk.0.ffn_up.weight", mat(FFN, HIDDEN))
    w.add_tensor("blk.0.ffn_down.weight", mat(HIDDEN, FFN))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    w.add_tensor("output.weight", mat(VOCAB, HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    width = 128
    if "--hidden" in args:
        at = args.index("--hidden")
        width = int(args[at + 1])
        del args[at : at + 2]
    main(args[0], width)
