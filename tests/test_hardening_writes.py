"""Writes that must not lose work, destroy files or leave litter (issue 31): 8-bit Adam's state checkpointed and
resumed to identical weights; a model folder holding files cmkit did not write refused; leftovers of killed writes
cleaned on the next write to the same place; a full disk named in one line with what is intact."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import lcm_lora_folders
from safetensors import SafetensorError
from safetensors.torch import load_file

from cmkit.cli.commands import main
from cmkit.core import files
from cmkit.latent.families.unet import tiny_pipeline
from cmkit.latent.lcm import LatentConsistencyModel, LCMFunction, add_lora
from cmkit.training.checkpoints import load_checkpoint, save_checkpoint
from cmkit.training.settings import TrainSettings
from cmkit.training.trainer import make_optimizer

TINY = ["model.hidden=64", "model.depth=1", "train.batch_size=16", "train.log_every=5", "train.ema_rates=[0.9]",
        "train.warmup=0", "eval.num_samples=100"]
FULL = "No space left on device"


def _argv(out, steps, *extra):
    sets = [a for kv in [*TINY, f"train.steps={steps}", *extra] for a in ("--set", kv)]
    return ["train-teacher", "quickstart-teacher", "--out", str(out), "--no-progress", *sets]


def _weights(folder: Path) -> dict:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


# --- a run that loses its work: every optimiser cmkit offers is checkpointed and resumes exactly

@pytest.mark.parametrize("kind", ["adam", "radam", "adamw", "adamw8bit"])
def test_every_optimiser_state_round_trips_through_a_checkpoint(kind, tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 64))  # 8-bit Adam quantises both
    opt = make_optimizer(net.parameters(), TrainSettings(optimizer=kind, lr=1e-2))
    for _ in range(3):
        net(torch.randn(4, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(tmp_path, 3, {"model": net}, opt, {})
    twin = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 64))
    twin_opt = make_optimizer(twin.parameters(), TrainSettings(optimizer=kind, lr=1e-2))
    load_checkpoint(tmp_path / "step-00000003", {"model": twin}, twin_opt)
    x = torch.randn(4, 64)
    for model, o in ((net, opt), (twin, twin_opt)):
        model(x).square().mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), twin.state_dict().values(), strict=True))


def test_an_adamw8bit_run_checkpoints_and_resumes_to_identical_weights(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    opt = ['train.optimizer="adamw8bit"', "train.checkpoint_every=6"]
    assert main(_argv(straight, 12, *opt)) == 0
    assert main(_argv(split, 6, *opt)) == 0, capsys.readouterr().err
    assert (split / "checkpoints" / "latest").read_text() == "step-00000006"
    state = load_file(split / "checkpoints" / "step-00000006" / "optimizer.safetensors")
    assert any(v.dtype == torch.uint8 for v in state.values())  # the 8-bit moments themselves were saved
    assert main(_argv(split, 12, *opt)) == 0
    a, b = _weights(straight / "model"), _weights(split / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_adamw8bit_lcm_lora_run_resumes_to_identical_adapter_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    lcm_lora_folders(tmp_path, 4)

    def argv(out, steps):
        sets = [f'data.path="{tmp_path / "data"}"', f'teacher.path="{tmp_path / "teacher"}"', "objective.lora_rank=2",
                "objective.lora_alpha=2.0", 'objective.lora_targets=["to_q","to_v"]', "train.batch_size=4",
                "train.checkpoint_every=1", "train.warmup=0", f"train.steps={steps}", 'train.optimizer="adamw8bit"']
        return ["distill", "tiny-t2i-lcm-lora", "--out", str(out), "--no-progress",
                *[a for kv in sets for a in ("--set", kv)]]

    assert main(argv(tmp_path / "straight", 2)) == 0
    assert main(argv(tmp_path / "split", 1)) == 0
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text() == "step-00000001"
    assert main(argv(tmp_path / "split", 2)) == 0
    a, b = (load_file(tmp_path / run / "model" / "pytorch_lora_weights.safetensors") for run in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- writes that destroy or leave litter

def _lcm_lora():
    pipe = tiny_pipeline("sd", seed=1)
    add_lora(pipe.unet, 4, 4.0, ["to_q", "to_v"])
    return LatentConsistencyModel(LCMFunction(pipe.denoiser), pipe, lora=True)


def test_a_model_folder_holding_files_cmkit_did_not_write_is_refused(tmp_path):
    lcm = _lcm_lora()
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"not cmkit's")
    with pytest.raises(ValueError, match=r"mine.*holiday\.jpg") as e:
        lcm.save_pretrained(folder)
    assert "\n" not in str(e.value)
    assert (folder / "holiday.jpg").read_bytes() == b"not cmkit's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left beside it
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "new", tmp_path / "new"):  # empty, absent, a previous export
        lcm.save_pretrained(target)
        assert (target / "cmkit.json").is_file()
    (tmp_path / "new" / "notes.txt").write_text("mine")  # a previous export, with a file of the user's in it
    with pytest.raises(ValueError, match=r"new.*notes\.txt"):
        lcm.save_pretrained(tmp_path / "new")
    assert (tmp_path / "new" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="holiday"):  # a pixel model folder takes the same check
        from cmkit.models.folder import write_model_folder
        write_model_folder(folder, torch.nn.Linear(1, 1), {})


def test_leftovers_of_a_killed_export_are_cleaned_on_the_next_write(tmp_path):
    old = time.time() - 3600
    stale = [".model.tmp-k1ll3d", "..model.tmp-k1ll3d.tmp-n3st3d", ".model.old-4242"]
    for name in stale:
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("half")
    fresh = tmp_path / ".model.tmp-wr1t1ng"  # another process's write, begun after this one started
    fresh.mkdir()
    (tmp_path / ".model.notes").write_text("the user's")  # not a name cmkit writes
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "cmkit.json").write_text("{}")
    for name in stale:
        os.utime(tmp_path / name, (old, old))
    _lcm_lora().save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.notes", ".model.tmp-wr1t1ng", "model"]


def test_a_full_disk_while_checkpointing_names_the_path_and_the_intact_checkpoint(tmp_path, capsys, monkeypatch):
    write_bytes, calls = Path.write_bytes, []

    def full_on_the_second_checkpoint(self, data):
        calls.append(self)
        if "step-00000004" in str(self):
            raise OSError(errno.ENOSPC, FULL)
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_on_the_second_checkpoint)
    assert main(_argv(tmp_path, 6, "train.checkpoint_every=2")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "internal error" not in err and "step-00000004" in err and str(tmp_path) in err
    assert "step-00000002" in err and "intact" in err
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000002"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_full_disk_during_export_or_a_cache_write_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              f'"{FULL}" }})')

    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(_argv(tmp_path, 2, "train.checkpoint_every=2")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "internal error" not in err and str(tmp_path / "model") in err and "intact" in err
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000002"
    pipe = tiny_pipeline("sd", seed=1)  # a full LCM: a pipeline folder written inside the student's own write
    lcm = LatentConsistencyModel(LCMFunction(pipe.denoiser), pipe)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    lcm.save_pretrained(tmp_path / "lcm")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match=r"writing \S*lcm; .*previous folder there is intact") as e:
        lcm.save_pretrained(tmp_path / "lcm")
    assert "tmp-" not in str(e.value) and (tmp_path / "lcm" / "model_index.json").is_file()
    cache = tmp_path / "cache" / "shard.safetensors"
    cache.parent.mkdir()
    cache.write_bytes(b"the previous shard")
    with pytest.raises(OSError, match=r"shard\.safetensors.*intact") as e:
        files.cache_write(cache, lambda tmp: full())
    assert "internal error" not in str(e.value) and "\n" not in str(e.value)
    assert cache.read_bytes() == b"the previous shard"
    assert sorted(p.name for p in cache.parent.iterdir()) == [".cmkit.lock", "shard.safetensors"]


def _ddpm_teacher():
    from diffusers import DDPMScheduler

    from cmkit.models.backbones import small_unet
    from cmkit.models.denoisers import DiffusersDenoiser

    return DiffusersDenoiser(small_unet(sample_size=8, channels=1, base=16), DDPMScheduler(num_train_timesteps=100))


def _cm_to_diffusers():
    from cmkit.models.backbones import small_unet
    from cmkit.models.consistency import ConsistencyModel

    cm = ConsistencyModel(small_unet(sample_size=8, channels=1, base=16), sigma_min=0.01, sigma_max=80.0)
    return cm.to_diffusers


def _vae():
    from cmkit.latent.autoencoder import VAETrainee, small_vae

    return VAETrainee(small_vae(16, (16, 16), norm_num_groups=8))


# each writer outside the model-folder helpers that wrote through diffusers' save_pretrained straight into its folder
WRITERS = {"ddpm-teacher": lambda: _ddpm_teacher().save_pretrained, "cm-to-diffusers": _cm_to_diffusers,
           "vae": lambda: _vae().save_pretrained}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_full_disk_in_a_diffusers_save_names_the_folder_and_keeps_the_previous_one(writer, tmp_path, monkeypatch):
    """Before: a raw ``SafetensorError`` (or ``[Errno 28]`` without a path) and a half-written folder in place of the
    previous one. Now: the write goes to a temporary folder renamed into place, and a full disk is one line naming
    the destination and saying the previous folder there is intact."""
    import safetensors.torch

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              f'"{FULL}" }})')

    write = WRITERS[writer]()
    write(tmp_path / "model")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "model").rglob("*") if p.is_file()}
    assert any(p.suffix == ".safetensors" for p in before)
    write(tmp_path / "model")  # its own earlier folder is replaced without a word
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match=r"no space left .* writing \S*model; .*previous folder there is intact") as e:
        write(tmp_path / "model")
    assert "tmp-" not in str(e.value) and "\n" not in str(e.value)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "model").rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: None)
    (tmp_path / "model" / "holiday.jpg").write_bytes(b"mine")  # and a folder holding a user's file is refused
    with pytest.raises(ValueError, match=r"model.*holiday\.jpg"):
        write(tmp_path / "model")
