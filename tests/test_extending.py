"""The seams ARCHITECTURE.md promises, exercised from outside the package: a new pipeline family and a new student
kind are each one class plus one registration call made here, in the test file alone, and every path that should
take them (loading, sampling, the CLI's generate / distill / bench, export) does with no other edit."""

import json

import numpy as np
import pytest
import torch
from conftest import caption_data

import cmkit
from cmkit.cli.commands import main
from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe
from cmkit.latent.families.sd3 import StableDiffusion3
from cmkit.latent.family import FAMILIES, register_family
from cmkit.models.folder import META_FILE, MODEL_KINDS
from cmkit.sampling.kinds import POLICIES, TeacherPolicy, register_policy

TOY = "ToyFlowPipeline"
PROMPTS = ["a red bag", "a blue sneaker"]


class ToyFlow(StableDiffusion3):
    """A stand-in pipeline class over SD3's network: the same components, its own ``_class_name``."""

    name = TOY

    def write(self, model, folder):
        super().write(model, folder)
        index = folder / "model_index.json"  # no diffusers class of this name: the folder is SD3's, renamed
        index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": TOY}))


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setattr(FAMILIES, "_items", dict(FAMILIES._items))  # the registration ends with the test
    register_family(ToyFlow)
    return FAMILIES[TOY]


def test_a_new_pipeline_family_is_one_class_and_one_registration(toy_family, tmp_path, capsys):
    teacher = toy_family.tiny(["a red bag", "a blue sneaker", "a green bag"], seed=1)
    assert teacher.family is toy_family and teacher.config["pipeline"] == TOY
    teacher.prompt_encoder.max_sequence_length = 256  # the pipeline's default, which a loaded folder encodes with
    teacher.save_pretrained(tmp_path / "teacher")
    assert json.loads((tmp_path / "teacher" / "model_index.json").read_text())["_class_name"] == TOY
    # load_teacher and text_to_image take it: the loaded folder samples as the model it was saved from
    loaded = cmkit.load_teacher(tmp_path / "teacher")
    assert loaded.family is toy_family
    g = torch.Generator().manual_seed(5)
    ours = cmkit.text_to_image(loaded, PROMPTS[:1], steps=3, generator=g)
    assert ours.shape == (1, 3, 32, 32) and torch.isfinite(ours).all()
    ref = cmkit.text_to_image(teacher, PROMPTS[:1], steps=3, generator=torch.Generator().manual_seed(5))
    assert (ours - ref).abs().max() < 1e-5
    # cmkit generate: the same image as text_to_image with its defaults and the same seed
    out = tmp_path / "g.npy"
    assert main(["generate", str(tmp_path / "teacher"), "--prompt", PROMPTS[0], "--num-per-prompt", "1",
                 "--steps", "3", "--seed", "5", "--out", str(out)]) == 0
    assert np.abs(np.load(out) - ours.clamp(-1, 1).numpy()).max() < 1e-5
    # a 3-step flow CD run distils it, and its student exports into the toy class and loads back
    recipe = load_recipe(None, ['objective.kind="flow_cd"', f'objective.teacher_pipeline="{TOY}"',
                                "objective.num_grid_steps=4", "train.batch_size=4", "train.steps=3",
                                "train.checkpoint_every=3", "train.ema_rates=[]"])
    run_job("distill", recipe, tmp_path / "run", str(tmp_path / "teacher"), progress=False, data=caption_data(32))
    student = cmkit.load_model(tmp_path / "run" / "model")
    assert student.family is toy_family and student.kind == "flow_cm"
    assert json.loads((tmp_path / "run" / "model" / "model_index.json").read_text())["_class_name"] == TOY
    x = cmkit.text_to_image(student, PROMPTS, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
    # --dry-run with no teacher here: the family's own tiny stand-in, of the recipe's class
    assert main(["distill", "tiny-sd3-cd", "--dry-run", "--teacher", str(tmp_path / "absent"), "--set",
                 f'objective.teacher_pipeline="{TOY}"', "--set", "train.steps=3", "--set",
                 f'data.path="{_caption_folder(tmp_path / "data")}"']) == 0
    assert "dry run OK" in capsys.readouterr().out


def _caption_folder(folder, n: int = 8):
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["a red bag", "a blue sneaker"][i % 2])
    return folder


class ToyStudent(torch.nn.Module):
    """A stand-in student kind: the teacher solved by DPM-Solver++(2M) at 3 steps and guidance 2 by default, saved
    as a ``cmkit.json`` naming its base teacher."""

    kind = "toy_student"

    def __init__(self, teacher, base: str):
        super().__init__()
        self.teacher, self.base = teacher, base

    def __getattr__(self, name):  # the rest of a pipeline is the teacher's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.teacher, name)

    def forward(self, z, sigma, **cond):
        return self.teacher(z, sigma, **cond)

    def save_pretrained(self, folder):
        folder.mkdir(parents=True)
        (folder / META_FILE).write_text(json.dumps({"kind": self.kind, "base": self.base}))

    @classmethod
    def from_pretrained(cls, folder, base=None):
        meta = json.loads((folder / META_FILE).read_text())
        return cls(cmkit.TextToImageModel.open(meta["base"]), meta["base"])


