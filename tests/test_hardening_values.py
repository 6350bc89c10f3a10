"""Issue 31, "non-finite or absurd numbers that pass silently": sampling arguments, outputs before they are written,
loaded weights, scheduler values and recipe values are refused in one line (``cmkit.core.checks``), through the
command line where the case is a command-line case. Tiny random pipelines, nothing trained."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cmkit import load_model, load_teacher
from cmkit.cli.commands import main
from cmkit.core.checks import finite_number, finite_tensors, in_range, positive_int
from cmkit.latent.families.flux import tiny_flux_pipeline
from cmkit.latent.families.sd3 import tiny_sd3_pipeline
from cmkit.latent.families.unet import LatentDenoiser, tiny_pipeline
from cmkit.latent.lcm import LatentConsistencyModel, LCMFunction, add_lora, student_unet
from cmkit.sampling.kinds import text_to_image


def _refused(capsys, argv, *needles) -> str:
    """``cmkit ARGV`` exits 2 with one line on stderr holding every needle."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # an argument's own error, from the parser
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]  # transformers' bar
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def _generate(folder, out) -> list[str]:
    return ["generate", str(folder), "--prompt", "a red sneaker", "--num-per-prompt", "1", "--steps", "2",
            "--out", str(out)]


def test_one_checker_per_kind():
    assert finite_number(2, "x") == 2.0
    assert in_range(1.0, "w", 1, 100) == 1.0 and positive_int(3, "steps") == 3
    for bad in (math.nan, math.inf, "3", True, None):
        with pytest.raises(ValueError, match="x must be a finite number"):
            finite_number(bad, "x")
    with pytest.raises(ValueError, match=r"w must be a finite number >= 1 and <= 100, got 1e\+308; lower it"):
        in_range(1e308, "w", 1, 100, fix="lower it")
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        in_range(0.0, "shift", 0, low_open=True)
    for bad in (2.5, 0, True):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            positive_int(bad, "steps")
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    finite_tensors(net, "net")
    with torch.no_grad():
        net[1].bias[0] = math.nan
    with pytest.raises(ValueError, match=r"^the net's weights hold NaN or inf values \(first: 1.bias\)$"):
        finite_tensors(net, "the net's weights")
    with pytest.raises(ValueError, match=r"the state hold NaN or inf values \(first: b\); fix it"):
        finite_tensors({"a": torch.ones(2), "n": torch.ones(2, dtype=torch.long), "b": torch.tensor([math.inf])},
                       "the state", "fix it")


def test_sampling_arguments(tmp_path, capsys):
    teacher = tiny_pipeline("sd", seed=4)
    lcm = LatentConsistencyModel(LCMFunction(LatentDenoiser(student_unet(teacher.unet, 8), teacher.scheduler)),
                                 teacher)
    for model in (teacher, lcm):
        with pytest.raises(ValueError, match="steps must be an integer >= 1, got 2.5"):
            text_to_image(model, ["x"], steps=2.5)
        for w in (math.nan, 1e308, 0.5):
            with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 1 and <= 100"):
                text_to_image(model, ["x"], steps=1, guidance_scale=w)
    out = tmp_path / "g.png"
    _refused(capsys, [*_generate("cmkit:tiny-t2i", out), "--guidance", "1e308"], "--guidance", "<= 100")
    _refused(capsys, [*_generate("cmkit:tiny-t2i", out), "--guidance", "nan"], "--guidance")
    assert not out.exists()


def _scaled(module, factor):
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(factor)


def test_non_finite_outputs_are_not_written(tmp_path, capsys):
    teacher = tiny_pipeline("sd", seed=4)
    _scaled(teacher.vae.decoder, 1e12)  # finite weights, overflowing images
    teacher.save_pretrained(tmp_path / "vae")
    _refused(capsys, _generate(tmp_path / "vae", tmp_path / "a.png"), "NaN or inf", "VAE decoder")
    teacher = tiny_pipeline("sd", seed=4)
    _scaled(teacher.unet, 1e12)  # finite weights, overflowing latents
    teacher.save_pretrained(tmp_path / "unet")
    err = _refused(capsys, _generate(tmp_path / "unet", tmp_path / "b.png"), "NaN or inf", "sampled latents",
                   "the network")
    assert "VAE" not in err
    cm = load_model("cmkit:digits-cd")
    _scaled(cm, 1e12)
    cm.save_pretrained(tmp_path / "cm")
    _refused(capsys, ["sample", str(tmp_path / "cm"), "--num", "2", "--steps", "1", "--out", str(tmp_path / "s.npy")],
             "NaN or inf", "nothing was written")
    assert not any((tmp_path / n).exists() for n in ("a.png", "b.png", "s.npy"))


