"""Scoring text-to-image samples of the coloured Fashion-MNIST prompts ("a {colour} {item}") offline, on two axes:

- item: a small classifier trained on the grayscale items (cached like the digits one) reads each sample's
  intensity (its per-pixel channel maximum); item accuracy is the share it assigns to the prompted item;
- colour: the mean chromaticity ``rgb / max(rgb)`` over the sample's bright pixels, nearest of the named colours;
- fidelity: the Frechet distance in the classifier's features to held-out images of the same prompts (each
  sample's prompt gets a held-out image of that prompt, so both sets follow the same prompt mix).
"""

from __future__ import annotations

import torch

from ..data.fashion_colours import (
    COLOURS,
    ITEM_NAMES,
    intensity,
    load_fashion_colours,
    load_fashion_items,
    parse_prompt,
)
from .classifier import load_or_train_classifier
from .metrics import frechet_distance

BRIGHT = 0.25  # a pixel belongs to the item when its intensity (in [0, 1]) is above this


def colour_of(images: torch.Tensor) -> list[str | None]:
    """The named colour of each image in [-1, 1] (None when no pixel is bright enough to tell)."""
    rgb = ((images.float().clamp(-1, 1) + 1) / 2)
    peak = rgb.amax(1, keepdim=True)
    bright = (peak > BRIGHT).float()
    chroma = (rgb / peak.clamp_min(1e-6) * bright).sum((2, 3)) / bright.sum((2, 3)).clamp_min(1)
    table = torch.tensor(list(COLOURS.values()))
    nearest = torch.cdist(chroma, table).argmin(1)
    names = list(COLOURS)
    return [names[i] if bright[j].sum() > 0 else None for j, i in enumerate(nearest.tolist())]


class PromptScorer:
    """``scorer(images, prompts) -> {"item_acc", "colour_acc", "fd"}`` for the coloured Fashion-MNIST prompts."""

    def __init__(self, progress: bool = True):
        self.net, self.info = load_or_train_classifier(load_fashion_items(), progress=progress)
        held_out = load_fashion_colours()
        self.by_prompt: dict[str, torch.Tensor] = {}
        for i, cap in enumerate(held_out.test_captions):
            self.by_prompt.setdefault(cap, []).append(i)
        self.by_prompt = {k: torch.tensor(v) for k, v in self.by_prompt.items()}
        self.held_out = held_out.test

    def reference(self, prompts: list[str], seed: int = 0) -> torch.Tensor:
        """Held-out images with the same prompt mix as ``prompts`` (drawn without replacement per prompt)."""
        g = torch.Generator().manual_seed(seed)
        perms = {k: v[torch.randperm(len(v), generator=g)] for k, v in self.by_prompt.items()}
        used: dict[str, int] = {}
        rows = []
        for p in prompts:
            parse_prompt(p)
            k = used.get(p, 0)
            rows.append(perms[p][k % len(perms[p])])
            used[p] = k + 1
        return self.held_out[torch.stack(rows)]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], seed: int = 0) -> dict:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        wanted = [parse_prompt(p) for p in prompts]
        gray = intensity(images.float().clamp(-1, 1))
        feats = self.net.features(gray)
        items = self.net.head(feats).argmax(1).tolist()
        item_acc = sum(ITEM_NAMES[i] == w[1] for i, w in zip(items, wanted, strict=True)) / len(prompts)
        colours = colour_of(images)
        colour_acc = sum(c == w[0] for c, w in zip(colours, wanted, strict=True)) / len(prompts)
        ref = self.net.features(intensity(self.reference(prompts, seed)))
        return {"item_acc": item_acc, "colour_acc": colour_acc, "fd": frechet_distance(feats, ref)}
