"""Writing videos for the command line: ``(3, F, H, W)`` frames in [-1, 1] as an ``.mp4`` clip (PyAV: H.264 where
its FFmpeg has ``libx264``, else MPEG-4 part 2) or an animated ``.gif`` (Pillow), and a batch ``(B, 3, F, H, W)`` as
one file per sample (``video_paths``)."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..core.files import atomic_write

VIDEO_SUFFIXES = (".mp4", ".gif")
DEFAULT_FPS = 16.0  # Wan's rate (its pipeline's export_to_video(..., fps=16))


def video_paths(path, count: int) -> list[Path]:
    """Where ``count`` videos go for ``--out path``: ``path`` itself for one, else ``STEM_0SUFFIX``,
    ``STEM_1SUFFIX``, ... beside it (in batch order)."""
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(count)]


def check_fps(fps: float) -> float:
    fps = float(fps)
    if not math.isfinite(fps) or not 0 < fps <= 1000:
        raise ValueError(f"fps must be a number in (0, 1000], got {fps:g}")
    return fps


def frames_uint8(frames: torch.Tensor) -> np.ndarray:
    """``(3, F, H, W)`` in [-1, 1] as ``(F, H, W, 3)`` uint8 RGB."""
    if frames.ndim != 4 or frames.shape[0] != 3:
        raise ValueError(f"a video needs RGB frames (3, F, H, W), got shape {tuple(frames.shape)}; write .npy instead")
    x = ((frames.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(x.permute(1, 2, 3, 0).numpy())


def save_video(frames: torch.Tensor, path, fps: float = DEFAULT_FPS) -> Path:
    """Write one video ``(3, F, H, W)`` in [-1, 1] to ``path``: ``.mp4`` (H.264 ``libx264`` where PyAV's FFmpeg has
    it, else ``mpeg4``; yuv420p, so even heights and widths) or ``.gif`` (looping, each frame ``1000 / fps`` ms, in
    GIF's 10 ms steps; Pillow merges a frame identical to the one before into it). Written to a temporary name and
    renamed, as ``save_images`` does."""
    path = Path(path)
    if path.suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"a video must end in .mp4 or .gif, got {path.name!r}")
    fps = check_fps(fps)
    rgb = frames_uint8(frames)
    if path.suffix == ".mp4" and (rgb.shape[1] % 2 or rgb.shape[2] % 2):
        raise ValueError(f"an .mp4 takes even heights and widths (yuv420p), got {rgb.shape[1]}x{rgb.shape[2]}; "
                         "write .gif or .npy instead")
    write = _mp4 if path.suffix == ".mp4" else _gif
    try:
        if path.exists() and not path.is_file():  # a device or a link to one is written as it is
            write(rgb, path, fps)
        else:
            atomic_write(path, lambda tmp: write(rgb, tmp, fps))
    except OSError as e:  # a full disk, a read-only folder: name the file, never a success line
        raise OSError(f"could not write {path}: {e.strerror or e}; free space or choose another --out") from None
    return path


def mp4_codec() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _mp4(rgb: np.ndarray, path: Path, fps: float) -> None:
    import av

    codec = mp4_codec()
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = rgb.shape[2], rgb.shape[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "10"}
        else:
            stream.bit_rate = max(1_000_000, rgb.shape[1] * rgb.shape[2] * 8 * int(math.ceil(fps)))
        for frame in rgb:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _gif(rgb: np.ndarray, path: Path, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f, "RGB") for f in rgb]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=max(10, round(1000 / fps)),
                   loop=0)
