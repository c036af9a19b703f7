#!/usr/bin/env bash
# Every performance benchmark of issue 9, one after another; each prints its ratios and writes
# results/bench/<name>.json. About 5-6 minutes on 2 quiet CPU cores (the tiny-world base model cached).
#
#   scripts/bench_all.sh            # CPU, fp32
#   scripts/bench_all.sh --gpu      # CUDA, bf16 where a script supports it
#   scripts/bench_all.sh --quick    # smoke run: fewer rounds, shorter runs (figures not for reporting)
#
# Timings on a shared machine are noisy: every script interleaves its variants round by round and reports
# medians and paired ratios; run this on a quiet machine for figures worth quoting.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
DEV=()
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --gpu) DEV=(--device cuda --dtype bf16) ;;
    --quick) QUICK=1 ;;
    *) echo "unknown option: $arg (valid: --gpu, --quick)" >&2; exit 2 ;;
  esac
done

run() {
  echo
  echo "=== $*"
  local t0=$SECONDS
  "$PY" "$@"
  echo "=== $1 took $((SECONDS - t0)) s"
}

start=$SECONDS
if [ "$QUICK" = 1 ]; then
  run scripts/bench_moe_layer.py --quick
  run scripts/bench_train_step.py --quick "${DEV[@]}"
  run scripts/bench_harness.py --quick --cache-demo none
  run scripts/bench_eval.py --rounds 1 --limit 100 "${DEV[@]}"
  run scripts/bench_memory.py --steps 2 --limit 4
  run scripts/bench_scaling.py --stages 1,3 --steps 3 --limit 4 --rounds 2 "${DEV[@]}"
else
  run scripts/bench_moe_layer.py --tokens 2048 --d-in 1024 --d-out 2816 --repeats 7
  run scripts/bench_train_step.py "${DEV[@]}"
  run scripts/bench_harness.py
  run scripts/bench_eval.py "${DEV[@]}"
  run scripts/bench_memory.py
  run scripts/bench_scaling.py "${DEV[@]}"
fi
echo
echo "all benchmarks: $((SECONDS - start)) s; results in results/bench/"
