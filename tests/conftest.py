import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite on both cores as two workers (README: pytest -n 2): one thread each, subprocesses included, since two
    # processes at two threads apiece on two cores spin-wait on each other's OpenMP barriers
    os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
# The hub is unreachable here: fail hub look-ups at once instead of after five retries (subprocesses inherit it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread while a module runs, restored after (a module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``): its networks are tiny, and on a loaded machine more
    threads spend their time waiting for each other in every small matmul."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def gaussian_denoiser():
    """The exact denoiser of N(mu, s^2 I) data: D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    class GaussianDenoiser(torch.nn.Module):
        def __init__(self, mu, s):
            super().__init__()
            self.mu, self.s = mu, s
            self.sigma_min, self.sigma_max = 0.002, 80.0

        def forward(self, x, sigma):
            sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)

    return GaussianDenoiser


CLI = [sys.executable, "-m", "cmkit"]


def free_port() -> str:
    """A TCP port nothing listens on, for a launcher test's rendezvous (fixed ports collide when tests run in
    parallel)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
ROOT = Path(__file__).resolve().parents[1]


def caption_data(size: int = 16, items=("bag", "boot")):
    """24 coloured random images with captions "a {colour} {item}" (20 to train on, 4 held out), the small
    captioned set the text-to-image training tests run on."""
    from cmkit.data import Dataset
    from cmkit.data.fashion_colours import paint

    g = torch.Generator().manual_seed(0)
    gray = torch.rand(24, 1, size, size, generator=g) * 2 - 1
    colours = torch.arange(24) % 3
    caps = [f"a {['red', 'green', 'blue'][c]} {items[i % 2]}" for i, c in enumerate(colours.tolist())]
    x = paint(gray, colours)
    return Dataset("tiny-captions", x[:20], x[20:], train_captions=caps[:20], test_captions=caps[20:])


def cmkit_forked(*args, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``cmkit ARGS`` as its own process: its own stdout and stderr file descriptors, its exit code, ``entry()``'s way
    out; but forked from this test process, which imported cmkit once, where ``python -m cmkit`` spends ~8 s of a CLI
    test's time importing torch, diffusers, peft and transformers on this machine. The child undoes what pytest set up
    in this process (warnings recorded, log records captured), so what a user would see on stderr is there; a warning
    printed once at import time is the one thing a fork cannot show, which the fresh-interpreter tests cover."""
    import tempfile

    argv = [str(a) for a in args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                _become_a_fresh_command(out.fileno(), err.fileno(), cwd)
                from cmkit.cli.commands import main

                code = main(argv)
            except BaseException:  # what a user would see: the traceback on stderr, exit 1
                import traceback

                traceback.print_exc()
            finally:
                import logging

                logging.shutdown()
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except (OSError, ValueError):
                        pass
                os._exit(code)
        deadline = time.monotonic() + timeout
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(["cmkit", *argv], timeout)
            time.sleep(0.01)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
    return subprocess.CompletedProcess(["cmkit", *argv], os.waitstatus_to_exitcode(done[1]), *texts)


def point_output_at(out_fd: int, err_fd: int) -> None:
    """In a forked child: file descriptors 1 and 2 onto ``out_fd`` / ``err_fd``, Python's streams reopened on them
    (line-buffered), and one OpenMP thread: the parent's worker threads did not come through the fork, and a parallel
    region on more than one would wait for them."""
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    torch.set_num_threads(1)


def record_resumed_steps(started: str) -> None:
    """In a forked child: every ``Trainer.resume`` writes the step it resumed from to the file ``started``, whole
    and then renamed, so that a SIGKILL between create and write never leaves an empty marker."""
    from cmkit.training import trainer

    resume = trainer.Trainer.resume

    def record(self):
        step = resume(self)
        Path(started + ".part").write_text(str(step))
        os.replace(started + ".part", started)
        return step

    trainer.Trainer.resume = record


def _become_a_fresh_command(out_fd: int, err_fd: int, cwd) -> None:
    import logging
    import warnings

    before = {id(sys.stdout): 1, id(sys.__stdout__): 1, id(sys.stderr): 2, id(sys.__stderr__): 2}
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdin = open(0, closefd=False)
    point_output_at(out_fd, err_fd)
    sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr
    if cwd is not None:
        os.chdir(cwd)
    os.environ.pop("CMKIT_DEBUG", None)
    # Python's own warning filters and printing (pytest records warnings instead of printing them)
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
        warnings.formatwarning(message, category, filename, lineno, line))
    # log records to stderr as in a fresh process: pytest's capturing handlers off, libraries' stream handlers re-aimed
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not type(h).__module__.startswith("_pytest")]
    for logger in [root, *logging.Logger.manager.loggerDict.values()]:
        for h in getattr(logger, "handlers", []):
            if type(h) is logging.StreamHandler and id(h.stream) in before:
                h.setStream(sys.stdout if before[id(h.stream)] == 1 else sys.stderr)


def one_line_error(capsys, code, *needles, progress_bars: bool = False):
    """The command exited 2 with one line on stderr, no traceback, holding every needle; ``progress_bars``: lines
    of transformers' own "Loading weights" bar, which a loading command prints above it, are not counted."""
    lines = capsys.readouterr().err.strip().splitlines()
    if progress_bars:
        lines = [s for s in lines if s.strip() and "it/s]" not in s]
    err = "\n".join(lines)
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def lcm_lora_folders(root: Path, images: int) -> Path:
    """A tiny random SD teacher (``root/teacher``) and a captioned folder of ``images`` 16x16 images
    (``root/data``), as the LCM-LoRA tests train on."""
    import numpy as np
    from PIL import Image

    from cmkit.latent.families.unet import tiny_pipeline

    captions = ["a red bag", "a green boot", "a blue bag", "a red boot"]
    rng = np.random.default_rng(0)
    (root / "data").mkdir()
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(captions[i % 4])
    tiny_pipeline("sd", "epsilon", texts=captions, seed=1, image_size=16).save_pretrained(root / "teacher")
    return root
