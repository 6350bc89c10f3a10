"""Zero-shot colorization of held-out tinted digits with a consistency model trained on tinted digits.

    python benchmarks/colorize_tinted.py --model runs/tinted-digits-ict/model [--out benchmarks/results/colorize-tinted]

Each held-out RGB digit is reduced to its luminance (0.2989 R + 0.5870 G + 0.1140 B) and coloured again by
``cmkit.colorize``. The colours of the original are random (``cmkit.data.tint``), so no method can recover them; what is
measured is whether the output keeps the luminance (max error) and has the data's colour statistics: sliced W2 between
the output's and the held-out images' per-pixel chroma (rgb minus the gray of equal luminance), between their
per-image mean chroma, and their mean saturation (chroma magnitude). Baselines: the gray image (R = G = B = the
luminance) and the training set's mean chroma added to it. Writes JSON + markdown + a figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from editing_common import editing_setup, summarise

import cmkit
from cmkit.data import load_dataset
from cmkit.data.imagefiles import side_by_side
from cmkit.eval.metrics import sliced_wasserstein
from cmkit.eval.report import machine_info
from cmkit.sampling.editing import LUMA


def luminance(rgb):
    return torch.einsum("c,bchw->bhw", torch.tensor(LUMA), rgb)[:, None]


def chroma(rgb):
    """(B, 3, H, W): what is left of each pixel after its gray of equal luminance, rgb - Y (1, 1, 1); zero for a
    gray pixel (the luma weights sum to 1 to 1e-4)."""
    return rgb - luminance(rgb)


def colour_stats(out, real) -> dict:
    c_out, c_real = chroma(out), chroma(real)
    pix = lambda c: c.permute(0, 2, 3, 1).reshape(-1, 3)  # noqa: E731
    return {"sw_pixel_chroma": sliced_wasserstein(pix(c_out), pix(c_real), seed=0),
            "sw_image_chroma": sliced_wasserstein(c_out.mean((2, 3)), c_real.mean((2, 3)), seed=0),
            "saturation": float(c_out.norm(dim=1).mean())}


def main():
    args, cm, sig = editing_setup(__doc__, "runs/tinted-digits-ict/model", "benchmarks/results/colorize-tinted")
    data = load_dataset("tinted_digits")
    x = data.test
    gray = luminance(x)
    mean_chroma = chroma(data.train).mean((0, 2, 3)).reshape(1, 3, 1, 1)
    baselines = {"gray (R = G = B = luminance)": gray.expand(-1, 3, -1, -1),
                 "gray + training mean chroma": gray + mean_chroma}
    rows = {name: [colour_stats(out, x) | {"max_luminance_error": float((luminance(out) - gray).abs().max())}]
            for name, out in baselines.items()}
    cm_name = f"consistency model ({args.steps} steps)"
    for seed in args.seeds:
        out = cmkit.colorize(cm, gray, sigmas=sig, generator=torch.Generator().manual_seed(seed))
        rows.setdefault(cm_name, []).append(colour_stats(out, x) | {
            "max_luminance_error": float((luminance(out) - gray).abs().max()),
            "outside_range": float(((out < -1.001) | (out > 1.001)).float().mean())})
        if seed == args.seeds[0]:
            figure = [("held-out", x[:16]), ("luminance input", gray[:16].expand(-1, 3, -1, -1)),
                      ("CM colorized", out[:16]),
                      ("training-mean chroma", baselines["gray + training mean chroma"][:16])]
    summary = summarise(rows)
    real_sat = float(chroma(x).norm(dim=1).mean())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {**machine_info(), "model": args.model, "steps": args.steps, "seeds": args.seeds,
            "n_images": int(x.shape[0]), "held_out_saturation": real_sat}
    (out_dir / "colorize.json").write_text(json.dumps({"info": info, "results": summary}, indent=2))
    lines = [f"Colorizing {x.shape[0]} held-out tinted digits from their luminance, {len(args.seeds)} seeds; measured "
             f"{info['date']} on {info['processor']} ({info['cpu_count']} cores). Held-out mean saturation: "
             f"{real_sat:.3f}.", "",
             "| method | max luminance error | SW2 pixel chroma ↓ | SW2 image-mean chroma ↓ | mean saturation |",
             "|---|---:|---:|---:|---:|"]
    for name, m in summary.items():
        cell = lambda k, m=m: f"{m[k][0]:.4f} ± {m[k][1]:.4f}"  # noqa: E731
        lines.append(f"| {name} | {m['max_luminance_error'][0]:.1e} | {cell('sw_pixel_chroma')} | "
                     f"{cell('sw_image_chroma')} | {cell('saturation')} |")
    (out_dir / "colorize.md").write_text("\n".join(lines) + "\n")
    side_by_side(figure, out_dir / "colorize.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
