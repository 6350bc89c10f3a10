"""The generalisation table: per 2-D set, iCT / sCT / MeanFlow at 1 and 2 steps (sliced W2), and the two checks
the continuous-time recipes must pass there: sCT's 2-step <= iCT's 2-step and MeanFlow's 1-step <= iCT's 1-step.
The floor column is the metric's own on that set: 4000 samples of the training split against the held-out split
(three draws, the benchmark's projections), what a perfect model would score.
    python benchmarks/toy2d_summary.py benchmarks/results/toy2d-generalise > .../summary.md"""

import json
import sys
from pathlib import Path

import torch

from cmkit.data import load_dataset
from cmkit.eval.metrics import sliced_wasserstein


def sw(rows, method, nfe):
    for r in rows:
        if r["method"] == method and r["nfe"] == nfe:
            return r["sw_mean"]
    raise KeyError(f"{method} at {nfe} steps")


def floor(name: str, num: int = 4000) -> float:
    data = load_dataset(name)
    draws = [data.train[torch.randperm(len(data.train), generator=torch.Generator().manual_seed(s))[:num]]
             for s in range(3)]
    return sum(sliced_wasserstein(x, data.test, n_projections=256, seed=0) for x in draws) / len(draws)


def main(root: Path) -> None:
    print("| set | floor | iCT 1 | iCT 2 | sCT 1 | sCT 2 | MeanFlow 1 | MeanFlow 2 | sCT 2 <= iCT 2 "
          "| MeanFlow 1 <= iCT 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|")
    for f in sorted(root.glob("*/quality_vs_steps.json")):
        rows = json.loads(f.read_text())["rows"]
        v = {(m, n): sw(rows, m, n) for m in ("iCT", "sCT", "MeanFlow") for n in (1, 2)}
        ok = lambda a, b: "yes" if a <= b else f"no ({a / b:.2f}x)"  # noqa: E731
        print(f"| {f.parent.name} | {floor(f.parent.name):.4f} | " + " | ".join(f"{v[k]:.4f}" for k in v)
              + f" | {ok(v['sCT', 2], v['iCT', 2])} | {ok(v['MeanFlow', 1], v['iCT', 1])} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
