"""Stopping a run cleanly: Ctrl-C (SIGINT) and SIGTERM (what schedulers and ``kill`` send) ask the loop to stop
after the step in progress, so the checkpoint holds one complete step; a second signal stops at once."""

from __future__ import annotations

import signal
import threading

from accelerate import Accelerator


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C / SIGTERM once the checkpoint is safely written."""


class StopRequest:
    """With several processes the request is shared through accelerate's ``set_trigger`` / ``check_trigger`` every
    ``every`` steps (no sync in between), so every rank stops at the same step."""

    def __init__(self, acc: Accelerator, every: int = 1):
        self.acc, self.every, self.flag, self.stopped, self.previous = acc, max(1, every), False, False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def requested(self, step: int) -> bool:
        if self.acc.num_processes == 1:
            self.stopped = self.flag
        elif step % self.every == 0:
            if self.flag:
                self.acc.set_trigger()
            self.stopped = self.acc.check_trigger()
        return self.stopped

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
