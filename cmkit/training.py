"""One trainer for every objective: accelerate, output EMAs, a target network, checkpoints, resume, Ctrl-C.

Layer 5. The trainer knows a model, an objective (``objective(model, x0, target, step, **cond)``), a batch source and
its settings; it never knows which objective it runs.

Determinism: before every step the global torch generator is seeded from ``(seed, step, rank)``, so a run that is
stopped and resumed draws the same data, noise and dropout as one that never stopped: the weights match exactly.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C once the checkpoint is safely written."""


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adam"          # adam | radam | adamw
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup: int = 0                  # linear lr warm-up steps; the schedule never depends on `steps`, so runs extend
    grad_clip: float = 0.0           # 0 = off
    ema_rates: list[float] = field(default_factory=lambda: [0.999])
    checkpoint_every: int = 500
    log_every: int = 50
    mixed_precision: str = "no"      # no | fp16 | bf16
    cpu: bool = False                # force CPU even where a GPU is present


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def make_optimizer(params, s: TrainSettings):
    kinds = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam, "adamw": torch.optim.AdamW}
    if s.optimizer not in kinds:
        raise ValueError(f"unknown optimizer {s.optimizer!r}; choose one of {', '.join(kinds)}")
    return kinds[s.optimizer](params, lr=s.lr, betas=tuple(s.betas), weight_decay=s.weight_decay)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, online: torch.nn.Module, rate: float) -> None:
    """``ema <- rate * ema + (1 - rate) * online`` for parameters; buffers are copied."""
    e_params = [p for p in ema.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    torch._foreach_lerp_(e_params, o_params, 1.0 - rate)
    for eb, ob in zip(ema.buffers(), online.buffers()):
        eb.copy_(ob)


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    c = copy.deepcopy(model)
    c.requires_grad_(False)
    return c


def train(model: torch.nn.Module, objective, batches: Callable[[int, torch.device], tuple[torch.Tensor, dict]],
          settings: TrainSettings, out, seed: int = 0, run_info: dict | None = None, progress: bool = True,
          accelerator: Accelerator | None = None) -> dict:
    """Train ``model`` with ``objective`` for ``settings.steps`` optimiser steps, resuming from ``out`` if it holds
    a checkpoint. ``batches(n, device)`` returns ``n`` training examples and their conditioning (drawn with torch's
    global generator). Writes ``out/log.jsonl``, ``out/checkpoints/`` and, at the end, ``out/model/`` (the first
    output EMA, or the online weights when no EMA is kept). Returns a summary dict.
    """
    if settings.steps < 1:
        raise ValueError(f"train.steps must be >= 1, got {settings.steps}")
    out = Path(out)
    acc = accelerator or Accelerator(cpu=settings.cpu, mixed_precision=settings.mixed_precision)
    world, rank = acc.num_processes, acc.process_index
    if settings.batch_size % world:
        raise ValueError(f"train.batch_size {settings.batch_size} is not divisible by the {world} processes")
    local_bs = settings.batch_size // world

    model.train()
    rates = {f"ema-{r!r}": float(r) for r in settings.ema_rates}  # repr keeps every digit: 0.9999999 != 1
    emas = {key: _frozen_copy(model) for key in rates}
    target = _frozen_copy(model) if objective.target_ema(0) > 0 else None
    optimizer = make_optimizer(model.parameters(), settings)

    nets = {"model": model, **emas, **({"target": target} if target is not None else {})}
    ckpt_root = out / "checkpoints"
    start = 0
    last = latest_checkpoint(ckpt_root)
    scaler_state = None
    if last is not None:
        state = load_checkpoint(last, nets, optimizer)
        start, scaler_state = state["step"], state.get("scaler")
    device = acc.device
    for m in list(emas.values()) + ([target] if target is not None else []):
        m.to(device)
    wrapped, optimizer = acc.prepare(model, optimizer)
    online = acc.unwrap_model(wrapped)
    if scaler_state and acc.scaler is not None:  # fp16 loss scale, so a resumed run scales as an unbroken one
        acc.scaler.load_state_dict(scaler_state)

    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(out / "log.jsonl", start)
    summary = {"start_step": start, "steps": settings.steps}
    if start >= settings.steps:
        acc.print(f"{out}: already at step {start} of {settings.steps}; nothing to train")
    step = start
    loss_sum = torch.zeros((), device=device)
    t0 = time.perf_counter()
    log_t0, log_step0 = t0, start

    def checkpoint():
        acc.wait_for_everyone()
        if acc.is_main_process:
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            save_checkpoint(ckpt_root, step, nets, optimizer, {"seed": seed, "scaler": scaler, **(run_info or {})})
        acc.wait_for_everyone()

    bar = tqdm(total=settings.steps, initial=start, disable=not (progress and acc.is_main_process),
               desc="train", dynamic_ncols=True)
    stop = StopRequest(acc)
    try:
        while step < settings.steps and not stop.requested(step, settings.log_every):
            torch.manual_seed(step_seed(seed, step, rank))
            x0, cond = batches(local_bs, device)
            lr = settings.lr * min(1.0, (step + 1) / settings.warmup) if settings.warmup else settings.lr
            for g in optimizer.param_groups:
                g["lr"] = lr
            with acc.autocast():
                loss = objective(wrapped, x0, target=target if target is not None else online, step=step, **cond)
            acc.backward(loss)
            if settings.grad_clip > 0:
                acc.clip_grad_norm_(wrapped.parameters(), settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            mu = objective.target_ema(step)
            if target is not None:
                ema_update(target, online, mu)
            for key, ema in emas.items():
                ema_update(ema, online, rates[key])
            loss_sum += loss.detach()
            bar.update(1)
            if step % settings.log_every == 0 or step == settings.steps:
                mean_loss = (acc.reduce(loss_sum, reduction="mean") / (step - log_step0)).item()
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss became {mean_loss} at step {step}; lower train.lr or check data")
                now = time.perf_counter()
                row = {"step": step, "loss": mean_loss, "lr": lr, "target_mu": mu,
                       "sec_per_step": (now - log_t0) / (step - log_step0), "elapsed": now - t0}
                if acc.is_main_process:
                    with open(out / "log.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{mean_loss:.4g}")
                loss_sum.zero_()
                log_t0, log_step0 = now, step
            if step % settings.checkpoint_every == 0 and step < settings.steps:
                checkpoint()
    except KeyboardInterrupt:  # a second Ctrl-C, or one raised by code: no checkpoint mid-step
        bar.close()
        raise TrainingInterrupted(f"stopped at once during step {step + 1}; the run resumes from the last "
                                  f"checkpoint in {ckpt_root}") from None
    finally:
        stop.restore()
    bar.close()
    if stop.requested() and step < settings.steps:
        if step > start:
            checkpoint()
        raise TrainingInterrupted(f"interrupted at step {step}; checkpoint saved in {ckpt_root}, "
                                  "run the same command again to resume")
    if step > start or latest_checkpoint(ckpt_root) is None:
        checkpoint()
    final = next(iter(emas.values()), online)
    if acc.is_main_process:
        export = copy.deepcopy(online).cpu()
        export.load_state_dict({k: v.cpu() for k, v in final.state_dict().items()})
        export.save_pretrained(out / "model")
    acc.wait_for_everyone()
    summary.update(end_step=step, seconds=time.perf_counter() - t0, model_dir=str(out / "model"),
                   world_size=world)
    return summary


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM (what schedulers and `kill` send) ask the loop to stop after the step in
    progress, so the checkpoint holds one complete step; a second signal stops at once. With several processes the
    request is shared (summed over ranks) every log_every steps, so every rank stops at the same step."""

    def __init__(self, acc: Accelerator):
        import signal
        import threading

        self.acc, self.flag, self.previous = acc, False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def requested(self, step: int | None = None, every: int = 1) -> bool:
        if self.acc.num_processes == 1:
            return self.flag
        if step is not None and step % every:  # share the request only every `every` steps: no sync per step
            return False
        flag = torch.tensor([float(self.flag)], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    def restore(self) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows past ``step`` (written by a run that stopped before its next checkpoint)."""
    if not path.is_file():
        return
    rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))
