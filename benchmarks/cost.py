"""The cost of one training iteration (CD, CT, iCT or ECT) next to the floor it cannot beat.

    python benchmarks/cost.py --recipe digits-cd [--iters 20] [--out benchmarks/results/cost]

The floor is the sum of the network passes one iteration needs, each timed alone on the same batch: the online
forward + backward and the target forward, plus for CD the teacher's forwards (two for Heun, one for Euler); CT, iCT
and ECT use no teacher. The iteration is the trainer's whole step (objective, backward, optimiser, target and output
EMA updates). Ratio = iteration / floor.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from cmkit.cli.jobs import build_run, dataset_for
from cmkit.cli.recipes import load_recipe
from cmkit.eval.report import machine_info
from cmkit.models import load_teacher
from cmkit.training import ema_update, make_optimizer


def timed(fn, iters: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def write_table(out: Path) -> None:
    """cost.md: one row per recipe measured into ``out`` so far."""
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    lines = ["| recipe | objective | batch | iteration | floor | ratio | measured |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        i = r["info"]
        lines.append(f"| `{r['recipe']}` | {r.get('kind', 'cd')} | {r['batch_size']} | {r['iteration_s'] * 1e3:.1f} ms "
                     f"| {r['floor_s'] * 1e3:.1f} ms | {r['ratio']:.2f} | {i['date']}, {r['device']}, "
                     f"{i['cpu_count']} cores |")
    (out / "cost.md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="digits-cd")
    ap.add_argument("--teacher", help="teacher folder (default: the recipe's teacher.path)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/cost")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    o, bs = recipe.objective, recipe.train.batch_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = None
    if o.kind in ("cd", "ect"):
        teacher = load_teacher(args.teacher or recipe.teacher.path).requires_grad_(False).eval().to(device)
    data = dataset_for(recipe)
    torch.manual_seed(0)
    model, obj = build_run(recipe, data, teacher)
    model = model.to(device).train()
    mu = obj.target_ema(0)
    # with mu = 0 (iCT, ECT) the trainer keeps no target copy: the target pass is the online net under no_grad
    target = copy.deepcopy(model).requires_grad_(False) if mu > 0 else model
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model.parameters(), recipe.train)
    x0 = data.train[torch.randint(0, len(data.train), (bs,))].to(device)
    sigma = torch.full((bs,), 1.0, device=device)

    def iteration():
        loss = obj(model, x0, target=target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mu > 0:
            ema_update(target, model, mu)
        ema_update(ema, model, recipe.train.ema_rates[0])

    def online():
        model(x0, sigma).square().mean().backward()
        model.zero_grad(set_to_none=True)

    def target_fwd():
        with torch.no_grad():
            target(x0, sigma)

    def teacher_fwd():
        with torch.no_grad():
            teacher(x0, sigma)

    t_iter = timed(iteration, args.iters)
    t_online, t_target = timed(online, args.iters), timed(target_fwd, args.iters)
    teacher_passes = (2 if o.solver == "heun" else 1) if o.kind == "cd" else 0
    t_teacher = timed(teacher_fwd, args.iters) if teacher_passes else 0.0
    floor = t_online + t_target + teacher_passes * t_teacher
    result = {"recipe": args.recipe, "kind": o.kind, "batch_size": bs, "device": device, "iteration_s": t_iter,
              "floor_s": floor,
              "ratio": t_iter / floor, "online_fwd_bwd_s": t_online, "target_fwd_s": t_target,
              "teacher_fwd_s": t_teacher, "teacher_passes": teacher_passes, "info": machine_info()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{Path(args.recipe).stem}.json").write_text(json.dumps(result, indent=2))
    write_table(out)
    print(f"{args.recipe}: iteration {t_iter * 1e3:.1f} ms, floor {floor * 1e3:.1f} ms "
          f"(online fwd+bwd {t_online * 1e3:.1f}, target {t_target * 1e3:.1f}, teacher {teacher_passes} x "
          f"{t_teacher * 1e3:.1f}), ratio {t_iter / floor:.2f} on {device}, batch {bs}")


if __name__ == "__main__":
    main()
