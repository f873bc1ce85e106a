#!/usr/bin/env bash
# Runs tests/python/test_openai_client.py (OpenAI's official client) against a server.
#
#   tools/test-openai-client.sh                 # builds and starts the mock server, tests it, stops it
#   BITNET_SERVER_URL=http://127.0.0.1:8080 BITNET_API_KEY=k tools/test-openai-client.sh
#                                               # tests a server that is already running
#
# The client and pytest are installed from PyPI into a virtual environment, $BITNET_VENV
# (default: target/venv-openai-client), made on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${BITNET_VENV:-target/venv-openai-client}"
if [ ! -x "$venv/bin/pytest" ] || ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet openai pytest
fi

server_pid=""
cleanup() { if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi; }
trap cleanup EXIT

if [ -z "${BITNET_SERVER_URL:-}" ]; then
    cargo build --quiet -p bitnet-server --example mock_serve
    target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
    log="$(mktemp)"
    export BITNET_API_KEY="test-key"
    "$target_dir/debug/examples/mock_serve" --port 0 --api-key "$BITNET_API_KEY" >"$log" 2>&1 &
    server_pid=$!
    for _ in $(seq 50); do
        grep -q "listening on" "$log" && break
        sleep 0.1
    done
    BITNET_SERVER_URL="$(grep -o 'http://[0-9.:]*' "$log" | head -1)"
    [ -n "$BITNET_SERVER_URL" ] || { cat "$log"; echo "the mock server did not start" >&2; exit 1; }
    export BITNET_SERVER_URL
fi

"$venv/bin/pytest" -q tests/python/test_openai_client.py
