"""Write coloured Fashion-MNIST as webdataset tar shards of PNG images with .txt captions, for the streamed-data
benchmarks: ``--num`` images (past the 48,000 training items, each item again in the next colour, so every image of a
200,000-image set is distinct), ``--per-shard`` to a tar.
    python benchmarks/caption_shards.py --num 200000 --out /tmp/shards-200k"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from cmkit.data.fashion_colours import COLOUR_NAMES, ITEM_NAMES, TRAIN_SEED, _items, paint, prompt
from cmkit.data.images import load_fashion_mnist


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, required=True)
    ap.add_argument("--per-shard", type=int, default=5000)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    d = load_fashion_mnist()
    gray, items, colours, _ = _items(d.train, d.train_labels, TRAIN_SEED)
    n_items = len(gray)
    a.out.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, a.num, a.per_shard)):
        idx = np.arange(start, min(a.num, start + a.per_shard))
        base, turn = idx % n_items, idx // n_items
        colour = (colours[base].numpy() + turn) % len(COLOUR_NAMES)
        import torch

        painted = paint(gray[base], torch.from_numpy(colour))
        pixels = ((painted + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        tmp = a.out / f".{s:05d}.tar.tmp"
        with tarfile.open(tmp, "w") as tar:
            for j, i in enumerate(idx):
                buf = io.BytesIO()
                Image.fromarray(pixels[j]).save(buf, format="PNG")
                _add(tar, f"{i:07d}.png", buf.getvalue())
                caption = prompt(COLOUR_NAMES[colour[j]], ITEM_NAMES[items[base[j]]])
                _add(tar, f"{i:07d}.txt", caption.encode())
        tmp.rename(a.out / f"{s:05d}.tar")
    print(f"wrote {a.num} images in {s + 1} shards to {a.out}")


if __name__ == "__main__":
    main()
