"""Issue 14, item 5: every bad input of the probe ends in one line on stderr naming the key or file (and the fix), a
non-zero exit, no traceback; memory bombs are refused up front with an estimate; long sampling shows progress.

The command runs in this process (``cmkit.cli.commands.main``); the models are the shipped ``cmkit:digits-cd`` (and
copies of it, damaged on purpose), so nothing here trains for more than a dry run's one step.
"""

import os
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmkit.cli.commands import main
from cmkit.loading import asset_path

CD = "cmkit:digits-cd"


def _image(path: Path, shape) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(0).random(shape) * 255).astype(np.uint8)).save(path)


def _damaged(tmp: Path, name: str, damage) -> str:
    folder = tmp / name
    shutil.copytree(asset_path("digits-cd"), folder)
    damage(folder)
    return str(folder)


def _truncate(file: Path, size: int) -> None:
    with open(file, "r+b") as f:
        f.truncate(size)


def _files(tmp: Path) -> dict:
    """Inputs, written once per test into its own folder; values are what a case's argv refers to."""
    rng = np.random.default_rng(0)
    f = {}
    for name, arr in {"x": np.zeros((2, 1, 8, 8), np.float32),
                      "complex": np.zeros((2, 1, 8, 8), np.complex64) + 1j,
                      "big": np.zeros((2, 1, 16, 16), np.float32),
                      "uint8": (rng.random((2, 1, 8, 8)) * 255).astype(np.uint8),
                      "float255": (rng.random((2, 1, 8, 8)) * 255).astype(np.float32),
                      "rgb": np.zeros((2, 3, 8, 8), np.float32),
                      "empty": np.zeros((0, 1, 8, 8), np.float32),
                      "points_complex": (rng.standard_normal((100, 2)) + 1j).astype(np.complex64)}.items():
        np.save(tmp / f"{name}.npy", arr)
        f[name] = str(tmp / f"{name}.npy")
    (tmp / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    (tmp / "binary.toml").write_bytes(bytes(range(256)))
    f["garbage"], f["binary"] = str(tmp / "garbage.npy"), str(tmp / "binary.toml")
    _image(tmp / "one" / "a.png", (8, 8))
    _image(tmp / "odd" / "a.png", (8, 8))
    _image(tmp / "odd" / "b.png", (9, 7))
    f["one"], f["odd"] = str(tmp / "one"), str(tmp / "odd")
    for suffix in ("npy", "png"):
        (tmp / f"full.{suffix}").symlink_to("/dev/full")
        f[f"full_{suffix}"] = str(tmp / f"full.{suffix}")
    f["bad_json"] = _damaged(tmp, "bad_json", lambda d: (d / "cmkit.json").write_bytes(b"\x00\xffgarbage"))
    f["partial_json"] = _damaged(tmp, "partial_json", lambda d: _truncate(d / "cmkit.json", 100))
    f["list_json"] = _damaged(tmp, "list_json", lambda d: (d / "cmkit.json").write_text("[1, 2]"))
    f["no_keys"] = _damaged(tmp, "no_keys", lambda d: (d / "cmkit.json").write_text('{"kind": "consistency_model"}'))
    f["bad_config"] = _damaged(tmp, "bad_config", lambda d: (d / "config.json").write_text('{"_class_name": "UN'))
    f["partial_weights"] = _damaged(tmp, "partial_weights",
                                    lambda d: _truncate(d / "diffusion_pytorch_model.safetensors", 1000))
    (tmp / "run" ).mkdir()
    (tmp / "run" / "recipe.json").write_text("{garbage")
    f["run"] = str(tmp / "run")
    f["out"] = str(tmp / "out")
    return f


DRY = ["--dry-run", "--set", "train.steps=1"]
# (id, argv with {file} placeholders, what the one line must name)
CASES = [
    ("ema-rate-above-one", ["train", "s_curve-ict", *DRY, "--set", "train.ema_rates=[1.5]"], ["train.ema_rates"]),
    ("hidden-zero", ["train", "s_curve-ict", *DRY, "--set", "model.hidden=0"], ["model.hidden"]),
    ("channels-two", ["train", "digits-ict", *DRY, "--set", "data.channels=2"], ["data.channels", "1", "3"]),
    ("complex-npy-data", ["train", "s_curve-ict", *DRY, "--set", "data.path={points_complex}"],
     ["points_complex.npy", "complex", "np.real"]),
    ("garbage-npy-data", ["train", "s_curve-ict", *DRY, "--set", "data.path={garbage}"], ["garbage.npy"]),
    ("s1-below-s0", ["train", "s_curve-ict", *DRY, "--set", "objective.s0=10", "--set", "objective.s1=2"], ["s0"]),
    ("eval-seeds-empty", ["train", "s_curve-ict", *DRY, "--set", "eval.seeds=[]"], ["eval.seeds"]),
    ("binary-recipe", ["train", "{binary}", *DRY], ["binary.toml", "TOML"]),
    ("one-image-folder", ["train", "digits-ict", *DRY, "--set", "data.path={one}"], ["one", "at least 2"]),
    ("odd-size-folder", ["train", "digits-ict", *DRY, "--set", "data.path={odd}"], ["odd", "data.image_size"]),
    ("batch-size-float", ["train", "s_curve-ict", "--out", "{out}", "--set", "train.batch_size=1e9"],
     ["train.batch_size"]),
    ("batch-size-memory", ["train", "digits-ict", "--out", "{out}", "--set", "train.batch_size=1000000000"],
     ["train.batch_size", "memory", "available"]),
    ("garbage-recipe-json", ["train", "s_curve-ict", "--out", "{run}"], ["recipe.json"]),
    ("edit-16x16-into-8x8", ["edit", "inpaint", CD, "--input", "{big}", "--out", "{out}/o.png"],
     ["big.npy", "(1, 16, 16)", "resize"]),
    ("edit-uint8", ["edit", "inpaint", CD, "--input", "{uint8}", "--out", "{out}/o.png"],
     ["uint8.npy", "127.5"]),
    ("edit-0-255-floats", ["edit", "sdedit", CD, "--input", "{float255}", "--out", "{out}/o.png"],
     ["float255.npy", "127.5"]),
    ("edit-3-channels-into-1", ["edit", "inpaint", CD, "--input", "{rgb}", "--out", "{out}/o.png"],
     ["rgb.npy", "(3, 8, 8)"]),
    ("edit-empty-batch", ["edit", "colorize", CD, "--input", "{empty}", "--out", "{out}/o.png"], ["empty.npy"]),
    ("edit-complex-npy", ["edit", "inpaint", CD, "--input", "{complex}", "--out", "{out}/o.png"],
     ["complex.npy", "complex"]),
    ("edit-garbage-npy", ["edit", "inpaint", CD, "--input", "{garbage}", "--out", "{out}/o.png"], ["garbage.npy"]),
    ("interpolate-num-zero", ["edit", "interpolate", CD, "--num", "0", "--out", "{out}/o.png"], ["--num"]),
    ("edit-full-disk", ["edit", "denoise", CD, "--input", "{x}", "--out", "{full_png}"], ["full.png", "space"]),
    ("sample-full-disk-npy", ["sample", CD, "--num", "2", "--out", "{full_npy}"], ["full.npy", "space"]),
    ("sample-full-disk-png", ["sample", CD, "--num", "2", "--out", "{full_png}"], ["full.png", "space"]),
    ("sample-no-suffix", ["sample", CD, "--num", "2", "--out", "/dev/full"], ["--out", ".npy"]),
    ("sample-memory", ["sample", CD, "--num", "1000000000", "--out", "{out}/s.npy"], ["--num", "memory"]),
    ("sample-steps-memory", ["sample", CD, "--num", "1000", "--steps", "1000000", "--out", "{out}/s.npy"],
     ["--steps", "memory"]),
    ("cmkit-json-garbage", ["sample", "{bad_json}", "--num", "2", "--out", "{out}/s.npy"], ["cmkit.json", "JSON"]),
    ("cmkit-json-partial", ["sample", "{partial_json}", "--num", "2", "--out", "{out}/s.npy"], ["cmkit.json"]),
    ("cmkit-json-list", ["sample", "{list_json}", "--num", "2", "--out", "{out}/s.npy"], ["cmkit.json"]),
    ("cmkit-json-no-keys", ["sample", "{no_keys}", "--num", "2", "--out", "{out}/s.npy"], ["cmkit.json", "backbone"]),
    ("config-json-partial", ["sample", "{bad_config}", "--num", "2", "--out", "{out}/s.npy"], ["bad_config"]),
    ("weights-partial", ["edit", "inpaint", "{partial_weights}", "--input", "{x}", "--out", "{out}/o.png"],
     ["partial_weights", "safetensors"]),
]


@pytest.fixture
def memory_guard():
    """An address-space limit a few GiB above what the process holds, so that a regression allocates into an error
    here instead of waking the kernel's OOM killer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (8 << 30), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize("argv,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line(argv, needles, tmp_path, capsys, monkeypatch, memory_guard):
    monkeypatch.delenv("CMKIT_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    if any("full_" in a for a in argv) and not Path("/dev/full").is_char_device():
        pytest.skip("this machine has no /dev/full device to stand in for a full disk")
    files = _files(tmp_path)
    rc = main([a.format(**files) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    if "{out}" in argv:  # refused before anything is written to --out
        assert not os.path.exists(files["out"]) or not any(Path(files["out"]).iterdir())


def test_long_sampling_shows_progress(tmp_path, capsys, monkeypatch):
    import cmkit.sampling.samplers as samplers

    assert samplers.PROGRESS_STEPS == 100  # chains of 100 re-noising steps and more show a bar; here from 5 on
    monkeypatch.setattr(samplers, "PROGRESS_STEPS", 5)
    assert main(["sample", CD, "--num", "1", "--steps", "4", "--out", str(tmp_path / "a.npy")]) == 0
    assert "step" not in capsys.readouterr().err
    assert main(["sample", CD, "--num", "1", "--steps", "8", "--out", str(tmp_path / "b.npy")]) == 0
    err = capsys.readouterr().err
    assert "steps:" in err and "/7 [" in err, err  # a tqdm bar over the 7 re-noising steps
