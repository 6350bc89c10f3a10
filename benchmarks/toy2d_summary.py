"""The generalisation table: per 2-D set, iCT / sCT / MeanFlow at 1 and 2 steps (sliced W2, the mean over the
training seeds the benchmark holds: labels ``iCT``, ``iCT-seed1``, ...), and the two checks the continuous-time
recipes must pass there: sCT's 2-step <= iCT's 2-step and MeanFlow's 1-step <= iCT's 1-step. A second table lists
every training seed's scores and in how many (run, run) pairs of the two methods the check holds, so a mean is never
read without its spread.
The floor column is the metric's own on that set: 4000 samples of the training split against the held-out split
(three draws, the benchmark's projections), what a perfect model would score.
    python benchmarks/toy2d_summary.py benchmarks/results/toy2d-generalise > .../summary.md"""

import json
import statistics
import sys
from pathlib import Path

import torch

from cmkit.data import load_dataset
from cmkit.eval.metrics import sliced_wasserstein

METHODS = ("iCT", "sCT", "MeanFlow")


def by_seed(rows, method: str, nfe: int) -> list[float]:
    """Sliced W2 of every training seed of ``method`` at ``nfe`` steps (seed 0 is labelled plainly)."""
    found = [r["sw_mean"] for r in rows
             if r["nfe"] == nfe and (r["method"] == method or r["method"].startswith(f"{method}-seed"))]
    if not found:
        raise KeyError(f"{method} at {nfe} steps")
    return found


def floor(name: str, num: int = 4000) -> float:
    data = load_dataset(name)
    draws = [data.train[torch.randperm(len(data.train), generator=torch.Generator().manual_seed(s))[:num]]
             for s in range(3)]
    return sum(sliced_wasserstein(x, data.test, n_projections=256, seed=0) for x in draws) / len(draws)


def main(root: Path) -> None:
    files = sorted(root.glob("*/quality_vs_steps.json"))
    tables = {f.parent.name: json.loads(f.read_text())["rows"] for f in files}
    seeds = {len(by_seed(rows, m, 1)) for rows in tables.values() for m in METHODS}
    print(f"Means over {'/'.join(map(str, sorted(seeds)))} training seeds per method (4000 samples x 3 sampling "
          "seeds each).\n")
    print("| set | floor | iCT 1 | iCT 2 | sCT 1 | sCT 2 | MeanFlow 1 | MeanFlow 2 | sCT 2 <= iCT 2 "
          "| MeanFlow 1 <= iCT 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|")
    for name, rows in tables.items():
        v = {(m, n): statistics.fmean(by_seed(rows, m, n)) for m in METHODS for n in (1, 2)}
        ok = lambda a, b: "yes" if a <= b else f"no ({a / b:.2f}x)"  # noqa: E731
        print(f"| {name} | {floor(name):.4f} | " + " | ".join(f"{v[k]:.4f}" for k in v)
              + f" | {ok(v['sCT', 2], v['iCT', 2])} | {ok(v['MeanFlow', 1], v['iCT', 1])} |")
    print("\nEach training seed (0, 1, ...):\n")
    print("| set | iCT 1 | iCT 2 | sCT 1 | sCT 2 | MeanFlow 1 | MeanFlow 2 | run pairs with sCT 2 <= iCT 2 "
          "| with MeanFlow 1 <= iCT 1 |")
    print("|---|---|---|---|---|---|---|:---:|:---:|")
    for name, rows in tables.items():
        # every run of one method against every run of the other (the seeds of two methods are not paired)
        wins = lambda a, b: f"{sum(x <= y for x in a for y in b)} of {len(a) * len(b)}"  # noqa: E731
        print(f"| {name} | " + " | ".join(" / ".join(f"{x:.4f}" for x in by_seed(rows, m, n))
                                         for m in METHODS for n in (1, 2))
              + f" | {wins(by_seed(rows, 'sCT', 2), by_seed(rows, 'iCT', 2))} "
              f"| {wins(by_seed(rows, 'MeanFlow', 1), by_seed(rows, 'iCT', 1))} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
