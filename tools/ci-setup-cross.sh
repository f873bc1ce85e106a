#!/usr/bin/env bash
# Installs what cross-testing the aarch64 NEON kernels needs on a Debian/Ubuntu x86-64 host,
# then (with --run) runs the bitnet-quant tests under qemu: once with qemu's default CPU
# (which has the dot-product extension: the `neon-dotprod` path) and once as a Cortex-A53
# (no dotprod: the `neon-plain` path). The linker and runner are set in .cargo/config.toml.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    as_root apt-get update
    as_root apt-get install -y qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross
fi
rustup target add aarch64-unknown-linux-gnu

if [ "${1:-}" = "--run" ]; then
    cd "$(dirname "$0")/.."
    cargo test -p bitnet-quant --target aarch64-unknown-linux-gnu
    QEMU_CPU=cortex-a53 cargo test -p bitnet-quant --target aarch64-unknown-linux-gnu
fi
