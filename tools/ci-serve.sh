#!/usr/bin/env bash
# The real server under real clients, as CI runs it: `bitnet serve` with the embedded model on
# loopback, then OpenAI's official Python client (tests/python/test_openai_client.py) and a
# scaled-down load test (bad, oversized and abandoned requests among valid ones), then SIGTERM,
# which must end the server with status 0.
#
#   tools/ci-serve.sh [BITNET_BINARY]     # default: target/debug/bitnet (built by cargo test)
#   LOAD_REQUESTS=2000 tools/ci-serve.sh  # the full load test of docs/serving.md
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${1:-target/debug/bitnet}"
[ -x "$bin" ] || cargo build --quiet -p bitnet-cli
key="ci-key-$$"
log="$(mktemp)"
"$bin" serve --port 0 --api-key "$key" --max-seqs 8 --max-queue 64 -t 2 >"$log" 2>&1 &
pid=$!
cleanup() { kill -TERM "$pid" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 300); do
    grep -q "serving .* on http://" "$log" && break
    kill -0 "$pid" 2>/dev/null || { cat "$log"; echo "bitnet serve exited" >&2; exit 1; }
    sleep 0.1
done
url="$(grep -o 'http://[0-9.:]*' "$log" | head -1)"
[ -n "$url" ] || { cat "$log"; echo "bitnet serve did not start" >&2; exit 1; }
echo "bitnet serve at $url (pid $pid)"

BITNET_SERVER_URL="$url" BITNET_API_KEY="$key" bash tools/test-openai-client.sh

cargo run --quiet -p bitnet-server --example loadtest -- --url "$url" --api-key "$key" \
    --requests "${LOAD_REQUESTS:-300}" --concurrency 32 --max-tokens 16 --pid "$pid"

trap - EXIT
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
[ "$status" -eq 0 ] || { cat "$log"; echo "bitnet serve exited with $status after SIGTERM" >&2; exit 1; }
echo "bitnet serve stopped cleanly"
