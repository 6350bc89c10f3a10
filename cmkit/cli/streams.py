"""The command's output streams and stop signals, torch-free (``cmkit --help`` imports this).

A message or progress bar that cannot be written (``cmkit ... | tee`` after ``tee`` died, an ssh session dropped)
must never stop a command, let alone cost a training run its checkpoint: ``guarded_output`` wraps ``sys.stdout`` and
``sys.stderr`` so a failed write is dropped (and the stream's file descriptor pointed at ``/dev/null``, so the flush at
exit does not fail either). ``signals_interrupt`` makes SIGTERM and SIGHUP end a command as Ctrl-C does."""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

from ..training.stop import STOP_SIGNALS  # torch-free: ``cmkit.training`` loads its names on first use


class GuardedStream:
    """A text stream whose ``write`` and ``flush`` never raise: after the first failure the rest is dropped."""

    def __init__(self, stream):
        self._stream, self.broken = stream, False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):  # EPIPE, EIO (a hung-up terminal), a closed file
                self._lost()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._lost()

    def _lost(self) -> None:
        self.broken = True
        try:  # what the stream still buffers, and later writes to the descriptor, go nowhere instead of failing
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self._stream.fileno())
            finally:
                os.close(null)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextmanager
def guarded_output():
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s if isinstance(s, GuardedStream) or s is None else GuardedStream(s) for s in saved)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def signals_interrupt():
    """SIGTERM and SIGHUP raise ``KeyboardInterrupt`` (the default would end the process with no message, and a
    benchmark without saying that its finished rows are kept). A SIGHUP that is ignored (``nohup``) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield StopSignals(())  # only the main thread may set handlers
        return
    # SIGINT keeps Python's own handler, which raises KeyboardInterrupt already
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS
                if sig != signal.SIGINT and not (sig != signal.SIGTERM and signal.getsignal(sig) == signal.SIG_IGN)}
    if signal.getsignal(signal.SIGINT) is not None:  # None: set outside Python, left alone
        previous.setdefault(signal.SIGINT, signal.getsignal(signal.SIGINT))
    try:
        yield StopSignals(tuple(previous))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopSignals:
    def __init__(self, signals: tuple):
        self.signals = signals  # those whose handlers signals_interrupt restores on exit

    def ignore(self) -> None:
        """The command is over (its exit code decided): a repeated stop signal (a terminal that sends SIGHUP twice,
        Ctrl-C pressed again) must not raise in the middle of its last line or of the way out. Restored on exit."""
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
