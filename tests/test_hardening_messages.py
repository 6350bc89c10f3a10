"""Issue 31, "messages that mislead" and "options that do nothing": each case a hostile user found, each failing on
the code before its fix."""

import json
import warnings

import pytest
import torch
from conftest import caption_data, one_line_error

import cmkit
from cmkit.cli.commands import main
from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe


def _one_line(capsys, code: int, *words):
    return one_line_error(capsys, code, *words, progress_bars=True)


def test_a_huge_caption_is_warned_about_in_one_short_line():
    teacher = cmkit.load_teacher("cmkit:tiny-t2i")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        teacher.encode_prompt(["a red bag " * 2000, "a blue boot " * 1000])
    text = [str(w.message) for w in seen if "truncated" in str(w.message)]
    assert len(text) == 1 and len(text[0]) < 250, text  # it printed ~49 KB before
    assert "2 prompts" in text[0] and "characters" in text[0]


def test_a_seed_torch_cannot_take_is_refused_as_an_argument_error(capsys):
    """It overflowed inside torch's generator (an internal error) after the model had loaded."""
    with pytest.raises(SystemExit) as stop:
        main(["generate", "cmkit:tiny-t2i", "--prompt", "x", "--seed", str(2**70)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "argument --seed: must be from 0 to 2**63 - 1" in err and "Traceback" not in err


def test_a_repeated_bench_seed_is_refused_not_counted_twice(tmp_path, capsys):
    _one_line(capsys, main(["bench", "text-to-image", "--seeds", "0,0", "--num", "8", "--out", str(tmp_path)]),
              "--seeds", "more than once")
    from cmkit.eval.bench import EvalSettings

    with pytest.raises(ValueError, match="more than once"):
        EvalSettings(num_samples=8, seeds=[1, 1]).check()


def test_a_lora_trained_from_a_relative_teacher_records_where_it_is(tmp_path, monkeypatch):
    """A relative --teacher was recorded as the LoRA's base as given, so the student opened only from the folder
    the run was started in."""
    cmkit.load_teacher("cmkit:tiny-t2i").save_pretrained(tmp_path / "teacher")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("tiny-t2i-lcm-lora", ["train.steps=2", "train.batch_size=4", "train.checkpoint_every=2",
                                               "objective.lora_rank=2", "objective.lora_alpha=2.0"])
    run_job("distill", recipe, tmp_path / "run", "teacher", progress=False, data=caption_data(32))
    base = json.loads((tmp_path / "run" / "model" / "cmkit.json").read_text())["base"]
    assert base == str((tmp_path / "teacher").resolve())
    monkeypatch.chdir(tmp_path / "run")  # elsewhere, the student still finds its base
    assert cmkit.load_model(tmp_path / "run" / "model").lora


def test_a_student_class_opens_only_its_own_kind(tmp_path):
    from cmkit.latent.families.unet import LatentDenoiser
    from cmkit.latent.flow_student import FlowConsistencyModel
    from cmkit.latent.lcm import LatentConsistencyModel, LCMFunction, student_unet

    teacher = cmkit.load_teacher("cmkit:tiny-t2i")
    lcm = LatentConsistencyModel(LCMFunction(LatentDenoiser(student_unet(teacher.unet, 8), teacher.scheduler)),
                                 teacher)
    lcm.save_pretrained(tmp_path / "lcm")
    with pytest.raises(ValueError, match="holds a 'lcm' model, not a 'flow_cm' one"):
        FlowConsistencyModel.from_pretrained(tmp_path / "lcm")  # it opened it, and re-saved it as a flow student


def test_saving_a_t5_less_sd3_folder_ends_with_no_diffusers_warning(tmp_path, capfd):
    from cmkit.latent.families.sd3 import tiny_sd3_pipeline

    tiny_sd3_pipeline().save_pretrained(tmp_path / "sd3")
    assert "cannot be saved" not in capfd.readouterr().err
    assert torch.isfinite(cmkit.text_to_image(cmkit.load_teacher(tmp_path / "sd3"), ["a red bag"], steps=1)).all()


@pytest.mark.parametrize("setting, env, words", [
    ('train.log_with="wandb"', {}, ("train.log_with = wandb", "pip install wandb")),
    ("train.steps=2", {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, ("--gradient_accumulation_steps 4",
                                                                      "train.micro_batch_size"))])
def test_options_that_would_do_nothing_are_refused(tmp_path, capsys, monkeypatch, setting, env, words):
    """A tracker whose package is missing logged nothing and exited 0; accelerate's gradient accumulation was
    ignored (the banner said 1)."""
    import importlib.util

    if "wandb" in setting and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _one_line(capsys, main(["train-teacher", "quickstart-teacher", "--out", str(tmp_path / "run"), "--set",
                            setting, "--set", "train.steps=2", "--no-progress"]), *words)
    assert not (tmp_path / "run" / "model").exists()


def test_internal_errors_of_damaged_folders_and_prompts_are_one_line(tmp_path, capsys):
    """A list as model_index.json's _class_name and an undecodable prompt were internal errors (TypeError); an
    empty weights file was reported as missing."""
    import shutil
    from pathlib import Path

    teacher = cmkit.load_teacher("cmkit:tiny-t2i")
    teacher.save_pretrained(tmp_path / "t")
    listed = tmp_path / "listed"
    shutil.copytree(tmp_path / "t", listed)
    index = json.loads((listed / "model_index.json").read_text())
    (listed / "model_index.json").write_text(json.dumps({**index, "_class_name": ["StableDiffusionPipeline"]}))
    capsys.readouterr()
    _one_line(capsys, main(["generate", str(listed), "--prompt", "x", "--out", str(tmp_path / "g.png")]),
              "_class_name must be a pipeline class name")
    _one_line(capsys, main(["generate", str(tmp_path / "t"), "--prompt", "a \udcff bag", "--steps", "1", "--out",
                            str(tmp_path / "g.png")]), "prompt 1", "not valid UTF-8")
    empty = tmp_path / "empty"
    shutil.copytree(tmp_path / "t", empty)
    next(Path(empty / "unet").glob("*.safetensors")).write_bytes(b"")
    code = main(["generate", str(empty), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "is not a readable safetensors file (0 bytes)" in err and "no .safetensors" not in err, err


def test_a_scheduler_of_another_kind_in_a_flow_folder_is_one_line(tmp_path, capsys):
    """A DDPMScheduler in an SD3 folder was an internal error (AttributeError: no attribute 'sigmas')."""
    from diffusers import DDPMScheduler

    from cmkit.latent.families.sd3 import tiny_sd3_pipeline

    tiny_sd3_pipeline().save_pretrained(tmp_path / "sd3")
    DDPMScheduler().save_pretrained(tmp_path / "sd3" / "scheduler")
    index = json.loads((tmp_path / "sd3" / "model_index.json").read_text())
    (tmp_path / "sd3" / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers",
                                                                                          "DDPMScheduler"]}))
    capsys.readouterr()
    _one_line(capsys, main(["generate", str(tmp_path / "sd3"), "--prompt", "x", "--steps", "2", "--out",
                            str(tmp_path / "g.png")]), "flow-matching scheduler", "not a DDPMScheduler")


def test_nan_in_a_recipe_float_no_kind_checks_is_refused():
    """EDM's p_mean has no range check of its own: NaN reached the first step (inf was refused already)."""
    with pytest.raises(ValueError, match="objective.p_mean must be a finite number, got nan"):
        load_recipe("quickstart-teacher", ["objective.p_mean=nan"])


def test_the_truncation_warning_counts_only_the_prompts_cut_and_quotes_their_text():
    """With a tokenizer whose padding token decodes to text (Gemma's ``<pad>``), a short prompt padded beside a long
    one was counted as cut and its padding quoted as the dropped text."""
    from cmkit.latent.text_encoders import byte_tokenizer, tokenize

    tok = byte_tokenizer("GemmaTokenizer", ["<unk>", "<pad>", "<bos>", "<eos>"], unk_token="<unk>",
                         pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tokenize(tok, ["a bag", "a red sneaker on a wooden floor"], 12)
    text = [str(w.message) for w in seen if "truncated" in str(w.message)]
    assert len(text) == 1 and text[0].startswith("1 prompt longer than 12") and "<pad>" not in text[0], text
