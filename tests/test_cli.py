"""Bad input ends in one line on stderr, a non-zero exit and no traceback, and leaves checkpoints alone."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cmkit_forked

from cmkit.cli.jobs import distill, train_teacher
from cmkit.cli.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "model.hidden=16", "--set", "model.depth=1", "--set", "train.batch_size=32",
         "--set", "train.steps=5"]


def fresh_cmkit(*args, cwd=None):
    """``python -m cmkit ARGS`` in a fresh interpreter: what a fork cannot show (import-time output) shows here."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CMKIT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "cmkit", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


cmkit = cmkit_forked


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    small = [s for s in SMALL if s != "--set"]
    train_teacher(load_recipe("quickstart-teacher", small), root / "teacher", progress=False)
    distill(load_recipe("quickstart-cd", small + ["eval.schedule_max_steps=0"]), root / "cd",
            teacher_path=str(root / "teacher" / "model"), progress=False)
    return root


def test_help_for_every_command():
    for cmd in ([], ["quickstart"], ["train-teacher"], ["distill"], ["sample"], ["bench", "quality-vs-steps"]):
        proc = fresh_cmkit(*cmd, "--help")
        assert proc.returncode == 0 and "usage: cmkit" in proc.stdout


def test_unknown_recipe_key_suggests_nearest(tmp_path):
    proc = cmkit("train-teacher", "quickstart-teacher", "--out", tmp_path, "--set", "train.step=3")
    assert_one_line_error(proc, "unknown recipe key 'train.step'", "did you mean 'train.steps'")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nbatchsize = 3\n")
    proc = cmkit("train-teacher", bad, "--out", tmp_path / "o")
    assert_one_line_error(proc, "train.batchsize", "train.batch_size")


def test_non_finite_data(tmp_path):
    arr = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    arr[3, 0] = np.inf
    np.save(tmp_path / "x.npy", arr)
    path = f"data.path='{tmp_path / 'x.npy'}'"
    proc = cmkit("train-teacher", "quickstart-teacher", "--out", tmp_path / "o", "--set", path)
    assert_one_line_error(proc, "NaN or inf")


def test_data_dimension_not_matching_teacher(tmp_path, tiny):
    np.save(tmp_path / "x3.npy", np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32))
    proc = cmkit("distill", "quickstart-cd", "--teacher", tiny / "teacher" / "model", "--out", tmp_path / "o",
                 "--set", f"data.path='{tmp_path / 'x3.npy'}'", *SMALL)
    assert_one_line_error(proc, "shape (3,)", "(2,)")


def test_missing_teacher_folder(tmp_path):
    proc = cmkit("distill", "quickstart-cd", "--teacher", tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(proc, "does not exist")


def test_steps_below_one(tmp_path, tiny):
    proc = cmkit("train-teacher", "quickstart-teacher", "--out", tmp_path / "o", "--set", "train.steps=0")
    assert_one_line_error(proc, "train.steps must be >= 1")
    cd = cmkit("distill", "quickstart-cd", "--teacher", tiny / "teacher" / "model", "--out", tmp_path / "cd", *SMALL)
    assert cd.returncode == 0, cd.stderr
    proc = cmkit("sample", tiny / "cd" / "model", "--steps", "0", "--out", tmp_path / "s.npy")
    assert_one_line_error(proc, "steps must be >= 1")


def test_bad_sigmas(tmp_path, tiny):
    model = tiny / "cd" / "model"
    # a fresh interpreter once: the model's load imports torch, diffusers and the rest, and nothing they print on import
    # may join the one line
    assert_one_line_error(fresh_cmkit("sample", model, "--sigmas", "1,5", "--out", tmp_path / "s.npy"), "descending")
    assert_one_line_error(cmkit("sample", model, "--sigmas", "200,1", "--out", tmp_path / "s.npy"), "sigma_max")
    assert_one_line_error(cmkit("sample", model, "--sigmas", "80,0.0001", "--out", tmp_path / "s.npy"), "sigma_min")
    ok = cmkit("sample", model, "--sigmas", "80,0.8", "--num", "7", "--out", tmp_path / "s.npy")
    assert ok.returncode == 0, ok.stderr
    assert np.load(tmp_path / "s.npy").shape == (7, 2)


def test_bad_input_leaves_checkpoint_untouched(tmp_path, tiny):
    out = tmp_path / "run"
    first = cmkit("train-teacher", "quickstart-teacher", "--out", out, *SMALL, "--no-progress")
    assert first.returncode == 0, first.stderr
    snapshot = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    proc = cmkit("train-teacher", "quickstart-teacher", "--out", out, *SMALL, "--set", "train.weight_decay=0.5")
    assert_one_line_error(proc, "different recipe")
    proc = cmkit("train-teacher", "quickstart-teacher", "--out", out, *SMALL, "--set", "train.lr=oops")
    assert_one_line_error(proc, "train.lr")
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == snapshot


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "cmkit", "train-teacher", "quickstart-teacher", "--out", str(out), "--no-progress",
            "--set", "model.hidden=16", "--set", "model.depth=1", "--set", "train.batch_size=32",
            "--set", "train.steps=100000", "--set", "train.log_every=10", "--set", "train.checkpoint_every=100000"]
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "log.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "Traceback" not in err
    step = int((out / "checkpoints" / "latest").read_text().split("-")[1])
    assert step >= 10
    resumed = cmkit("train-teacher", "quickstart-teacher", "--out", out, "--no-progress", "--set", "model.hidden=16",
                    "--set", "model.depth=1", "--set", "train.batch_size=32", "--set", f"train.steps={step + 5}")
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "checkpoints" / "latest").read_text() == f"step-{step + 5:08d}"


def test_ct_with_a_teacher_and_ect_without_one_are_errors(tmp_path, tiny):
    proc = cmkit("train", "s_curve-ict", "--teacher", tiny / "teacher" / "model", "--out", tmp_path / "a")
    assert_one_line_error(proc, "trains without a teacher", "remove teacher.path")
    proc = cmkit("train", "s_curve-ect", "--out", tmp_path / "b")
    assert_one_line_error(proc, "'ect' needs a teacher", "--teacher")
    proc = cmkit("train", "quickstart-cd", "--out", tmp_path / "c")
    assert_one_line_error(proc, "runs with `cmkit distill`")
