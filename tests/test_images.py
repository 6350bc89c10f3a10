"""Image paths end to end on tiny models: DDPM teacher training through the denoiser interface, image CD with a
diffusers teacher, the classifier metrics, sampling to PNG."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cmkit_forked
from diffusers import DDPMScheduler

import cmkit
from cmkit.cli.jobs import distill, train_teacher
from cmkit.cli.recipes import load_recipe
from cmkit.data import load_dataset
from cmkit.eval.bench import image_scorer
from cmkit.eval.classifier import train_classifier
from cmkit.objectives import DDPMLoss

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.base=8", "model.levels=1", "model.attention=false", "model.dropout=0.0", "train.batch_size=16",
        "train.log_every=5", "train.checkpoint_every=1000"]


def test_ddpm_loss_is_epsilon_mse():
    """The x0-space DDPM loss equals the textbook ||eps_hat - eps||^2 for an epsilon network."""
    torch.manual_seed(0)
    net = cmkit.models.small_unet(8, 1, 8, 1, 1, False)
    sched = DDPMScheduler(num_train_timesteps=1000)
    den = cmkit.DiffusersDenoiser(net, sched)
    x0 = torch.randn(4, 1, 8, 8)
    torch.manual_seed(5)
    ours = DDPMLoss(den.log_sigmas)(den, x0)
    torch.manual_seed(5)
    t = torch.randint(0, 1000, (4,))
    eps = torch.randn_like(x0)
    sigma = den.log_sigmas.exp().float()[t]
    x_t = sched.add_noise(x0, eps, t)
    ref = (net(x_t, t.float()).sample - eps).pow(2).mean((1, 2, 3)).mean()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert sigma.shape == (4,)


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    train_teacher(load_recipe("digits-teacher", TINY + ["train.steps=30"]), root / "teacher", progress=False)
    cd = load_recipe("digits-cd", TINY + ["train.steps=20", "eval.schedule_max_steps=2",
                                          "eval.schedule_candidates=3", "eval.schedule_num_samples=64"])
    distill(cd, root / "cd", teacher_path=str(root / "teacher" / "model"), progress=False)
    return root


def test_ddpm_teacher_folder_is_a_diffusers_pipeline(digits_runs):
    folder = digits_runs / "teacher" / "model"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    den = cmkit.load_teacher(folder)
    assert isinstance(den, cmkit.DiffusersDenoiser) and den.prediction_type == "epsilon"
    rows = [json.loads(r) for r in (digits_runs / "teacher" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_image_cd_student_and_schedule(digits_runs):
    cm = cmkit.ConsistencyModel.from_pretrained(digits_runs / "cd" / "model")
    assert cm.sample_shape == (1, 8, 8)
    assert isinstance(cm.backbone, type(cmkit.load_teacher(digits_runs / "teacher" / "model").unet))
    assert 2 in cm.default_sigmas and cm.default_sigmas[2][0] == cm.sigma_max
    x = cmkit.sample(cm, 5, steps=2)
    assert x.shape == (5, 1, 8, 8) and torch.isfinite(x).all()


def test_sample_cli_writes_png(digits_runs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "-m", "cmkit", "sample", str(digits_runs / "cd" / "model"), "--num", "9",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    im = Image.open(out)
    assert im.size == (3 * 8 + 4, 3 * 8 + 4)


def test_classifier_and_image_metrics():
    data = load_dataset("digits")
    clf, info = train_classifier(data, steps=300, progress=False)
    assert info["test_accuracy"] > 0.85
    score = image_scorer(clf, data.test)
    real = score(data.train[:297])
    noise = score(torch.rand(297, 1, 8, 8) * 2 - 1)
    assert real["fd"] < noise["fd"] / 5
    assert real["recognised"] > noise["recognised"]
    x = torch.rand(297, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        top = clf.head(clf.features(x)).softmax(1).max(1).values
    got = score(x)
    assert got["confidence"] == pytest.approx(top.mean().item(), rel=1e-6)
    assert got["recognised"] == pytest.approx((top >= 0.5).double().mean().item())


def test_fashion_mnist_missing_names_apt(tmp_path):
    from cmkit.data import load_fashion_mnist

    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_image_folder_with_classes_and_flips(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = load_dataset(path=str(tmp_path))
    assert d.train.shape[1:] == (3, 6, 6) and d.num_classes == 2
    assert d.train.min() >= -1 and d.train.max() <= 1
    torch.manual_seed(0)
    x, cond = d.batches(conditional=True, hflip=True)(64, "cpu")
    assert cond["class_labels"].shape == (64,)
    flipped = sum(any(torch.equal(xi, t.flip(-1)) and not torch.equal(xi, t) for t in d.train) for xi in x)
    assert 10 < flipped < 54


def test_edit_cli_inpaint_superres_and_errors(digits_runs, tmp_path):
    model = str(digits_runs / "cd" / "model")
    x = load_dataset("digits").test[:4].numpy()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "low.npy", torch.nn.functional.avg_pool2d(torch.from_numpy(x), 2).numpy())

    def run(*args):
        return cmkit_forked("edit", *args)

    p = run("inpaint", model, "--input", tmp_path / "x.npy", "--mask-kind", "left-half", "--out", tmp_path / "o.npy",
            "--figure", tmp_path / "fig.png", "--reference", tmp_path / "x.npy")
    assert p.returncode == 0, p.stderr
    out = np.load(tmp_path / "o.npy")
    assert np.array_equal(out[..., :4], x[..., :4]) and (tmp_path / "fig.png").is_file()
    p = run("superres", model, "--input", tmp_path / "low.npy", "--factor", "2", "--out", tmp_path / "s.npy")
    assert p.returncode == 0, p.stderr
    up = torch.from_numpy(np.load(tmp_path / "s.npy"))
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(up, 2), torch.from_numpy(np.load(tmp_path / "low.npy")),
                               rtol=0, atol=1e-5)
    p = run("colorize", model, "--input", tmp_path / "x.npy")
    assert p.returncode != 0 and "RGB model" in p.stderr and "Traceback" not in p.stderr
    p = run("inpaint", model)
    assert p.returncode != 0 and "needs --input" in p.stderr


@pytest.mark.parametrize("name", ["digits-ddpm", "digits-edm"])
def test_shipped_teachers_load_and_denoise_held_out_digits(name):
    """Each shipped teacher loads offline by name and is a trained denoiser: at sigma = 0.3 its x0 estimate of a
    held-out digit is far closer to the digit than the noisy input is."""
    den = cmkit.load_teacher(f"cmkit:{name}")
    assert den.sample_shape == (1, 8, 8)
    x = load_dataset("digits").test[:64]
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (den.eval()(noisy, 0.3) - x).pow(2).mean()
    assert err < 0.25 * (noisy - x).pow(2).mean()


def test_outputs_are_written_to_a_temporary_name_then_renamed(tmp_path, monkeypatch):
    """Two writers of one --out file never leave a mix of both: the bytes go to a temporary file beside it, which
    is renamed over the destination only once complete (an earlier file stays whole until then)."""
    import numpy as np

    from cmkit.data import imagefiles

    out = tmp_path / "x.npy"
    imagefiles.save_images(torch.zeros(2, 3), out)
    seen = []
    real = imagefiles._save

    def spy(x, path, suffix):
        seen.append(Path(path))
        assert np.load(out).sum() == 0  # the old file is untouched while the new one is written
        real(x, path, suffix)

    monkeypatch.setattr(imagefiles, "_save", spy)
    imagefiles.save_images(torch.ones(2, 3), out)
    assert seen and seen[0] != out and seen[0].parent == out.parent and not seen[0].exists()
    assert np.load(out).sum() == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]
