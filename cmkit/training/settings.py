"""The ``[train]`` section: what every training run is told, whatever its objective."""

from __future__ import annotations

from dataclasses import dataclass, field

WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adam", "radam", "adamw", "adamw8bit")


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adam"          # adam | radam | adamw | adamw8bit (bitsandbytes: pip install 'cmkit[bnb]')
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup: int = 0                  # linear lr warm-up steps; the schedule never depends on `steps`, so runs extend
    grad_clip: float = 0.0           # 0 = off
    ema_rates: list[float] = field(default_factory=lambda: [0.999])
    ema_device: str = ""             # "": the training device; "cpu": output EMAs held (and updated) in host memory
    fsdp: bool = False               # shard the trained network, its EMAs and target over the processes (FSDP2)
    checkpoint_every: int = 500
    log_every: int = 50
    # which weights become out/model: auto | online | target | ema (the first of ema_rates) | ema-<rate>;
    # auto takes the slowest output EMA that has forgotten its start (rate**steps <= START_LEFT), else the online
    # weights: a 0.999 EMA after 600 steps still holds 55% of the weights the run started from
    export: str = "auto"
    # no | fp16 | bf16; unset (None): accelerate's own choice, so `accelerate launch --mixed_precision bf16` (or its
    # config file) decides, else no
    mixed_precision: str | None = None
    # per-process micro-batch (0: the whole per-process share in one pass); batch_size stays the global batch and
    # each step accumulates batch_size / (processes x micro_batch_size) micro-batches
    micro_batch_size: int = 0
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (diffusers networks)
    # the frozen text-to-image teacher's network and text encoders are held in this (float32 | bfloat16 | float16);
    # the VAE, the student, its EMAs and optimiser state stay float32
    weight_dtype: str = "float32"
    log_with: str = ""               # "" | tensorboard | wandb: accelerate's trackers, beside log.jsonl
    validate_every: int = 0          # 0: off; else a grid of validation_prompts every this many steps
    validation_prompts: list[str] = field(default_factory=list)
    cpu: bool = False                # force CPU even where a GPU is present

    def check(self) -> None:
        """One-line errors for values no run can use."""
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.lr == float("inf"):
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown train.optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.ema_device not in ("", "cpu"):
            raise ValueError(f"train.ema_device must be '' (the training device) or 'cpu', got {self.ema_device!r}")
        for name in ("warmup", "grad_clip", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        bad = [r for r in self.ema_rates if not 0 <= r < 1]
        if bad:
            raise ValueError(f"train.ema_rates must lie in [0, 1), got {bad[0]}")
        if not isinstance(self.export, str) or not (
                self.export in ("auto", "online", "target", "ema") or self.export.startswith("ema-")):
            raise ValueError(f"train.export must be auto, online, target, ema or ema-<rate>, got {self.export!r}")
        if self.micro_batch_size < 0:
            raise ValueError(f"train.micro_batch_size must be >= 0 (0: no accumulation), got {self.micro_batch_size}")
        if self.log_with not in ("", "tensorboard", "wandb"):
            raise ValueError(f"train.log_with must be tensorboard, wandb or empty, got {self.log_with!r}")
        if self.validate_every < 0 or (self.validate_every and not self.validation_prompts):
            raise ValueError("train.validate_every needs train.validation_prompts (a list of prompts) and must be "
                             f">= 0, got {self.validate_every} with {len(self.validation_prompts)} prompt(s)")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"train.weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.weight_dtype!r}")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"train.mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
