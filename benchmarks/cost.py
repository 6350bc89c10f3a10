"""The cost of one training iteration (CD, CT, iCT, ECT, sCT, sCD or MeanFlow) next to the floor it cannot beat.

    python benchmarks/cost.py --recipe digits-cd [--batch 64] [--iters 30] [--out benchmarks/results/cost]

The iteration is the trainer's own step, ``cmkit.training.Trainer.step`` (seeding, batch draw, objective, backward,
optimiser, target and output EMA updates). The floor is the sum of the network passes one iteration needs, each
timed alone on the same batch: the online forward + backward and the target forward, plus for CD the teacher's
forwards (two for Heun, one for Euler); CT, iCT and ECT use no teacher. For the continuous-time kinds (sCT, sCD,
MeanFlow) the target pass is the JVP of the network (``torch.func.jvp``, timed alone the way the objective calls it),
plus one teacher forward for sCD. Ratio = iteration / floor. The parts are
timed in interleaved rounds (iteration, online, target, teacher, then again), ``--iters`` calls each, and each part's
median over ``--repeats`` rounds is kept: on a shared machine the speed drifts by several percent between minutes,
and interleaving puts the same drift into the iteration and its floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cmkit.cli.jobs import build_run, dataset_for
from cmkit.cli.recipes import load_recipe
from cmkit.eval.report import machine_info
from cmkit.loading import load_teacher
from cmkit.objectives.tangents import directional_derivative
from cmkit.training import Trainer


def timed_rounds(parts: dict, iters: int, repeats: int) -> dict:
    """``{name: median seconds per call}`` over ``repeats`` interleaved rounds of ``iters`` calls of each part."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in parts.values():
        fn()  # warm-up
    times = {name: [] for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / iters)
    return {name: statistics.median(v) for name, v in times.items()}


def write_table(out: Path) -> None:
    """cost.md: one row per (recipe, batch) measured into ``out`` so far."""
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    lines = ["| recipe | objective | batch | iteration | floor | ratio | measured |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        i = r["info"]
        lines.append(f"| `{r['recipe']}` | {r['kind']} | {r['batch_size']} | {r['iteration_s'] * 1e3:.1f} ms "
                     f"| {r['floor_s'] * 1e3:.1f} ms | {r['ratio']:.2f} | {i['date']}, {r['device']}, "
                     f"{i['cpu_count']} cores |")
    (out / "cost.md").write_text("\n".join(lines) + "\n")


def passes(kind: str, online, target, x0: torch.Tensor):
    """The online forward + backward and the target pass one iteration of ``kind`` needs, on the batch ``x0``: a
    forward at sigma = 1 for the discrete kinds, the network in its own time units and a JVP for the continuous ones."""
    n = x0.shape[0]
    if kind in ("sct", "scd", "meanflow"):
        t = torch.full((n,), 0.8, device=x0.device)
        if kind == "meanflow":
            raw, primals = (0.5 * t, t), (x0, 0.5 * t, t)
            tangents = (torch.randn_like(x0), torch.zeros_like(t), torch.ones_like(t))

            def fn(x, r, tt):
                return target(x, raw_time=(r, tt))
        else:
            raw, primals, tangents = t, (x0, t), (torch.randn_like(x0), torch.ones_like(t))

            def fn(x, tt):
                return target(x, raw_time=tt)

        def target_pass():
            directional_derivative(fn, primals, tangents)
    else:
        raw, sigma = None, torch.ones(n, device=x0.device)

        def target_pass():
            with torch.no_grad():
                target(x0, sigma)

    def online_pass():
        out = online(x0, raw_time=raw) if raw is not None else online(x0, sigma)
        out.square().mean().backward()
        online.zero_grad(set_to_none=True)

    return online_pass, target_pass


def measure(recipe_name: str, teacher_path: str | None, batch: int | None, iters: int, repeats: int) -> dict:
    recipe = load_recipe(recipe_name)
    if batch:
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, batch_size=batch))
    o, bs = recipe.objective, recipe.train.batch_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = None
    if hasattr(o, "n_points") or o.kind in ("ect", "scd"):
        teacher = load_teacher(teacher_path or recipe.teacher.path).requires_grad_(False).eval().to(device)
    data = dataset_for(recipe)
    torch.manual_seed(0)
    model, obj = build_run(recipe, data, teacher)
    x0 = data.train[torch.randint(0, len(data.train), (bs,))].to(device)
    sigma = torch.full((bs,), 1.0, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, obj, data.batches(), recipe.train, tmp, progress=False)
        online, target = trainer.online, trainer.target if trainer.target is not None else trainer.online

        online_pass, target_pass = passes(o.kind, online, target, x0)

        def no_grad(net):
            def run():
                with torch.no_grad():
                    net(x0, sigma)
            return run

        teacher_passes = (2 if o.solver in ("heun", "dpm2") else 1) if o.kind == "cd" else int(o.kind == "scd")
        parts = {"iteration": trainer.step, "online": online_pass, "target": target_pass,
                 **({"teacher": no_grad(teacher)} if teacher_passes else {})}
        t = timed_rounds(parts, iters, repeats)
    t_iter, t_online, t_target, t_teacher = t["iteration"], t["online"], t["target"], t.get("teacher", 0.0)
    floor = t_online + t_target + teacher_passes * t_teacher
    return {"recipe": recipe_name, "kind": o.kind, "batch_size": bs, "device": device, "iteration_s": t_iter,
            "floor_s": floor, "ratio": t_iter / floor, "online_fwd_bwd_s": t_online, "target_fwd_s": t_target,
            "teacher_fwd_s": t_teacher, "teacher_passes": teacher_passes, "info": machine_info()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="digits-cd")
    ap.add_argument("--teacher", help="teacher folder (default: the recipe's teacher.path)")
    ap.add_argument("--batch", type=int, help="batch size (default: the recipe's)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/cost")
    args = ap.parse_args()
    r = measure(args.recipe, args.teacher, args.batch, args.iters, args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{Path(args.recipe).stem}-b{r['batch_size']}.json").write_text(json.dumps(r, indent=2))
    write_table(out)
    print(f"{args.recipe}: iteration {r['iteration_s'] * 1e3:.1f} ms, floor {r['floor_s'] * 1e3:.1f} ms (online "
          f"fwd+bwd {r['online_fwd_bwd_s'] * 1e3:.1f}, target {r['target_fwd_s'] * 1e3:.1f}, teacher "
          f"{r['teacher_passes']} x {r['teacher_fwd_s'] * 1e3:.1f}), ratio {r['ratio']:.2f} on {r['device']}, "
          f"batch {r['batch_size']}")


if __name__ == "__main__":
    main()
