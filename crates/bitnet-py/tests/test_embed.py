"""Model.embed equals `bitnet embed` bit for bit and transformers' pooled, normalized output
(tests/fixtures/qwen3-embed-tiny, made by tools/make_arch_fixture.py); bad input raises."""

import json
import shutil

import numpy as np
import pytest

import bitnet
from conftest import THREADS, fixture_dir

EMBED = fixture_dir("qwen3-embed-tiny")


def golden_texts() -> list:
    golden = json.loads((EMBED / "golden" / "golden.json").read_text())
    return golden["forms"]["master"]["texts"]


def hidden_size() -> int:
    return json.loads((EMBED / "master" / "config.json").read_text())["hidden_size"]


def transformers_embedding(i: int) -> np.ndarray:
    """Tensor `embedding.{i}` (F32) of the golden safetensors file, read by hand: an 8-byte
    header length, the JSON header, then the data."""
    raw = (EMBED / "golden" / "embed_f32.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    info = json.loads(raw[8 : 8 + n])[f"embedding.{i}"]
    assert info["dtype"] == "F32"
    start, end = info["data_offsets"]
    return np.frombuffer(raw[8 + n + start : 8 + n + end], dtype="<f4")


def test_embed_equals_the_cli_bit_for_bit(cli):
    texts = golden_texts()[:2]
    model = bitnet.Model.load(EMBED / "master", threads=THREADS)
    got = model.embed(texts)
    assert got.dtype == np.float32 and got.shape == (2, hidden_size())
    args = ["embed", "--model", str(EMBED / "master"), "-t", str(THREADS), "--json"]
    for t in texts:
        args += ["--input", t]
    data = json.loads(cli.run(*args))["data"]
    want = np.array([d["embedding"] for d in data], dtype=np.float64).astype(np.float32)
    differ = got.view(np.uint32) != want.view(np.uint32)
    assert not differ.any(), f"{differ.sum()} of {differ.size} values differ"


def test_embed_matches_transformers_and_is_normalized():
    texts = golden_texts()
    model = bitnet.Model.load(EMBED / "master", threads=THREADS)
    got = model.embed(texts)
    assert got.shape == (len(texts), hidden_size())
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    for i in range(len(texts)):
        want = transformers_embedding(i)
        cos = float(np.dot(got[i], want) / (np.linalg.norm(got[i]) * np.linalg.norm(want)))
        assert cos >= 0.999, f"text {i}: cosine {cos}"
    # One text as a str is a batch of one, the same row.
    one = model.embed(texts[0])
    assert one.shape == (1, got.shape[1])
    assert (one[0].view(np.uint32) == got[0].view(np.uint32)).all()


def test_embed_refuses_bad_input(tmp_path):
    model = bitnet.Model.load(EMBED / "master", threads=THREADS)
    with pytest.raises(ValueError, match="empty"):
        model.embed([])
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        model.embed(["hello", ""])
    with pytest.raises(ValueError, match="str or a list of str"):
        model.embed([1, 2])
    # A checkpoint that declares mean pooling is refused before anything runs.
    for f in ["config.json", "model.safetensors", "tokenizer.json"]:
        shutil.copy(EMBED / "master" / f, tmp_path / f)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    mean = bitnet.Model.load(tmp_path, threads=THREADS)
    with pytest.raises(ValueError, match="declares mean pooling"):
        mean.embed("hello")
