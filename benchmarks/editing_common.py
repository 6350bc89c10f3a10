"""What the editing benchmarks share: their command line, the model and its editing grid, and mean ± std tables."""

from __future__ import annotations

import argparse
import statistics

import cmkit


def editing_setup(doc: str, model: str, out: str, configure=None):
    """Parse ``--model --out --steps --seeds`` (plus what ``configure(parser)`` adds); load the consistency model and
    its editing grid: None without ``--steps`` (the editing functions' default, the model's editing schedule, which
    ``args.steps`` then counts), else ``steps`` points of the Karras grid, sigma_min dropped. Returns
    ``(args, cm, sigmas)``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default=model)
    ap.add_argument("--out", default=out)
    ap.add_argument("--steps", type=int, help="editing steps along the Karras grid (default: the model's editing "
                    "schedule, as cmkit.inpaint etc. use it; 18 Karras steps unless its cmkit.json stores another)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    if configure:
        configure(ap)
    args = ap.parse_args()
    cm = cmkit.ConsistencyModel.from_pretrained(args.model)
    if args.steps is None:
        args.steps = len(cm.editing_schedule())
        return args, cm, None
    return args, cm, cmkit.core.karras_steps(args.steps, cm.sigma_min, cm.sigma_max)


def summarise(rows: dict) -> dict:
    """``{method: [{metric: value} per seed]}`` -> ``{method: {metric: (mean, std over seeds)}}``."""
    return {name: {k: (statistics.fmean(v[k] for v in vals),
                       statistics.stdev(v[k] for v in vals) if len(vals) > 1 else 0.0) for k in vals[0]}
            for name, vals in rows.items()}
