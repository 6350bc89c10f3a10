"""Quality against the number of network evaluations: a teacher with each solver beside consistency models.

Layer 6. Writes ``quality_vs_steps.json`` (all numbers, machine, versions), ``quality_vs_steps.md`` (the table) and
``quality_vs_steps.png`` (metric against NFE on a log axis, and a grid of samples).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import metrics
from .sampling import TWO_EVAL_SOLVERS, class_condition, sample, sample_teacher, teacher_grid

MMD_MAX = 2000  # MMD is quadratic in the set size; the first MMD_MAX samples of each set are enough to rank methods


# metric key -> (column title, lower is better)
METRICS = {"sw": ("sliced W2", True), "mmd": ("MMD²", True), "fd": ("Fréchet dist. (classifier features)", True),
           "confidence": ("classifier confidence", False), "recognised": ("recognised", False),
           "precision": ("precision", False), "recall": ("recall", False),
           "fid": ("FID (Inception)", True), "kid": ("KID (Inception)", True)}


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


def quality_vs_steps(teacher, models: dict, score, *, teacher_solvers=("euler", "heun"),
                     teacher_nfe=(1, 2, 4, 8, 16, 35, 79), cm_steps=(1, 2, 4), num_samples: int = 4000,
                     seeds=(0, 1, 2), dopri5: bool = True, progress: bool = True, partial_dir=None,
                     score_tag: str = "") -> dict:
    """Score every (method, NFE) pair over ``seeds`` with ``score(samples) -> {metric: value}`` (see
    ``vector_scorer`` and ``image_scorer``; both compare against the held-out split).

    Solvers that cannot reach an NFE exactly (heun reaches only odd NFE) skip it. Returns a dict with ``rows``
    (one per method and NFE: means and standard deviations over seeds, samples per second) and ``samples``
    (seed 0's samples of the best setting of each method, for plots).

    With ``partial_dir``, each (method, NFE) result is saved there as it finishes (row JSON + seed-0 samples), and
    a later call with the same directory and settings loads those instead of measuring them again: an interrupted
    benchmark loses nothing it had finished. ``score_tag`` names a scorer other than the default (e.g. "fid"), so
    that results scored without it are not reused.
    """
    jobs = []  # (method, nfe, model for conditioning, run(n, generator, cond) -> (samples, counted nfe))
    for solver in teacher_solvers:
        for nfe in teacher_nfe:
            if solver in TWO_EVAL_SOLVERS and nfe % 2 == 0:
                continue
            grid = teacher_grid(nfe, solver, teacher.sigma_min, teacher.sigma_max)
            jobs.append((f"teacher {solver}", nfe, teacher, lambda n, g, c, grid=grid, solver=solver:
                         (sample_teacher(teacher, n, grid, method=solver, generator=g, **c), None)))
    if dopri5:
        grid = [teacher.sigma_max, teacher.sigma_min, 0.0]
        jobs.append(("teacher dopri5", None, teacher, lambda n, g, c: sample_teacher(
            teacher, n, grid, method="dopri5", generator=g, return_nfe=True, rtol=1e-5, atol=1e-5, **c)))
    for name, cm in models.items():
        for steps in cm_steps:
            jobs.append((name, steps, cm, lambda n, g, c, cm=cm, steps=steps:
                         (sample(cm, n, steps=steps, generator=g, **c), None)))

    rows, kept = [], {}
    settings = {"num_samples": num_samples, "seeds": list(seeds), **({"score": score_tag} if score_tag else {})}
    store = PartialResults(partial_dir, settings) if partial_dir else None
    bar = tqdm(total=len(jobs) * len(seeds), desc="bench", disable=not progress, dynamic_ncols=True)
    for method, nfe, model, run in jobs:
        key = (method, nfe if nfe is not None else "adaptive")
        fp = model_fingerprint(model) if store else None
        done = store.load(key, fp) if store else None
        if done is not None:
            rows.append(done[0])
            kept[key] = done[1]
            bar.update(len(seeds))
            continue
        scores, secs, nfes = [], [], []
        for seed in seeds:
            t0 = time.perf_counter()
            x, counted = run(num_samples, _gen(seed), class_condition(model, num_samples, seed=seed))
            secs.append(time.perf_counter() - t0)
            nfes.append(counted if counted is not None else nfe)
            scores.append(score(x.float().cpu()))
            if seed == seeds[0]:
                kept[key] = x.float().cpu()
            bar.update(1)
        row = {"method": method, "nfe": statistics.fmean(nfes), "adaptive": nfe is None,
               "samples_per_sec": num_samples / statistics.fmean(secs), **_summarise(scores)}
        rows.append(row)
        if store:
            store.save(key, fp, row, kept[key])
    bar.close()
    return {"rows": rows, "samples": kept, "num_samples": num_samples, "seeds": list(seeds)}


_FINGERPRINTS: dict[int, str] = {}


def model_fingerprint(model) -> str:
    """A hash of a model's weights, so saved results are reused only for the very same model."""
    import hashlib

    if id(model) not in _FINGERPRINTS:
        h = hashlib.sha256()
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        _FINGERPRINTS[id(model)] = h.hexdigest()[:16]
    return _FINGERPRINTS[id(model)]


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
        import numpy as np

        return saved["row"], torch.from_numpy(np.load(arr))

    def save(self, key, fingerprint: str, row: dict, samples: torch.Tensor) -> None:
        import os

        import numpy as np

        stem = self._stem(key)
        tmp = stem.with_name(stem.name + ".tmp.npy")
        np.save(tmp, samples.numpy())
        os.replace(tmp, stem.with_suffix(".npy"))
        tmp = stem.with_name(stem.name + ".tmp.json")
        tmp.write_text(json.dumps({"settings": self.settings, "model": fingerprint, "row": row}))
        os.replace(tmp, stem.with_suffix(".json"))


def machine_info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import os

    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "git_commit": commit}


