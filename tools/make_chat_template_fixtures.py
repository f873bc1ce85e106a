#!/usr/bin/env python3
"""Renders the chat templates of tests/data/chat-templates/ with transformers into fixtures.json.

For every template of templates.json and every conversation below, records what
`tokenizer.apply_chat_template(...)` returns as text (tokenize=False) and as token ids
(tokenize=True), the ids with the default model's tokenizer (assets/default-model/tokenizer.json).
crates/bitnet-models/tests/chat_templates.rs asserts that bitnet_models::chat renders the same
bytes and that Tokenizer::encode_without_special_tokens gives the same ids.

The special-token strings of each template are passed as template variables (transformers lets
keyword arguments override the tokenizer's own special tokens), so that one tokenizer serves all
templates; a token a checkpoint does not have is not passed and stays undefined.

Needs transformers (torch is not needed) and jinja2:

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install transformers jinja2
    /tmp/venv/bin/python tools/make_chat_template_fixtures.py
"""

import json
import sys
from pathlib import Path

import jinja2
import transformers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "chat-templates"
TOKENIZER = ROOT / "assets" / "default-model" / "tokenizer.json"

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}

CONVERSATIONS = {
    "system_user": [SYSTEM, {"role": "user", "content": "What is BitNet?"}],
    "user_only": [{"role": "user", "content": "Hello!"}],
    "multi_turn": [
        SYSTEM,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "ends_with_assistant": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    "unicode": [
        {"role": "user", "content": "  Grüße aus Köln! 你好，世界 🌍 — naïve café  \n"},
        {"role": "assistant", "content": "Ça va très bien ✓"},
        {"role": "user", "content": "Ελληνικά; Русский? עברית!"},
    ],
    "markup_in_content": [
        {
            "role": "user",
            "content": "Use {{ braces }} and {% tags %} and <|im_end|> literally.\nSecond line\twith a tab.",
        },
    ],
    "thinking_history": [
        {"role": "user", "content": "Solve x+1=2."},
        {"role": "assistant", "content": "<think>\nSubtract 1 from both sides.\n</think>\n\nx = 1"},
        {"role": "user", "content": "And x+2=5?"},
    ],
}

# (conversation, add_generation_prompt, enable_thinking or None when not passed)
RENDERINGS = [
    ("system_user", True, None),
    ("user_only", True, None),
    ("user_only", False, None),
    ("multi_turn", True, None),
    ("multi_turn", False, None),
    ("ends_with_assistant", False, None),
    ("unicode", True, None),
    ("markup_in_content", True, None),
    ("thinking_history", True, None),
]
# Qwen3's switch, only for the template that reads it.
THINKING_RENDERINGS = [
    ("system_user", True, False),
    ("system_user", True, True),
    ("thinking_history", True, False),
]


def template_kwargs(tokens):
    names = {"bos": "bos_token", "eos": "eos_token", "unk": "unk_token", "pad": "pad_token"}
    return {names[k]: v for k, v in tokens.items()}


def main():
    manifest = json.loads((DATA / "templates.json").read_text())
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))
    # No special tokens of its own may leak into the templates: they come from the manifest.
    leaked = {k: v for k, v in tokenizer.special_tokens_map.items() if v}
    assert not leaked, f"the tokenizer brings special tokens of its own: {leaked}"

    cases = []
    for entry in manifest["templates"]:
        source = (DATA / entry["file"]).read_text()
        kwargs = template_kwargs(entry["tokens"])
        renderings = RENDERINGS + (THINKING_RENDERINGS if "enable_thinking" in source else [])
        for conversation, add_generation_prompt, enable_thinking in renderings:
            messages = CONVERSATIONS[conversation]
            extra = dict(kwargs)
            if enable_thinking is not None:
                extra["enable_thinking"] = enable_thinking
            common = dict(chat_template=source, add_generation_prompt=add_generation_prompt, **extra)
            text = tokenizer.apply_chat_template(messages, tokenize=False, **common)
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **common)
            # apply_chat_template(tokenize=True) is the text encoded without added special tokens.
            assert list(ids) == tokenizer.encode(text, add_special_tokens=False), (entry["name"], conversation)
            cases.append(
                {
                    "template": entry["name"],
                    "conversation": conversation,
                    "add_generation_prompt": add_generation_prompt,
                    "enable_thinking": enable_thinking,
                    "rendered": text,
                    "token_ids": list(ids),
                }
            )

    out = {
        "comment": "Written by tools/make_chat_template_fixtures.py: transformers' apply_chat_template of "
        "templates.json's templates on these conversations; token_ids with assets/default-model/tokenizer.json.",
        "transformers_version": transformers.__version__,
        "jinja2_version": jinja2.__version__,
        "conversations": CONVERSATIONS,
        "cases": cases,
    }
    path = DATA / "fixtures.json"
    path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {path.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
