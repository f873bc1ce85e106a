"""Shared fixtures of the bitnet Python tests.

The CLI comparisons run the `bitnet` binary named by $BITNET_BIN (tools/ci-python.sh builds it
and sets it); without it they are skipped. The models are the repository's test fixtures
(tests/fixtures) and the embedded default model.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import bitnet

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "tests" / "fixtures"
DEFAULT_MODEL_ASSETS = REPO / "assets" / "default-model"
# Threads for every run: the CLI and Python use the same count.
THREADS = 2


def fixture_dir(name: str) -> Path:
    return FIXTURES / name


def golden_prompt_ids(fixture: str) -> list:
    golden = json.loads((FIXTURES / fixture / "golden" / "golden.json").read_text())
    return golden["prompt_ids"]


class Cli:
    """The `bitnet` binary."""

    def __init__(self, path: str):
        self.path = path

    def run(self, *args: str) -> str:
        out = subprocess.run([self.path, *args], capture_output=True, text=True)
        if out.returncode != 0:
            raise AssertionError(f"bitnet {' '.join(args)} failed:\n{out.stderr}")
        return out.stdout

    @staticmethod
    def model_args(model) -> list:
        return [] if model is None else ["--model", str(model)]

    def logits(self, model, ids, all_positions=False) -> np.ndarray:
        args = ["logits", *self.model_args(model), "--tokens", ",".join(map(str, ids)), "-t", str(THREADS)]
        if all_positions:
            args.append("--all-positions")
        rows = json.loads(self.run(*args))["logits"]
        # serde_json writes each f32 as the shortest decimal that reads back as the same f32.
        return np.array(rows, dtype=np.float64).astype(np.float32)

    def generate(self, model, *, ids=None, prompt=None, max_tokens=16, extra=()) -> dict:
        args = ["generate", *self.model_args(model), "--json", "-n", str(max_tokens), "-t", str(THREADS)]
        if ids is not None:
            args += ["--tokens", ",".join(map(str, ids))]
        else:
            args += ["--prompt", prompt]
        # Model.generate is greedy unless told otherwise; the CLI follows the checkpoint's
        # generation_config.json (the default model samples), so compare greedy with greedy.
        if "--temperature" not in extra:
            args += ["--temperature", "0"]
        return json.loads(self.run(*args, *extra))


@pytest.fixture(scope="session")
def cli() -> Cli:
    path = os.environ.get("BITNET_BIN")
    if not path:
        pytest.skip("set BITNET_BIN to the bitnet binary to compare with the CLI")
    if not os.access(path, os.X_OK):
        pytest.fail(f"BITNET_BIN={path} is not an executable")
    return Cli(path)


@pytest.fixture(scope="session")
def default_model() -> "bitnet.Model":
    return bitnet.Model.load(threads=THREADS)


@pytest.fixture(scope="session")
def tiny_model() -> "bitnet.Model":
    return bitnet.Model.load(fixture_dir("hf-bitnet-tiny/packed"), threads=THREADS)
