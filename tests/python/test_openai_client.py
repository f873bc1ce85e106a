"""The server against OpenAI's official Python client.

Point it at a running server (`bitnet serve`, or the mock:
`cargo run -p bitnet-server --example mock_serve -- --port 8080 --api-key k`):

    BITNET_SERVER_URL=http://127.0.0.1:8080 BITNET_API_KEY=k pytest tests/python/test_openai_client.py

BITNET_API_KEY is the key the server was started with; leave it unset for a server without one
(the 401 test is then skipped). The assertions hold for any model: exact texts are only compared
between two greedy (temperature 0) runs of the same request.
"""

import os

import openai
import pytest

BASE_URL = os.environ.get("BITNET_SERVER_URL", "").rstrip("/")
API_KEY = os.environ.get("BITNET_API_KEY")

pytestmark = pytest.mark.skipif(not BASE_URL, reason="BITNET_SERVER_URL is not set")

PROMPT = "The capital of France is"
QUESTION = "Name three colours."


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=BASE_URL + "/v1", api_key=API_KEY or "unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].object == "model"
    return models[0].id


def user(text):
    return [{"role": "user", "content": text}]


def check_usage(usage, max_completion=None):
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if max_completion is not None:
        assert usage.completion_tokens <= max_completion


def test_chat(client, model):
    r = client.chat.completions.create(model=model, messages=user(QUESTION), max_tokens=24, temperature=0)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == model
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    check_usage(r.usage, 24)


def test_chat_with_system_prompt_and_content_parts(client, model):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
    ]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
    assert r.choices[0].message.content is not None
    check_usage(r.usage, 8)


def test_chat_stream_matches_the_whole_answer(client, model):
    whole = client.chat.completions.create(model=model, messages=user(QUESTION), max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model=model,
        messages=user(QUESTION),
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    check_usage(usage_chunk.usage, 16)


def test_completion(client, model):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert isinstance(r.choices[0].text, str) and r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")
    check_usage(r.usage, 12)


def test_completion_stream_matches_the_whole_answer(client, model):
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_max_tokens_bounds_the_completion(client, model):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 3
    r = client.chat.completions.create(model=model, messages=user(QUESTION), max_completion_tokens=2, temperature=0)
    assert r.usage.completion_tokens <= 2


def test_stop_strings_cut_the_text(client, model):
    free = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    assert len(free) >= 4, f"need some text to cut: {free!r}"
    # A stop string from the middle of the greedy answer: the stopped answer is what came before
    # its first occurrence.
    middle = len(free) // 2
    stop = free[middle : middle + 2]
    expected = free[: free.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop], stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert text == expected, (stop, free)
        assert finish == "stop"


def test_wrong_key_is_401(model):
    if not API_KEY:
        pytest.skip("the server has no API key (BITNET_API_KEY unset)")
    bad = openai.OpenAI(base_url=BASE_URL + "/v1", api_key=API_KEY + "-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=model, messages=user("hi"), max_tokens=1)
    assert e.value.status_code == 401


def test_bad_values_are_400(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=user("hi"), temperature=-1)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=10_000_000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=user("hi"), n=2)


def test_embeddings_in_float_and_base64(client, model):
    # The client asks for base64 unless told otherwise and decodes it itself; both must agree.
    texts = ["It is a truth universally acknowledged", "a single man"]
    default = client.embeddings.create(model=model, input=texts)
    floats = client.embeddings.create(model=model, input=texts, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1]
    for a, b in zip(default.data, floats.data):
        assert len(a.embedding) == len(b.embedding) > 0
        assert a.embedding == pytest.approx(b.embedding, rel=0, abs=0)
        assert sum(x * x for x in a.embedding) == pytest.approx(1.0, rel=1e-5)
    assert default.usage.prompt_tokens == default.usage.total_tokens > 2
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=model, input="")
