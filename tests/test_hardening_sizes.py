"""Issue 31, "sizes never checked": the memory estimate covers the networks a run builds (counted on torch's meta
device from their configs, before anything is allocated), not the batch alone, and the refusal names what is too big
and the key or file to change. Available memory is faked small (``cmkit.core.memory.available_bytes``), so each case
is refused at a size that costs little even where the check is missing."""

import json
import shutil

import pytest
from conftest import caption_data

import cmkit
from cmkit.cli.commands import main
from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe
from cmkit.loading import asset_path

MiB = 2**20


@pytest.fixture
def avail(monkeypatch):
    """``avail(n)``: the memory cmkit sees is ``n`` bytes from now on."""
    import cmkit.core.memory as memory

    def set_to(n: int) -> None:
        monkeypatch.setattr(memory, "available_bytes", lambda device=None: n)
    return set_to


def _refused(argv, capsys, *words) -> str:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def test_train_teacher_refuses_an_mlp_too_wide_before_building_it(tmp_path, capsys, avail):
    avail(256 * MiB)
    err = _refused(["train-teacher", "quickstart-teacher", "--out", str(tmp_path / "a"), "--no-progress",
                    "--set", "model.hidden=4096", "--set", "model.depth=4"], capsys, "model.hidden", "memory")
    assert "train.batch_size" not in err
    # the absurd sizes of the report: nothing allocated (they would need terabytes)
    _refused(["train-teacher", "quickstart-teacher", "--out", str(tmp_path / "b"), "--no-progress",
              "--set", "model.hidden=100000", "--set", "model.depth=50"], capsys, "model.hidden", "model.depth")
    assert not (tmp_path / "b" / "model").exists()


def test_train_teacher_refuses_a_unet_with_huge_channels(tmp_path, capsys, avail):
    avail(64 * MiB)
    err = _refused(["train-teacher", "digits-teacher", "--out", str(tmp_path / "a"), "--no-progress",
                    "--set", "model.base=256"], capsys, "model.base", "memory")
    assert "train.batch_size" not in err
    _refused(["train-teacher", "digits-teacher", "--out", str(tmp_path / "b"), "--no-progress",
              "--set", "model.base=100000"], capsys, "model.base")


def test_distill_counts_the_students_copy_of_the_teacher(tmp_path, capsys, avail):
    avail(6 * MiB)  # the teacher (3 MB) loads; its trained copy (weights, gradients, Adam: 11 MB) does not fit
    err = _refused(["distill", "digits-cd", "--out", str(tmp_path / "a"), "--no-progress"], capsys, "teacher",
                   "memory")
    assert "train.batch_size" not in err
    # a teacher folder whose config.json is absurd is refused before its weights are read
    teacher = tmp_path / "teacher"
    shutil.copytree(asset_path("digits-edm"), teacher)
    cfg = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**cfg, "block_out_channels": [100000, 100000]}))
    _refused(["distill", "digits-cd", "--teacher", str(teacher), "--out", str(tmp_path / "b"), "--no-progress"],
             capsys, "config.json", "block_out_channels")


def test_lora_rank_is_named_when_the_adapter_is_too_big(tmp_path, avail):
    recipe = load_recipe("tiny-t2i-lcm-lora", ["train.steps=2", "train.batch_size=4", "objective.lora_rank=5000"])
    avail(32 * MiB)
    with pytest.raises(ValueError) as e:
        run_job("distill", recipe, tmp_path / "run", progress=False, data=caption_data(32))
    assert "objective.lora_rank" in str(e.value) and "train.batch_size" not in str(e.value)
    assert not (tmp_path / "run" / "model").exists()


def _widened(tmp_path, channels) -> str:
    folder = tmp_path / "t2i"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(asset_path("tiny-t2i"), folder)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = channels
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_generate_refuses_a_folder_whose_config_is_too_big_before_loading(tmp_path, capsys, avail):
    avail(64 * MiB)
    out = str(tmp_path / "g.npy")
    _refused(["generate", _widened(tmp_path, [192, 384]), "--prompt", "a red bag", "--out", out], capsys,
             "unet/config.json", "memory")
    _refused(["generate", _widened(tmp_path, [100000, 100000]), "--prompt", "a red bag", "--out", out], capsys,
             "unet/config.json", "block_out_channels")


