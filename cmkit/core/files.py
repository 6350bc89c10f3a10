"""Atomic writes: a file or a folder is written under a temporary name next to its destination and renamed into
place, so a crash at any moment leaves either the old version or the new one, never half of one. The one helper
behind model folders, checkpoints, the classifier cache and benchmark partial results. A model folder is written only
where nothing cmkit did not write would be replaced (``check_model_folder``); what killed writes of a folder left
beside it is removed on the next write there; a full disk is a one-line ``DiskFull`` naming the path and what is
intact."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the pid is still written
    fcntl = None


def _umask() -> int:
    """The process's umask (read by setting it, so set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_modes(path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes ``open()`` and ``mkdir()`` would under the
    process's umask: ``mkstemp`` / ``mkdtemp`` and the libraries that write through them (safetensors' ``save_file``,
    diffusers' and transformers' ``save_pretrained``) leave files 0600 and folders 0700. Links are left alone."""
    path, mask = Path(path), _umask()
    entries = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for entry in entries:
        if entry.is_symlink():
            continue
        mode = entry.stat().st_mode
        full = 0o777 if entry.is_dir() or mode & 0o111 else 0o666
        os.chmod(entry, full & ~mask)


_STARTED = time.time()  # when this process took up cmkit's file helpers: a temporary entry older is not its own

# a folder holding one of these is a model folder cmkit wrote (its own cmkit.json, or a diffusers pipeline folder)
MODEL_MARKERS = ("cmkit.json", "model_index.json")
# the other top-level files of the model folders cmkit writes (a pipeline folder's parts are its model_index.json's
# keys): a pixel model's backbone (sharded or not), a LoRA student's adapter, a teacher's sample size
MODEL_FILES = re.compile(r"^(config\.json|pytorch_lora_weights\.safetensors|sample_size\.json|"
                         r"diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors(\.index\.json)?)$")


class DiskFull(OSError):
    """No space left on the device for a write (an OSError with one line, which the command line prints as it is):
    it names the path and what is intact."""

    def __init__(self, path, intact: str):
        self.path, self.intact = Path(path), intact
        super().__init__(f"no space left on the device writing {self.path}; the write was abandoned and {intact}: "
                         "free some space and run it again")


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` is a write that failed for want of space: ``OSError`` ENOSPC / EDQUOT, or safetensors' own
    error around one (its ``SafetensorError`` carries the OS error only as text), or a nested write's ``DiskFull``."""
    if isinstance(e, DiskFull):
        return True
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return type(e).__name__ == "SafetensorError" and any(
        s in text for s in ("code: 28", "code: 122", "StorageFull", "QuotaExceeded", "No space left"))


@contextmanager
def _full_disk_named(path: Path, what: str) -> Iterator[None]:
    """A full disk inside becomes a ``DiskFull`` naming ``path`` (the destination, not a temporary name) and saying
    whether the previous ``what`` there is intact."""
    try:
        yield
    except BaseException as e:
        if is_disk_full(e):
            intact = f"the previous {what} there is intact" if path.exists() else "nothing was left there"
            raise DiskFull(path, intact) from e
        raise


def _not_written_by_cmkit(folder: Path) -> list[str]:
    """The entries of ``folder`` that no model folder cmkit writes holds (all of them where it holds no marker)."""
    names = sorted(p.name for p in folder.iterdir())
    if not any(m in names for m in MODEL_MARKERS):
        # a diffusers model folder (a VAE's: config.json and its weights) is cmkit's when it holds nothing else
        mine = "config.json" in names and all(MODEL_FILES.match(n) or _written_for(n) for n in names)
        return [] if mine else names
    parts: set[str] = set()
    try:
        index = json.loads((folder / "model_index.json").read_text())
        parts = {k for k in index if not k.startswith("_")} if isinstance(index, dict) else set()
    except (OSError, ValueError):
        pass
    return [n for n in names if n not in MODEL_MARKERS and n not in parts and not MODEL_FILES.match(n)
            and _written_for(n) is None]  # a temporary entry of a killed write inside is cmkit's too


