"""The generalisation table: per 2-D set, iCT / sCT / MeanFlow at 1 and 2 steps (sliced W2), and the two checks
the continuous-time recipes must pass there: sCT's 2-step <= iCT's 2-step and MeanFlow's 1-step <= iCT's 1-step.
    python benchmarks/toy2d_summary.py benchmarks/results/toy2d-generalise > .../summary.md"""

import json
import sys
from pathlib import Path


def sw(rows, method, nfe):
    for r in rows:
        if r["method"] == method and r["nfe"] == nfe:
            return r["sw_mean"]
    raise KeyError(f"{method} at {nfe} steps")


def main(root: Path) -> None:
    print("| set | iCT 1 | iCT 2 | sCT 1 | sCT 2 | MeanFlow 1 | MeanFlow 2 | sCT 2 <= iCT 2 | MeanFlow 1 <= iCT 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|:---:|:---:|")
    for f in sorted(root.glob("*/quality_vs_steps.json")):
        rows = json.loads(f.read_text())["rows"]
        v = {(m, n): sw(rows, m, n) for m in ("iCT", "sCT", "MeanFlow") for n in (1, 2)}
        ok = lambda a, b: "yes" if a <= b else f"no ({a / b:.2f}x)"  # noqa: E731
        print(f"| {f.parent.name} | " + " | ".join(f"{v[k]:.4f}" for k in v)
              + f" | {ok(v['sCT', 2], v['iCT', 2])} | {ok(v['MeanFlow', 1], v['iCT', 1])} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
