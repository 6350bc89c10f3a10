"""The GPU device check (benchmarks/gpu_check.sh) cannot rot: its --dry-run runs every case through the same code
path on the CPU with tiny configs and writes a table of finite, positive it/s for each."""

import json
import math
import os
import subprocess
import sys

from conftest import ROOT

CASES = ("sd15-lcm-lora", "sd35m-flow-cd-lora", "sd35m-scd-jvp", "sd35m-scd-jvp_math")


def test_the_gpu_check_dry_run_measures_every_case(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CMKIT_CACHE": str(tmp_path / "cache"), "PYTHON": sys.executable,
           "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for case in CASES:
        assert case in done.stdout, done.stdout
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["dry_run"] and report["device"] and report["date"]
    got = {r["case"]: r for r in report["results"]}
    assert set(got) == set(CASES)
    for case, r in got.items():
        assert math.isfinite(r["it_per_s"]) and r["it_per_s"] > 0, (case, r)
        assert r["timed_steps"] >= 1 and r["peak_memory_gb"] > 0, (case, r)
    assert "| case | resolution | it/s |" in (out / "gpu-check.md").read_text()
