"""Writing a quality-vs-steps result: the markdown table, the JSON with the machine it ran on, the plot and the sample
grid. Measurement lives in ``bench.py``."""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import torch

# metric key -> (column title, lower is better)
METRICS = {"sw": ("sliced W2", True), "mmd": ("MMD²", True), "fd": ("Fréchet dist. (classifier features)", True),
           "confidence": ("classifier confidence", False), "recognised": ("recognised", False),
           "precision": ("precision", False), "recall": ("recall", False),
           "fid": ("FID (Inception)", True), "kid": ("KID (Inception)", True),
           "item_acc": ("item accuracy", False), "colour_acc": ("colour accuracy", False),
           "direction_acc": ("direction accuracy", False)}


def machine_info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import os

    return {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": platform.platform(),
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
        elif x.ndim in (4, 5):  # videos (N, C, F, H, W): their middle frames
            x = x[:, :, x.shape[2] // 2] if x.ndim == 5 else x
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
