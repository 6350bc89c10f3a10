#!/usr/bin/env bash
# Do the continuous-time S-curve recipes generalise? iCT, sCT and MeanFlow trained by their S-curve recipes, unchanged
# but for data.name, on each of cmkit's other 2-D sets, then scored side by side (sliced W2 / MMD^2, 4000 samples x 3
# sampling seeds), the S-curve itself beside them; each recipe trained with three seeds (SEEDS), since one training run
# does not decide a set (sCT's two steps on eight Gaussians: 0.044 with seed 0, 0.021 with seed 1). Results:
# benchmarks/results/toy2d-generalise/<set>/quality_vs_steps.md and summary.md (means over the training seeds).
# About 30 minutes a set on 2 cores when it has to train.
#   source .venv/bin/activate && [SEEDS="0 1 2"] bash benchmarks/toy2d_generalise.sh [set ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CMKIT=${CMKIT:-cmkit}
PY=${PY:-python}
R=benchmarks/results/toy2d-generalise
SETS=${*:-s_curve swiss_roll moons checkerboard eight_gaussians}
SEEDS=${SEEDS:-0 1 2}
for set in $SETS; do
  models=()
  for seed in $SEEDS; do
    for job in ict sct meanflow; do
      case $job in ict) label=iCT ;; sct) label=sCT ;; meanflow) label=MeanFlow ;; esac
      run=runs/toy2d-$set-$job
      [ "$seed" = 0 ] || { run=$run-seed$seed; label=$label-seed$seed; }
      [ -f $run/model/cmkit.json ] || \
        $CMKIT train s_curve-$job --set data.name=$set --set seed=$seed --out $run --no-progress
      models+=(--model "$label=$run/model")
    done
  done
  $CMKIT bench quality-vs-steps s_curve-ict --set data.name=$set --no-progress --out $R/$set "${models[@]}"
done
$PY benchmarks/toy2d_summary.py $R > $R/summary.md