def check_model_folder(folder) -> None:
    """Refuse, in one line, to write a model into ``folder`` unless it is absent, empty or a model folder cmkit wrote
    before holding nothing else (``MODEL_MARKERS``, a pipeline's parts, ``MODEL_FILES``; or, without a marker, a
    diffusers model's ``config.json`` and weights alone, as a trained VAE's folder is): writing replaces the whole
    folder, which must not take a user's files with it. The one check every model folder write goes through
    (``atomic_dir``)."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        what = "link" if folder.is_symlink() else "file"
        raise ValueError(f"refusing to write a model folder at {folder}: it is a {what}, which cmkit did not write; "
                         "pick a new or empty folder")
    foreign = _not_written_by_cmkit(folder)
    if not foreign:
        return
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise ValueError(f"refusing to write a model folder into {folder}: it holds {shown}, which cmkit did not write, "
                     "and writing replaces the whole folder; pick a new or empty folder, or move those away")


def clean_stale_writes(path) -> list[str]:
    """Remove what killed atomic writes of ``path`` left beside it (cmkit's own temporary names for it, nested ones
    included), if older than this process: a write begun since may be another process's, in progress."""
    path = Path(path)
    return clean_partial_writes(path.parent, lambda name: name == path.name, older_than=_STARTED)


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, flush it to disk and rename it to ``path``
    (with the mode the umask gives, whatever mode ``write`` left)."""
    path = Path(path)
    with _full_disk_named(path, "file"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: give it the mode open() would
        try:
            write(Path(tmp))
            umask_modes(tmp)  # a writer that replaces the file (safetensors' save_file) leaves it 0600 again
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


@contextmanager
def atomic_dir(folder, model: bool = True) -> Iterator[Path]:
    """``with atomic_dir(dst) as tmp:`` fill ``tmp``; on success it replaces ``dst`` (an older ``dst`` is swapped
    out first and removed only afterwards), on error it is removed and ``dst`` is untouched. ``model``: ``dst`` is a
    model folder, refused unless cmkit wrote what it holds (``check_model_folder``). What killed earlier writes of
    ``dst`` left beside it is removed first; a full disk is a ``DiskFull`` naming ``dst``."""
    folder = Path(folder)
    if model:
        check_model_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_writes(folder)
    with _full_disk_named(folder, "folder"):
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: give it the mode mkdir() would
        try:
            yield tmp
            umask_modes(tmp)  # what diffusers / transformers / safetensors wrote inside is 0600 / 0700
            old = None
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
                os.replace(folder, old)
            os.replace(tmp, folder)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# the temporary names the two helpers above use beside a destination NAME: atomic_dir's `.NAME.tmp-XXXX` and
# `.NAME.old-PID`, atomic_write's `.NAME.XXXX.tmp`
_PARTIAL = re.compile(r"^\.(?P<name>.+?)\.(?:tmp-[A-Za-z0-9_]+|old-\d+|[A-Za-z0-9_]+\.tmp)$")


def _written_for(name: str) -> str | None:
    """The destination a temporary entry named ``name`` was written for, through nested temporary names (an
    ``atomic_dir`` inside another's temporary folder writes ``..NAME.tmp-X.tmp-Y``); None: not a temporary name."""
    m = _PARTIAL.match(name)
    return None if m is None else _written_for(m["name"]) or m["name"]


def clean_partial_writes(folder, owned: Callable[[str], bool], older_than: float | None = None) -> list[str]:
    """Remove what a killed atomic write of a destination NAME with ``owned(NAME)`` left in ``folder`` (its
    temporary files and folders, nested ones included; nothing else is touched; ``older_than``: only entries last
    changed before that time); a destination that a kill caught between its two renames (``.NAME.old-PID`` there,
    ``NAME`` gone) is renamed back. Call it only while holding the folder's lock, or with ``older_than``. Returns
    the names it removed or restored."""
    folder, done = Path(folder), []
    if not folder.is_dir():
        return done
    for entry in sorted(folder.iterdir()):
        name = _written_for(entry.name)
        if name is None or not owned(name):
            continue
        try:
            if older_than is not None and entry.lstat().st_mtime >= older_than:
                continue
        except OSError:
            continue
        dest = folder / name
        if ".old-" in entry.name and _PARTIAL.match(entry.name)["name"] == name and not dest.exists():
            os.replace(entry, dest)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        done.append(entry.name)
    return done


def note(message: str) -> None:
    """A one-line ``cmkit: ...`` note on stderr; a closed or broken stream costs nothing but the note."""
    import sys

    try:
        print(f"cmkit: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def cache_write(path, write: Callable[[Path], None]) -> Path:
    """``atomic_write`` into a cache folder shared by runs: under the folder's lock (waited for), after removing what
    a killed earlier write left there (its ``.NAME.XXXX.tmp`` files), so no temporary file outlives the next write."""
    path = Path(path)
    with folder_lock(path.parent, wait=True):
        clean_partial_writes(path.parent, lambda name: name != LOCK_FILE)
        return atomic_write(path, write)


LOCK_FILE = ".cmkit.lock"
_HELD: dict[str, list] = {}  # lock path -> [open file, depth]: a process may take its own lock again


class FolderInUse(ValueError):
    """Another live process holds the folder's lock (a ValueError: the command line reports it in one line)."""


def _pid_in(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


@contextmanager
def folder_lock(folder, wait: bool = False) -> Iterator[Path]:
    """``with folder_lock(out):`` hold ``out/.cmkit.lock`` (created with ``out``), which names this process's pid.
    The lock is an advisory ``flock`` on that file, so the kernel drops it when its holder dies, however it dies: a
    lock file left by a dead process is taken over, and a live holder is refused with one line naming its pid
    (``wait``: waited for instead, as a shared cache's short writes are)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        f = open(path, "a+")  # noqa: SIM115 - held open for as long as the lock is
        try:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            raise FolderInUse(f"{folder} is in use by process {_pid_in(path)} (lock {path}); wait for it to finish "
                              "or stop it, or use another --out") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        _HELD[key] = [f, 1]
    try:
        yield path
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            _HELD.pop(key)[0].close()  # closing drops the flock; the file stays (unlinking it would race)


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_weights_file(path, what: str, sha256_prefix: str | None = None) -> Path:
    """Refuse, in one line, a pickle-format weights file (``.pth``) that a loader cmkit triggers would unpickle
    with code execution allowed (torch-fidelity's ``torch.load(weights_only=False)``, torch.hub's cache): the file
    must start its SHA-256 with ``sha256_prefix`` when given (torch.hub's file-name convention,
    ``NAME-<hash prefix>.pth``), and ``torch.load(weights_only=True)`` must read it, which admits tensors and plain
    containers only. A file that passes holds nothing a full unpickler would run."""
    import torch

    path = Path(path)
    if sha256_prefix and not sha256_of(path).startswith(sha256_prefix):
        raise ValueError(f"{what} {path} is not the published file (its SHA-256 does not start with "
                         f"{sha256_prefix}); delete it and put the original there")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not plain weights
        raise ValueError(f"{what} {path} is not a plain weights file (torch.load(weights_only=True) refuses it: "
                         f"{' '.join(str(e).split())[:120]}); it could run code when unpickled, so it is not loaded: "
                         "delete it and put the original there") from None
    return path


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickles(folder, what: str) -> None:
    """Refuse, in one line, a model component folder that holds its weights only as a pickle
    (``pytorch_model.bin``, ``diffusion_pytorch_model.bin``, ...): cmkit never unpickles a file from a folder a user
    was given (unpickling can run code), so it reads safetensors only. A folder with safetensors weights passes."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{folder / pickles[0]} is a pickle ({what} weights), which cmkit never unpickles (it could "
                         "run code); convert it to safetensors where you trust it (from_pretrained, then "
                         "save_pretrained(folder, safe_serialization=True)) and try again")
