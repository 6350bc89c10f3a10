"""Quality against the number of network evaluations: a teacher with each solver beside consistency models.

Measurement only: ``report.py`` writes the results (``quality_vs_steps.{json,md,png}``).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.files import atomic_write, atomic_write_text
from ..sampling import class_condition, sample, sample_teacher
from ..solvers import SOLVERS, teacher_grid
from . import metrics


@dataclass
class EvalSettings:
    """The ``[eval]`` section: what a benchmark measures, and the schedule search after training."""
    num_samples: int = 4000             # samples per method and seed
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    teacher_solvers: list[str] = field(default_factory=lambda: ["euler", "heun"])
    teacher_nfe: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 8, 9, 16, 17, 35, 79])
    cm_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    schedule_max_steps: int = 4         # after distillation/training, search few-step sigmas up to this many steps
    schedule_candidates: int = 16       # candidate sigmas tried per step (log-spaced)
    schedule_num_samples: int = 2000    # samples drawn to score each candidate
    dopri5: bool = True                 # include the adaptive dopri5 teacher reference in the benchmark

    def check(self) -> None:
        if self.num_samples < 2 or not self.seeds:
            raise ValueError("eval.num_samples must be >= 2 and eval.seeds must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):  # a repeated seed would be reported as another seed
            raise ValueError(f"eval.seeds lists a seed more than once ({list(self.seeds)}); give each seed once")


MMD_MAX = 2000  # MMD is quadratic in the set size; the first MMD_MAX samples of each set are enough to rank methods


def vector_scorer(reference: torch.Tensor):
    """Sliced W2 and MMD² against reference samples (2-D and other vector data)."""
    def score(samples: torch.Tensor) -> dict:
        return {"sw": metrics.sliced_wasserstein(samples, reference, n_projections=256, seed=0),
                "mmd": metrics.mmd(samples[:MMD_MAX], reference[:MMD_MAX])}
    return score


def image_scorer(classifier, reference: torch.Tensor):
    """Frechet distance in a small classifier's feature space, its confidence and recognition rate."""
    from .classifier import classifier_scores

    with torch.no_grad():
        ref_features = classifier.features(reference.float())
    return lambda samples: classifier_scores(classifier, samples, reference, ref_features)


def scorer_for(data, progress: bool = True, fid: bool = False, inception_weights=None) -> tuple:
    """The scorer a dataset is measured with, and what to record about it: vector data -> sliced W2 and MMD²;
    labelled images -> the cached classifier's metrics (its held-out accuracy recorded), plus with ``fid`` FID and
    KID in Inception features (``cmkit.fidelity``; needs torch-fidelity and its weights file)."""
    if fid and data.train.ndim != 4:
        raise ValueError("FID/KID are image metrics; drop --fid for vector data")
    if data.train.ndim == 4 and data.train_labels is not None:
        from .classifier import load_or_train_classifier

        clf, info = load_or_train_classifier(data, progress=progress)
        score = image_scorer(clf, data.test)
        if fid:
            from .fidelity import InceptionMetrics

            inception = InceptionMetrics(data.test, inception_weights)
            return (lambda x: {**score(x), **inception(x)}), {"classifier": info, "fid_reference": "held-out split"}
        return score, {"classifier": info}
    if data.train.ndim == 2:
        return vector_scorer(data.test), {}
    raise ValueError(f"no quality metric for dataset {data.name!r}: images need class labels for the classifier")


