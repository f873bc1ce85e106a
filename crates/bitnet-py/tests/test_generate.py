"""Generation from Python equals `bitnet generate --json`; streaming yields the same text."""

import pytest

import bitnet
from conftest import THREADS, fixture_dir, golden_prompt_ids

SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repeat_penalty=1.1, seed=7)
SAMPLING_FLAGS = [
    "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--min-p", "0.02",
    "--repeat-penalty", "1.1", "--seed", "7",
]


@pytest.mark.parametrize("fixture", ["hf-bitnet-tiny/packed", "llama158/packed_bitlinear", "gqa3-odd/packed_bitlinear"])
def test_greedy_ids_equal_the_cli(cli, fixture):
    path = fixture_dir(fixture)
    ids = golden_prompt_ids(fixture.split("/")[0])
    model = bitnet.Model.load(path, threads=THREADS)
    got = model.generate(ids, max_tokens=24)
    want = cli.generate(path, ids=ids, max_tokens=24)
    assert got.prompt_token_ids == want["tokens"] == ids
    assert got.token_ids == want["generated"]
    assert got.text == want["text"]
    assert got.stop_reason.replace("_", "") == want["stop_reason"]


def test_default_model_text_prompt_equals_the_cli(cli, default_model):
    got = default_model.generate("Once upon a time", max_tokens=40)
    want = cli.generate(None, prompt="Once upon a time", max_tokens=40)
    assert (got.prompt_token_ids, got.token_ids, got.text) == (want["tokens"], want["generated"], want["text"])
    assert got.text and got.stop_reason in ("max_tokens", "eos")


def test_sampling_equals_the_cli(cli, default_model):
    got = default_model.generate("The little dog", max_tokens=40, **SAMPLING)
    want = cli.generate(None, prompt="The little dog", max_tokens=40, extra=SAMPLING_FLAGS)
    assert got.token_ids == want["generated"]
    assert got.text == want["text"]
    other_seed = default_model.generate("The little dog", max_tokens=40, **{**SAMPLING, "seed": 8})
    assert other_seed.token_ids != got.token_ids, "the seed changes what is sampled"


def test_stop_strings_equal_the_cli(cli, default_model):
    free = default_model.generate("Once upon a time", max_tokens=60)
    # A stop string taken from the middle of the free-running text.
    words = free.text.split()
    assert len(words) > 6, free.text
    stop = words[4]
    got = default_model.generate("Once upon a time", max_tokens=60, stop=[stop, "never appears"])
    want = cli.generate(None, prompt="Once upon a time", max_tokens=60, extra=["--stop", stop, "--stop", "never appears"])
    assert got.stop_reason == "stop_string"
    assert stop not in got.text and free.text.startswith(got.text)
    assert (got.text, got.token_ids) == (want["text"], want["generated"])
    # One string works as a list of one.
    assert default_model.generate("Once upon a time", max_tokens=60, stop=stop).text == got.text


@pytest.mark.parametrize("kwargs", [{}, SAMPLING, {"stop": ["the"]}], ids=["greedy", "sampled", "stop"])
def test_stream_yields_the_text_of_the_whole_generation(default_model, kwargs):
    whole = default_model.generate("Once upon a time", max_tokens=50, **kwargs)
    stream = default_model.generate("Once upon a time", max_tokens=50, stream=True, **kwargs)
    assert isinstance(stream, bitnet.TextStream)
    assert stream.result is None
    pieces = list(stream)
    assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == whole.text
    result = stream.result
    assert (result.text, result.token_ids, result.stop_reason) == (whole.text, whole.token_ids, whole.stop_reason)
    with pytest.raises(StopIteration):
        next(stream)


def test_closing_a_stream_stops_the_generation(default_model):
    full = default_model.generate("Once upon a time", max_tokens=200)
    assert full.stop_reason == "max_tokens", "the test needs a generation that runs to its limit"
    stream = default_model.generate("Once upon a time", max_tokens=200, stream=True)
    first = next(stream)
    stream.close()
    result = stream.result
    assert result.stop_reason == "cancelled"
    assert len(result.token_ids) < 200
    assert full.text.startswith(first)
    assert full.token_ids[: len(result.token_ids)] == result.token_ids
    # A with block closes the stream too.
    with default_model.generate("Once upon a time", max_tokens=200, stream=True) as s:
        next(s)
    assert s.result.stop_reason == "cancelled"
    # The model still generates as before.
    assert default_model.generate("Once upon a time", max_tokens=200).token_ids == full.token_ids


def test_chat_equals_generate_on_the_rendered_prompt(default_model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story."}]
    assert default_model.chat_template is None, "the default model has no template: the plain fallback"
    text = default_model.apply_chat_template(messages, tokenize=False)
    assert text == "System: You are terse.\nUser: Tell me a story.\nAssistant:"
    ids = default_model.apply_chat_template(messages)
    assert ids[0] == default_model.bos_token_id
    reply = default_model.chat(messages, max_tokens=40)
    same = default_model.generate(ids, max_tokens=40, stop=["\nUser:"])
    assert (reply.token_ids, reply.text, reply.prompt_token_ids) == (same.token_ids, same.text, ids)
    streamed = "".join(default_model.chat(messages, max_tokens=40, stream=True))
    assert streamed == reply.text


def test_tokenizer_round_trip(default_model):
    tok = default_model.tokenizer
    ids = tok.encode("Hello world")
    assert ids[0] == default_model.bos_token_id
    assert tok.encode("Hello world", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == "Hello world"
    assert tok.vocab_size == default_model.vocab_size
    assert tok.token_to_id("no such token, surely") is None


def test_max_tokens_is_capped_by_the_context(default_model):
    ids = default_model.tokenizer.encode("Once upon a time")
    g = default_model.generate(ids, max_tokens=10_000)
    assert len(ids) + len(g.token_ids) <= default_model.context_length
    assert g.stop_reason in ("max_tokens", "eos")
