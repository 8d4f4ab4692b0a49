#!/usr/bin/env bash
# Issue #11, goal 3: recipes side by side on real V4 (190923), ONE bank for every row (the
# 24,000-image bank of configs/v4_190923.yaml, its cached stages) and about the config's compute.
# The rows were measured with that file as of commit 8cc732e (the 25-filter iterative recipe, the
# default until 2026-12-05): `git show 8cc732e:configs/v4_190923.yaml > /tmp/v4_old.yaml` to rerun them.
# The config's own row is the farm job's (benchmarks/results/v4_190923_all33_bank24k.jsonl).
#
#   bash benchmarks/equal_compute_v4.sh             # every row below, neurons 190923:0-3
#   NEURONS_A=190923:0,2,4,6 NEURONS_B=190923:1,3,5,7 bash benchmarks/equal_compute_v4.sh
#   .venv/bin/python benchmarks/recipes.py --table benchmarks/results/recipes_v4_190923_bank24k.jsonl
#
# Two processes at a time (one per core, ~6 GB each with this bank), each over its half of the
# neurons; resumable: a rerun skips the rows already in $OUT (benchmarks/recipes.py). The pass counts
# scale the session-8 rows (6,000-image bank, 190923:0-1, same code) to this bank at ~800 CPU-s per
# neuron, the config's cost on an idle 2-core VM: paper 519 CPU-s for 14 + 4 passes, fast 367 for
# 10 + 5 x 1 + 3 (a pass here is 4x the images).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
OUT=${OUT:-benchmarks/results/recipes_v4_190923_bank24k.jsonl}
A=${NEURONS_A:-190923:0,2}
B=${NEURONS_B:-190923:1,3}
PY=${PY:-.venv/bin/python}
K35=../shared/models/published/shared_compact_models/from_ensemble_model/shared_compact_model_35filters.keras

row() {  # row <recipe> <label> <set...>
  local recipe=$1 label=$2
  shift 2
  for neurons in "$A" "$B"; do
    "$PY" benchmarks/recipes.py --config configs/v4_190923.yaml --neurons "$neurons" --recipes "$recipe" \
      --label "$label" --out "$OUT" --set "$@" &
  done
  wait
}

# the bank and the teacher's responses, once (a fresh checkout builds them here)
"$PY" -c "from farm.config import load_job_config; from farm.pipeline import prepare_job; \
prepare_job(load_job_config('configs/v4_190923.yaml'))"

# in order of what they decide: the paper's recipe (goal 3), then the two rows that could lift the
# config's raw R² within the goal's 20 CPU-minutes and 12,469 parameters, then the others
row paper "paper (8 filters; distill 5.4 + retrain 1.5 passes, one pruning round at tau 0.9)" \
  specialize=null distill.passes=5.4 retrain.passes=1.5
row config "K35 start, (48, 16) late, as configured otherwise" \
  shared.path=$K35 "specialize.late_filters=[48,16]"
row config "K25 start, 9 map + 3 tune passes (the 20-CPU-minute budget's headroom)" \
  specialize.passes=9 specialize.tune_passes=3
row fast "fast (8 filters; distill 5.4 + 5 x 0.55 iterative + retrain 1.6 passes)" \
  specialize=null distill.passes=5.4 iterative_retrain_passes=0.55 retrain.passes=1.6
row config "K25 start, pruning at tau 0.99, as configured otherwise" prune.tau=0.99
"$PY" benchmarks/recipes.py --table "$OUT"
