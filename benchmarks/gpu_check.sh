#!/usr/bin/env bash
# The GPU device check: it/s and peak GPU memory of SD 1.5 LCM-LoRA, SD3.5-medium flow-CD LoRA and sCD (block JVP
# against the math kernel) at 1024 px, on random weights at the released configs; nothing is downloaded. At most 8
# minutes on one H100. See benchmarks/gpu_check.py for what is measured and how.
#   bash benchmarks/gpu_check.sh                  # on a GPU machine: benchmarks/results/gpu-check/gpu-check.{md,json}
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/check   # tiny configs on the CPU (tests/test_gpu_check.py)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$(if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python; fi)}"
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
