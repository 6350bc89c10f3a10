"""One trainer for every objective: accelerate, output EMAs, a target network, checkpoints, resume, Ctrl-C.

The trainer knows a model, an objective (``objective(model, x0, target, step, **cond)`` and ``objective.target_ema``),
a batch source and its settings; it never knows which objective it runs.

Determinism: before every step the global torch generator is seeded from ``(seed, step, rank)``, so a run that is
stopped and resumed draws the same data, noise and dropout as one that never stopped: the weights match exactly.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ..core.files import atomic_write_text
from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .ema import EMA, frozen_copy
from .settings import TrainSettings
from .stop import StopRequest, TrainingInterrupted

Batches = Callable[[int, torch.device], tuple[torch.Tensor, dict]]


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def make_optimizer(params, s: TrainSettings):
    kinds = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam, "adamw": torch.optim.AdamW}
    if s.optimizer not in kinds:
        raise ValueError(f"unknown train.optimizer {s.optimizer!r}; choose one of {', '.join(kinds)}")
    # Adam and AdamW run fused (one kernel for the whole update, CPU and GPU alike: 3x faster than the per-tensor
    # loop torch picks on a CPU by default, the same maths rounded differently); RAdam has no fused kernel and runs
    # foreach (one kernel per operation over all tensors), which is bit-identical to the loop
    impl = {"fused": True} if s.optimizer in ("adam", "adamw") else {"foreach": True}
    return kinds[s.optimizer](params, lr=s.lr, betas=tuple(s.betas), weight_decay=s.weight_decay, **impl)


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators a step draws from. ``torch.manual_seed`` would also queue lazy seeds for every
    accelerator backend torch knows (formatting a stack trace for each, about 0.5 ms a step); only the CPU generator
    and, on a GPU, the current device's are used."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


class Trainer:
    """The pieces of a run, each on one screen: ``resume``, ``step``, ``log``, ``checkpoint``, ``export``; ``run``
    strings them together."""

    def __init__(self, model: torch.nn.Module, objective, batches: Batches, settings: TrainSettings, out,
                 seed: int = 0, run_info: dict | None = None, progress: bool = True,
                 accelerator: Accelerator | None = None):
        settings.check()
        self.s, self.objective, self.batches, self.seed = settings, objective, batches, seed
        self.out, self.run_info, self.progress = Path(out), run_info or {}, progress
        self.acc = accelerator or Accelerator(cpu=settings.cpu, mixed_precision=settings.mixed_precision)
        world = self.acc.num_processes
        if settings.batch_size % world:
            raise ValueError(f"train.batch_size {settings.batch_size} is not divisible by the {world} processes")
        self.local_bs = settings.batch_size // world
        model.train()
        self.rates = {f"ema-{r!r}": float(r) for r in settings.ema_rates}  # repr keeps every digit: 0.9999999 != 1
        self.emas = {key: frozen_copy(model) for key in self.rates}
        self.target = frozen_copy(model) if objective.target_ema(0) > 0 else None
        # an objective may own trainable parameters (sCM's learnt loss weighting): optimised and checkpointed with
        # the model, not exported with it
        self.extra = [p for p in objective.parameters() if p.requires_grad] if isinstance(objective, nn.Module) else []
        self.optimizer = make_optimizer([*model.parameters(), *self.extra], settings)
        self.nets = {"model": model, **self.emas, **({"target": self.target} if self.target is not None else {}),
                     **({"objective": objective} if self.extra else {})}
        self.ckpt_root = self.out / "checkpoints"
        self.step_no = self.resume()
        for m in list(self.emas.values()) + ([self.target] if self.target is not None else []):
            m.to(self.acc.device)
        if isinstance(objective, nn.Module):
            objective.to(self.acc.device)
        self.wrapped, self.optimizer = self.acc.prepare(model, self.optimizer)
        self.online = self.acc.unwrap_model(self.wrapped)
        # without a loss scaler, accelerate's optimizer wrapper adds only per-step checks (package look-ups) to the
        # plain step and zero_grad; gradients are already all-reduced by the wrapped model's backward
        plain = self.acc.scaler is None
        self._optimizer_step = self.optimizer.optimizer.step if plain else self.optimizer.step
        self._zero_grad = self.optimizer.optimizer.zero_grad if plain else self.optimizer.zero_grad
        if self._scaler_state and self.acc.scaler is not None:  # fp16 loss scale, as an unbroken run has it
            self.acc.scaler.load_state_dict(self._scaler_state)
        # bound after prepare(), which may move the online weights to another device
        self._ema_updates = [(EMA(e, self.online), self.rates[k]) for k, e in self.emas.items()]
        self._target_update = EMA(self.target, self.online) if self.target is not None else None

    def resume(self) -> int:
        """Load the newest checkpoint into the networks and optimiser; the step to go on from (0: a new run)."""
        self._scaler_state = None
        last = latest_checkpoint(self.ckpt_root)
        if last is None:
            return 0
        state = load_checkpoint(last, self.nets, self.optimizer)
        self._scaler_state = state.get("scaler")
        return state["step"]

    def lr_at(self, step: int) -> float:
        return self.s.lr * min(1.0, (step + 1) / self.s.warmup) if self.s.warmup else self.s.lr

    def step(self) -> torch.Tensor:
        """One optimiser step (with its target and EMA updates); returns the detached loss."""
        step = self.step_no
        seed_step(step_seed(self.seed, step, self.acc.process_index), self.acc.device)
        x0, cond = self.batches(self.local_bs, self.acc.device)
        if self.s.warmup and step <= self.s.warmup:
            for g in self.optimizer.param_groups:
                g["lr"] = self.lr_at(step)
        with self.acc.autocast():
            target = self.target if self.target is not None else self.online
            loss = self.objective(self.wrapped, x0, target=target, step=step, **cond)
        self.acc.backward(loss)
        if self.extra and self.acc.num_processes > 1:
            self._sync_extra_grads()
        if self.s.grad_clip > 0:
            self.acc.clip_grad_norm_([*self.wrapped.parameters(), *self.extra], self.s.grad_clip)
        self._optimizer_step()
        self._zero_grad(set_to_none=True)
        self.step_no = step = step + 1
        if self._target_update is not None:
            self._target_update.update(self.objective.target_ema(step))
        for ema, rate in self._ema_updates:
            ema.update(rate)
        return loss.detach()

    def _sync_extra_grads(self) -> None:
        """The objective's own parameters sit outside the DDP wrapper: average their gradients over processes here,
        as DDP does for the model's."""
        for p in self.extra:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= self.acc.num_processes

    def log(self, loss_sum: torch.Tensor, since_step: int, since_time: float, started: float) -> float:
        """Append one row to ``log.jsonl`` (mean loss since the last row); refuse to go on from a non-finite loss."""
        step = self.step_no
        mean_loss = (self.acc.reduce(loss_sum, reduction="mean") / (step - since_step)).item()
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"loss became {mean_loss} at step {step}; lower train.lr or check data")
        now = time.perf_counter()
        row = {"step": step, "loss": mean_loss, "lr": self.lr_at(step - 1),
               "target_mu": self.objective.target_ema(step), "sec_per_step": (now - since_time) / (step - since_step),
               "elapsed": now - started}
        if self.acc.is_main_process:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return mean_loss

    def checkpoint(self) -> None:
        acc = self.acc
        acc.wait_for_everyone()
        if acc.is_main_process:
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            save_checkpoint(self.ckpt_root, self.step_no, self.nets, self.optimizer,
                            {"seed": self.seed, "scaler": scaler, **self.run_info})
        acc.wait_for_everyone()

    def export(self) -> Path:
        """Write the first output EMA (the online weights when no EMA is kept) as ``out/model``."""
        final = next(iter(self.emas.values()), self.online)
        if self.acc.is_main_process:
            export = copy.deepcopy(self.online).cpu()
            export.load_state_dict({k: v.cpu() for k, v in final.state_dict().items()})
            export.save_pretrained(self.out / "model")
        self.acc.wait_for_everyone()
        return self.out / "model"

    def run(self) -> dict:
        start, s = self.step_no, self.s
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_log(self.out / "log.jsonl", start)
        if start >= s.steps:
            self.acc.print(f"{self.out}: already at step {start} of {s.steps}; nothing to train")
        t0 = time.perf_counter()
        self._loop(start, t0)
        if self.step_no > start or latest_checkpoint(self.ckpt_root) is None:
            self.checkpoint()
        model_dir = self.export()
        return {"start_step": start, "steps": s.steps, "end_step": self.step_no, "seconds": time.perf_counter() - t0,
                "model_dir": str(model_dir), "world_size": self.acc.num_processes}

    def _loop(self, start: int, t0: float) -> None:
        s = self.s
        loss_sum = torch.zeros((), device=self.acc.device)
        log_t0, log_step0 = t0, start
        bar = tqdm(total=s.steps, initial=start, disable=not (self.progress and self.acc.is_main_process),
                   desc="train", dynamic_ncols=True)
        stop = StopRequest(self.acc, s.log_every)
        try:
            while self.step_no < s.steps and not stop.requested(self.step_no):
                loss_sum += self.step()
                bar.update(1)
                if self.step_no % s.log_every == 0 or self.step_no == s.steps:
                    bar.set_postfix(loss=f"{self.log(loss_sum, log_step0, log_t0, t0):.4g}")
                    loss_sum.zero_()
                    log_t0, log_step0 = time.perf_counter(), self.step_no
                if self.step_no % s.checkpoint_every == 0 and self.step_no < s.steps:
                    self.checkpoint()
        except KeyboardInterrupt:  # a second Ctrl-C, or one raised by code: no checkpoint mid-step
            raise TrainingInterrupted(f"stopped at once during step {self.step_no + 1}; the run resumes from the "
                                      f"last checkpoint in {self.ckpt_root}") from None
        finally:
            stop.restore()
            bar.close()
        if stop.stopped and self.step_no < s.steps:
            if self.step_no > start:
                self.checkpoint()
            raise TrainingInterrupted(f"interrupted at step {self.step_no}; checkpoint saved in {self.ckpt_root}, "
                                      "run the same command again to resume")


def train(model: torch.nn.Module, objective, batches: Batches, settings: TrainSettings, out, seed: int = 0,
          run_info: dict | None = None, progress: bool = True, accelerator: Accelerator | None = None) -> dict:
    """Train ``model`` with ``objective`` for ``settings.steps`` optimiser steps, resuming from ``out`` if it holds
    a checkpoint. ``batches(n, device)`` returns ``n`` training examples and their conditioning (drawn with torch's
    global generator). Writes ``out/log.jsonl``, ``out/checkpoints/`` and, at the end, ``out/model/`` (the first
    output EMA, or the online weights when no EMA is kept). Returns a summary dict.
    """
    return Trainer(model, objective, batches, settings, out, seed, run_info, progress, accelerator).run()


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows past ``step`` (written by a run that stopped before its next checkpoint)."""
    if not path.is_file():
        return
    rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
    atomic_write_text(path, "".join(r + "\n" for r in rows))
