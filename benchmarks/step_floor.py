"""Each few-step kind's training step on the shipped flow teacher against its floor: the network passes the step
cannot do without (the guided teacher pass, the target or tangent pass, the student's forward and backward, rCM's
student samples and fake-score passes) and the optimiser update, each timed alone at the same batch and summed.
Both are medians over the same steps, measured side by side in one run.

    python benchmarks/step_floor.py [--kinds cd,cd-lora,scd,scd-lora,rcm] [--batch 64] [--iters 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time

import torch

from cmkit.cli.jobs import build_run, dataset_for
from cmkit.cli.recipes import load_recipe
from cmkit.eval.report import machine_info
from cmkit.latent.students import adapters_off
from cmkit.loading import load_teacher
from cmkit.objectives.latent_scm import TrigFlowView
from cmkit.objectives.tangents import directional_derivative
from cmkit.solvers import ode_step
from cmkit.training import Trainer


def timed(fn, iters: int) -> float:
    fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def floor_passes(kind: str, model, objective, z0, cond, step: int) -> list:
    """The passes one step at ``step`` needs, as callables (each run alone)."""
    n = z0.shape[0]
    pos = {k: v for k, v in cond.items() if not k.startswith("negative_")}
    w = torch.full((n,), objective.cfg.w_min)
    off = (lambda: adapters_off(objective.teacher.network)) if objective.lora else contextlib.nullcontext
    sigma = torch.full((n,), 1.5)

    def teacher():
        with torch.no_grad(), off():
            objective.teacher(z0, sigma, guidance_scale=w, **cond)

    def no_grad_student(batch=1):
        def run():
            with torch.no_grad():
                model(torch.cat([z0] * batch), torch.cat([sigma] * batch), **{k: torch.cat([v] * batch) for k, v in
                                                                               pos.items()})
        return run

    def student_backward(batch=1):
        def run():
            model(torch.cat([z0] * batch), torch.cat([sigma] * batch),
                  **{k: torch.cat([v] * batch) for k, v in pos.items()}).float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
        return run

    if kind.startswith("cd"):
        def teacher_step():
            with torch.no_grad(), off():
                ode_step(objective.teacher, z0, sigma, sigma * 0.8, solver=objective.cfg.solver, **cond,
                         guidance_scale=w)
        return [teacher_step, no_grad_student(), student_backward()]
    t = torch.full((n,), 0.9)

    def tangent():
        view = TrigFlowView(model, objective.sd)
        directional_derivative(lambda x, tt: view(x, raw_time=tt, **pos), (z0, t), (z0, t))
    if kind.startswith("scd") or objective.student_phase(step):
        passes = [teacher, tangent]
        if kind == "rcm" and step > objective.cfg.tangent_warmup:
            k = objective._counts(step)[0] % objective.cfg.dmd_max_steps
            fake = no_grad_fake(objective, z0, sigma, pos)
            return passes + [no_grad_student()] * k + [student_backward(2), fake, teacher]
        return passes + [student_backward()]
    k = objective._counts(step)[1] % objective.cfg.dmd_max_steps

    def fake_backward():
        objective.fake(z0, sigma, **pos).pow(2).mean().backward()
        objective.fake.zero_grad(set_to_none=True)
    return [no_grad_student()] * (k + 1) + [fake_backward]


def no_grad_fake(objective, z0, sigma, pos):
    def run():
        with torch.no_grad():
            objective.fake(z0, sigma, **pos)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="cd,cd-lora,scd,scd-lora,rcm")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    rows = []
    for kind in args.kinds.split(","):
        recipe = load_recipe(f"tiny-sd3-{kind}", [f"train.batch_size={args.batch}", "train.warmup=0"])
        teacher = load_teacher(recipe.teacher.path).requires_grad_(False).eval()
        data = dataset_for(recipe)
        model, objective = build_run(recipe, data, teacher, teacher_path=recipe.teacher.path)
        with tempfile.TemporaryDirectory() as out:
            trainer = Trainer(model, objective, objective.batches, recipe.train, out, progress=False)
            start = getattr(objective.cfg, "tangent_warmup", 0) + 1  # rCM: the steps with every phase in them
            trainer.step_no = start
            z0, cond = objective.batches(args.batch, torch.device("cpu"))
            steps = list(range(start, start + args.iters))
            step_times, floors = [], []
            trainer.step()  # the first step allocates the optimiser state
            for s in steps:
                trainer.step_no = s
                t0 = time.perf_counter()
                trainer.step()
                step_times.append(time.perf_counter() - t0)
                floors.append(sum(timed(p, 1) for p in floor_passes(kind, trainer.online, objective, z0, cond, s)))
            trained = [q for q in trainer._params if q.requires_grad]
            for q in trained:  # the update alone, on gradients of the right shapes
                q.grad = torch.zeros_like(q)
            opt = timed(trainer._optimizer_step, 3)
            for q in trained:
                q.grad = None
        step, floor = statistics.median(step_times), statistics.median(floors) + opt
        rows.append({"kind": kind, "objective": recipe.objective.kind, "batch": args.batch,
                     "step_s": round(step, 4), "floor_s": round(floor, 4), "ratio": round(step / floor, 3)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"info": machine_info(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
