#!/usr/bin/env bash
# HiLo ablation of issue 5: the "2468" rank schedule against a uniform rank at equal expert counts.
#
# Both variants keep the default expert schedule (experts "2468": 2/4/6/8 experts per layer group). The uniform
# rank 5 is the mean of 2,4,6,8, so both have the same ACTIVE parameters per token (top-2); the trainable count
# differs because deeper groups hold more experts. The default ("2468" ranks) runs are the published ones in
# results/tiny-world (same code, same command, same run ids): they are copied, not retrained; the runner skips a
# finished run, so only the uniform-rank variant trains (about 15 min on 1 CPU thread; rerunning resumes).
#
#   scripts/ablate_hilo_ranks.sh [OUTPUT]     # default OUTPUT: results/ablations/hilo-ranks
#
# The leaderboard of OUTPUT then has one row per variant: `hilo [ranks=2468]` and `hilo [ranks=uniform5]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${1:-results/ablations/hilo-ranks}"
mkdir -p "$OUT/runs"
cp results/tiny-world/runs/hilo--tiny-world--tiny-world--seed[012].json "$OUT/runs/"
"$PY" -m benchmark -q run --methods hilo --seeds 0,1,2 --output "$OUT" --set num_threads=1
"$PY" -m benchmark -q run --methods hilo --seeds 0,1,2 --output "$OUT" --set num_threads=1 \
    --set methods.hilo.ranks=uniform5
"$PY" -m benchmark -q leaderboard --results "$OUT"
cat "$OUT/leaderboard.md"
