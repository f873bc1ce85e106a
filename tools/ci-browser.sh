#!/usr/bin/env bash
# The chat page in a real browser, as CI runs it: Debian's headless Chromium driven by
# playwright-core loads / of `bitnet serve` (the embedded model), sends a message, sees the
# reply stream in, sends a second one and stops it, and saves a screenshot.
#
#   tools/ci-browser.sh [BITNET_BINARY] [SCREENSHOT]   # needs chromium (apt-get) and npm
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${1:-target/debug/bitnet}"
shot="${2:-target/chat-page.png}"
command -v chromium >/dev/null || { echo "chromium is not installed (apt-get install chromium)" >&2; exit 1; }
(cd tools/browser-check && npm install --silent --no-audit --no-fund)
log="$(mktemp)"
# Short replies: the embedded model's context is 256 tokens, and the page sends no max_tokens.
"$bin" serve --port 0 --default-max-tokens 64 -t 2 >"$log" 2>&1 &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    grep -q "serving .* on http://" "$log" && break
    sleep 0.1
done
url="$(grep -o 'http://[0-9.:]*' "$log" | head -1)"
[ -n "$url" ] || { cat "$log"; echo "bitnet serve did not start" >&2; exit 1; }
# A failed check shows what the server said and whether it still runs (it once died of SIGPIPE).
server_state() {
    echo "--- server log ($1):" >&2; cat "$2" >&2
    if kill -0 "$3" 2>/dev/null; then echo "the server still runs" >&2
    else wait "$3"; echo "the server exited with status $?" >&2; fi
}
BROWSER_CHECK_FAST_MODEL=1 node tools/browser-check/check_chat_page.mjs "$url" "$shot" \
    || { server_state "bitnet serve" "$log" "$pid"; exit 1; }
# The page's streaming and Stop, watched token by token: the mock engine answers at 60 ms a token.
cargo build --quiet -p bitnet-server --example mock_serve
mlog="$(mktemp)"
target/debug/examples/mock_serve --port 0 --token-delay-ms 60 >"$mlog" 2>&1 &
mpid=$!
trap 'kill -TERM "$pid" "$mpid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "listening on" "$mlog" && break; sleep 0.1; done
murl="$(grep -o 'http://[0-9.:]*' "$mlog" | head -1)"
node tools/browser-check/check_chat_page.mjs "$murl" "target/chat-page-mock.png" \
    || { server_state "mock_serve" "$mlog" "$mpid"; exit 1; }