class ToyPolicy(TeacherPolicy):
    solver = "dpmpp_2m"

    def default_steps(self, model):
        return 3

    def default_guidance(self, model):
        return 2.0

    def follows_guidance(self, model):
        return False


@pytest.fixture
def toy_kind(monkeypatch):
    monkeypatch.setattr(MODEL_KINDS, "_items", dict(MODEL_KINDS._items))
    monkeypatch.setattr(POLICIES, "_items", dict(POLICIES._items))
    MODEL_KINDS.register("toy_student", ToyStudent)
    register_policy("toy_student")(ToyPolicy)


def test_a_new_student_kind_is_one_policy_and_one_registration(toy_kind, tmp_path, monkeypatch):
    teacher = cmkit.load_teacher("cmkit:tiny-t2i")
    ToyStudent(teacher, "cmkit:tiny-t2i").save_pretrained(tmp_path / "toy")
    student = cmkit.load_model(tmp_path / "toy")
    assert isinstance(student, ToyStudent)
    # its own defaults (3 steps of dpmpp_2m at guidance 2), not a teacher's (25 DDIM steps at 4)
    x, nfe = cmkit.text_to_image(student, PROMPTS[:1], generator=torch.Generator().manual_seed(3), return_nfe=True)
    ref = cmkit.text_to_image(teacher, PROMPTS[:1], steps=3, solver="dpmpp_2m", guidance_scale=2.0,
                              generator=torch.Generator().manual_seed(3))
    assert nfe == 6 and (x - ref).abs().max() < 1e-5
    out = tmp_path / "g.npy"
    assert main(["generate", str(tmp_path / "toy"), "--prompt", PROMPTS[0], "--num-per-prompt", "1", "--seed", "3",
                 "--out", str(out)]) == 0
    assert np.abs(np.load(out) - x.clamp(-1, 1).numpy()).max() < 1e-5
    bench = tmp_path / "bench"
    monkeypatch.setattr("cmkit.eval.prompt_scores.PromptScorer", ColourScorer)  # no Fashion-MNIST needed here
    assert main(["bench", "text-to-image", "--num", "8", "--seeds", "0", "--steps", "1", "--solvers", "euler",
                 "--model", f"toy={tmp_path / 'toy'}", "--model-steps", "2", "--out", str(bench),
                 "--no-progress"]) == 0
    rows = json.loads((bench / "quality_vs_steps.json").read_text())
    assert "toy" in json.dumps(rows)
    # the benchmark sampled the student as its kind samples: its 2 steps of dpmpp_2m at guidance 2 (4 passes)
    assert ColourScorer.seen and all(torch.isfinite(x).all() for x in ColourScorer.seen)
    assert any(r.get("method") == "toy" and r.get("nfe") == 4 for r in _rows(rows)), rows


def _rows(result):
    return [r for r in (result if isinstance(result, list) else result.get("rows", [])) if isinstance(r, dict)]


class ColourScorer:
    """A stand-in for the benchmark's Fashion-MNIST scorer (whose data this machine may lack): the mean colour of
    each image, and the images it was given."""

    seen: list = []
    info = "mean colour (test stand-in)"

    def __init__(self, progress=True):
        ColourScorer.seen = []

    def reference(self, prompts, seed=0):
        return torch.zeros(len(prompts), 3, 32, 32)

    def __call__(self, images, prompts, seed=0):
        ColourScorer.seen.append(images)
        return {"item_acc": 0.0, "colour_acc": 0.0, "fd": float(images.mean())}


def test_text_to_image_and_generate_agree_on_a_teachers_defaults(tmp_path):
    """The same default guidance (4), steps (25) and solver (DDIM) from Python and from the CLI: one seed, one
    image (they guided at 5 and 4 before)."""
    teacher = cmkit.load_teacher("cmkit:tiny-t2i")
    x = cmkit.text_to_image(teacher, [PROMPTS[0]], generator=torch.Generator().manual_seed(7))
    out = tmp_path / "g.npy"
    assert main(["generate", "cmkit:tiny-t2i", "--prompt", PROMPTS[0], "--seed", "7", "--out", str(out)]) == 0
    images = np.load(out)
    assert images.shape[0] == 4  # --num-per-prompt defaults to 4; the first is the Python call's image
    assert np.abs(images[:1] - x.clamp(-1, 1).numpy()).max() < 1e-5
    other = cmkit.text_to_image(teacher, [PROMPTS[0]], guidance_scale=5.0, generator=torch.Generator().manual_seed(7))
    assert np.abs(images[:1] - other.clamp(-1, 1).numpy()).max() > 1e-3  # the check can tell guidance 4 from 5
