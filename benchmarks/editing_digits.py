"""Zero-shot editing on held-out digits with a distilled consistency model, against simple baselines.

    python benchmarks/editing_digits.py [--model cmkit:digits-cd] [--out benchmarks/results/editing-digits]

Inpainting a random half of the pixels: error on the missing pixels against mean-fill (the known pixels' mean) and
blur-fill (missing pixels from a normalised 3x3 average of the known ones). Super-resolution x2: error against
bicubic upsampling, and the digits classifier's accuracy on each result. Writes JSON + markdown.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from editing_common import editing_setup, summarise

import cmkit
from cmkit.data import load_dataset
from cmkit.data.imagefiles import side_by_side
from cmkit.eval.classifier import load_or_train_classifier
from cmkit.eval.report import machine_info


def blur_fill(images, mask):
    k = torch.ones(1, 1, 3, 3)
    num, den = F.conv2d(images * mask, k, padding=1), F.conv2d(mask, k, padding=1)
    filled = images * mask
    for _ in range(4):  # spread known values into holes a few pixels wide
        est = num / den.clamp_min(1e-6)
        filled = torch.where(mask.bool(), images, torch.where(den > 0, est, filled))
        num, den = F.conv2d(filled, k, padding=1), F.conv2d((den > 0).float(), k, padding=1)
    return filled


def mse_on(a, b, where):
    return float(((a - b) ** 2)[where.expand_as(a).bool()].mean())


def main():
    args, cm, sig = editing_setup(__doc__, "cmkit:digits-cd", "benchmarks/results/editing-digits",
                                  lambda ap: ap.add_argument("--average", type=int, default=8,
                                                             help="samples averaged for the posterior-mean row"))
    data = load_dataset("digits")
    clf, clf_info = load_or_train_classifier(data)
    x, labels = data.test, data.test_labels
    rows = {}

    def add(name, vals):
        rows.setdefault(name, []).append(vals)

    for seed in args.seeds:
        g = torch.Generator().manual_seed(seed)
        mask = (torch.rand(x.shape[0], 1, 8, 8, generator=g) < 0.5).float()
        missing = 1 - mask
        known_mean = (x * mask).sum((1, 2, 3), keepdim=True) / mask.sum((1, 2, 3), keepdim=True)
        samples = [cmkit.inpaint(cm, x, mask, sigmas=sig, generator=g) for _ in range(args.average)]
        cands = {
            "inpaint: consistency model, one sample": samples[0],
            f"inpaint: consistency model, mean of {args.average}": torch.stack(samples).mean(0),
            "inpaint: mean-fill": torch.where(mask.bool(), x, known_mean.expand_as(x)),
            "inpaint: blur-fill": blur_fill(x, mask),
        }
        for name, out in cands.items():
            add(name, {"mse_missing": mse_on(out, x, missing)})
        low = F.avg_pool2d(x, 2)
        ups = [cmkit.superres(cm, low, 2, sigmas=sig, generator=g) for _ in range(args.average)]
        sr = {
            "superres x2: consistency model, one sample": ups[0],
            f"superres x2: consistency model, mean of {args.average}": torch.stack(ups).mean(0),
            "superres x2: bicubic": F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=False)
            .clamp(-1, 1),
        }
        for name, out in sr.items():
            with torch.no_grad():
                acc = float((clf(out.clamp(-1, 1)).argmax(1) == labels).float().mean())
            add(name, {"mse": float(((out - x) ** 2).mean()), "classifier_accuracy": acc})
        if seed == args.seeds[0]:
            figure = [("held-out", x[:16]), ("masked", x[:16] * mask[:16] - missing[:16]),
                      ("CM inpaint", samples[0][:16]),
                      ("blur-fill", cands["inpaint: blur-fill"][:16]),
                      ("low-res x2", low[:16].repeat_interleave(2, 2).repeat_interleave(2, 3)),
                      ("CM superres", ups[0][:16]),
                      ("bicubic", sr["superres x2: bicubic"][:16])]
    with torch.no_grad():
        real_acc = float((clf(x).argmax(1) == labels).float().mean())
    summary = summarise(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {**machine_info(), "model": args.model, "steps": args.steps, "seeds": args.seeds,
            "classifier": clf_info, "classifier_accuracy_on_real": real_acc, "n_images": int(x.shape[0])}
    (out / "editing.json").write_text(json.dumps({"info": info, "results": summary}, indent=2))
    lines = [f"Editing {x.shape[0]} held-out digits, consistency model {args.model} with {args.steps} editing steps "
             f"({'its default editing schedule' if sig is None else 'Karras grid'}), "
             f"{len(args.seeds)} seeds; "
             f"measured {info['date']} on {info['processor']} ({info['cpu_count']} cores). Classifier accuracy on "
             f"the real images: {real_acc:.3f}.", "", "| method | MSE (missing pixels / all) | classifier accuracy |",
             "|---|---:|---:|"]
    for name, m in summary.items():
        err = m.get("mse_missing", m.get("mse"))
        acc = f"{m['classifier_accuracy'][0]:.3f} ± {m['classifier_accuracy'][1]:.3f}" if "classifier_accuracy" in m \
            else "-"
        lines.append(f"| {name} | {err[0]:.4f} ± {err[1]:.4f} | {acc} |")
    (out / "editing.md").write_text("\n".join(lines) + "\n")
    side_by_side(figure, out / "editing.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
