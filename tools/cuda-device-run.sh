#!/bin/bash
# The bitnet-cuda checks on a GPU machine, from binaries built elsewhere: `bitnet devices`, the
# conformance suite, transformers parity, then `bitnet bench --device cuda` on a 2B-4T synth
# model (float and int8 heads). Run from the repository root with D pointing at a folder of
# xz-compressed binaries: bitnet (cargo build --release --features cuda) and the test binaries
# conformance, parity, synth_2b4t (cargo test --release -p bitnet-cuda --no-run), which were
# built in a checkout at $BUILD_ROOT (default /work/main; the fixtures' path is compiled into
# them). Logs go to $OUT (default /tmp/out).
D=${D:?set D to the folder of binaries}; ROOT=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p crates/bitnet-cuda
BUILD_ROOT=${BUILD_ROOT:-/work/main}
[ -e "$BUILD_ROOT" ] || { mkdir -p "$(dirname "$BUILD_ROOT")" && ln -s "$ROOT" "$BUILD_ROOT"; }
NV=$(find /usr/local /opt /usr/lib -name 'libnvrtc.so.13*' 2>/dev/null | grep -v alt | head -1)
export LD_LIBRARY_PATH=$(dirname "$NV"):/usr/local/cuda/lib64:$LD_LIBRARY_PATH
B=/tmp/bin; mkdir -p $B; for f in $D/*.xz; do xz -dc $f > $B/$(basename $f .xz) & done; wait; chmod +x $B/*
$B/bitnet synth --config 2b4t --out /tmp/m2b > $OUT/synth.txt 2>&1 &
$B/bitnet devices 2>&1 | tee $OUT/devices.txt
for t in kernels_compile conformance parity synth_2b4t; do
  echo "=== $t"; timeout 120 $B/$t --nocapture --test-threads=1 > $OUT/test_$t.txt 2>&1; echo "rc=$?"
  grep -E "SKIPPED|FAILED|passed|panicked|ok on|cosine|agree|test result" $OUT/test_$t.txt | head -30
done
wait
echo "=== bench"
timeout 150 $B/bitnet bench --model /tmp/m2b --device cuda -p 512 -n 128 -r 2 -c 1,8,64 -t 8 2>&1 | tee $OUT/bench_float.txt
timeout 90 $B/bitnet bench --model /tmp/m2b --device cuda --lm-head int8 -p 512 -n 128 -r 2 -t 8 2>&1 | tee $OUT/bench_int8.txt
