"""Pixel values as every reader of images takes them: 16-bit grayscale (a PNG PIL opens in one of ``WIDE_MODES``)
scaled by 255 / 65535 onto the 0..255 scale, never clipped by PIL's own conversion to 8 bits (which turns a mid-grey
white). Image folders, captioned folders and tar shards all ask ``wide_to_float``; this module imports nothing else
of ``cmkit``."""

from __future__ import annotations

import numpy as np

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit grayscale PNGs (PIL opens them in one of these)
GREY_MODES = ("L", "1", "F", *WIDE_MODES)


def wide_to_float(im):
    """A PIL image in one of ``WIDE_MODES`` as a mode "F" image on the 0..255 scale."""
    from PIL import Image

    return Image.fromarray(np.asarray(im, dtype=np.float32) * (255 / 65535))


def to_rgb(im):
    """A PIL image as 8-bit RGB, a 16-bit grey one scaled (``wide_to_float``) rather than clipped."""
    from PIL import Image

    if im.mode in WIDE_MODES:
        grey = np.clip(np.round(np.asarray(wide_to_float(im))), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return im.convert("RGB")
