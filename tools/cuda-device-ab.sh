#!/bin/bash
# One device call that compares two builds of the CUDA backend (session 24's method): the GPU
# tests of NEW, base/new alternating `bitnet bench` rows, the serving rows of NEW, and `ncu`
# per-kernel times of NEW (a tg step, and a serving step). Run from the repository root on the
# GPU machine with A and N pointing at folders of xz-compressed binaries built on the dev
# machine: A holds bitnet.xz (the baseline), N holds bitnet.xz and the bitnet-cuda test
# binaries conformance.xz, parity.xz, synth_2b4t.xz (`cargo test --release -p bitnet-cuda
# --no-run`, stripped, built in a checkout at /work/main: the fixtures' path is compiled in).
# Logs go to $OUT: tests.txt, ab.txt, ncu-tg.txt, ncu-serve.txt, ncu-pp.txt and the raw ncu CSVs
# (.xz). Each step has its own timeout; the whole call takes about 6 minutes on an H100 (the
# synth model is made on the GPU machine's cores meanwhile).
# C (optional) holds a third bitnet.xz, a variant of NEW that joins the bench rounds.
# QUICK=1 leaves out the second bench round and the serving and prefill ncu profiles (about
# 4 minutes: for a session with little device time left).
A=${A:?set A to the folder of the baseline bitnet.xz}; N=${N:?set N to the folder of the new binaries}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$(pwd); [ -e /work/main ] || { mkdir -p /work && ln -s "$ROOT" /work/main; }
NV=$(find /usr/local /opt /usr/lib -name 'libnvrtc.so.13*' 2>/dev/null | grep -v alt | head -1)
export LD_LIBRARY_PATH=$(dirname "$NV"):/usr/local/cuda/lib64:$LD_LIBRARY_PATH
BA=/tmp/ab-base; BN=/tmp/ab-new; mkdir -p $BA $BN
xz -dc "$A/bitnet.xz" > $BA/bitnet &
BC=/tmp/ab-c; [ -n "$C" ] && { mkdir -p $BC; xz -dc "$C/bitnet.xz" > $BC/bitnet & }
for f in "$N"/*.xz; do xz -dc "$f" > $BN/$(basename "$f" .xz) & done
wait; chmod +x $BA/* $BN/* ${C:+$BC/*}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
$BN/bitnet synth --config 2b4t --out /tmp/m2b > /tmp/synth.txt 2>&1 &
# The steps run in order of what matters most when a call is cut short (device machines can be
# taken back, and a session's device time can run out): the conformance suite, one alternating
# bench round, the parity tests, the serving rows, a second bench round, synth_2b4t, then ncu.
# Every step's log lands in $OUT as it finishes.
run_test() {  # run_test NAME TIMEOUT: a bitnet-cuda test binary of NEW, its log in tests.txt
  [ -x $BN/$1 ] || return
  echo "=== $1" >> "$OUT/tests.txt"
  timeout $2 $BN/$1 --nocapture --test-threads=1 >> "$OUT/tests.txt" 2>&1; echo "=== $1 rc=$?" | tee -a "$OUT/tests.txt"
  sed -n "/^=== $1\$/,\$p" "$OUT/tests.txt" | grep -E "checks|FAILED|panicked|lowest|int8 flip|split|part|test result" | head -20
}
bench_round() {  # base and new (and C, a variant, if given), one tg128/pp512 run each
  for b in $BA $BN ${C:+$BC}; do echo "== $b"
    timeout 50 $b/bitnet bench --model /tmp/m2b --device cuda -p 512 -n 128 -r 2 --no-probe 2>&1 | grep -E "pp512|tg128"
  done | tee -a "$OUT/ab.txt"
}
run_test conformance 150
wait  # the synth model
echo "=== tg128 / pp512, base and new alternating"; bench_round
run_test parity 100
echo "=== serving rows, base and new"
for b in $BA $BN; do echo "== $b"
  timeout 80 $b/bitnet bench --model /tmp/m2b --device cuda -p 512 -n 128 -r 1 -c 1,8,64 -t 8 --no-probe 2>&1 | grep serve
done | tee -a "$OUT/ab.txt"
[ -z "$QUICK" ] && { echo "=== tg128 / pp512, second round"; bench_round; }
run_test synth_2b4t 100
ncu_of() {  # ncu_of NAME STEPS bench-args...: per-kernel GPU time of the last STEPS forward steps
  local name=$1 steps=$2; shift 2
  timeout 110 ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    $BN/bitnet bench --model /tmp/m2b --device cuda "$@" --no-probe > /tmp/$name.csv 2>/tmp/$name.err
  echo "ncu $name rc=$?"
  python3 tools/ncu_summary.py /tmp/$name.csv --steps "$steps" | tee "$OUT/$name.txt" | head -16
  xz -T8 -c /tmp/$name.csv > "$OUT/$name.csv.xz"
}
echo "=== ncu: tg steps after a 512-token prompt"; ncu_of ncu-tg 8 -p 512 -n 8 -r 1
[ -n "$QUICK" ] && exit 0
echo "=== ncu: serve64 steps"; ncu_of ncu-serve 3 -p 32 -n 4 -c 64 -r 1 -t 8
echo "=== ncu: the 512-token prefill step and one decode step"; ncu_of ncu-pp 2 -p 512 -n 1 -r 1
