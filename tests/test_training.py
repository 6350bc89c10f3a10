import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cmkit.cli.jobs import distill, train_consistency, train_teacher
from cmkit.cli.recipes import load_recipe
from cmkit.training import TrainingInterrupted

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

SMALL = ["model.hidden=32", "model.depth=2", "train.batch_size=64", "train.log_every=10", "train.checkpoint_every=50",
         "eval.num_samples=200"]


def teacher_recipe(steps, *extra):
    return load_recipe("quickstart-teacher", SMALL + [f"train.steps={steps}", *extra])


def weights(folder):
    return load_file(folder / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train_teacher(teacher_recipe(150), out, progress=False)
    return out / "model"


def test_teacher_loss_decreases(tmp_path):
    train_teacher(teacher_recipe(300), tmp_path, progress=False)
    rows = [json.loads(r) for r in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-1] == 300
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]


def test_resume_gives_identical_weights(tmp_path, small_teacher):
    cd = ["objective.kind=\"cd\"", f"teacher.path=\"{small_teacher}\"", "train.checkpoint_every=1000"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    distill(load_recipe("quickstart-cd", SMALL + cd + ["train.steps=200"]), straight, progress=False)
    distill(load_recipe("quickstart-cd", SMALL + cd + ["train.steps=100"]), split, progress=False)
    assert (split / "checkpoints" / "latest").read_text() == "step-00000100"
    distill(load_recipe("quickstart-cd", SMALL + cd + ["train.steps=200"]), split, progress=False)
    a, b = weights(straight / "model"), weights(split / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # online and target networks in the checkpoint match too
    for name in ("model", "target"):
        ca = load_file(straight / "checkpoints" / "step-00000200" / f"{name}.safetensors")
        cb = load_file(split / "checkpoints" / "step-00000200" / f"{name}.safetensors")
        assert all(torch.equal(ca[k], cb[k]) for k in ca)
    log_steps = [json.loads(r)["step"] for r in (split / "log.jsonl").read_text().splitlines()]
    assert log_steps == sorted(set(log_steps)) and log_steps[-1] == 200


def test_resume_with_other_recipe_is_refused(tmp_path):
    train_teacher(teacher_recipe(20), tmp_path, progress=False)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="different recipe"):
        train_teacher(teacher_recipe(40, "train.batch_size=32"), tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_ctrl_c_finishes_the_step_saves_and_resume_matches(tmp_path, monkeypatch):
    import os
    import signal

    import cmkit.data

    real = cmkit.data.Dataset.batches
    calls = {"n": 0}

    def interrupting(self, conditional=False, hflip=False):
        draw = real(self, conditional, hflip)

        def wrapped(n, device):
            calls["n"] += 1
            # Ctrl-C arrives while step 38 is being computed (call 1 is the dry first step that checks the recipe
            # before anything is written)
            if calls["n"] == 39:
                os.kill(os.getpid(), signal.SIGINT)
            return draw(n, device)
        return wrapped

    monkeypatch.setattr(cmkit.data.Dataset, "batches", interrupting)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 38; checkpoint saved"):
        train_teacher(teacher_recipe(60), tmp_path / "a", progress=False)
    assert (tmp_path / "a" / "checkpoints" / "latest").read_text() == "step-00000038"
    monkeypatch.setattr(cmkit.data.Dataset, "batches", real)
    train_teacher(teacher_recipe(60), tmp_path / "a", progress=False)
    train_teacher(teacher_recipe(60), tmp_path / "b", progress=False)
    a, b = weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _emulate_two_ranks(recipe, teacher_dir, steps):
    """The same run computed in one process: each step draws rank 0's and rank 1's batches (their own seeds), sums
    their gradients and halves them, as DDP's all-reduce does; returns the online weights."""
    from cmkit.cli.jobs import build_run, dataset_for
    from cmkit.loading import load_teacher
    from cmkit.training import ema_update, frozen_copy, make_optimizer, step_seed

    data = dataset_for(recipe)
    teacher = load_teacher(teacher_dir).requires_grad_(False).eval()
    torch.manual_seed(recipe.seed)
    model, objective = build_run(recipe, data, teacher)
    model.train()
    target, ema = frozen_copy(model), frozen_copy(model)
    opt = make_optimizer(model.parameters(), recipe.train)
    batches = data.batches()
    for step in range(steps):
        for rank in (0, 1):
            torch.manual_seed(step_seed(recipe.seed, step, rank))
            x0, cond = batches(recipe.train.batch_size // 2, torch.device("cpu"))
            objective(model, x0, target=target, step=step).backward()
        for p in model.parameters():
            p.grad /= 2
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(target, model, objective.target_ema(step + 1))
        ema_update(ema, model, recipe.train.ema_rates[0])
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_two_process_cpu_run(tmp_path, small_teacher):
    """Two CPU processes train one model: their gradients are all-reduced (the result is the one-process emulation
    of two ranks, and not what rank 0 alone would have trained)."""
    steps = 6
    overrides = [*SMALL, f"train.steps={steps}", "train.cpu=true", "train.checkpoint_every=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "cmkit", "distill", "quickstart-cd", "--teacher", str(small_teacher), "--out", str(tmp_path / "dd"),
           "--no-progress", *[f"--set={s}" for s in overrides], "--set", "eval.schedule_max_steps=0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpts = sorted(p.name for p in (tmp_path / "dd" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-00000003", "step-00000006"]
    state = json.loads((tmp_path / "dd" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["step"] == steps
    online = "checkpoints/step-00000006/model.safetensors"
    got = load_file(tmp_path / "dd" / online)
    want = _emulate_two_ranks(load_recipe("quickstart-cd", overrides), small_teacher, steps)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # rank 0 alone (its own half-batches, no all-reduce) trains different weights
    alone = tmp_path / "alone"
    distill(load_recipe("quickstart-cd", [*overrides, "train.batch_size=32", "eval.schedule_max_steps=0"]), alone,
            teacher_path=str(small_teacher), progress=False)
    assert max((load_file(alone / online)[k] - got[k]).abs().max().item() for k in got) > 1e-3


def test_a_finished_ict_run_extends_with_the_same_curriculum(tmp_path):
    """--set train.steps=... extends a finished iCT run; the curriculum's K stays the first run's train.steps."""
    base = ["model.hidden=16", "model.depth=1", "train.batch_size=16", "train.checkpoint_every=5",
            "train.log_every=5", "eval.schedule_max_steps=0"]
    from cmkit.cli.jobs import train_consistency

    train_consistency(load_recipe("s_curve-ict", [*base, "train.steps=10"]), tmp_path, progress=False)
    summary = train_consistency(load_recipe("s_curve-ict", [*base, "train.steps=15"]), tmp_path, progress=False)
    assert (summary["start_step"], summary["end_step"]) == (10, 15)
    saved = json.loads((tmp_path / "recipe.json").read_text())
    assert saved["run_constants"] == {"total_steps": 10}
    with pytest.raises(ValueError, match="different recipe"):
        train_consistency(load_recipe("s_curve-ict", [*base, "train.steps=20", "train.batch_size=8"]), tmp_path,
                          progress=False)
    with pytest.raises(ValueError, match=r"curriculum length \(objective.total_steps\) is 10.*train.steps=N alone"):
        train_consistency(load_recipe("s_curve-ict", [*base, "train.steps=20", "objective.total_steps=20"]),
                          tmp_path, progress=False)
    # stating the horizon the run has is no change
    summary = train_consistency(load_recipe("s_curve-ict", [*base, "train.steps=20", "objective.total_steps=10"]),
                                tmp_path, progress=False)
    assert (summary["start_step"], summary["end_step"]) == (15, 20)


@pytest.mark.parametrize("export, ema, steps, want", [
    ("auto", "[0.9]", 10, "online"),      # 0.9**10 = 0.35 of the starting weights left: too young
    ("auto", "[0.9, 0.5]", 40, "ema-0.9"),  # both have forgotten the start (0.015, 1e-12): the slower one
    ("ema", "[0.9]", 10, "ema-0.9"),
    ("target", "[0.9]", 10, "target"),
    ("online", "[0.5]", 40, "online"),
])
def test_the_exported_weights_are_the_ones_named_and_cmkit_json_says_which(tmp_path, small_teacher, export, ema,
                                                                          steps, want):
    cd = ["objective.kind=\"cd\"", f"teacher.path=\"{small_teacher}\"", "train.checkpoint_every=1000",
          f"train.steps={steps}", f"train.ema_rates={ema}", f"train.export=\"{export}\""]
    distill(load_recipe("quickstart-cd", SMALL + cd), tmp_path, progress=False)
    meta = json.loads((tmp_path / "model" / "cmkit.json").read_text())["exported_weights"]
    assert meta["weights"] == want and meta["step"] == steps
    ckpt = tmp_path / "checkpoints" / f"step-{steps:08d}"
    source = load_file(ckpt / f"{'model' if want == 'online' else want}.safetensors")
    exported = weights(tmp_path / "model")
    others = [load_file(f) for f in ckpt.glob("*.safetensors") if f.stem not in (want if want != "online" else "model",
                                                                                  "optimizer", "objective")]
    for k, v in exported.items():
        assert torch.equal(v, source[next(s for s in source if s.endswith(k))]), k
    # and not some other copy's: every other kept network differs somewhere
    assert all(any(not torch.equal(v, o[next(s for s in o if s.endswith(k))]) for k, v in exported.items())
               for o in others)


@pytest.mark.parametrize("export, ema, message", [
    ("target", "[0.9]", None), ("ema", "[]", "train.ema_rates is empty"),
    ("ema-0.99", "[0.9]", "not one of the kept EMAs"), ("best", "[0.9]", "train.export must be"),
])
def test_an_export_that_names_weights_the_run_does_not_keep_fails_before_training(tmp_path, small_teacher, export,
                                                                                  ema, message):
    overrides = SMALL + ["objective.kind=\"cd\"", f"teacher.path=\"{small_teacher}\"", "train.steps=2",
                         f"train.ema_rates={ema}", f"train.export=\"{export}\""]
    if message is None:  # a CT run keeps no target network
        overrides = SMALL + ["train.steps=2", f"train.ema_rates={ema}", f"train.export=\"{export}\""]
        with pytest.raises(ValueError, match="keeps no target network"):
            train_consistency(load_recipe("s_curve-ict", overrides), tmp_path, progress=False)
    else:
        with pytest.raises(ValueError, match=message):
            distill(load_recipe("quickstart-cd", overrides), tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()
