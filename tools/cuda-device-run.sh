#!/bin/bash
# The bitnet-cuda checks on a GPU machine, from binaries built elsewhere: `bitnet devices`, the
# conformance suite, transformers parity, then `bitnet bench --device cuda` on a 2B-4T synth
# model (float and int8 heads). Run from the repository root with D pointing at a folder of
# xz-compressed binaries: bitnet (cargo build --release --features cuda) and the test binaries
# conformance, parity, synth_2b4t (cargo test --release -p bitnet-cuda --no-run), which were
# built in a checkout at $BUILD_ROOT (default /work/main; the fixtures' path is compiled into
# them). Logs go to $OUT (default /tmp/out): devices.txt, tests.txt (every test's whole output)
# and bench.txt (BENCH=0 skips the benchmarks). Do not run it under `exec > >(tee …)`: bash's `wait` also waits for that tee.
D=${D:?set D to the folder of binaries}; ROOT=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p crates/bitnet-cuda
BUILD_ROOT=${BUILD_ROOT:-/work/main}
[ -e "$BUILD_ROOT" ] || { mkdir -p "$(dirname "$BUILD_ROOT")" && ln -s "$ROOT" "$BUILD_ROOT"; }
NV=$(find /usr/local /opt /usr/lib -name 'libnvrtc.so.13*' 2>/dev/null | grep -v alt | head -1)
export LD_LIBRARY_PATH=$(dirname "$NV"):/usr/local/cuda/lib64:$LD_LIBRARY_PATH
B=/tmp/bin; mkdir -p $B; for f in $D/*.xz; do xz -dc $f > $B/$(basename $f .xz) & done; wait; chmod +x $B/*
$B/bitnet synth --config 2b4t --out /tmp/m2b > /tmp/synth.txt 2>&1 &
# One log file: the device machine hands back only a few files, so the whole output of every
# test (the failures' messages included) goes into $OUT/tests.txt.
$B/bitnet devices 2>&1 | tee $OUT/devices.txt
for t in kernels_compile conformance parity synth_2b4t; do
  echo "=== $t" >> $OUT/tests.txt
  timeout 120 $B/$t --nocapture --test-threads=1 >> $OUT/tests.txt 2>&1; rc=$?
  echo "=== $t rc=$rc" | tee -a $OUT/tests.txt
done
grep -E "^===|SKIPPED|FAILED|panicked|ok on|cosine|agree|split|test result" $OUT/tests.txt | head -60
wait
[ "${BENCH:-1}" = 1 ] || exit 0
echo "=== bench"
timeout 150 $B/bitnet bench --model /tmp/m2b --device cuda -p 512 -n 128 -r 2 -c 1,8,64 -t 8 2>&1 | tee $OUT/bench.txt
timeout 90 $B/bitnet bench --model /tmp/m2b --device cuda --lm-head int8 -p 512 -n 128 -r 2 -t 8 2>&1 | tee -a $OUT/bench.txt
