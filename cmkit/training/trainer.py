"""One trainer for every objective: accelerate, output EMAs, a target network, checkpoints, resume, Ctrl-C.

The trainer knows a model, an objective (``objective(model, x0, target, step, **cond)`` and ``objective.target_ema``),
a batch source and its settings; it never knows which objective it runs.

Determinism: before every step the global torch generator is seeded from ``(seed, step, rank)``, so a run that is
stopped and resumed draws the same data, noise and dropout as one that never stopped: the weights match exactly.

Non-finite steps: every step computes a flag on the device (loss and gradient norm finite) and an update whose flag
is false is not applied (fused Adam / AdamW take it as ``found_inf`` and skip on the device, with no host sync;
RAdam reads it, one host sync a step). Device-side counters are read at each log row and before each checkpoint:
skipped steps are reported, and MAX_NONFINITE_RUN of them in a row stop the run without saving, so the last
checkpoint stays the last good one. No checkpoint or model folder is written with a non-finite tensor in it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ..core.files import DiskFull, atomic_write, atomic_write_text, clean_partial_writes
from ..core.processes import setup_guard
from ..models.folder import annotate_meta
from .checkpoints import (
    CheckpointError,
    clean_checkpoints,
    last_intact,
    latest_checkpoint,
    load_checkpoint,
    resume_newest,
    save_checkpoint,
    shard_changes,
    warn,
)
from .ema import EMA, frozen_copy
from .settings import TrainSettings
from .sharding import (
    all_agree,
    full_state,
    gathered_optimizer_states,
    is_sharded,
    is_sharded_tensor,
    local,
    shard_network,
)
from .stop import CutShort, QuietStream, StopRequest, TrainingInterrupted, quietly

Batches = Callable[[int, torch.device], tuple[torch.Tensor, dict]]
START_LEFT = 0.05  # train.export=auto: an EMA still holding more of its starting weights than this is too young
MAX_NONFINITE_RUN = 10  # this many non-finite steps in a row stop a run: it diverged, skipping will not save it
OUT_NAMES = ("model", "checkpoints", "log.jsonl", "recipe.json", "schedule_search.json")  # what cmkit writes in out


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def _adamw8bit():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("train.optimizer = 'adamw8bit' needs bitsandbytes: pip install 'cmkit[bnb]'") from None
    return bnb.optim.AdamW8bit


def make_optimizer(params, s: TrainSettings):
    kinds = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam, "adamw": torch.optim.AdamW}
    if s.optimizer == "adamw8bit":  # AdamW with 8-bit block-quantised moments: a quarter of AdamW's state memory
        return _adamw8bit()(params, lr=s.lr, betas=tuple(s.betas), weight_decay=s.weight_decay)
    if s.optimizer not in kinds:
        raise ValueError(f"unknown train.optimizer {s.optimizer!r}; choose one of {', '.join(kinds)}, adamw8bit")
    # Adam and AdamW run fused (one kernel for the whole update, CPU and GPU alike: 3x faster than the per-tensor
    # loop torch picks on a CPU by default, the same maths rounded differently); RAdam has no fused kernel and runs
    # foreach (one kernel per operation over all tensors), which is bit-identical to the loop
    impl = {"fused": True} if s.optimizer in ("adam", "adamw") else {"foreach": True}
    return kinds[s.optimizer](params, lr=s.lr, betas=tuple(s.betas), weight_decay=s.weight_decay, **impl)


def make_accelerator(settings: TrainSettings, out) -> Accelerator:
    """accelerate's Accelerator for a run: the device, the precision (the recipe's, else the launcher's) and the
    trackers ``train.log_with`` names, writing under ``out``."""
    need = {"tensorboard": "'cmkit[track]' (or tensorboard)", "wandb": "wandb"}.get(settings.log_with)
    if need and importlib.util.find_spec(settings.log_with) is None:  # accelerate would skip the tracker silently
        raise ValueError(f"train.log_with = {settings.log_with} needs the {settings.log_with} package: pip install "
                         f"{need}")
    check_launcher_options()
    with setup_guard():  # a stale WORLD_SIZE refused; the processes meet within a minute or the run says why
        return Accelerator(cpu=settings.cpu, mixed_precision=settings.mixed_precision,
                           log_with=settings.log_with or None, project_dir=str(out))


def check_launcher_options() -> None:
    """accelerate launch options cmkit does not take, refused in one line before the Accelerator reads them."""
    # accelerate launch --gradient_accumulation_steps is not how cmkit accumulates: it would be ignored silently
    steps = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    if steps.strip() not in ("", "1"):
        raise ValueError(f"accelerate launch --gradient_accumulation_steps {steps} is not used by cmkit; set "
                         "train.micro_batch_size instead (micro-batches accumulate to train.batch_size)")
    # --use_fsdp: accelerate's FSDP plugin would wrap the model behind the trainer's EMAs and checkpoints (and on the
    # CPU fails outright); cmkit shards with torch's FSDP2 itself (training.sharding)
    if os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes"):
        raise ValueError("accelerate launch --use_fsdp is not how cmkit shards: launch without --use_fsdp (and its "
                         "--fsdp_* options) and set train.fsdp = true, which shards the student, its EMAs and target "
                         "with torch's FSDP2 over the launched processes")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on diffusers' activation checkpointing in every network of ``model`` that trains; a one-line error
    where none can (cmkit's MLPs keep every activation: they are small)."""
    nets = [m for m in model.modules() if getattr(m, "_supports_gradient_checkpointing", False)
            and any(p.requires_grad for p in m.parameters())]
    if not nets:
        raise ValueError("train.gradient_checkpointing: no network of this model supports it (diffusers UNets and "
                         "transformers do); set it to false")
    for net in nets:
        net.enable_gradient_checkpointing()


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
                 accelerator: Accelerator | None = None, validate: Callable | None = None):
        settings.check()
        self.s, self.objective, self.batches, self.seed = settings, objective, batches, seed
        self.out, self.run_info, self.progress = Path(out), run_info or {}, progress
        self.acc = accelerator or make_accelerator(settings, out)
        # validate(model, prompts) -> images in [-1, 1]: the job layer knows how its kind samples
        self.validate, self._stop = validate, None  # the stop request, while the loop runs
        world = self.acc.num_processes
        if settings.batch_size % world:
            raise ValueError(f"train.batch_size {settings.batch_size} is not divisible by the {world} processes")
        self.local_bs = settings.batch_size // world
        self.micro = settings.micro_batch_size or self.local_bs
        if self.local_bs % self.micro:
            raise ValueError(f"train.batch_size {settings.batch_size} over {world} process(es) is {self.local_bs} "
                             f"each, which train.micro_batch_size {self.micro} does not divide; pick a divisor of it")
        self.accumulate = self.local_bs // self.micro
        model.train()
        if settings.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.rates = {f"ema-{r!r}": float(r) for r in settings.ema_rates}  # repr keeps every digit: 0.9999999 != 1
        self.emas = {key: frozen_copy(model) for key in self.rates}
        self.target = frozen_copy(model) if objective.target_ema(0) > 0 else None
        self.sharded = settings.fsdp
        self._plain = self._shard(model) if self.sharded else None
        # an objective may own trainable parameters (sCM's learnt loss weighting): optimised and checkpointed with
        # the model, not exported with it
        # (a fake-score network, rCM's) at its own learning-rate scale (``objective.lr_groups()``)
        self.extra = [p for p in objective.parameters() if p.requires_grad] if isinstance(objective, nn.Module) else []
        groups = objective.lr_groups() if hasattr(objective, "lr_groups") else [(self.extra, 1.0)]
        # parameters an objective claims may sit inside the model (DMD2-LoRA's fake-score adapter on the network
        # its student shares): they train in the objective's group only
        claimed = {id(p) for ps, _ in groups for p in ps}
        self.optimizer = make_optimizer(
            [{"params": [p for p in model.parameters() if id(p) not in claimed], "lr_scale": 1.0}]
            + [{"params": ps, "lr": settings.lr * scale, "lr_scale": scale} for ps, scale in groups if ps], settings)
        self.nets = {"model": model, **self.emas, **({"target": self.target} if self.target is not None else {}),
                     **({"objective": objective} if self.extra else {})}
        self.ckpt_root = self.out / "checkpoints"
        self.step_no = self.resume()
        self.export_choice()  # a train.export that names weights this run does not keep fails now, not at the end
        self._place(model)
        self.online = self.acc.unwrap_model(self.wrapped)
        self.online_device = next(self.online.parameters()).device
        # without a loss scaler, accelerate's optimizer wrapper adds only per-step checks (package look-ups) to the
        # plain step and zero_grad; gradients are already all-reduced by the wrapped model's backward
        plain = self.acc.scaler is None
        self._raw_opt = self.optimizer.optimizer
        self._device_skip = plain and bool(self._raw_opt.defaults.get("fused"))
        self._params = [*self.wrapped.parameters(), *self.extra]
        self._counters()
        self._optimizer_step = self.optimizer.optimizer.step if plain else self.optimizer.step
        self._zero_grad = self.optimizer.optimizer.zero_grad if plain else self.optimizer.zero_grad
        if self._scaler_state and self.acc.scaler is not None:  # fp16 loss scale, as an unbroken run has it
            self.acc.scaler.load_state_dict(self._scaler_state)
        # bound after prepare(), which may move the online weights to another device
        self._ema_updates = [(EMA(e, self.online), self.rates[k]) for k, e in self.emas.items()]
        self._target_update = EMA(self.target, self.online) if self.target is not None else None

    def _place(self, model: nn.Module) -> None:
        """Networks to their devices and the model and optimiser through accelerate (``self.wrapped``)."""
        # output EMAs may live in host memory (train.ema_device = "cpu"); the target network is used every step
        ema_device = self.s.ema_device or self.acc.device
        for m in self.emas.values():
            m.to(ema_device)
        if self.target is not None:
            self.target.to(self.acc.device)
        if isinstance(self.objective, nn.Module):
            self.objective.to(self.acc.device)
        if self.sharded:  # FSDP2 reduces the gradients itself: no DDP wrapper around it
            self.wrapped, self.optimizer = model, self.acc.prepare(self.optimizer)
        else:
            self.wrapped, self.optimizer = self.acc.prepare(model, self.optimizer)

    def _shard(self, model: nn.Module) -> nn.Module | None:
        """Shard the online network, its EMAs and the target over the processes (``train.fsdp``); returns the main
        process's unsharded host copy, which exports and validation load the gathered weights into."""
        if self.acc.num_processes < 2:
            raise ValueError("train.fsdp shards over processes: launch 2 or more (accelerate launch "
                             "--num_processes N -m cmkit ...), or set it to false")
        if self.s.ema_device:
            raise ValueError("train.fsdp shards the EMAs beside the model; remove train.ema_device")
        if getattr(model, "lora", False):  # the adapter lives in the teacher's own network, which the student shares
            raise ValueError("train.fsdp shards full students; a LoRA student trains only its adapter: run it without "
                             "train.fsdp (train.weight_dtype = 'bfloat16' holds the frozen base in half the memory)")
        plain = copy.deepcopy(model).cpu() if self.acc.is_main_process else None
        own = self.objective.trained_networks() if hasattr(self.objective, "trained_networks") else []
        for net in [model, *self.emas.values(), *([self.target] if self.target is not None else []), *own]:
            shard_network(net.to(self.acc.device), self.acc.device)
        return plain

    def resume(self) -> int:
        """Load the newest intact checkpoint into the networks and optimiser (newer broken ones are reported and
        skipped; what a killed write left is removed first); the step to go on from (0: a new run). Refuses to start
        from step 0 where a run's checkpoints or model are but no checkpoint can be used."""
        self._scaler_state = None
        main = self.acc.is_main_process
        if main:
            clean_checkpoints(self.ckpt_root)
            clean_partial_writes(self.out, OUT_NAMES.__contains__)
        self.acc.wait_for_everyone()
        state = resume_newest(self.ckpt_root, lambda f: load_checkpoint(f, self.nets, self.optimizer),
                              (lambda message: quietly(warn, message)) if main else lambda message: None)
        if state is None:
            if (self.out / "model").exists():
                raise CheckpointError(f"{self.out} holds a trained model/ but no checkpoint to go on from; rather "
                                      "than train it again from step 0 unasked, the run stops: pass --restart")
            return 0
        changed = shard_changes(state.get("data_shards"), self._data_shards())
        if changed is not None and main:
            quietly(warn, changed)
        self._scaler_state = state.get("scaler")
        for g in self.optimizer.param_groups:  # the recipe's learning rate, which may differ from the saved one's
            g["lr"] = self.lr_at(state["step"]) * g.get("lr_scale", 1.0)
        return state["step"]

    def _data_shards(self) -> dict | None:
        """The shard set of the cached data the objective reads (its ``encoded`` latent cache: ``data_shards``), which
        each checkpoint records so that a resume over other shards says so; None for other data."""
        return getattr(getattr(self.objective, "encoded", None), "data_shards", None)

    def _counters(self) -> None:
        """Device-side tallies, read only at log rows and checkpoints: the loss summed over finite steps and their
        number since the last row, the non-finite steps since the last read, the current and longest run of them."""
        dev = self.acc.device
        self._loss_sum = torch.zeros((), device=dev)
        self._good, self._bad, self._run, self._longest = (torch.zeros((), dtype=torch.long, device=dev)
                                                            for _ in range(4))

    def lr_at(self, step: int) -> float:
        return self.s.lr * min(1.0, (step + 1) / self.s.warmup) if self.s.warmup else self.s.lr

    def step(self) -> torch.Tensor:
        """One optimiser step (with its target and EMA updates); returns the detached loss."""
        step = self.step_no
        seed_step(step_seed(self.seed, step, self.acc.process_index), self.acc.device)
        x0, cond = self.batches(self.local_bs, self.acc.device)
        if self.s.warmup and step <= self.s.warmup:
            for g in self.optimizer.param_groups:
                g["lr"] = self.lr_at(step) * g.get("lr_scale", 1.0)
        target = self.target if self.target is not None else self.online
        if self.accumulate == 1:
            with self.acc.autocast():
                loss = self.objective(self.wrapped, x0, target=target, step=step, **cond)
            self.acc.backward(loss)
        else:
            loss = self._accumulated(x0, cond, target, step)
        if self.extra and self.acc.num_processes > 1:
            self._sync_extra_grads()
        loss = loss.detach()
        ok = self._finite(loss)
        if self._device_skip:  # fused Adam / AdamW: the whole update is skipped on the device when found_inf is 1
            self._raw_opt.found_inf = (~ok).float()
            self._optimizer_step()
        elif self.acc.scaler is not None or ok.item():  # a loss scaler skips non-finite gradients itself
            self._optimizer_step()
        self._zero_grad(set_to_none=True)
        self._tally(loss, ok)
        self.step_no = step = step + 1
        if self._target_update is not None:
            self._target_update.update(self.objective.target_ema(step))
        for ema, rate in self._ema_updates:
            ema.update(rate)
        return loss

    def _accumulated(self, x0: torch.Tensor, cond: dict, target, step: int) -> torch.Tensor:
        """The step's batch as ``accumulate`` micro-batches: each loss over ``accumulate`` backpropagated, gradients
        all-reduced once, on the last (the mean of equal parts' means is the whole batch's mean)."""
        k, n = self.accumulate, x0.shape[0]
        parts = [x0.chunk(k), *[v.chunk(k) if torch.is_tensor(v) and v.ndim and v.shape[0] == n else [v] * k
                                for v in cond.values()]]
        total = torch.zeros((), device=x0.device)
        for i, (x, *values) in enumerate(zip(*parts, strict=True)):
            sync = contextlib.nullcontext() if i == k - 1 else self.acc.no_sync(self.wrapped)
            with sync, self.acc.autocast():
                loss = self.objective(self.wrapped, x, target=target, step=step, **dict(zip(cond, values, strict=True)))
                self.acc.backward(loss / k)
            total = total + loss.detach() / k
        return total

    def _finite(self, loss: torch.Tensor) -> torch.Tensor:
        """A device flag: the loss and the gradients' norm are finite (clipping, when on, happens here)."""
        ok = torch.isfinite(loss)
        if self.s.grad_clip > 0:
            norm = self.acc.clip_grad_norm_(self._params, self.s.grad_clip)
        elif self.acc.scaler is None:
            grads = [local(p.grad) for p in self._params if p.grad is not None]
            norm = torch.stack(torch._foreach_norm(grads)).sum() if grads else None
        else:
            norm = None  # scaled gradients: the loss scaler checks them
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # clipping a sharded network's
        ok = ok & torch.isfinite(norm) if norm is not None and self.acc.scaler is None else ok
        return all_agree(ok) if self.sharded else ok  # shards differ: one bad shard skips the step everywhere

    def _tally(self, loss: torch.Tensor, ok: torch.Tensor) -> None:
        bad = ~ok
        self._loss_sum += torch.where(ok, loss.float(), 0.0)
        self._good += ok
        self._bad += bad
        self._run.add_(1).mul_(bad)
        torch.maximum(self._longest, self._run, out=self._longest)

    def _health(self) -> None:
        """Read the non-finite tallies (one host sync): report skipped steps; stop a run that keeps diverging."""
        bad, longest = torch.stack([self._bad, self._longest]).tolist()
        self._bad.zero_()
        self._longest.copy_(self._run)
        if bad and self.acc.is_main_process:
            quietly(warn, f"{bad} step(s) up to step {self.step_no} had a non-finite loss or gradients and were not "
                    "applied")
        if longest >= MAX_NONFINITE_RUN:
            last = latest_checkpoint(self.ckpt_root)
            raise FloatingPointError(
                f"loss or gradients non-finite on {longest} steps in a row (by step {self.step_no}): the run "
                f"diverged and stops unsaved; {last or 'no checkpoint'} is the last good state: rerun with a lower "
                "--set train.lr=... (train.lr, train.warmup and train.grad_clip may change on resume)")

    def _check_finite_state(self, what: str) -> None:
        """Refuse to write ``what`` when a network or the optimiser holds a non-finite value."""
        named = [(f"{k}.safetensors", t) for k, net in self.nets.items() for t in net.state_dict().values()]
        named += [("optimizer.safetensors", v) for st in self._raw_opt.state.values() for v in st.values()
                  if torch.is_tensor(v)]
        named = [(n, local(t)) for n, t in named if t.is_floating_point()]
        flags = torch.stack([torch.isfinite(t).all().to(self.acc.device) for _, t in named])
        flags = (torch.stack([all_agree(f) for f in flags]) if self.sharded else flags).tolist()
        bad = sorted({n for (n, _), f in zip(named, flags, strict=True) if not f})
        if bad:
            raise FloatingPointError(f"{', '.join(bad)} would hold non-finite values at step {self.step_no}; "
                                     f"{what} is not written and {latest_checkpoint(self.ckpt_root) or 'nothing'} "
                                     "stays the last good state: rerun with a lower --set train.lr=...")

    def _sync_extra_grads(self) -> None:
        """The objective's own parameters sit outside the DDP wrapper: average their gradients over processes here,
        as DDP does for the model's. A parameter with no gradient took no part in this step on any process (rCM's
        fake score on a student step: each process runs the same schedule) and is left to the optimiser to skip, as
        one process skips it; a sharded one (an objective network under ``train.fsdp``) FSDP has reduced already."""
        for p in self.extra:
            if p.grad is None or is_sharded_tensor(p):
                continue
            torch.distributed.all_reduce(p.grad)
            p.grad /= self.acc.num_processes

    def log(self, since_step: int, since_time: float, started: float) -> float | None:
        """Append one row to ``log.jsonl``: the mean loss of the finite steps since the last row (None: none was)."""
        self._health()
        step = self.step_no
        total, good = self.acc.reduce(torch.stack([self._loss_sum, self._good.float()]), reduction="sum").tolist()
        self._loss_sum.zero_()
        self._good.zero_()
        mean_loss = total / good if good and math.isfinite(total) else None
        now = time.perf_counter()
        row = {"step": step, "loss": mean_loss, "lr": self.lr_at(step - 1),
               "target_mu": self.objective.target_ema(step), "sec_per_step": (now - since_time) / (step - since_step),
               "elapsed": now - started}
        if hasattr(self.objective, "log_metrics"):  # an objective's own signals (DMD2's collapse watch)
            row.update(self.objective.log_metrics())
        if self.acc.is_main_process:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.s.log_with:
                self.acc.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)
        return mean_loss

    def validation_grid(self) -> Path | None:
        """A grid of ``train.validation_prompts`` from the weights the run would export now, written as
        ``out/validation/step-N.png`` and sent to the trackers (main process only)."""
        if self.validate is None:
            return None
        name, _ = self.export_choice()
        net = {"online": self.online, "target": self.target}.get(name) or self.emas[name]
        if self.sharded:  # every process gathers; the main one samples from an unsharded copy
            state = full_state(net)
            if not self.acc.is_main_process:
                return None
            net = copy.deepcopy(self._plain)
            net.load_state_dict(state)
            net.to(self.online_device)
        elif not self.acc.is_main_process:
            return None
        if next(net.parameters()).device != self.online_device:  # an EMA held on the CPU samples on the device
            net = copy.deepcopy(net).to(self.online_device)
        try:  # a stop signal cuts the images short (at the next network call): the run checkpoints and ends
            with self._stop.cuts_short(net) if self._stop is not None else contextlib.nullcontext():
                images = self.validate(net, list(self.s.validation_prompts)).float().cpu().clamp(-1, 1)
        except CutShort:
            quietly(self.acc.print, f"validation images at step {self.step_no} cut short by the stop: none written")
            return None
        path = self.out / "validation" / f"step-{self.step_no:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        from torchvision.utils import save_image

        atomic_write(path, lambda tmp: save_image((images + 1) / 2, tmp, nrow=max(1, int(len(images) ** 0.5)),
                                                  padding=1, pad_value=1, format="png"))
        if self.s.log_with:
            grid = ((images + 1) / 2).permute(0, 2, 3, 1).numpy()  # NHWC, as the trackers take images
            for tracker in self.acc.trackers:  # tensorboard takes the batch, wandb a list of images
                if tracker.name == "tensorboard":
                    tracker.log_images({"validation": grid}, step=self.step_no, dataformats="NHWC")
                else:
                    tracker.log_images({"validation": list(grid)}, step=self.step_no)
        return path

    def checkpoint(self) -> None:
        acc = self.acc
        acc.wait_for_everyone()
        self._health()
        self._check_finite_state(f"checkpoint step-{self.step_no:08d}")
        nets, optimizer = self.nets, self.optimizer
        if self.sharded:  # gathered by every process: the full weights and each process's optimiser shard
            nets = {k: full_state(net) if is_sharded(net) else net for k, net in nets.items()}
            optimizer = gathered_optimizer_states(self._raw_opt)
        if acc.is_main_process:
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            save_checkpoint(self.ckpt_root, self.step_no, nets, optimizer,
                            {"seed": self.seed, "scaler": scaler, "data_shards": self._data_shards(), **self.run_info})
        acc.wait_for_everyone()

    def export_choice(self) -> tuple[str, str]:
        """``(name, why)`` of the weights ``train.export`` names for a run that has reached ``self.step_no``."""
        choice, steps = self.s.export, self.step_no
        if choice == "online":
            return "online", "train.export = online"
        if choice == "target":
            if self.target is None:
                raise ValueError("train.export = target, but this objective keeps no target network "
                                 "(objective.target_ema is 0); export online or an output EMA")
            return "target", "train.export = target"
        if choice.startswith("ema"):
            if not self.emas:
                raise ValueError(f"train.export = {choice}, but train.ema_rates is empty; add a rate or export online")
            if choice == "ema":
                return next(iter(self.emas)), "train.export = ema (the first of train.ema_rates)"
            if choice not in self.emas:
                raise ValueError(f"train.export = {choice} is not one of the kept EMAs ({', '.join(self.emas)}); "
                                 f"name one of them, or add its rate to train.ema_rates")
            return choice, f"train.export = {choice}"
        # auto: an EMA started from the initial weights and after n steps still gives them weight rate**n
        grown = {k: r for k, r in self.rates.items() if r**steps <= START_LEFT}
        if grown:
            key = max(grown, key=grown.get)
            return key, (f"train.export = auto: the slowest output EMA whose starting weights have decayed below "
                         f"{START_LEFT:g} after {steps} steps ({self.rates[key]}**{steps} = "
                         f"{self.rates[key] ** steps:.2g})")
        if not self.rates:
            return "online", "train.export = auto: no output EMA is kept"
        young = ", ".join(f"{r}**{steps} = {r**steps:.2g}" for r in self.rates.values())
        return "online", (f"train.export = auto: every output EMA still holds its starting weights after {steps} "
                          f"steps ({young} > {START_LEFT:g})")

    def export(self) -> Path:
        """Write the weights ``train.export`` names as ``out/model``, and which they were in its ``cmkit.json``."""
        name, why = self.export_choice()
        final = {"online": self.online, "target": self.target}.get(name) or self.emas[name]
        self._check_finite_state(str(self.out / "model"))
        state = full_state(final) if self.sharded else None
        if self.acc.is_main_process:
            export = self._plain if self.sharded else copy.deepcopy(self.online).cpu()
            export.load_state_dict(state if self.sharded else {k: v.cpu() for k, v in final.state_dict().items()})
            try:
                export.save_pretrained(self.out / "model")
            except DiskFull as e:  # the run is done and checkpointed: a rerun only exports
                last = last_intact(self.ckpt_root, "exports it without training again")
                raise DiskFull(e.path, f"{e.intact}; {last}") from e
            # a teacher family's pipeline folder has no cmkit.json: the line below says it there
            annotate_meta(self.out / "model", exported_weights={"weights": name, "step": self.step_no, "why": why})
            quietly(self.acc.print, f"exported the {name} weights at step {self.step_no} ({why})")
        self.acc.wait_for_everyone()
        return self.out / "model"

    def run(self) -> dict:
        start, s = self.step_no, self.s
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_log(self.out / "log.jsonl", start)
        if start >= s.steps:
            quietly(self.acc.print, f"{self.out}: already at step {start} of {s.steps}; nothing to train")
        else:
            quietly(self.acc.print, f"batch {s.batch_size} = {self.acc.num_processes} process(es) x micro-batch "
                    f"{self.micro} x {self.accumulate} accumulation step(s); mixed precision "
                    f"{self.acc.mixed_precision}" + ("; gradient checkpointing" if s.gradient_checkpointing else ""))
        if s.log_with and self.acc.is_main_process:
            self.acc.init_trackers("cmkit", config={k: v for k, v in vars(s).items()
                                                    if isinstance(v, int | float | str | bool)})
        t0 = time.perf_counter()
        try:
            self._loop(start, t0)
        finally:
            if s.log_with:
                self.acc.end_training()
        if self.step_no > start or latest_checkpoint(self.ckpt_root) is None:
            self.checkpoint()
        model_dir = self.export()
        return {"start_step": start, "steps": s.steps, "end_step": self.step_no, "seconds": time.perf_counter() - t0,
                "model_dir": str(model_dir), "world_size": self.acc.num_processes}

    def _loop(self, start: int, t0: float) -> None:
        s = self.s
        log_t0, log_step0 = t0, start
        # the bar writes through QuietStream: a closed pipe or a hung-up terminal never stops the run
        bar = tqdm(total=s.steps, initial=start, disable=not (self.progress and self.acc.is_main_process),
                   desc="train", dynamic_ncols=True, file=QuietStream())
        stop = self._stop = StopRequest(self.acc, s.log_every)
        try:
            while self.step_no < s.steps and not stop.requested(self.step_no):
                self.step()
                bar.update(1)
                if self.step_no % s.log_every == 0 or self.step_no == s.steps:
                    loss = self.log(log_step0, log_t0, t0)
                    bar.set_postfix(loss="non-finite" if loss is None else f"{loss:.4g}")
                    log_t0, log_step0 = time.perf_counter(), self.step_no
                if self.step_no % s.checkpoint_every == 0 and self.step_no < s.steps:
                    self.checkpoint()
                if s.validate_every and (self.step_no % s.validate_every == 0 or self.step_no == s.steps):
                    self.validation_grid()
            if stop.stopped and start < self.step_no < s.steps:
                self.checkpoint()  # first, with the stop handlers still on (a repeated SIGTERM / SIGHUP waits)
        except KeyboardInterrupt:  # a second Ctrl-C, or one raised by code: no checkpoint mid-step
            raise TrainingInterrupted(f"stopped at once at step {self.step_no}; the run resumes from the last "
                                      f"checkpoint in {self.ckpt_root}") from None
        finally:
            stop.restore()
            self._stop = None
            bar.close()
        if stop.stopped and self.step_no < s.steps:
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
    """Drop log rows past ``step`` (written by a run that stopped before its next checkpoint) and a row a kill tore
    in half."""
    if not path.is_file():
        return
    rows = []
    for r in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(r)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            rows.append(r)
    atomic_write_text(path, "".join(r + "\n" for r in rows))
