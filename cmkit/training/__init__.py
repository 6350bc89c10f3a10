"""Layer 5: the one trainer (accelerate, output EMAs, a target network), its atomic checkpoints and clean stops.

The names are loaded on first use (PEP 562), so ``cmkit.training.stop`` (the stop signals, which the command line's
torch-free streams share) imports without torch; ``from cmkit.training import train`` works as before."""

from __future__ import annotations

import importlib

_EXPORTS = {
    **dict.fromkeys(("latest_checkpoint", "load_checkpoint", "save_checkpoint"), "checkpoints"),
    **dict.fromkeys(("EMA", "ema_update", "frozen_copy"), "ema"),
    **dict.fromkeys(("TrainSettings",), "settings"),
    **dict.fromkeys(("StopRequest", "TrainingInterrupted"), "stop"),
    **dict.fromkeys(("Trainer", "make_optimizer", "step_seed", "train"), "trainer"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
