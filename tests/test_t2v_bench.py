"""Issue 33's ``cmkit bench text-to-video`` (``cmkit.eval.t2v_bench``): a randomly initialised tiny Wan teacher folder
(32x32, 9 frames) through the benchmark and the CLI: rows per solver and step count with their network passes counted,
the pipeline's own row equal to cmkit's UniPC from the same noise, the table / JSON / plot and the GIF of prompts x
methods, the Frechet distance in the item classifier's features (``video_scores``), one-line errors.

Fashion-MNIST and the trained item classifier are not needed: the held-out clips are drawn from synthetic items and
the classifier is a seeded random ``SmallCNN`` (its features are what the distance reads)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import one_line_error
from PIL import Image

import cmkit
from cmkit.cli.commands import main
from cmkit.data.moving_fashion import moving_fashion, parse_moving_prompt
from cmkit.eval.bench import EvalSettings
from cmkit.eval.classifier import SmallCNN
from cmkit.eval.t2v_bench import gif_columns, text_to_video_benchmark, video_prompt_list
from cmkit.eval.video_scores import VideoScorer, video_features, video_frechet_distance
from cmkit.latent.families.wan import tiny_wan_pipeline

PIPELINE = "diffusers pipeline (UniPCMultistepScheduler)"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny networks, one thread


def _items():
    """Eight 28x28 grayscale items, one a class: squares of eight sizes and brightness levels, in [-1, 1]."""
    gray = torch.full((8, 1, 28, 28), -1.0)
    for k in range(8):
        r = 5 + k
        gray[k, :, 14 - r: 14 + r, 14 - r: 14 + r] = 0.3 + 0.1 * k
    return gray, torch.arange(8)


def _net():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return SmallCNN(1, 8).eval()


def _stand_ins(mp) -> None:
    """The benchmark's scorer with a seeded random classifier, and its held-out clips from synthetic items."""
    net = _net()
    mp.setattr("cmkit.eval.video_scores.VideoScorer",
               lambda progress=True, reference=None: VideoScorer(net=net, reference=reference))
    mp.setattr("cmkit.eval.t2v_bench.fashion_item_pool", lambda split: _items())


@pytest.fixture
def stand_ins(monkeypatch):
    _stand_ins(monkeypatch)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("t2v") / "wan"
    tiny_wan_pipeline(seed=3, image_size=32, num_frames=9).save_pretrained(path, record_size=True)
    return path


@pytest.fixture(scope="module")
def bench(folder, tmp_path_factory):
    """The benchmark at 4 videos, one seed, euler and unipc at 1 and 2 steps, the pipeline's row at 2 steps, and a
    model row (``name -> [(nfe, model, run)]``) that is the teacher's 1-step Euler under another name."""
    out = tmp_path_factory.mktemp("t2v-out")
    mp = pytest.MonkeyPatch()
    _stand_ins(mp)
    try:
        teacher = cmkit.load_teacher(str(folder))
        assert teacher.image_shape == (3, 9, 32, 32)  # the folder's sample size, not WanPipeline's 81 x 480 x 832

        def run(n, g, c):
            noise = torch.randn(n, *teacher.sample_shape, generator=g)
            return cmkit.text_to_video(teacher, video_prompt_list(n), steps=1, solver="euler", guidance_scale=5.0,
                                       latents=noise, return_nfe=True)
        written = text_to_video_benchmark(teacher, folder, EvalSettings(num_samples=4, seeds=[0]), out,
                                          solvers=("euler", "unipc"), steps=(1, 2), pipeline_steps=2,
                                          models={"copy": [(1, teacher, run)]}, progress=False)
    finally:
        mp.undo()
    return out, written


def _rows(out) -> dict:
    return {(r["method"], r["nfe"]): r for r in json.loads((out / "quality_vs_steps.json").read_text())["rows"]}


def _samples(out, method: str, nfe: int) -> torch.Tensor:
    return torch.from_numpy(np.load(out / "partial" / f"{method.replace(' ', '_')}-{nfe}.npy"))


def test_rows_count_their_passes_and_the_pipeline_row_is_cmkits_unipc(bench):
    out, written = bench
    rows = _rows(out)
    # guided (w = 5): two passes an evaluation; Euler and UniPC one evaluation a step, the step from the grid's start
    # (t = 1 - 1e-6 in the folder's UniPC grid) included; the sampler's own count, not the predicted one
    assert set(rows) == {(PIPELINE, 4), ("teacher euler", 2), ("teacher euler", 4), ("teacher unipc", 2),
                         ("teacher unipc", 4), ("copy", 2)}, sorted(rows)
    for r in rows.values():
        assert {"fd_mean", "item_acc_mean", "colour_acc_mean", "direction_acc_mean"} <= set(r), r
        assert np.isfinite(r["fd_mean"]) and r["fd_mean"] >= 0
    assert "direction accuracy" in written["table"] and (out / "quality_vs_steps.png").stat().st_size > 0
    # every row starts from the same noise: the pipeline's 2 UniPC steps are cmkit's unipc row at 2 steps...
    pipe, unipc = _samples(out, PIPELINE, 4), _samples(out, "teacher unipc", 4)
    euler = _samples(out, "teacher euler", 4)
    assert pipe.shape == unipc.shape == (4, 3, 9, 32, 32)
    assert (pipe - unipc).abs().max() < 1e-4
    assert (pipe - euler).abs().max() > 1e-3  # ...and not Euler's: the comparison tells solvers apart
    # ...and so are its scores
    p, u = rows[(PIPELINE, 4)], rows[("teacher unipc", 4)]
    assert all(p[k] == u[k] for k in ("item_acc_mean", "colour_acc_mean", "direction_acc_mean"))
    assert p["fd_mean"] == pytest.approx(u["fd_mean"], rel=1e-3, abs=1e-6)
    # a model row is scored against the same prompts: the teacher's 1-step Euler under another name scores as it
    c, e = rows[("copy", 2)], rows[("teacher euler", 2)]
    assert all(c[k] == e[k] for k in ("fd_mean", "item_acc_mean", "colour_acc_mean", "direction_acc_mean"))


