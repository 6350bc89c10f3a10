"""Faults a training run must survive: SIGKILL at random moments and inside checkpoint writes, a truncated newest
checkpoint, a missing ``latest`` pointer, a second process on the same ``--out``, non-finite losses and weights.

The runs are real ``cmkit`` command lines in child processes (forked from this one, which imported cmkit once: a
fresh interpreter spends ~6 s importing torch on this machine), killed with a real SIGKILL."""

import hashlib
import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import point_output_at, record_resumed_steps
from safetensors.torch import load_file

import cmkit.cli.dryrun  # noqa: F401 - imported here once, so the forked children start at once
import cmkit.cli.jobs  # noqa: F401
from cmkit.cli.commands import main
from cmkit.training import checkpoints as ckpt_mod
from cmkit.training import trainer as trainer_mod

TINY = ["model.hidden=16", "model.depth=1", "train.batch_size=16", "train.checkpoint_every=1", "train.log_every=5",
        "train.ema_rates=[0.9]", "train.warmup=0"]
STEPS = 200
FORK = multiprocessing.get_context("fork")


def _argv(out, steps=STEPS, *extra):
    sets = [a for kv in [*TINY, f"train.steps={steps}", *extra] for a in ("--set", kv)]
    return ["train-teacher", "quickstart-teacher", "--out", str(out), "--no-progress", *sets]


def _child(argv, log, started, fault):
    """Run ``cmkit ARGV`` with stdout and stderr in ``log``; record the step it resumed from in ``started``;
    ``fault``: (kind, n) kills this process with SIGKILL at the n-th checkpoint file write ("write", half the file
    written) or the n-th ``latest`` pointer update ("pointer", after the folder's rename)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    point_output_at(fd, fd)
    record_resumed_steps(started)
    if fault is not None:
        _install_fault(*fault)
    os._exit(main(argv))


def _install_fault(kind, n):
    calls = [0]

    def due():
        calls[0] += 1
        return calls[0] == n

    if kind == "write":
        write_bytes = Path.write_bytes

        def torn(self, data):
            if due():
                write_bytes(self, data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return write_bytes(self, data)

        Path.write_bytes = torn
    else:
        pointer = ckpt_mod.atomic_write_text

        def killed(path, text):
            if due():
                os.kill(os.getpid(), signal.SIGKILL)
            return pointer(path, text)

        ckpt_mod.atomic_write_text = killed


def _start(tmp, argv, fault=None):
    log, started = tmp / "child.log", tmp / "started"
    started.unlink(missing_ok=True)
    p = FORK.Process(target=_child, args=(argv, str(log), str(started), fault))
    p.start()
    return p


def _run(tmp, argv, fault=None, timeout=300):
    p = _start(tmp, argv, fault)
    p.join(timeout)
    if p.exitcode is None:  # not left running: it would take a core from the rest of the suite
        p.kill()
        p.join()
        pytest.fail(f"child did not finish in {timeout} s")
    return p.exitcode


def _intact(folder: Path) -> bool:
    """The test's own reading of a checkpoint: every file in its manifest there, with that SHA-256."""
    try:
        files = json.loads((folder / "manifest.json").read_text())["files"]
    except (OSError, ValueError):
        return False
    return all((folder / n).is_file() and hashlib.sha256((folder / n).read_bytes()).hexdigest() == v["sha256"]
               for n, v in files.items())


def _newest_intact(ckpt: Path) -> int:
    steps = sorted((int(d.name[5:]) for d in ckpt.glob("step-*") if _intact(d)), reverse=True)
    return steps[0] if steps else 0


def _tensors(out: Path) -> dict:
    """Every tensor of the final model and the final checkpoint."""
    found = {f"model/{k}": v for k, v in load_file(out / "model" / "diffusion_pytorch_model.safetensors").items()}
    last = out / "checkpoints" / f"step-{STEPS:08d}"
    for f in sorted(last.glob("*.safetensors")):
        found.update({f"{f.name}/{k}": v for k, v in load_file(f).items()})
    return found


