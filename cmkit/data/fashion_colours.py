"""Coloured Fashion-MNIST with prompts: the text-to-image set the shipped tiny teacher is trained on, built so that
prompt adherence is measurable on two axes, the item (a classifier) and the colour (a rule).

Each 28x28 item (eight of Fashion-MNIST's ten classes: coat and shirt are left out because even a good classifier
confuses them with pullovers and t-shirts, which would blur the item axis) is padded to 32x32 and painted in one of
five named colours on black, ``rgb = intensity * colour``; its caption is ``"a {colour} {item}"``. Every colour has a
channel at 1, so the per-pixel maximum over channels gives the item's intensity back exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from .dataset import DATASETS, TEST_SEED, TRAIN_SEED, Dataset
from .images import FASHION_DIR, load_fashion_mnist

# Fashion-MNIST label -> the name prompts use
ITEMS = {0: "t-shirt", 1: "trousers", 2: "pullover", 3: "dress", 5: "sandal", 7: "sneaker", 8: "bag", 9: "boot"}
COLOURS = {
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 1.0, 0.15),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 1.0, 0.15),
    "white": (1.0, 1.0, 1.0),
}
ITEM_NAMES = list(ITEMS.values())
COLOUR_NAMES = list(COLOURS)


def prompt(colour: str, item: str) -> str:
    return f"a {colour} {item}"


def all_prompts() -> list[str]:
    """Every prompt of the set, item-major: ``a red t-shirt, a green t-shirt, ...``."""
    return [prompt(c, i) for i in ITEM_NAMES for c in COLOUR_NAMES]


def parse_prompt(text: str) -> tuple[str, str]:
    """``"a red sneaker"`` -> ``("red", "sneaker")``; a one-line error for anything else."""
    words = text.strip().split(" ", 2)
    if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in ITEM_NAMES:
        raise ValueError(f"{text!r} is not a prompt of the coloured Fashion-MNIST set: expected 'a COLOUR ITEM' with "
                         f"COLOUR in {', '.join(COLOUR_NAMES)} and ITEM in {', '.join(ITEM_NAMES)}")
    return words[1], words[2]


def paint(gray: torch.Tensor, colour_idx: torch.Tensor) -> torch.Tensor:
    """Grayscale items in [-1, 1], (n, 1, H, W), painted in the colours ``colour_idx`` -> (n, 3, H, W) in [-1, 1]."""
    table = torch.tensor(list(COLOURS.values()), dtype=gray.dtype)
    intensity = (gray + 1) / 2
    return intensity * table[colour_idx][:, :, None, None] * 2 - 1


def intensity(images: torch.Tensor) -> torch.Tensor:
    """The item's grayscale intensity in [-1, 1] from painted images: the per-pixel maximum over channels."""
    return images.amax(1, keepdim=True)


def _items(gray: torch.Tensor, labels: torch.Tensor, seed: int):
    keep = torch.isin(labels, torch.tensor(list(ITEMS)))
    gray = torch.nn.functional.pad(gray[keep], (2, 2, 2, 2), value=-1.0)
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[list(ITEMS)] = torch.arange(len(ITEMS))
    items = remap[labels[keep]]
    colours = torch.from_numpy(np.random.default_rng(seed).integers(0, len(COLOURS), len(items)))
    captions = [prompt(COLOUR_NAMES[c], ITEM_NAMES[i]) for c, i in zip(colours.tolist(), items.tolist(), strict=True)]
    return gray, items, colours, captions


def load_fashion_items(root=FASHION_DIR) -> Dataset:
    """The grayscale 32x32 items alone (labels 0..7 as ``ITEM_NAMES``): what the item classifier is trained on."""
    d = load_fashion_mnist(root)
    tr, ytr, _, _ = _items(d.train, d.train_labels, TRAIN_SEED)
    te, yte, _, _ = _items(d.test, d.test_labels, TEST_SEED)
    return Dataset("fashion_items", tr, te, ytr, yte, len(ITEMS))


@DATASETS.register("fashion_colours")
def load_fashion_colours(root=FASHION_DIR) -> Dataset:
    """Coloured Fashion-MNIST, 32x32 RGB in [-1, 1], with captions and item labels (0..7 as ``ITEM_NAMES``);
    48,000 training and 8,000 held-out images (Fashion-MNIST's own test split), colours drawn with fixed seeds."""
    d = load_fashion_mnist(root)
    tr, ytr, ctr, cap_tr = _items(d.train, d.train_labels, TRAIN_SEED)
    te, yte, cte, cap_te = _items(d.test, d.test_labels, TEST_SEED)
    return Dataset("fashion_colours", paint(tr, ctr), paint(te, cte), ytr, yte, len(ITEMS), cap_tr, cap_te)
