#!/usr/bin/env bash
# Reproduce the README's benchmark tables and plots on this machine (results under benchmarks/results/).
#   bash benchmarks/run.sh            # S-curve (trains its models, ~3 min) and digits (uses runs/digits-cd if present)
# Models that take longer to train are trained once by their recipes and then loaded:
#   cmkit distill recipes/digits-cd.toml --out runs/digits-cd          (~15 min on a 2-core CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
CMKIT=${CMKIT:-cmkit}

# S-curve: teacher, CD, and the table (the quickstart's pipeline)
$CMKIT quickstart --out benchmarks/results/s_curve

# digits: the shipped DDPM teacher against its distilled consistency model
if [ ! -f runs/digits-cd/model/cmkit.json ]; then
  $CMKIT distill recipes/digits-cd.toml --out runs/digits-cd
fi
$CMKIT bench quality-vs-steps recipes/digits-cd.toml --model CD=runs/digits-cd/model \
  --out benchmarks/results/digits-cd