def _corrupt_newest(ckpt: Path, rng: random.Random) -> None:
    """Truncate a file of the newest checkpoint (only while an older intact one is there) and remove ``latest``."""
    folders = sorted(d for d in ckpt.glob("step-*") if _intact(d))
    if len(folders) >= 2:
        victim = rng.choice(sorted(folders[-1].glob("*.safetensors")))
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    (ckpt / "latest").unlink(missing_ok=True)


def _timed_reference(tmp, out):
    """An unbroken run; the seconds it took to start training (the set-up kills are timed from it)."""
    t0 = time.perf_counter()
    p = _start(tmp, _argv(out))
    while not (tmp / "started").is_file() and p.is_alive():
        time.sleep(0.01)
    setup = time.perf_counter() - t0
    p.join(120)
    assert p.exitcode == 0, (tmp / "child.log").read_text()[-2000:]
    return setup


def _newest_step(ckpt: Path) -> int:
    steps = [int(d.name[5:]) for d in ckpt.glob("step-*")]
    return max(steps, default=0)


def _kill_after_steps(p, tmp: Path, ckpt: Path, ahead: int, rng: random.Random) -> None:
    """SIGKILL ``p`` once it has resumed and written ``ahead`` more checkpoints (one a step), then a random part of a
    step later: counted in the run's own progress, so how far each run gets does not depend on the machine's load."""
    started = ""
    while not started and p.is_alive():
        started = (tmp / "started").read_text() if (tmp / "started").is_file() else ""
        time.sleep(0.002)
    goal = int(started or 0) + ahead
    t = time.perf_counter()
    while _newest_step(ckpt) < goal and p.is_alive():
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 1) * (time.perf_counter() - t) / max(ahead, 1))
    if p.is_alive():
        os.kill(p.pid, signal.SIGKILL)


def test_sigkill_truncation_and_lost_pointer_resume_to_identical_weights(tmp_path):
    ref, out = tmp_path / "unbroken", tmp_path / "faulty"
    setup = _timed_reference(tmp_path, ref)
    rng = random.Random(14)
    faults = [("write", rng.randint(1, 40)) for _ in range(4)] + [("pointer", rng.randint(1, 8)) for _ in range(2)]
    kills, checked, torn_writes = 0, 0, 0
    while kills < 24:
        expected = _newest_intact(out / "checkpoints")
        fault = faults.pop() if faults and kills % 4 == 1 else None
        p = _start(tmp_path, _argv(out), fault)
        if fault is None and kills % 4 == 3:
            deadline = time.perf_counter() + rng.uniform(0.3, 1.0) * setup  # during set-up, at the latest on resuming
            while time.perf_counter() < deadline and not (tmp_path / "started").is_file():
                time.sleep(0.002)
            os.kill(p.pid, signal.SIGKILL)
        elif fault is None:
            _kill_after_steps(p, tmp_path, out / "checkpoints", rng.randint(0, 6), rng)  # resuming, stepping, saving
        p.join(60)
        if p.exitcode == 0:
            break  # finished before the kill: the comparison below still holds
        assert p.exitcode == -signal.SIGKILL, (tmp_path / "child.log").read_text()[-2000:]
        kills += 1
        if (tmp_path / "started").is_file():
            assert int((tmp_path / "started").read_text()) == expected
            checked += 1
        torn_writes += any(e.name.startswith(".step-") for e in (out / "checkpoints").glob(".*"))
        if kills % 3 == 0:
            _corrupt_newest(out / "checkpoints", rng)
    print(f"{kills} kills, {checked} resumes checked, {torn_writes} left a torn checkpoint write")
    assert kills == 24 and checked >= 12 and torn_writes >= 1, (kills, checked, torn_writes)
    expected = _newest_intact(out / "checkpoints")
    assert _run(tmp_path, _argv(out)) == 0
    assert int((tmp_path / "started").read_text()) == expected
    want, got = _tensors(ref), _tensors(out)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not [e for e in (out / "checkpoints").iterdir() if e.name.startswith(".step-")]  # temp folders cleaned
    log = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(5, STEPS + 1, 5))


