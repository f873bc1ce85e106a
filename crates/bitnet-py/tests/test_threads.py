"""Several Python threads generate at once on one model; the GIL is released while the engine
works; Ctrl-C stops a generation cleanly."""

import _thread
import json
import shutil
import threading
import time

import pytest

import bitnet
from conftest import DEFAULT_MODEL_ASSETS

PROMPTS = ["Once upon a time", "The little dog", "She looked at the sky and"]
SAMPLED = dict(temperature=0.9, top_p=0.95, seed=11)


def run_all(model, prompts, kwargs):
    return [model.generate(p, max_tokens=60, **kwargs).token_ids for p in prompts]


def test_threads_generating_at_once_get_what_each_gets_alone(default_model):
    for kwargs in ({}, SAMPLED):
        alone = run_all(default_model, PROMPTS, kwargs)
        results = [None] * len(PROMPTS)
        errors = []
        start = threading.Barrier(len(PROMPTS))

        def work(i):
            try:
                start.wait()
                results[i] = default_model.generate(PROMPTS[i], max_tokens=60, **kwargs).token_ids
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert results == alone


def test_streams_read_in_turns_get_what_each_gets_alone(default_model):
    alone = [default_model.generate(p, max_tokens=40).text for p in PROMPTS]
    streams = [default_model.generate(p, max_tokens=40, stream=True) for p in PROMPTS]
    texts = ["" for _ in PROMPTS]
    live = set(range(len(PROMPTS)))
    while live:
        for i in sorted(live):
            piece = next(streams[i], None)
            if piece is None:
                live.discard(i)
            else:
                texts[i] += piece
    assert texts == alone


def test_the_gil_is_released_while_generating():
    model = bitnet.Model.load(threads=1)
    took = time.perf_counter()
    model.generate("Once upon a time", max_tokens=200)
    took = time.perf_counter() - took
    worker = threading.Thread(target=model.generate, args=("Once upon a time",), kwargs=dict(max_tokens=200))
    worker.start()
    time.sleep(took / 10)
    # This Python thread runs while the other one is inside the engine.
    counted = sum(1 for _ in range(10_000))
    still_generating = worker.is_alive()
    worker.join()
    assert counted == 10_000
    assert still_generating, f"the main thread only ran after the generation ({took:.3f} s) ended"


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    """The default model with a 4096-token context, for generations long enough to interrupt."""
    folder = tmp_path_factory.mktemp("long-context")
    for name in ["generation_config.json", "model.safetensors", "tokenizer.json"]:
        shutil.copy(DEFAULT_MODEL_ASSETS / name, folder / name)
    config = json.loads((DEFAULT_MODEL_ASSETS / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (folder / "config.json").write_text(json.dumps(config))
    return bitnet.Model.load(folder, threads=1)


def interrupt_after(seconds):
    timer = threading.Timer(seconds, _thread.interrupt_main)
    timer.start()
    return timer


def test_keyboard_interrupt_stops_a_generation_cleanly(long_context_model):
    model = long_context_model
    full = model.generate("Once upon a time", max_tokens=3000)
    took = full.prompt_seconds + full.decode_seconds
    timer = interrupt_after(took / 10)
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        model.generate("Once upon a time", max_tokens=3000)
    elapsed = time.perf_counter() - started
    timer.join()
    if took > 0.5:
        assert elapsed < took / 2, f"stopped after {elapsed:.2f} s of {took:.2f} s: at the interrupt, not at the end"
    # The model is intact: the same call gives the same tokens.
    assert model.generate("Once upon a time", max_tokens=3000).token_ids == full.token_ids


def test_keyboard_interrupt_while_reading_a_stream_stops_it(long_context_model):
    model = long_context_model
    full = model.generate("Once upon a time", max_tokens=3000)
    took = full.prompt_seconds + full.decode_seconds
    stream = model.generate("Once upon a time", max_tokens=3000, stream=True)
    text = next(stream)
    timer = interrupt_after(took / 10)
    with pytest.raises(KeyboardInterrupt):
        for piece in stream:
            text += piece
            time.sleep(0.001)
    timer.join()
    stream.close()
    result = stream.result
    if took > 0.5:
        assert result.stop_reason == "cancelled", result.stop_reason
    assert full.text.startswith(text)
