"""``cmkit generate`` with a video model (a tiny saved WanPipeline folder): ``--num-frames`` as the pipeline takes it,
the videos as one ``.npy`` batch equal to ``cmkit.text_to_video``, an ``.mp4`` PyAV reads back as the frames (up to
the codec's error), an animated ``.gif``, one file per sample for several; the one-line refusals of an output or an
option the model's kind cannot take."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import one_line_error

import cmkit
from cmkit.cli.commands import main
from cmkit.latent.families.wan import tiny_wan_pipeline

SIZE = ["--height", "16", "--width", "16", "--num-frames", "5", "--steps", "2", "--max-sequence-length", "16"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny networks, one thread


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """(folder, the videos ``(2, 3, 5, 16, 16)`` ``text_to_video`` gives for ["p", "q"] at seed 0)."""
    folder = tmp_path_factory.mktemp("wan") / "wan21"
    tiny_wan_pipeline(seed=6, two_experts=False).save_pretrained(folder)
    teacher = cmkit.load_teacher(str(folder))
    ref = cmkit.text_to_video(teacher, ["p", "q"], steps=2, height=16, width=16, num_frames=5,
                              max_sequence_length=16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert teacher.num_frames == 81  # the model's own count, restored after the call
    return folder, ref


def _generate(folder, out, *extra, prompts=("p",)):
    return main(["generate", str(folder), *[a for p in prompts for a in ("--prompt", p)], "--num-per-prompt", "1",
                 *SIZE, "--out", str(out), *extra])


def _rgb(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 frames as (3, F, H, W) in [-1, 1]."""
    return torch.from_numpy(frames.astype(np.float32) / 127.5 - 1).permute(3, 0, 1, 2)


def test_npy_is_text_to_video(wan, tmp_path):
    folder, ref = wan
    assert _generate(folder, tmp_path / "v.npy") == 0
    video = torch.from_numpy(np.load(tmp_path / "v.npy"))
    assert video.shape == (1, 3, 5, 16, 16) and (video - ref[:1]).abs().max() < 1e-4
    # two prompts: one array, in prompt order
    assert _generate(folder, tmp_path / "two.npy", prompts=("p", "q")) == 0
    both = torch.from_numpy(np.load(tmp_path / "two.npy"))
    assert both.shape == (2, 3, 5, 16, 16) and (both - ref).abs().max() < 1e-4


@pytest.mark.parametrize("codec", ["default", "mpeg4"])
def test_mp4_reads_back_as_the_frames(wan, tmp_path, codec, monkeypatch):
    """H.264 where PyAV's FFmpeg has libx264 (the wheels do), else MPEG-4 part 2: both read back."""
    import av

    from cmkit.data import videofiles

    if codec == "mpeg4":
        monkeypatch.setattr(videofiles, "mp4_codec", lambda: "mpeg4")
    folder, ref = wan
    assert _generate(folder, tmp_path / "v.mp4", "--fps", "8") == 0
    with av.open(str(tmp_path / "v.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 8 and (codec == "default" or stream.codec_context.name == "mpeg4")
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    assert frames.shape == (5, 16, 16, 3)
    err = (_rgb(frames) - ref[0]).abs()
    # yuv420p halves the colour's resolution: a 16x16 noise-like clip keeps its brightness, not every pixel's hue
    assert err.mean() < 0.15, err.mean()
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1, 1)
    corr = torch.corrcoef(torch.stack([(_rgb(frames) * luma).sum(0).flatten(), (ref[0] * luma).sum(0).flatten()]))
    print("mp4 error", err.mean().item(), err.max().item(), "luma correlation", corr[0, 1].item())
    assert corr[0, 1] > 0.95, corr  # the clip's brightness follows the sample's pixel by pixel, not only its mean


def test_gif_and_one_file_per_sample(wan, tmp_path, capsys):
    from PIL import Image, ImageSequence

    folder, ref = wan
    assert _generate(folder, tmp_path / "v.gif", prompts=("p", "q")) == 0
    assert "wrote 2 videos of 5 frames" in capsys.readouterr().out
    assert not (tmp_path / "v.gif").exists()
    for i in range(2):
        with Image.open(tmp_path / f"v_{i}.gif") as im:
            assert im.info["duration"] in (60, 62, 63)  # 1000 / 16 ms, in GIF's 10 ms steps
            frames = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
        assert frames.shape == (5, 16, 16, 3)
        assert (_rgb(frames) - ref[i]).abs().max() < 0.1  # a palette of 256 colours per frame
    assert _generate(folder, tmp_path / "w.mp4", prompts=("p", "q")) == 0
    assert (tmp_path / "w_0.mp4").is_file() and (tmp_path / "w_1.mp4").is_file()


def test_refusals_in_one_line(wan, tmp_path, capsys):
    folder, _ = wan
    capsys.readouterr()
    for out in ("v.png", "v.jpg"):
        one_line_error(capsys, _generate(folder, tmp_path / out), ".mp4", ".gif", ".npy", progress_bars=True)
    one_line_error(capsys, main(["generate", str(folder), "--prompt", "p", *SIZE[:4], "--num-frames", "4",
                                 "--out", str(tmp_path / "v.npy")]), "num_frames 4 is not 1 + a multiple of 4",
                   progress_bars=True)
    with pytest.raises(SystemExit) as e:  # argparse's refusal: main exits 2
        _generate(folder, tmp_path / "v.mp4", "--fps", "0")
    one_line_error(capsys, e.value.code, "--fps", "(0, 1000]")
    image = ["generate", "cmkit:tiny-t2i", "--prompt", "p", "--num-per-prompt", "1", "--steps", "1"]
    for out in ("g.mp4", "g.gif"):
        one_line_error(capsys, main([*image, "--out", str(tmp_path / out)]), "makes images", ".png", ".npy",
                       progress_bars=True)
    one_line_error(capsys, main([*image, "--num-frames", "5", "--out", str(tmp_path / "g.npy")]),
                   "makes images, not videos", "--num-frames", progress_bars=True)
    one_line_error(capsys, main([*image, "--fps", "8", "--out", str(tmp_path / "g.npy")]), "--fps",
                   progress_bars=True)
    assert not list(tmp_path.iterdir())  # nothing was written


def test_memory_check_counts_every_frame(wan, monkeypatch):
    """image_shape is (3, F, H, W) for a video model: the bound grows with the frames."""
    from cmkit.cli import text2image
    from cmkit.core import memory

    folder, _ = wan
    teacher = cmkit.load_teacher(str(folder))
    needs = []
    monkeypatch.setattr(memory, "check_fits", lambda need, what, fix, device=None: needs.append((need, what, fix)))
    for frames in (5, 9):
        with teacher.sampling_at(16, 16, None, frames):
            text2image._check_memory(teacher, 2)
    (small, what, fix), (big, _, _) = needs
    assert "2 videos" in what and "--num-frames" in fix
    assert big > small * 1.6  # decoded frames 9 / 5; latent frames 3 / 2
