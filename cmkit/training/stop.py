"""Stopping a run cleanly: Ctrl-C (SIGINT), SIGTERM (what schedulers and ``kill`` send) and SIGHUP (a closed terminal,
a dropped ssh session) ask the loop to stop after the step in progress, so the checkpoint holds one complete step; a
second Ctrl-C stops at once (a repeated SIGTERM or SIGHUP does not: a closed terminal may send SIGHUP twice, and the
checkpoint is written with these handlers still on). A SIGHUP that is ignored (``nohup``) stays ignored.

A stop is acknowledged the moment it arrives, whatever the run is doing (one line on stderr), and work that is not
a training step is cut short rather than finished: validation images (``StopRequest.cuts_short``) stop at the next
network call, and the run then checkpoints and ends as it does between steps.

Whatever state stdout / stderr are in when a run stops (the reader of its pipe gone, its terminal hung up), the
checkpoint comes first: the progress bar writes through ``QuietStream`` and messages through ``quietly``, which drop
what cannot be written."""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C / SIGTERM / SIGHUP once the checkpoint is safely written."""


class CutShort(BaseException):  # noqa: N818 - not an error: a stop, passing through libraries' ``except Exception``
    """Raised inside work a stop request cuts short (validation images), at its next network call."""


def say_now(message: str) -> None:
    """``message`` on stderr at once, from a signal handler: straight to the file descriptor (the interrupted code may
    hold the buffered stream's lock), dropped when it cannot be written."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError, RuntimeError):  # RuntimeError: a reentrant call into the stream being written
        pass
    try:
        os.write(2, (message + "\n").encode(errors="replace"))
    except OSError:
        pass


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
        if not self.flag and getattr(self.acc, "is_main_process", True):  # said once, by the main process
            again = "; Ctrl-C again stops at once, without one" if signum == signal.SIGINT else ""
            say_now(f"cmkit: {signal.Signals(signum).name} received: stopping after the step in progress, once its "
                    f"checkpoint is written{again}")
        self.flag = True  # a repeated SIGTERM / SIGHUP (a closed terminal can send two) leaves the stop as it is

    @contextmanager
    def cuts_short(self, net: nn.Module):
        """While the body runs, every module call inside ``net`` first checks for a stop and raises ``CutShort``:
        sampling (validation images) stops within one network call of a signal instead of finishing."""
        def check(module, args):
            if self.flag:
                raise CutShort
        hooks = [m.register_forward_pre_hook(check) for m in net.modules()]
        try:
            if self.flag:
                raise CutShort
            yield
        finally:
            for h in hooks:
                h.remove()

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