def _corrupt(module, value, name_has=""):
    with torch.no_grad():
        name, p = next((n, p) for n, p in module.named_parameters() if name_has in n)
        p.view(-1)[0] = value
    return name


def test_loaded_weights_are_finite(tmp_path, capsys):
    teacher = tiny_pipeline("sd", seed=1)
    name = _corrupt(teacher.unet, math.nan)
    teacher.save_pretrained(tmp_path / "sd")
    _refused(capsys, _generate(tmp_path / "sd", tmp_path / "a.png"), "unet", name, "NaN or inf")
    sd3 = tiny_sd3_pipeline(seed=1)
    name = _corrupt(sd3.vae, math.inf, "decoder")
    sd3.save_pretrained(tmp_path / "sd3")
    with pytest.raises(ValueError, match=f"vae.*{name}"):
        load_teacher(str(tmp_path / "sd3"))
    # an LCM-LoRA whose cmkit.json holds a NaN lora_alpha
    base = tiny_pipeline("sd", seed=2)
    base.save_pretrained(tmp_path / "teacher")
    base = load_teacher(str(tmp_path / "teacher"))
    add_lora(base.unet, 4, 4.0, ["to_q", "to_v"])
    LatentConsistencyModel(LCMFunction(base.denoiser), base, lora=True,
                           base=str(tmp_path / "teacher")).save_pretrained(tmp_path / "lora")
    meta_file = tmp_path / "lora" / "cmkit.json"
    meta = json.loads(meta_file.read_text())
    meta["lora_config"]["lora_alpha"] = math.nan
    meta_file.write_text(json.dumps(meta))
    _refused(capsys, _generate(tmp_path / "lora", tmp_path / "b.png"), "lora_alpha", "nan")
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()


def _with_scheduler(folder, **values):
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **values}))


@pytest.mark.parametrize("shift", [0, -3, math.nan])
def test_flow_shift_is_refused(tmp_path, capsys, shift):
    tiny_sd3_pipeline(seed=1).save_pretrained(tmp_path / "sd3")
    _with_scheduler(tmp_path / "sd3", shift=shift)
    _refused(capsys, _generate(tmp_path / "sd3", tmp_path / "a.png"), "scheduler_config.json", "shift")


def test_flux_base_shift_is_refused(tmp_path):
    tiny_flux_pipeline(seed=1).save_pretrained(tmp_path / "flux")
    _with_scheduler(tmp_path / "flux", base_shift=math.nan)
    with pytest.raises(ValueError, match="scheduler_config.json.*base_shift"):
        load_teacher(str(tmp_path / "flux"))


@pytest.mark.parametrize("setting,key", [("objective.sigma_data=1e-30", "objective.sigma_data"),
                                         ("objective.p_std=inf", "objective.p_std")])
def test_recipe_values_are_refused(tmp_path, capsys, setting, key):
    small = ["model.hidden=16", "model.depth=1", "train.steps=2", "train.batch_size=8", "eval.schedule_max_steps=0"]
    _refused(capsys, ["train", "s_curve-ict", "--out", str(tmp_path / "out"), "--set", setting,
                      *[f"--set={s}" for s in small]], key, "finite number")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sets", [['objective.kind="latent_rcm"', "objective.fake_lr_scale=inf"],
                                  ['objective.kind="sct"', "objective.p_std=inf"],
                                  ['objective.kind="sct"', "objective.sigma_data=0"],
                                  ["train.ema_rates=[0.999, inf]"]])
def test_every_float_of_a_recipe_is_finite(sets):
    from cmkit.cli.recipes import load_recipe

    with pytest.raises(ValueError, match=f"{sets[-1].split('=')[0]} must be a finite number"):
        load_recipe(None, sets)


@pytest.mark.parametrize("key,value", [("steps", 2.5), ("guidance_scale", math.nan)])
def test_flow_student_cmkit_json_values(tmp_path, key, value):
    from cmkit.latent.flow_student import FlowConsistencyModel

    teacher = tiny_sd3_pipeline(seed=1)
    FlowConsistencyModel(teacher.denoiser, teacher).save_pretrained(tmp_path / "student")
    meta_file = tmp_path / "student" / "cmkit.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), key: value}))
    with pytest.raises(ValueError, match=f"cmkit.json: {key} must be"):
        load_model(tmp_path / "student")
