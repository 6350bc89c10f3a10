"""Where this process stands among a run's processes (torch.distributed, as accelerate and torchrun set it up): one
place for the rank / world lookup the latent cache's encode split and the checkpoints' optimiser shards both need, and
for setting the group up without a hang (``setup_guard``): an environment that names several processes no launcher
started is refused at once, and a set-up that cannot complete (the others never join) says so within a minute and
obeys a stop signal meanwhile, though it waits in C++, where no Python signal handler runs."""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from contextlib import contextmanager, nullcontext

import torch


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` outside a process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every process of the group (nothing to wait for in a single-process run)."""
    if rank_world()[1] > 1:
        torch.distributed.barrier()


# --- setting the process group up: a stale launch environment refused, a set-up that cannot finish bounded --------

# accelerate reads the number of processes from these (torchrun's, then the MPI launchers'); a launcher also sets one
# of LAUNCHED (torchrun and accelerate launch: LOCAL_RANK and TORCHELASTIC_RUN_ID; MPI: its local rank)
WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LAUNCHED = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
            "MV2_COMM_WORLD_LOCAL_RANK")
RENDEZVOUS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SETUP_SECONDS = 60.0  # how long the processes of a run may take to find each other (CMKIT_SETUP_TIMEOUT overrides)
LAUNCH_FIX = "launch every process with torchrun or accelerate launch --num_processes N"


def launched_world(env=None) -> tuple[str, int] | None:
    """``(variable, N)`` where the environment says this process is one of N > 1; None otherwise."""
    env = os.environ if env is None else env
    for name in WORLD_VARS:
        value = env.get(name, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a number of processes: unset it, or {LAUNCH_FIX}") from None
            return (name, n) if n > 1 else None
    return None


def _set_vars(env) -> str:
    return ", ".join(f"{k}={env[k]}" for k in RENDEZVOUS if env.get(k))


def stale_launch(env=None) -> str | None:
    """A one-line reason when the environment names several processes that can never meet: no launcher started this
    one (none of ``LAUNCHED``) and no ``MASTER_ADDR`` says where the others would be (a ``WORLD_SIZE`` left over
    from another job, say). Decided from the environment alone, before anything waits."""
    env = os.environ if env is None else env
    world = launched_world(env)
    if world is None or any(env.get(k) for k in (*LAUNCHED, "MASTER_ADDR")):
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    name, n = world
    return (f"{_set_vars(env) or f'{name}={n}'} in the environment says this is one of {n} processes, but no launcher "
            f"started it and no MASTER_ADDR says where the others are: unset {name} (and RANK, MASTER_PORT) for one "
            f"process, or {LAUNCH_FIX}")


def setup_seconds(env=None) -> float:
    env = os.environ if env is None else env
    value = env.get("CMKIT_SETUP_TIMEOUT", "").strip()
    try:
        seconds = float(value) if value else SETUP_SECONDS
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"CMKIT_SETUP_TIMEOUT must be a number of seconds > 0, got {value!r}")
    return seconds


SETUP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
STOP_NUMBERS = frozenset(int(s) for s in SETUP_SIGNALS)


def _give_up(message: str, code: int) -> None:
    """Say ``message`` on stderr (unbuffered: the main thread may hold the stream's lock) and end the process."""
    try:
        os.write(2, f"cmkit: {message}\n".encode(errors="replace"))
    except OSError:
        pass
    os._exit(code)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"{signal.Signals(signum).name} during the process-group set-up: stopped, nothing written")


def _watch(read: int, done: threading.Event, seconds: float, late: str) -> None:
    """The watchdog: past the deadline, or a second after a stop signal the blocked main thread could not act on,
    one line and the process ends (2; 130 for a signal)."""
    deadline = time.monotonic() + seconds
    while not done.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            _give_up(late, 2)
        ready = select.select([read], [], [], left)[0]
        signums = [b for b in os.read(read, 64) if b in STOP_NUMBERS] if ready else []
        if signums and not done.wait(1.0):
            _give_up(f"{signal.Signals(signums[0]).name} received during the process-group set-up: stopped, nothing "
                     "was written", 130)


@contextmanager
def bounded_setup(seconds: float, late: str):
    """Run the body with a deadline of ``seconds`` (then ``late`` is said and the process exits 2) and stop signals
    obeyed at once: they raise ``KeyboardInterrupt`` where the main thread runs Python, and end the process where it
    waits in C++ (the signal's byte reaches the watchdog through ``signal.set_wakeup_fd``)."""
    main = threading.current_thread() is threading.main_thread()
    read, write = os.pipe()
    os.set_blocking(write, False)
    done, previous, old_fd = threading.Event(), {}, -1
    if main:
        old_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for sig in SETUP_SIGNALS:
            handler = signal.getsignal(sig)
            if handler is not None and not (sig != signal.SIGINT and handler == signal.SIG_IGN):  # nohup stays
                previous[sig] = signal.signal(sig, _interrupt)
    watchdog = threading.Thread(target=_watch, args=(read, done, seconds, late), daemon=True, name="cmkit-setup")
    watchdog.start()
    try:
        yield
    finally:
        done.set()
        if main:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_fd)
        os.write(write, b"\0")  # wakes the watchdog, which sees ``done``
        watchdog.join()
        os.close(read)
        os.close(write)


def setup_guard():
    """The context a run sets its process group up in (accelerate's ``Accelerator()``): a stale environment refused
    at once (``ValueError``), a multi-process set-up bounded by ``setup_seconds()``, nothing for a single process."""
    problem = stale_launch()
    if problem:
        raise ValueError(problem)
    world = launched_world()
    if world is None or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return nullcontext()
    seconds, name = setup_seconds(), world[0]
    late = (f"the {world[1]} processes of this run did not meet within {seconds:g} s ({_set_vars(os.environ)}): "
            f"the others never joined. If no launcher started this run, unset {name}, RANK, MASTER_ADDR and "
            f"MASTER_PORT; else {LAUNCH_FIX} (CMKIT_SETUP_TIMEOUT=SECONDS waits longer)")
    return bounded_setup(seconds, late)
