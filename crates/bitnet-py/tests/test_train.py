"""`bitnet.train` with a callback writes a model that `Model.load` runs."""

import json

import pytest

import bitnet
from conftest import THREADS

WORDS = "the king said that she was not a lady of great wit and he would go".split()
# A small model so that a few steps take a moment.
SMALL = dict(vocab=300, hidden=32, layers=2, seq=16, batch=3, threads=THREADS, eval_every=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    lines = []
    x = 12345
    for line in range(1200):
        words = []
        for _ in range(6):
            x = (x * 6364136223846793005 + 1442695040888963407) % 2**64
            words.append(WORDS[x >> 60])
        lines.append(" ".join(words) + ".")
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(autouse=True)
def no_token_cache(monkeypatch):
    monkeypatch.setenv("BITNET_CACHE_DIR", "off")


def logged_losses(out):
    return [json.loads(l)["loss"] for l in (out / "train_log.jsonl").read_text().splitlines()]


def test_train_reports_every_step_and_the_model_runs(corpus, tmp_path):
    out = tmp_path / "run"
    seen = []
    summary = bitnet.train(corpus, out, steps=6, callback=lambda step, loss: seen.append((step, loss)), **SMALL)
    assert isinstance(summary, bitnet.TrainSummary)
    assert (summary.steps_done, summary.stopped_early) == (6, False)
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5, 6]
    # The losses the callback heard are those of the run's log (a line per step for this preset).
    assert [l for _, l in seen] == logged_losses(out)
    assert seen[-1][1] == summary.final_loss
    assert str(summary.out) == str(out)

    model = bitnet.Model.load(out, threads=THREADS)
    assert model.vocab_size == 300
    g = model.generate("the king", max_tokens=10)
    assert len(g.token_ids) >= 1 and g.prompt_token_ids
    assert model.logits(g.prompt_token_ids).shape == (300,)


def test_a_callback_returning_false_stops_the_run(corpus, tmp_path):
    out = tmp_path / "run"
    summary = bitnet.train(corpus, out, steps=10, callback=lambda step, loss: step < 3, **SMALL)
    assert (summary.steps_done, summary.stopped_early) == (3, True)
    assert (out / "checkpoints" / "step-00000003.safetensors").exists()
    # The stopped run resumes to the end.
    resumed = bitnet.train(corpus, out, steps=10, resume=True, **SMALL)
    assert (resumed.steps_done, resumed.stopped_early) == (10, False)
    bitnet.Model.load(out).generate("she was", max_tokens=4)


def test_an_exception_in_the_callback_stops_the_run_and_is_raised(corpus, tmp_path):
    out = tmp_path / "run"

    def callback(step, loss):
        if step == 2:
            raise RuntimeError("enough")

    with pytest.raises(RuntimeError, match="enough"):
        bitnet.train(corpus, out, steps=10, callback=callback, **SMALL)
    assert (out / "checkpoints" / "step-00000002.safetensors").exists()
    assert (out / "model.safetensors").exists()