def _metric_keys(result: dict) -> list[str]:
    first = result["rows"][0]
    return [k for k in METRICS if f"{k}_mean" in first]


def markdown_table(result: dict) -> str:
    keys = _metric_keys(result)
    head = " | ".join(f"{METRICS[k][0]} {'↓' if METRICS[k][1] else '↑'}" for k in keys)
    lines = [f"| method | NFE | {head} | samples/s |", "|---|---:|" + "---:|" * len(keys) + "---:|"]
    for r in result["rows"]:
        nfe = f"{r['nfe']:.0f}" + (" (adaptive)" if r["adaptive"] else "")
        cells = " | ".join(f"{r[k + '_mean']:.4g} ± {r[k + '_std']:.2g}" for k in keys)
        lines.append(f"| {r['method']} | {nfe} | {cells} | {r['samples_per_sec']:.0f} |")
    return "\n".join(lines)


def plot(result: dict, reference: torch.Tensor, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    picks = [("data (held out)", reference)]
    teacher_shown = {("teacher euler", 2), ("teacher heun", 35), ("teacher dopri5", "adaptive")}
    for (method, nfe), x in samples.items():
        if not method.startswith("teacher") or (method, nfe) in teacher_shown:
            picks.append((f"{method}, NFE {nfe}", x))
    picks = picks[:8]
    key = _metric_keys(result)[0]
    two_d = reference.ndim == 2 and reference.shape[1] == 2
    fig = plt.figure(figsize=(5 + 2.6 * len(picks), 4.2))
    gs = fig.add_gridspec(1, len(picks) + 2)
    ax = fig.add_subplot(gs[0, :2])
    by_method: dict[str, list] = {}
    for r in result["rows"]:
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in by_method.items():
        rs = sorted(rs, key=lambda r: r["nfe"])
        xs, ys, es = [r["nfe"] for r in rs], [r[key + "_mean"] for r in rs], [r[key + "_std"] for r in rs]
        style = "--o" if method.startswith("teacher") else "-s"
        ax.errorbar(xs, ys, yerr=es, fmt=style, label=method, capsize=2, markersize=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(f"{METRICS[key][0]} to held-out data")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    for i, (title, x) in enumerate(picks):
        a = fig.add_subplot(gs[0, i + 2])
        if two_d:
            a.scatter(x[:2000, 0], x[:2000, 1], s=1, alpha=0.5)
            a.set_xlim(-1.6, 1.6)
            a.set_ylim(-1.6, 1.6)
            a.set_aspect("equal")
        elif x.ndim == 4:
            a.imshow(image_grid(x[:36], 6), cmap="gray" if x.shape[1] == 1 else None, vmin=0, vmax=1)
        a.set_title(title, fontsize=8)
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_grid(x: torch.Tensor, nrow: int):
    """(n, C, H, W) in [-1, 1] -> an (rows*H, nrow*W[, C]) array in [0, 1] for imshow."""
    from torchvision.utils import make_grid

    g = make_grid((x.float().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)
    return g[0].numpy() if x.shape[1] == 1 else g.permute(1, 2, 0).numpy()


def write_results(result: dict, reference: torch.Tensor, out, name: str = "quality_vs_steps",
                  extra: dict | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = {**machine_info(), **(extra or {})}
    payload = {"info": info, "num_samples": result["num_samples"], "seeds": result["seeds"], "rows": result["rows"]}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    header = (f"Quality vs steps, {result['num_samples']} samples x {len(result['seeds'])} seeds, measured "
              f"{info['date']} on {info['processor']} ({info['cpu_count']} cores, torch {info['torch']}).\n\n")
    table = markdown_table(result)
    (out / f"{name}.md").write_text(header + table + "\n")
    plot(result, reference, out / f"{name}.png")
    return {"table": table, "header": header, "paths": [str(out / f"{name}.{e}") for e in ("md", "json", "png")]}
