"""Issue 20 on the latent text-to-image stack and the recipes: items 2 (no file of a model folder is executed or
unpickled), 4 (LoRA files, bases that changed, latent / classifier caches, recipe values), 4/6 (LCM sampling in
``cmkit generate``), 5 (file modes), 7 (refused before ``--out`` is written) and 8 (the README's Python API after a
bare ``import cmkit``).

Commands run in this process (``cmkit.cli.commands.main``) on tiny random pipelines; nothing trains for more than a
few steps."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cmkit.cli.commands import main
from cmkit.latent.families.unet import LatentDenoiser, tiny_pipeline
from cmkit.latent.lcm import LatentConsistencyModel, LCMFunction, add_lora, student_unet
from cmkit.latent.students import LORA_FILE

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red bag", "a green boot", "a blue bag", "a red boot"]


def _cli(argv, capsys) -> tuple[int, str]:
    """Run a command; its exit code and the one error line it printed (none: "")."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("cmkit: error")]
    assert len(errors) <= 1, err
    return code, errors[0] if errors else ""


def _perturb(module, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny SD teacher (16x16, captions above), a caption folder, a full LCM and an LCM-LoRA of that teacher."""
    from cmkit import load_teacher

    root = tmp_path_factory.mktemp("latent")
    tiny_pipeline("sd", texts=CAPTIONS, seed=1, image_size=16).save_pretrained(root / "teacher")
    rng = np.random.default_rng(0)
    (root / "captions").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "captions" / f"{i}.png")
        (root / "captions" / f"{i}.txt").write_text(CAPTIONS[i % 4])
    teacher = load_teacher(str(root / "teacher"))
    LatentConsistencyModel(LCMFunction(LatentDenoiser(student_unet(teacher.unet, 8), teacher.scheduler)),
                           teacher, base=str(root / "teacher")).save_pretrained(root / "lcm")
    base = load_teacher(str(root / "teacher"))
    add_lora(base.unet, 2, 2.0, ["to_q", "to_v", "conv1"])
    _perturb(torch.nn.ModuleList([m for n, m in base.unet.named_modules() if n.endswith("lora_B")]))
    LatentConsistencyModel(LCMFunction(base.denoiser), base, lora=True,
                           base=str(root / "teacher")).save_pretrained(root / "lora")
    return root


def _copy(folders, name, tmp_path) -> Path:
    shutil.copytree(folders / name, tmp_path / name)
    return tmp_path / name


def _generate(folder, out, *extra):
    return ["generate", folder, "--prompt", "a red bag", "--num-per-prompt", "1", "--steps", "1", "--out", out,
            *extra]


# --- item 2: nothing in a model folder runs or is unpickled


@pytest.mark.parametrize("part,safe,pickle", [("text_encoder", "model.safetensors", "pytorch_model.bin"),
                                               ("unet", "diffusion_pytorch_model.safetensors",
                                                "diffusion_pytorch_model.bin")])
def test_pickled_weights_are_refused_without_unpickling(part, safe, pickle, folders, tmp_path, capsys, monkeypatch):
    folder = _copy(folders, "teacher", tmp_path)
    torch.save(load_file(folder / part / safe), folder / part / pickle)
    (folder / part / safe).unlink()
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    code, err = _cli(_generate(folder, tmp_path / "x.png"), capsys)
    assert code == 2 and not (tmp_path / "x.png").exists()
    assert f"{part}/{pickle} is a pickle" in err and "never unpickles" in err and "safetensors" in err, err
    assert calls == []


def _plant_custom_tokenizer(folder: Path, tokenizer_class: str) -> Path:
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "AutoTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index))
    cfg_file = folder / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}, tokenizer_class=tokenizer_class)
    cfg_file.write_text(json.dumps(cfg))
    marker = folder.parent / f"ran-{tokenizer_class}"
    (folder / "tokenizer" / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import CLIPTokenizer as EvilTokenizer\n")
    return marker


def test_tokenizer_auto_map_code_never_runs(folders, tmp_path, capsys):
    from cmkit import load_teacher

    # a known class beside the auto_map: loaded as that class, the .py never imported
    plain = _copy(folders, "teacher", tmp_path / "a")
    marker = _plant_custom_tokenizer(plain, "CLIPTokenizer")
    assert type(load_teacher(str(plain)).prompt_encoder.tokenizers[0]).__name__ == "CLIPTokenizer"
    assert not marker.exists()
    # only the custom class: refused in one line, nothing asked, nothing run
    custom = _copy(folders, "teacher", tmp_path / "b")
    marker = _plant_custom_tokenizer(custom, "EvilTokenizer")
    code, err = _cli(_generate(custom, tmp_path / "x.png"), capsys)
    assert code == 2 and "tokenizer/ asks for custom code" in err and "never runs code" in err, err
    assert not marker.exists()


# --- item 4: LoRA files


def _only(prefix_test):
    def damage(folder: Path):
        state = load_file(folder / LORA_FILE)
        save_file({k: v for k, v in state.items() if prefix_test(k)}, folder / LORA_FILE)
    return damage


def _half(folder: Path):
    state = load_file(folder / LORA_FILE)
    keys = sorted(state)
    save_file({k: state[k] for k in keys[: len(keys) // 2]}, folder / LORA_FILE)


def _with_text_encoder(folder: Path):
    state = load_file(folder / LORA_FILE)
    state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 32)
    save_file(state, folder / LORA_FILE)


def _nan(folder: Path):
    state = load_file(folder / LORA_FILE)
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, folder / LORA_FILE)


def _truncated(folder: Path):
    with open(folder / LORA_FILE, "r+b") as f:
        f.truncate(100)


def _meta_without(key):
    def damage(folder: Path):
        meta = json.loads((folder / "cmkit.json").read_text())
        del meta[key]
        (folder / "cmkit.json").write_text(json.dumps(meta))
    return damage


def _base(name):
    def damage(folder: Path):
        meta = json.loads((folder / "cmkit.json").read_text())
        meta["base"] = name
        (folder / "cmkit.json").write_text(json.dumps(meta))
    return damage


LORA_DAMAGE = {
    "only-A": (_only(lambda k: "lora_A" in k), "the file is partial"),
    "only-B": (_only(lambda k: "lora_B" in k), "the file is partial"),
    "half": (_half, "the file is partial"),
    "text-encoder-keys": (_with_text_encoder, "tensors for text_encoder"),
    "nan": (_nan, "hold NaN or inf values"),
    "truncated": (_truncated, "is not a readable safetensors file"),
    "garbage": (lambda f: (f / LORA_FILE).write_bytes(b"not a safetensors file at all" * 10),
                "is not a readable safetensors file"),
    "missing": (lambda f: (f / LORA_FILE).unlink(), "is missing"),
    "no-lora-config": (_meta_without("lora_config"), "lacks lora_config"),
    "pixel-base": (_base("cmkit:digits-ddpm"), "is not a text-to-image teacher"),
}


@pytest.mark.parametrize("case", sorted(LORA_DAMAGE))
def test_damaged_lora_folders_are_refused_in_one_line(case, folders, tmp_path, capsys):
    damage, words = LORA_DAMAGE[case]
    folder = _copy(folders, "lora", tmp_path)
    damage(folder)
    code, err = _cli(_generate(folder, tmp_path / "x.png", "--guidance", "1"), capsys)
    assert code == 2 and words in err and not (tmp_path / "x.png").exists(), err
    assert "SafetensorError" not in err.split("(")[0] and "KeyError" not in err


def test_lora_on_a_teacher_whose_weights_changed_is_refused(folders, tmp_path, capsys):
    from cmkit import load_model, load_teacher

    teacher, lora = _copy(folders, "teacher", tmp_path), _copy(folders, "lora", tmp_path)
    meta = json.loads((lora / "cmkit.json").read_text())
    (lora / "cmkit.json").write_text(json.dumps({**meta, "base": str(teacher)}))
    assert load_model(lora).lora  # the recorded base, unchanged: loads
    changed = load_teacher(str(teacher))
    _perturb(changed.unet, 1e-3)  # same shapes, other weights: a retrained or replaced teacher
    changed.save_pretrained(teacher)
    code, err = _cli(_generate(lora, tmp_path / "x.png", "--guidance", "1"), capsys)
    assert code == 2 and "has changed since the LCM-LoRA was trained" in err and "base=" in err, err
    # a base the caller chooses on purpose is taken, with a note
    model = LatentConsistencyModel.from_pretrained(lora, base=load_teacher(str(teacher)))
    assert model.lora and "a base other than the one it was trained on" in capsys.readouterr().err


# --- item 4/6: LCM sampling


def test_lcm_sampling_refuses_what_it_would_ignore(folders, tmp_path, capsys):
    from cmkit import load_model, load_teacher
    from cmkit.sampling.text2image import lcm_sample

    code, err = _cli(_generate(folders / "lcm", tmp_path / "x.png", "--steps", "51"), capsys)
    assert code == 2 and "more than this LCM's schedule of 50 timesteps (num_ddim_timesteps" in err, err
    code, err = _cli(_generate(folders / "lcm", tmp_path / "x.png", "--negative-prompt", "blurry"), capsys)
    assert code == 2 and "takes guidance through its embedding and would ignore the negative prompt" in err, err
    code, err = _cli(_generate(folders / "lora", tmp_path / "x.png", "--guidance", "1", "--negative-prompt", "x"),
                     capsys)
    assert code == 2 and "ignore the negative prompt" in err, err
    assert not (tmp_path / "x.png").exists()
    lcm, lora = load_model(folders / "lcm"), load_model(folders / "lora")
    with pytest.raises(ValueError, match="not a solver"):
        lcm_sample(lcm, ["a red bag"], 1, solver="heun")
    with pytest.raises(ValueError, match="samples a latent consistency model"):
        lcm_sample(load_teacher(str(folders / "teacher")), ["a red bag"], 1)
    with pytest.raises(ValueError, match="finite number >= 1"):
        lcm_sample(lcm, ["a red bag"], 1, guidance_scale=float("nan"))
    # an LCM-LoRA folds guidance in: by default it samples unguided, one pass a step
    z = torch.randn(1, *lora.sample_shape, generator=torch.Generator().manual_seed(0))
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    x, passes = lcm_sample(lora, ["a red bag"], 2, latents=z, generator=gen(), output="latent", return_nfe=True)
    assert passes == 2
    assert torch.equal(x, lcm_sample(lora, ["a red bag"], 2, 1.0, latents=z, generator=gen(), output="latent"))
    # a full LCM takes its guidance through the embedding, by default at 4
    x = lcm_sample(lcm, ["a red bag"], 1, latents=z, output="latent")
    assert torch.equal(x, lcm_sample(lcm, ["a red bag"], 1, 4.0, latents=z, output="latent"))


# --- item 4: the latent cache and the classifier cache


def _notes(err: str) -> list[str]:
    """The lines cmkit wrote to stderr (libraries' progress bars and the cache's "encoding N shards" aside)."""
    return [line for line in err.splitlines() if line.startswith("cmkit:") and "latent cache: encoding" not in line]


def _encode(teacher, images, captions):
    from cmkit.data.latent_cache import encode_set

    return encode_set(teacher.vae, teacher.prompt_encoder, images, captions, progress=False)


def test_latent_cache_that_does_not_match_its_key_or_is_truncated_is_rebuilt(folders, tmp_path, monkeypatch,
                                                                             capsys):
    from cmkit import load_teacher
    from cmkit.data.latent_cache import cache_root

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    teacher = load_teacher(str(folders / "teacher"))
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(4, 3, 16, 16, generator=g) * 2 - 1 for _ in range(2))
    want_a, want_b = _encode(teacher, a, CAPTIONS), _encode(teacher, b, CAPTIONS[:2] * 2)
    files = sorted(cache_root().glob("*.safetensors"))
    assert len(files) == 2 and _notes(capsys.readouterr().err) == []
    # swap the two files: each read finds another key inside, says so, and encodes again
    tmp = files[0].with_suffix(".swap")
    os.replace(files[0], tmp), os.replace(files[1], files[0]), os.replace(tmp, files[1])
    got = _encode(teacher, a, CAPTIONS)
    err = _notes(capsys.readouterr().err)
    assert len(err) == 1 and "holds the key" in err[0] and "encoding it again" in err[0], err
    assert torch.equal(got.mean, want_a.mean) and got.captions == want_a.captions
    assert torch.equal(_encode(teacher, b, CAPTIONS[:2] * 2).mean, want_b.mean)
    capsys.readouterr()
    # a truncated file: one line, encoded again, and the file is whole afterwards
    for f in cache_root().glob("*.safetensors"):
        with open(f, "r+b") as h:
            h.truncate(64)
    assert torch.equal(_encode(teacher, a, CAPTIONS).mean, want_a.mean)
    err = _notes(capsys.readouterr().err)
    assert len(err) == 1 and "is unreadable (" in err[0] and "encoding it again" in err[0], err
    assert torch.equal(_encode(teacher, a, CAPTIONS).mean, want_a.mean) and _notes(capsys.readouterr().err) == []


def test_a_killed_cache_write_leaves_no_temporary_file(folders, tmp_path, monkeypatch):
    env = {**os.environ, "CMKIT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = textwrap.dedent(f"""
        import os, signal, torch
        import cmkit.data.latent_cache as lc
        from cmkit import load_teacher
        def killed(tensors, path, metadata=None):
            open(path, "wb").write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        lc.save_file = killed
        t = load_teacher({str(folders / "teacher")!r})
        lc.encode_set(t.vae, t.prompt_encoder, torch.zeros(2, 3, 16, 16), ["a red bag"] * 2, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    root = tmp_path / "cache" / "latents"
    assert [p.name for p in root.iterdir() if p.name.endswith(".tmp")]  # what the kill left
    from cmkit import load_teacher

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    _encode(load_teacher(str(folders / "teacher")), torch.zeros(2, 3, 16, 16), ["a green boot"] * 2)
    assert [p.name for p in root.iterdir() if p.name.endswith(".tmp")] == []
    assert len(list(root.glob("*.safetensors"))) == 1


def test_truncated_classifier_cache_is_trained_again(tmp_path, monkeypatch, capsys):
    import cmkit.eval.classifier as clf
    from cmkit.data import Dataset

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    quick = clf.train_classifier
    monkeypatch.setattr(clf, "train_classifier", lambda data, progress=True: quick(data, steps=3, progress=False))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1, torch.arange(20) % 4
    data = Dataset("toy", x[:16], x[16:], y[:16], y[16:], 4)
    clf.load_or_train_classifier(data, progress=False)
    (wfile,) = clf.cache_dir().glob("*.safetensors")
    with open(wfile, "r+b") as f:
        f.truncate(50)
    capsys.readouterr()
    net, info = clf.load_or_train_classifier(data, progress=False)
    err = _notes(capsys.readouterr().err)
    assert len(err) == 1 and "classifier cache" in err[0] and "training it again" in err[0], err
    assert info["steps"] == 3 and load_file(wfile)  # whole again
    clf.load_or_train_classifier(data, progress=False)
    assert _notes(capsys.readouterr().err) == []


# --- item 4: recipe values refused before anything runs


def _distill(folders, out, kind, *sets):
    recipe = "tiny-t2i-lcm" if kind == "lcm" else "tiny-t2i-lcm-lora"
    base = [f'data.path="{folders / "captions"}"', "train.batch_size=4", "train.steps=2", "train.log_every=1",
            "train.checkpoint_every=2", "eval.schedule_max_steps=0"]
    base += ["objective.w_embedding_dim=8", "train.ema_rates=[]"] if kind == "lcm" else \
        ["objective.lora_rank=2", "objective.lora_alpha=2.0", 'objective.lora_targets=["to_q","to_v","conv1"]']
    return ["distill", recipe, "--teacher", folders / "teacher", "--out", out, "--no-progress",
            *[f"--set={s}" for s in (*base, *sets)]]


RECIPE_VALUES = [
    ("lcm", "objective.timestep_scaling=0", "objective.timestep_scaling must be a finite number > 0"),
    ("lcm", "objective.timestep_scaling=nan", "objective.timestep_scaling must be a finite number, got nan"),
    ("lcm", "objective.target_ema=1.0", "objective.target_ema must lie in [0, 1)"),
    ("lcm", "objective.target_ema=-0.5", "objective.target_ema must lie in [0, 1)"),
    ("lcm", "objective.huber_c=0", "objective.huber_c must be a finite number > 0"),
    ("lcm_lora", "objective.huber_c=nan", "objective.huber_c must be a finite number, got nan"),
    ("lcm", "objective.num_ddim_timesteps=0", "objective.num_ddim_timesteps must be >= 1"),
]


@pytest.mark.parametrize("kind,setting,words", RECIPE_VALUES)
def test_lcm_recipe_values_are_refused_before_anything_runs(kind, setting, words, folders, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    code, err = _cli(_distill(folders, tmp_path / "out", kind, setting), capsys)
    assert code == 2 and words in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # nothing encoded or written


@pytest.mark.parametrize("recipe,setting,words", [
    ("s_curve-sct", "objective.tangent_norm_c=nan", "objective.tangent_norm_c must be a finite number, got nan"),
    ("s_curve-sct", "objective.p_mean=nan", "objective.p_mean must be a finite number, got nan"),
    ("s_curve-meanflow", "objective.sigma_max=0", "objective.sigma_max must be a finite number > 0"),
    ("s_curve-meanflow", "objective.sigma_max=-1", "objective.sigma_max must be a finite number > 0"),
    ("s_curve-ict", "objective.huber_c=0", "objective.huber_c must be a finite number > 0"),
])
def test_continuous_time_recipe_values_are_refused(recipe, setting, words, tmp_path, capsys):
    small = ["model.hidden=16", "model.depth=1", "train.steps=2", "train.batch_size=8", "train.log_every=1",
             "train.checkpoint_every=2", "eval.schedule_max_steps=0"]  # short even where the value is let through
    code, err = _cli(["train", recipe, "--out", tmp_path / "out", "--no-progress", "--set", setting,
                      *[f"--set={s}" for s in small]], capsys)
    assert code == 2 and words in err, err
    assert not (tmp_path / "out").exists()


# --- item 7: refused before --out is written, so the corrected command runs there


def test_network_that_does_not_fit_the_objective_is_refused_before_writing(tmp_path, capsys):
    small = ["model.hidden=16", "model.depth=1", "train.steps=2", "train.batch_size=8", "train.checkpoint_every=2",
             "train.log_every=1", "eval.schedule_max_steps=0"]
    out = tmp_path / "run"
    args = ["train", "s_curve-sct", "--out", out, "--no-progress", *[f"--set={s}" for s in small]]
    code, err = _cli([*args, "--set=model.times=2"], capsys)
    assert code == 2 and "fails on its first training step" in err and "nothing was written" in err, err
    assert not (out / "recipe.json").exists() and not (out / "checkpoints").exists()
    code, err = _cli(args, capsys)
    assert code == 0 and err == "" and (out / "model" / "cmkit.json").is_file()


# --- items 4 and 5: an LCM-LoRA run resumed on a changed teacher; modes of what runs and saves write


def _modes(folder: Path) -> set:
    return {(p.is_dir(), p.stat().st_mode & 0o777) for p in [folder, *folder.rglob("*")] if p.name != ".cmkit.lock"}


def test_resume_on_a_changed_teacher_is_refused_and_files_follow_the_umask(folders, tmp_path, monkeypatch, capsys):
    from cmkit import load_teacher

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    teacher = _copy(folders, "teacher", tmp_path)  # the run's own copy: the module's teacher stays as it is
    args = _distill(folders, tmp_path / "run", "lcm_lora")
    args[args.index("--teacher") + 1] = teacher
    old = os.umask(0o022)
    try:
        code, err = _cli(args, capsys)
        assert code == 0, err
        tiny_pipeline("sd", seed=2, image_size=16).save_pretrained(tmp_path / "saved")
    finally:
        os.umask(old)
    for folder in (tmp_path / "run" / "model", tmp_path / "run" / "checkpoints", tmp_path / "cache",
                   tmp_path / "saved"):
        assert _modes(folder) <= {(False, 0o644), (True, 0o755)}, (folder, _modes(folder))
    assert any(tmp_path.joinpath("cache").rglob("*.safetensors"))
    # the model records the hash of the base it sits on, the same one the run's recipe.json keeps
    recorded = json.loads((tmp_path / "run" / "model" / "cmkit.json").read_text())["base_hash"]
    assert recorded and recorded == json.loads((tmp_path / "run" / "recipe.json").read_text())["teacher_hash"]
    # the teacher changes (same shapes); going on with the run is refused, the run is untouched
    changed = load_teacher(str(teacher))
    _perturb(changed.unet, 1e-3)
    changed.save_pretrained(teacher)
    before = (tmp_path / "run" / "recipe.json").read_text()
    args[args.index("--set=train.steps=2")] = "--set=train.steps=4"
    code, err = _cli(args, capsys)
    assert code == 2 and "whose weights have changed since it started" in err and "--restart" in err, err
    assert (tmp_path / "run" / "recipe.json").read_text() == before


# --- item 8: the public API as the README shows it, after a bare `import cmkit`


def _readme_blocks() -> tuple[str, str]:
    text = (ROOT / "README.md").read_text()
    tour = text[text.index("## A five-minute tour of the Python API"):]
    tour = tour[tour.index("```python") + 9: tour.index("```", tour.index("```python") + 9)]
    t2i = text[text.index("## Text-to-image: latent teachers"):]
    t2i = t2i[t2i.index("```python") + 9: t2i.index("```", t2i.index("```python") + 9)]
    return tour, t2i


def _tour_folders(root: Path) -> None:
    """The model folders the tours name, small and untrained (the tours show calls, not results)."""
    from cmkit import load_teacher
    from cmkit.models import ConsistencyModel, EDMDenoiser, MeanFlowModel, TimeMLP, TrigFlowConsistencyModel

    EDMDenoiser(TimeMLP(dim=2, hidden=32, depth=1)).save_pretrained(root / "quickstart-out/teacher/model")
    ConsistencyModel(TimeMLP(dim=2, hidden=32, depth=1)).save_pretrained(root / "quickstart-out/cd/model")
    TrigFlowConsistencyModel(TimeMLP(dim=2, hidden=32, depth=1)).save_pretrained(root / "runs/s_curve-sct/model")
    MeanFlowModel(TimeMLP(dim=2, hidden=32, depth=1, second_time=True)).save_pretrained(
        root / "runs/s_curve-meanflow/model")
    t = load_teacher("cmkit:tiny-t2i")
    LatentConsistencyModel(LCMFunction(LatentDenoiser(student_unet(t.unet, 8), t.scheduler)), t,
                           base="cmkit:tiny-t2i").save_pretrained(root / "runs/tiny-t2i-lcm/model")


def test_readme_python_tours_run_after_a_bare_import(tmp_path):
    tour, t2i = _readme_blocks()
    _tour_folders(tmp_path)
    names = sorted(set(re.findall(r"\bcmkit\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", tour + t2i)))
    assert {"lcm_sample", "load_model", "text_to_image", "ode_solve"} <= {n.split(".")[0] for n in names}
    # the text-to-image snippet uses z and sigmas from the text around it
    prelude = ("teacher = cmkit.load_teacher('cmkit:tiny-t2i')\nsigmas = teacher.grid(4, None)\n"
               "z = torch.randn(1, *teacher.sample_shape) * (1 + sigmas[0] ** 2) ** 0.5\n")
    script = "\n".join([
        "import functools, operator, sys",
        "import torch, cmkit",
        f"missing = [n for n in {names!r} if not hasattr(functools.reduce(getattr, n.split('.')[:-1], cmkit), "
        "n.split('.')[-1])]",
        "assert not missing, f'names the README shows that a bare import cmkit lacks: {missing}'",
        tour, prelude, t2i,
        "assert type(cmkit.load_model('runs/tiny-t2i-lcm/model')).__name__ == 'LatentConsistencyModel'",
        "assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()",
        "print('tours ok')"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "tours ok" in proc.stdout, proc.stderr[-3000:]


def test_load_model_of_an_lcm_after_a_bare_import(folders):
    script = (f"import cmkit\nm = cmkit.load_model({str(folders / 'lcm')!r})\n"
              "print(type(m).__name__, callable(getattr(cmkit, 'lcm_sample', None)))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["LatentConsistencyModel", "True"], proc.stdout
