"""Choosing a consistency model's few-step sigma schedule by measurement (the CM paper picks its intermediate
sigmas by a search on a quality metric; this automates it).

Greedy: the best intermediate sigma for 2 steps is found on a log grid; for k steps the first k-1 sigmas of
the best (k-1)-step schedule are kept and the next one is searched below the last; where the model's Karras default
scores better, it is kept instead. The caller's metric ``score(samples, reference, seed) -> float`` (lower is better;
the jobs use sliced W2) is computed against *training* samples, so the held-out split stays untouched for the
benchmark.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..core import log_spaced
from .samplers import sample


def search_schedule(cm, reference: torch.Tensor, score: Callable, max_steps: int = 4, candidates: int = 16,
                    num: int = 2000, seed: int = 12345, progress: bool = True, **cond) -> dict[int, dict]:
    """Search the intermediate sigmas for 2..max_steps steps; store them in ``cm.default_sigmas`` and return
    ``{steps: {"sigmas": [...], "score": float, "karras_score": float}}`` (``score(samples, reference, seed)``)."""
    reference = reference[: max(num, 2)].float()

    def score_of(sigmas) -> float:
        x = sample(cm, num, sigmas=sigmas, generator=torch.Generator().manual_seed(seed), **cond)
        return score(x.float().cpu(), reference, seed)

    found: dict[int, dict] = {}
    best = [cm.sigma_max]
    bar = tqdm(total=candidates * max(0, max_steps - 1), desc="schedule search", disable=not progress,
               dynamic_ncols=True)
    for steps in range(2, max_steps + 1):
        scored = []
        for s in log_spaced(best[-1], cm.sigma_min * 1.5, candidates):
            scored.append((score_of(best + [s]), s))
            bar.update(1)
        value, s = min(scored)
        karras = cm.karras_schedule(steps)
        karras_value = score_of(karras)
        best = best + [s]
        if karras_value < value:  # greedy extension is not always best: never store worse than the Karras default
            best, value = list(karras), karras_value
        found[steps] = {"sigmas": list(best), "score": value, "karras_score": karras_value}
    bar.close()
    for steps, r in found.items():
        cm.default_sigmas[steps] = r["sigmas"]
    return found