def test_checkpoints_that_cannot_be_used_stop_the_run_until_restart(tmp_path):
    out = tmp_path / "run"
    assert _run(tmp_path, _argv(out, 6)) == 0
    for d in (out / "checkpoints").glob("step-*"):
        (d / "model.safetensors").write_bytes(b"garbage")
    assert _run(tmp_path, _argv(out, 8)) == 2
    message = (tmp_path / "child.log").read_text().strip().splitlines()[-1]
    assert "no usable checkpoint" in message and "--restart" in message and "model.safetensors" in message
    assert not (tmp_path / "started").exists()  # refused before any step
    assert _run(tmp_path, [*_argv(out, 8), "--restart"]) == 0
    assert int((tmp_path / "started").read_text()) == 0
    aside = list(out.glob("before-restart-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoints").is_dir() and (aside[0] / "model").is_dir()
    # a model but no checkpoint at all: also refused
    (out / "checkpoints").rename(tmp_path / "gone")
    assert _run(tmp_path, _argv(out, 10)) == 2
    assert "no checkpoint" in (tmp_path / "child.log").read_text().splitlines()[-1]


def test_an_out_in_use_is_refused_and_a_dead_owners_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = _start(tmp_path, _argv(out, 100_000))
    deadline = time.time() + 60
    while not (tmp_path / "started").is_file() and time.time() < deadline:
        time.sleep(0.05)
    assert (out / ".cmkit.lock").read_text().strip() == str(first.pid)
    second = FORK.Process(target=_child, args=(_argv(out, 100_000), str(tmp_path / "second.log"),
                                                str(tmp_path / "second-started"), None))
    second.start()
    second.join(60)
    os.kill(first.pid, signal.SIGKILL)
    first.join(60)
    assert second.exitcode == 2
    assert f"in use by process {first.pid}" in (tmp_path / "second.log").read_text()
    assert (out / ".cmkit.lock").read_text().strip() == str(first.pid)  # a dead owner's lock file is left...
    step = _newest_intact(out / "checkpoints")
    assert _run(tmp_path, _argv(out, step + 3)) == 0  # ...and taken over
    assert int((tmp_path / "started").read_text()) == step


def test_out_never_replaces_files_cmkit_did_not_write(tmp_path):
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("mine")
    assert _run(tmp_path, _argv(out, 2)) == 2
    assert "model" in (tmp_path / "child.log").read_text().splitlines()[-1]
    assert (out / "model" / "notes.txt").read_text() == "mine" and not (out / "recipe.json").exists()


def test_a_bad_value_writes_nothing_so_the_corrected_command_runs(tmp_path):
    out = tmp_path / "run"
    for bad in ("train.optimizer=sgd", "train.grad_clip=-1", "train.betas=[0.9, 1.5]", "train.batch_size=0"):
        assert _run(tmp_path, _argv(out, 2, bad)) == 2
        assert bad.split("=")[0] in (tmp_path / "child.log").read_text().splitlines()[-1]
        assert not out.exists() or not any(out.iterdir())
    assert _run(tmp_path, _argv(out, 2)) == 0


def _all_saved_tensors(out: Path) -> list[tuple[str, torch.Tensor]]:
    return [(f"{f}:{k}", v) for f in sorted(out.rglob("*.safetensors")) for k, v in load_file(f).items()]


def test_a_diverged_run_saves_no_non_finite_tensor_and_resumes_with_a_lower_lr(tmp_path):
    """Six good steps, then lr 1e39 (beyond float32): Adam's next step overflows every weight to inf with
    finite gradients. The run stops with one line and writes nothing, every saved tensor is finite, and the run goes
    on from its last good checkpoint with a lower lr."""
    out = tmp_path / "run"
    assert _run(tmp_path, _argv(out, 6)) == 0
    assert _run(tmp_path, _argv(out, 40, "train.lr=1e39")) == 2
    line = (tmp_path / "child.log").read_text().strip().splitlines()[-1]
    assert "non-finite" in line and "step-00000006" in line and "train.lr" in line, line
    saved = _all_saved_tensors(out)
    assert saved and all(torch.isfinite(v).all() for _, v in saved if v.is_floating_point())
    assert _newest_intact(out / "checkpoints") == 6
    assert _run(tmp_path, _argv(out, 10, "train.lr=1e-3")) == 0
    assert int((tmp_path / "started").read_text()) == 6  # lr may change on resume, and the change is said
    assert "train.lr changed from 1e+39 to 0.001" in (tmp_path / "child.log").read_text()
    assert all(torch.isfinite(v).all() for _, v in _all_saved_tensors(out) if v.is_floating_point())


class _Spiky(torch.nn.Module):
    """A toy objective whose loss is NaN on chosen steps."""

    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def target_ema(self, step):
        return 0.0

    def forward(self, model, x0, target=None, step=0, **cond):
        loss = (model(x0) - 1).pow(2).mean()
        return loss * float("nan") if self.bad(step) else loss


def _toy_run(out, steps, bad, **settings):
    from cmkit.training import TrainSettings, train

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    model.save_pretrained = lambda folder: Path(folder).mkdir(exist_ok=True)
    s = TrainSettings(steps=steps, batch_size=4, checkpoint_every=1, log_every=4, cpu=True,
                      **{"ema_rates": [0.9], "lr": 1e-2, **settings})
    return train(model, _Spiky(bad), lambda n, dev: (torch.randn(n, 3, device=dev), {}), s, out, progress=False)


@pytest.mark.parametrize("optimizer", ["adam", "radam"])
def test_a_non_finite_step_is_not_applied(tmp_path, optimizer):
    """The 4th step's loss is NaN: checkpoints 3 and 4 (the two kept) hold the same weights and optimiser state,
    the 3rd and 5th did change them, and the log's mean loss is of the three finite steps."""
    _toy_run(tmp_path, 4, lambda step: step == 3, optimizer=optimizer)
    ck = tmp_path / "checkpoints"
    for f in ("model.safetensors", "optimizer.safetensors"):
        before, after = load_file(ck / "step-00000003" / f), load_file(ck / "step-00000004" / f)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    _toy_run(tmp_path / "clean", 4, lambda step: False, optimizer=optimizer)
    clean = load_file(tmp_path / "clean" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert any(not torch.equal(clean[k], v) for k, v in load_file(ck / "step-00000004" / "model.safetensors").items())
    rows = [json.loads(r) for r in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["loss"] is not None and rows[0]["loss"] > 0


def test_a_run_that_keeps_diverging_stops_with_its_last_good_checkpoint(tmp_path, capfd):
    with pytest.raises(FloatingPointError, match="10 steps in a row"):
        _toy_run(tmp_path, 100, lambda step: step >= 5)
    assert "were not applied" in capfd.readouterr().err
    saved = _all_saved_tensors(tmp_path)
    assert saved and all(torch.isfinite(v).all() for _, v in saved)
    newest = sorted((tmp_path / "checkpoints").glob("step-*"))[-1]
    assert newest.name == "step-00000014"  # the 15th checkpoint, after 10 non-finite steps, was not written
    opt = load_file(newest / "optimizer.safetensors")
    assert all(v.item() == 5 for k, v in opt.items() if k.endswith(".step"))  # only the 5 good steps applied
    summary = _toy_run(tmp_path, 20, lambda step: False, lr=1e-3)  # resumes, a lower lr
    assert summary["start_step"] == int(newest.name[5:]) and summary["end_step"] == 20


def test_files_and_folders_follow_the_umask(tmp_path):
    from cmkit.core.files import atomic_dir, atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750


def test_leftovers_of_killed_writes_are_cleaned_and_a_torn_log_row_dropped(tmp_path):
    from cmkit.core.files import clean_partial_writes

    (tmp_path / ".model.old-123").mkdir()  # killed between atomic_dir's two renames: model/ is gone
    (tmp_path / ".model.old-123" / "cmkit.json").write_text("{}")
    (tmp_path / ".model.tmp-abc_1").mkdir()
    (tmp_path / ".recipe.json.k2j_x.tmp").write_text("{")
    (tmp_path / ".notes.ab.tmp").write_text("a user's file")  # not a name cmkit writes: left alone
    done = clean_partial_writes(tmp_path, trainer_mod.OUT_NAMES.__contains__)
    assert sorted(done) == [".model.old-123", ".model.tmp-abc_1", ".recipe.json.k2j_x.tmp"]
    assert (tmp_path / "model" / "cmkit.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.ab.tmp", "model"]
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 5, "loss": 1.0}\n{"step": 10, "loss": 0.9}\n{"step": 15, "lo')
    trainer_mod._truncate_log(log, 10)
    assert [json.loads(r)["step"] for r in log.read_text().splitlines()] == [5, 10]
