"""Layer 5: the one trainer (accelerate, output EMAs, a target network), its atomic checkpoints and clean stops.

The names are loaded on first use (PEP 562), so ``cmkit.training.stop`` (the stop signals, which the command line's
torch-free streams share) imports without torch; ``from cmkit.training import train`` works as before."""

from __future__ import annotations

from ..core.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("latest_checkpoint", "load_checkpoint", "save_checkpoint"), "checkpoints"),
    **dict.fromkeys(("EMA", "ema_update", "frozen_copy"), "ema"),
    **dict.fromkeys(("TrainSettings",), "settings"),
    **dict.fromkeys(("StopRequest", "TrainingInterrupted"), "stop"),
    **dict.fromkeys(("Trainer", "make_optimizer", "step_seed", "train"), "trainer"),
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