def test_train_teacher_counts_each_output_ema(tmp_path, capsys, avail):
    # an MLP of 3.46 M parameters: trained (weights, gradients, Adam) 55 MB, which fits in 84 MB with a batch of 2;
    # its four output EMAs (another 55 MB) do not
    avail(24 * 3_455_490)
    err = _refused(["train-teacher", "quickstart-teacher", "--out", str(tmp_path / "a"), "--no-progress",
                    "--set", "model.hidden=512", "--set", "model.depth=4", "--set", "train.batch_size=2",
                    "--set", "train.steps=1", "--set", "train.ema_rates=[0.9, 0.99, 0.999, 0.9999]"],
                   capsys, "model.hidden", "4 EMA copies (train.ema_rates)", "memory")
    assert "train.batch_size" not in err
    assert not (tmp_path / "a" / "model").exists()


def test_distill_counts_the_target_network(tmp_path, capsys, avail):
    # digits-ddpm's UNet, 0.70 M parameters: the trained student (10.7 MiB) fits in 12.8 MiB, its target network
    # (objective.target_mu > 0: 2.7 MiB more) does not; refused before the student is built, naming the target
    # (where only the student was counted, the build went ahead and the batch check blamed train.batch_size)
    avail(int(12.8 * MiB))
    common = ["--no-progress", "--set", "train.ema_rates=[]", "--set", "train.batch_size=2", "--set", "train.steps=1"]
    err = _refused(["distill", "digits-cd", "--out", str(tmp_path / "a"), *common], capsys,
                   "student", "target network (objective.target_mu)", "memory")
    assert "train.batch_size" not in err and "EMA" not in err


def test_rcm_counts_the_fake_score(tmp_path, avail):
    """rCM with a LoRA student: the adapter is small, but the fake score is a trained float32 copy of the teacher's
    network (tiny-sd3's 3.5 M parameters: 53 MiB with its gradients and Adam moments)."""
    recipe = load_recipe("tiny-sd3-rcm-lora", ["train.steps=1", "train.batch_size=2"])
    avail(32 * MiB)
    with pytest.raises(ValueError) as e:
        run_job("distill", recipe, tmp_path / "run", progress=False, data=caption_data(32))
    msg = str(e.value)
    assert "fake score (objective.kind='latent_rcm_lora')" in msg and "LoRA adapter" in msg, msg
    assert "latent_scd_lora" in msg and "train.batch_size" not in msg, msg
    assert not (tmp_path / "run" / "model").exists()


def test_under_fsdp_each_process_counts_its_share(tmp_path, avail, monkeypatch):
    """rCM's fake score refused above is sharded over the processes under train.fsdp: with 4 of them each holds a
    quarter, which fits (it was refused as if one process held it all)."""
    from cmkit.cli import jobs

    recipe = load_recipe("tiny-sd3-rcm-lora", ["train.steps=1", "train.batch_size=2"])
    teacher = cmkit.load_teacher("cmkit:tiny-sd3")
    avail(32 * MiB)
    with pytest.raises(ValueError, match="fake score"):
        jobs.check_student_fits(recipe, teacher, "cmkit:tiny-sd3", None)
    recipe.train.fsdp = True
    monkeypatch.setattr(jobs, "rank_world", lambda: (0, 4))
    jobs.check_student_fits(recipe, teacher, "cmkit:tiny-sd3", None)  # 53 MiB / 4 of fake score, and the adapter
    avail(8 * MiB)
    with pytest.raises(ValueError, match=r"fake score \(objective.kind='latent_rcm_lora'\) / 4 processes"):
        jobs.check_student_fits(recipe, teacher, "cmkit:tiny-sd3", None)


def _fake_hub_cache(root, repo: str, files: dict) -> None:
    """``files`` (path in the repository -> text) laid out as huggingface_hub's cache holds a download of ``repo``:
    ``models--ORG--NAME/snapshots/REV/...`` and ``refs/main`` naming REV (configs only: no weights)."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / "hub" / f"models--{repo.replace('/', '--')}"
    for name, text in files.items():
        f = repo_dir / "snapshots" / rev / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(rev)


def test_a_hub_teacher_is_sized_from_its_cached_config_before_its_weights(tmp_path, capsys, avail, monkeypatch):
    import huggingface_hub.constants

    ddpm = asset_path("digits-ddpm")
    unet = json.loads((ddpm / "unet" / "config.json").read_text())
    files = {"model_index.json": (ddpm / "model_index.json").read_text(),
             "scheduler/scheduler_config.json": (ddpm / "scheduler" / "scheduler_config.json").read_text(),
             "unet/config.json": json.dumps({**unet, "block_out_channels": [100000, 100000]})}
    _fake_hub_cache(tmp_path / "hf", "someorg/huge-ddpm", files)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    avail(64 * MiB)
    err = _refused(["distill", "digits-cd", "--teacher", "someorg/huge-ddpm", "--out", str(tmp_path / "a"),
                    "--no-progress"], capsys, "someorg/huge-ddpm", "unet/config.json", "block_out_channels", "memory")
    assert "could not load" not in err