def _summarise(rows: list[dict]) -> dict:
    out = {}
    for key in rows[0]:
        vals = [r[key] for r in rows]
        out[f"{key}_mean"] = statistics.fmean(vals)
        out[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def teacher_jobs(teacher, ev: EvalSettings) -> list[tuple]:
    """(method, nfe, model, run(n, generator, cond) -> (samples, counted nfe or None)) for every teacher setting;
    solvers that cannot reach an NFE exactly (heun reaches only odd NFE) skip it. No teacher (None): no rows."""
    jobs = []
    if teacher is None:
        return jobs
    for solver in ev.teacher_solvers:
        for nfe in ev.teacher_nfe:
            if SOLVERS[solver].evals_per_step == 2 and nfe % 2 == 0:
                continue
            grid = teacher_grid(nfe, solver, teacher.sigma_min, teacher.sigma_max)
            jobs.append((f"teacher {solver}", nfe, teacher, lambda n, g, c, grid=grid, solver=solver:
                         (sample_teacher(teacher, n, grid, method=solver, generator=g, **c), None)))
    if ev.dopri5:
        grid = [teacher.sigma_max, teacher.sigma_min, 0.0]
        jobs.append(("teacher dopri5", None, teacher, lambda n, g, c: sample_teacher(
            teacher, n, grid, method="dopri5", generator=g, return_nfe=True, rtol=1e-5, atol=1e-5, **c)))
    return jobs


def model_jobs(models: dict, ev: EvalSettings) -> list[tuple]:
    return [(name, steps, cm, lambda n, g, c, cm=cm, steps=steps: (sample(cm, n, steps=steps, generator=g, **c), None))
            for name, cm in models.items() for steps in ev.cm_steps]


def quality_vs_steps(teacher, models: dict, score, ev: EvalSettings | None = None, *, progress: bool = True,
                     partial_dir=None, score_tag: str = "") -> dict:
    """Score every (method, NFE) pair over ``ev.seeds`` with ``score(samples) -> {metric: value}`` (see
    ``vector_scorer`` and ``image_scorer``; both compare against the held-out split).

    Returns a dict with ``rows`` (one per method and NFE: means and standard deviations over seeds, samples per
    second) and ``samples`` (seed 0's samples of each setting, for plots).

    With ``partial_dir``, each (method, NFE) result is saved there as it finishes (row JSON + seed-0 samples), and
    a later call with the same directory and settings loads those instead of measuring them again: an interrupted
    benchmark loses nothing it had finished. ``score_tag`` names a scorer other than the default (e.g. "fid"), so
    that results scored without it are not reused.
    """
    ev = ev or EvalSettings()
    ev.check()
    return measure_jobs(teacher_jobs(teacher, ev) + model_jobs(models, ev), score, ev, progress=progress,
                        partial_dir=partial_dir, score_tag=score_tag)


def measure_jobs(jobs: list[tuple], score, ev: EvalSettings, *, progress: bool = True, partial_dir=None,
                 score_tag: str = "") -> dict:
    """Score ``jobs`` (``(method, nfe, model, run(n, generator, cond) -> (samples, counted nfe or None))``) over
    ``ev.seeds``: the loop behind ``quality_vs_steps`` and the text-to-image benchmark."""
    settings = {"num_samples": ev.num_samples, "seeds": list(ev.seeds), **({"score": score_tag} if score_tag else {})}
    store = PartialResults(partial_dir, settings) if partial_dir else None
    fingerprints: dict[int, str] = {}  # the models of this call (all alive during it), each hashed once
    rows, kept = [], {}
    bar = tqdm(total=len(jobs) * len(ev.seeds), desc="bench", disable=not progress, dynamic_ncols=True)
    for method, nfe, model, run in jobs:
        key = (method, nfe if nfe is not None else "adaptive")
        if store and id(model) not in fingerprints:
            fingerprints[id(model)] = model_fingerprint(model)
        done = store.load(key, fingerprints[id(model)]) if store else None
        if done is None:
            done = _measure(method, nfe, model, run, score, ev, bar)
            if store:
                store.save(key, fingerprints[id(model)], *done)
        else:
            bar.update(len(ev.seeds))
        rows.append(done[0])
        kept[key] = done[1]
    bar.close()
    return {"rows": rows, "samples": kept, "num_samples": ev.num_samples, "seeds": list(ev.seeds)}


def _measure(method, nfe, model, run, score, ev: EvalSettings, bar) -> tuple[dict, torch.Tensor]:
    """One (method, NFE) setting over every seed: its row and seed 0's samples."""
    scores, secs, nfes, first = [], [], [], None
    for seed in ev.seeds:
        t0 = time.perf_counter()
        x, counted = run(ev.num_samples, _gen(seed), class_condition(model, ev.num_samples, seed=seed))
        secs.append(time.perf_counter() - t0)
        nfes.append(counted if counted is not None else nfe)
        scores.append(score(x.float().cpu()))
        first = x.float().cpu() if first is None else first
        bar.update(1)
    row = {"method": method, "nfe": statistics.fmean(nfes), "adaptive": nfe is None,
           "samples_per_sec": ev.num_samples / statistics.fmean(secs), **_summarise(scores)}
    return row, first


def model_fingerprint(model) -> str:
    """A hash of a model's weights and of the sampling settings it carries, so saved results are reused only for
    the very same model sampled the same way: a model whose few-step sigmas a new schedule search changed (its
    ``config_dict``) is measured again. A student that holds its teacher's parts apart (an LCM, a LoRA student: its
    state dict is the adapter alone) hashes those too, so a row of a LoRA applied to another base is measured again."""
    h = hashlib.sha256()
    settings = model.config_dict() if hasattr(model, "config_dict") else \
        {k: getattr(model, k) for k in ("steps", "sampler", "guidance_scale") if hasattr(model, k)}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    parts = getattr(model, "parts", None)
    if parts is not None:
        from ..core.digests import weights_digest

        h.update(weights_digest(parts).encode())
    return h.hexdigest()[:16]


class PartialResults:
    """Finished (method, NFE) results of a benchmark, one JSON + one .npy each, written atomically; results made
    with other settings (sample count, seeds) are ignored."""

    def __init__(self, folder, settings: dict):
        self.folder, self.settings = Path(folder), settings
        self.folder.mkdir(parents=True, exist_ok=True)

    def _stem(self, key) -> Path:
        method, nfe = key
        return self.folder / f"{method.replace(' ', '_')}-{nfe}"

    def load(self, key, fingerprint: str):
        stem = self._stem(key)
        meta, arr = stem.with_suffix(".json"), stem.with_suffix(".npy")
        if not (meta.is_file() and arr.is_file()):
            return None
        saved = json.loads(meta.read_text())
        if saved.get("settings") != self.settings or saved.get("model") != fingerprint:
            return None
        return saved["row"], torch.from_numpy(np.load(arr, allow_pickle=False))

    def save(self, key, fingerprint: str, row: dict, samples: torch.Tensor) -> None:
        stem = self._stem(key)
        atomic_write(stem.with_suffix(".npy"), lambda tmp: _save_npy(tmp, samples))
        atomic_write_text(stem.with_suffix(".json"),
                          json.dumps({"settings": self.settings, "model": fingerprint, "row": row}))


def _save_npy(path: Path, x: torch.Tensor) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to a path
        np.save(f, x.numpy())


def run_benchmark(teacher, models: dict, data, ev: EvalSettings, out, *, fid: bool = False, inception_weights=None,
                  progress: bool = True, extra: dict | None = None) -> dict:
    """The quality-vs-steps benchmark end to end: score with the data's scorer (plus FID/KID with ``fid``), measure
    (resumable under ``out/partial``), and write the table, JSON and plot to ``out``."""
    from .report import write_results

    score, score_info = scorer_for(data, progress, fid=fid, inception_weights=inception_weights)
    result = quality_vs_steps(teacher, models, score, ev, progress=progress, partial_dir=Path(out) / "partial",
                              score_tag="fid" if fid else "")
    return write_results(result, data.test, out, extra={"dataset": data.name, **(extra or {}), **score_info})
