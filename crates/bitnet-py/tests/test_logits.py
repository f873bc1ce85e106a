"""Python logits equal `bitnet logits` bit for bit, on every fixture layout, GGUF and the
embedded default model."""

import json

import numpy as np
import pytest

import bitnet
from conftest import THREADS, fixture_dir, golden_prompt_ids

CHECKPOINTS = [
    ("hf-bitnet-tiny", "master"),
    ("hf-bitnet-tiny", "packed"),
    ("hf-bitnet-tiny", "packed_bitlinear"),
    ("gqa1-theta1e4", "packed"),
    ("gqa3-odd", "packed_bitlinear"),
    ("deep5", "packed"),
    ("userms", "packed_bitlinear"),
    ("llama158", "packed_bitlinear"),
    ("bitnet1bit", "master"),
    ("w256-tq", "packed"),
]


def assert_bits_equal(got: np.ndarray, want: np.ndarray):
    assert got.dtype == np.float32
    assert got.shape == want.shape
    differ = got.view(np.uint32) != want.view(np.uint32)
    assert not differ.any(), f"{differ.sum()} of {differ.size} logits differ; first at {np.argwhere(differ)[0]}"


@pytest.mark.parametrize("fixture,form", CHECKPOINTS, ids=[f"{f}/{l}" for f, l in CHECKPOINTS])
def test_logits_equal_the_cli_bit_for_bit(cli, fixture, form):
    path = fixture_dir(f"{fixture}/{form}")
    ids = golden_prompt_ids(fixture)
    model = bitnet.Model.load(path, threads=THREADS)
    every = model.logits(ids, all_positions=True)
    assert every.shape == (len(ids), model.vocab_size)
    assert_bits_equal(every, cli.logits(path, ids, all_positions=True))
    last = model.logits(ids)
    assert last.shape == (model.vocab_size,)
    assert_bits_equal(last, cli.logits(path, ids)[0])
    # A second call (a reused context) gives the same bits.
    assert_bits_equal(model.logits(ids), last)


def test_default_model_logits_equal_the_cli(cli, default_model):
    ids = default_model.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    assert_bits_equal(default_model.logits(ids, all_positions=True), cli.logits(None, ids, all_positions=True))
    # Text is encoded as the CLI's --prompt encodes it.
    assert_bits_equal(default_model.logits("The quick brown fox jumps over the lazy dog"), cli.logits(None, ids)[0])


def test_int8_head_logits_equal_the_cli(cli):
    path = fixture_dir("hf-bitnet-tiny/packed")
    ids = golden_prompt_ids("hf-bitnet-tiny")
    model = bitnet.Model.load(path, threads=THREADS, lm_head="int8")
    assert model.lm_head == "int8"
    out = cli.run("logits", "--model", str(path), "--tokens", ",".join(map(str, ids)), "-t", str(THREADS), "--lm-head", "int8")
    want = np.array(json.loads(out)["logits"][0], dtype=np.float64).astype(np.float32)
    assert_bits_equal(model.logits(ids), want)
    float_head = bitnet.Model.load(path, threads=THREADS).logits(ids)
    assert not np.array_equal(model.logits(ids), float_head), "the int8 head approximates the float one"


def test_convert_quantize_and_gguf_logits(cli, tmp_path):
    src = fixture_dir("w256-tq/packed")
    ids = golden_prompt_ids("w256-tq")
    tq2 = tmp_path / "model-tq2_0.gguf"
    bitnet.convert(src, tq2, type="tq2_0")
    want = None
    # q2_0 keeps the one scale in each group's f16; "f16" writes every matrix as f16 values,
    # which are exactly 0 and ±scale and so load as the same codes.
    for kind in ["tq2_0", "tq1_0", "i2_s", "q2_0", "f16"]:
        path = tq2
        if kind != "tq2_0":
            path = tmp_path / f"model-{kind}.gguf"
            bitnet.quantize(tq2, path, type=kind)
        got = bitnet.Model.load(path, threads=THREADS).logits(ids, all_positions=True)
        assert_bits_equal(got, cli.logits(path, ids, all_positions=True))
        # Every type holds the same ternary codes and scale: the same logits.
        want = got if want is None else want
        assert_bits_equal(got, want)
