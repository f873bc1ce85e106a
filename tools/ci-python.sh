#!/usr/bin/env bash
# The Python bindings' CI: builds the `bitnet` wheel once (release, maturin from PyPI) and the
# `bitnet` CLI, installs the wheel into a fresh virtualenv and runs crates/bitnet-py/tests with
# pytest (which compares Python with the CLI through $BITNET_BIN).
#
# Needs python3 (with venv and pip), the Rust toolchain and access to PyPI. Run from anywhere:
#   bash tools/ci-python.sh [extra pytest arguments]
# VENV (default: $CARGO_TARGET_DIR/ci-python-venv) is recreated on every run. transformers
# and jinja2 (no torch) are installed for the live chat-template comparison; BITNET_PY_TRANSFORMERS=0
# skips it (the comparison with transformers' recorded renderings still runs).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
target=${CARGO_TARGET_DIR:-$root/target}
venv=${VENV:-$target/ci-python-venv}
wheels=$target/ci-python-wheels

python3 --version
cargo --version
rm -rf "$venv" "$wheels"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
packages=(maturin pytest numpy)
if [ "${BITNET_PY_TRANSFORMERS:-1}" = 1 ]; then
    packages+=(transformers jinja2)
fi
"$venv/bin/python" -m pip install --quiet "${packages[@]}"

# One release build of the wheel; the CLI's release build shares its compiled dependencies.
"$venv/bin/maturin" build --release --manifest-path crates/bitnet-py/Cargo.toml --out "$wheels"
cargo build --release -p bitnet-cli
"$venv/bin/python" -m pip install --quiet "$wheels"/bitnet-*.whl

export BITNET_BIN=$target/release/bitnet
# Run from the tests folder so that `import bitnet` finds the installed wheel.
cd crates/bitnet-py/tests
"$venv/bin/python" -m pytest -q "$@"
