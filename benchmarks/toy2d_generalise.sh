#!/usr/bin/env bash
# Do the continuous-time S-curve recipes generalise? iCT, sCT and MeanFlow trained by their S-curve recipes, unchanged
# but for data.name, on each of cmkit's other 2-D sets, then scored side by side (sliced W2 / MMD^2, 4000 samples x 3
# seeds), the S-curve itself beside them. Results: benchmarks/results/toy2d-generalise/<set>/quality_vs_steps.md and
# summary.md. About 10 minutes a set on 2 cores.
#   source .venv/bin/activate && bash benchmarks/toy2d_generalise.sh [set ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CMKIT=${CMKIT:-cmkit}
PY=${PY:-python}
R=benchmarks/results/toy2d-generalise
SETS=${*:-s_curve swiss_roll moons checkerboard eight_gaussians}
for set in $SETS; do
  for job in ict sct meanflow; do
    [ -f runs/toy2d-$set-$job/model/cmkit.json ] || \
      $CMKIT train s_curve-$job --set data.name=$set --out runs/toy2d-$set-$job --no-progress
  done
  $CMKIT bench quality-vs-steps s_curve-ict --set data.name=$set --no-progress --out $R/$set \
    --model iCT=runs/toy2d-$set-ict/model --model sCT=runs/toy2d-$set-sct/model \
    --model MeanFlow=runs/toy2d-$set-meanflow/model
done
$PY benchmarks/toy2d_summary.py $R > $R/summary.md