def test_the_gif_is_prompts_by_methods_over_the_frames(bench):
    out, written = bench
    path = out / "prompts_by_method.gif"
    assert str(path) in written["paths"]
    with Image.open(path) as gif:
        assert gif.n_frames == 9
        frames = []
        for f in (0, 8):
            gif.seek(f)
            frames.append(np.asarray(gif.convert("RGB"), dtype=np.int16))
        # rows: the held-out clips and the 6 table rows, 64 pixels high (2x) with 2 between, under two text lines;
        # columns: the 4 prompts, 64 pixels wide with 2 between, right of the labels
        assert gif.size[1] == 32 + 7 * 66 and gif.size[0] > 4 * 66
    assert np.abs(frames[0] - frames[1]).max() > 0  # it moves


def test_gif_columns_show_every_item_in_several_colours_and_directions():
    prompts = video_prompt_list(160)
    assert len(set(prompts)) == 160 and video_prompt_list(161)[160] == prompts[0]
    words = [parse_moving_prompt(prompts[i]) for i in gif_columns(160)]
    assert len({w[1] for w in words}) == 8 and len({w[0] for w in words}) == 5 and len({w[2] for w in words}) == 4
    assert gif_columns(3) == [0, 1, 2] and gif_columns(30) == [0, 25, 1, 2, 3, 4, 5, 6]


def test_the_frechet_distance_reads_the_classifiers_features_per_frame_or_per_video():
    net = _net()
    a = moving_fashion(12, seed=0, items=_items()).videos
    b = moving_fashion(12, seed=5, items=_items()).videos
    frames = video_features(net, a)
    assert frames.shape == (12 * 9, 64)
    per_video = video_features(net, a, per="video")
    assert torch.allclose(per_video, frames.view(12, 9, 64).mean(1), atol=1e-6)
    # (a random network's features are small: the distances are compared with each other)
    other = video_frechet_distance(net, a, b)
    assert abs(video_frechet_distance(net, a, a)) < 1e-3 * other
    assert video_frechet_distance(net, a, torch.full_like(a, -1.0)) > 10 * other  # blank clips are far
    # the scorer's "fd" is that distance to its reference
    scored = VideoScorer(net=net, reference=b)(a, [f"a red {c} moving left" for c in ["bag"] * 12])
    assert scored["fd"] == pytest.approx(video_frechet_distance(net, a, b), rel=1e-6)
    assert "fd" not in VideoScorer(net=net)(a[:2], ["a red bag moving left"] * 2)
    with pytest.raises(ValueError, match="per must be one of frame, video"):
        video_features(net, a, per="clip")
    with pytest.raises(ValueError, match=r"\(N, 3, F, H, W\)"):
        video_features(net, a[:, :, 0])


def test_the_cli_runs_end_to_end(folder, tmp_path, stand_ins, capsys):
    out = tmp_path / "cli"
    assert main(["bench", "text-to-video", "--teacher", str(folder), "--num-samples", "2", "--seeds", "0",
                 "--steps", "1", "--solvers", "euler", "--pipeline-steps", "1", "--guidance-scale", "3",
                 "--out", str(out), "--no-progress"]) == 0
    assert "teacher euler" in capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == {(PIPELINE, 2), ("teacher euler", 2)}
    info = json.loads((out / "quality_vs_steps.json").read_text())["info"]
    assert info["guidance_scale"] == 3 and info["size"] == [9, 32, 32] and info["dataset"] == "moving_fashion"
    assert (out / "prompts_by_method.gif").is_file() and (out / "quality_vs_steps.md").is_file()


@pytest.mark.parametrize("args, words", [
    (["--teacher", "cmkit:tiny-sd3"], ["cmkit:tiny-sd3", "makes images, not videos", "text-to-image"]),
    (["--teacher", "{tmp}/no-such-folder"], ["no-such-folder"]),
    (["--teacher", "{folder}", "--solvers", "euler,nope"], ["--solvers", "unknown nope"]),
    (["--teacher", "{folder}", "--pipeline-steps", "0"], ["--pipeline-steps must be >= 1"]),
    (["--teacher", "{folder}", "--num-samples", "1"], ["num_samples must be >= 2"]),
])
def test_bad_inputs_get_one_line_errors(args, words, folder, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, folder=folder) for a in args]
    one_line_error(capsys, main(["bench", "text-to-video", *args, "--out", str(tmp_path / "o"), "--no-progress"]),
                   *words, progress_bars=True)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_an_image_teacher_is_refused_by_the_function(tmp_path):
    teacher = cmkit.load_teacher("cmkit:tiny-t2i")
    with pytest.raises(ValueError, match="makes images, not videos") as e:
        text_to_video_benchmark(teacher, "cmkit:tiny-t2i", EvalSettings(num_samples=2, seeds=[0]), tmp_path)
    assert "\n" not in str(e.value)
