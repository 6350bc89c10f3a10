"""Stopping a run cleanly: Ctrl-C (SIGINT), SIGTERM (what schedulers and ``kill`` send) and SIGHUP (a closed terminal,
a dropped ssh session) ask the loop to stop after the step in progress, so the checkpoint holds one complete step; a
second Ctrl-C stops at once (a repeated SIGTERM or SIGHUP does not: a closed terminal may send SIGHUP twice, and the
checkpoint is written with these handlers still on). A SIGHUP that is ignored (``nohup``) stays ignored.

Whatever state stdout / stderr are in when a run stops (the reader of its pipe gone, its terminal hung up), the
checkpoint comes first: the progress bar writes through ``QuietStream`` and messages through ``quietly``, which drop
what cannot be written."""

from __future__ import annotations

import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C / SIGTERM / SIGHUP once the checkpoint is safely written."""


class StopRequest:
    """With several processes the request is shared through accelerate's ``set_trigger`` / ``check_trigger`` every
    ``every`` steps (no sync in between), so every rank stops at the same step."""

    def __init__(self, acc: Accelerator, every: int = 1):
        self.acc, self.every, self.flag, self.stopped, self.previous = acc, max(1, every), False, False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if sig == getattr(signal, "SIGHUP", None) and signal.getsignal(sig) == signal.SIG_IGN:
                    continue  # nohup: the user asked for the run to outlive its terminal
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:  # Ctrl-C twice: the user wants out now
            raise KeyboardInterrupt
        self.flag = True  # a repeated SIGTERM / SIGHUP (a closed terminal can send two) leaves the stop as it is

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


class QuietStream:
    """``sys.stderr`` as it is at each write, whose writes never raise (a closed pipe, a hung-up terminal, a closed
    file): for progress bars, which must never stop a run."""

    def write(self, text: str) -> int:
        try:
            return sys.stderr.write(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):
        return getattr(sys.stderr, name)


def quietly(say, message: str) -> None:
    """``say(message)``, dropped when the stream cannot take it."""
    try:
        say(message)
    except (OSError, ValueError):
        pass
