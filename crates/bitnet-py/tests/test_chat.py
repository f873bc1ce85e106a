"""Chat prompts equal transformers' apply_chat_template: against the renderings recorded with
transformers in tests/data/chat-templates/fixtures.json, and against transformers itself when
it is installed."""

import json
import shutil

import pytest

import bitnet
from conftest import DEFAULT_MODEL_ASSETS, REPO, THREADS

TEMPLATES = REPO / "tests" / "data" / "chat-templates"
TEMPLATE = "llama-3-8b-instruct"


def load_fixtures():
    return json.loads((TEMPLATES / "fixtures.json").read_text())


def template_entry(name):
    manifest = json.loads((TEMPLATES / "templates.json").read_text())
    return next(t for t in manifest["templates"] if t["name"] == name)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """The default model as a checkpoint folder whose tokenizer_config.json carries Llama 3's
    chat template and special-token strings (as a Hugging Face checkpoint does)."""
    entry = template_entry(TEMPLATE)
    folder = tmp_path_factory.mktemp("chat-model")
    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]:
        shutil.copy(DEFAULT_MODEL_ASSETS / name, folder / name)
    config = {"chat_template": (TEMPLATES / entry["file"]).read_text()}
    config.update({f"{k}_token": v for k, v in entry["tokens"].items()})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def cases():
    return [c for c in load_fixtures()["cases"] if c["template"] == TEMPLATE and c["enable_thinking"] is None]


@pytest.mark.parametrize("case", cases(), ids=lambda c: f"{c['conversation']}-gen{int(c['add_generation_prompt'])}")
def test_chat_prompt_equals_recorded_transformers(chat_checkpoint, case):
    model = bitnet.Model.load(chat_checkpoint, threads=THREADS)
    assert model.chat_template == (TEMPLATES / template_entry(TEMPLATE)["file"]).read_text()
    messages = load_fixtures()["conversations"][case["conversation"]]
    gen = case["add_generation_prompt"]
    assert model.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == case["rendered"]
    assert model.apply_chat_template(messages, add_generation_prompt=gen) == case["token_ids"]


def test_chat_prompt_equals_live_transformers(chat_checkpoint):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("jinja2", reason="jinja2 (which apply_chat_template needs) is not installed")
    entry = template_entry(TEMPLATE)
    # As tools/make_chat_template_fixtures.py: the tokenizer.json alone, the template and its
    # special-token strings passed to apply_chat_template.
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(DEFAULT_MODEL_ASSETS / "tokenizer.json"))
    kwargs = {f"{k}_token": v for k, v in entry["tokens"].items()}
    source = (TEMPLATES / entry["file"]).read_text()
    model = bitnet.Model.load(chat_checkpoint, threads=THREADS)
    for messages in load_fixtures()["conversations"].values():
        want = tokenizer.apply_chat_template(
            messages, chat_template=source, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs
        )
        assert model.apply_chat_template(messages) == list(want)


def test_chat_generates_from_the_template_prompt(chat_checkpoint):
    model = bitnet.Model.load(chat_checkpoint, threads=THREADS)
    messages = [{"role": "user", "content": "Hello!"}]
    ids = model.apply_chat_template(messages)
    reply = model.chat(messages, max_tokens=24)
    assert reply.prompt_token_ids == ids
    # The default model's vocabulary has no <|eot_id|> token: the stops are the model's EOS ids.
    assert model.tokenizer.token_to_id("<|eot_id|>") is None
    assert reply.token_ids == model.generate(ids, max_tokens=24).token_ids
