"""Layer 5: the one trainer (accelerate, output EMAs, a target network), its atomic checkpoints and clean stops."""

from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .ema import EMA, ema_update, frozen_copy
from .settings import TrainSettings
from .stop import StopRequest, TrainingInterrupted
from .trainer import Trainer, make_optimizer, step_seed, train

__all__ = ["EMA", "StopRequest", "TrainSettings", "Trainer", "TrainingInterrupted", "ema_update", "frozen_copy",
           "latest_checkpoint", "load_checkpoint", "make_optimizer", "save_checkpoint", "step_seed", "train"]
