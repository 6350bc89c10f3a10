"""A small image classifier whose feature space scores samples (Frechet distance, confidence, recognition rate)
where Inception weights cannot be had. Trained once per dataset on its training split and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..core.files import cache_write, note
from .metrics import frechet_distance, precision_recall

RECOGNISED = 0.5  # a sample counts as recognised when the classifier gives its top class at least this probability


class SmallCNN(nn.Module):
    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, 64), nn.SiLU(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def cache_dir() -> Path:
    return Path(os.environ.get("CMKIT_CACHE", Path.home() / ".cache" / "cmkit")) / "classifiers"


def _fingerprint(data) -> str:
    h = hashlib.sha256()
    h.update(data.train.numpy().tobytes())
    h.update(data.train_labels.numpy().tobytes())
    return h.hexdigest()[:16]


def train_classifier(data, steps: int = 2000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     progress: bool = True) -> tuple[SmallCNN, dict]:
    if data.train_labels is None or data.train.ndim != 4:
        raise ValueError(f"a classifier needs labelled images; dataset {data.name!r} has none")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = SmallCNN(data.train.shape[1], data.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(steps), desc="classifier", disable=not progress, dynamic_ncols=True):
        idx = torch.randint(0, len(data.train), (batch_size,), generator=g)
        x = data.train[idx]
        x = x + 0.05 * torch.randn(x.shape, generator=g)  # a little noise: samples are never pixel-perfect
        loss = nn.functional.cross_entropy(net(x), data.train_labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(data.test).argmax(1) == data.test_labels).float().mean().item()
    return net, {"test_accuracy": acc, "steps": steps, "dataset": data.name}


def load_or_train_classifier(data, progress: bool = True) -> tuple[SmallCNN, dict]:
    """The cached classifier for this dataset (keyed by a hash of its training split), trained on first use."""
    key = f"{data.name}-{_fingerprint(data)}"
    folder = cache_dir()
    wfile, ifile = folder / f"{key}.safetensors", folder / f"{key}.json"
    net = SmallCNN(data.train.shape[1], data.num_classes)
    if wfile.is_file() and ifile.is_file():
        try:
            net.load_state_dict(load_file(wfile))
            return net.eval(), json.loads(ifile.read_text())
        except Exception as e:  # noqa: BLE001 - a truncated file: safetensors' own error, JSON's, or a shape mismatch
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
            note(f"classifier cache {wfile} is unreadable ({type(e).__name__}: {first}; truncated?); training it "
                 "again")
    net, info = train_classifier(data, progress=progress)
    cache_write(wfile, lambda tmp: save_file(net.state_dict(), tmp))
    cache_write(ifile, lambda tmp: tmp.write_text(json.dumps(info)))
    return net, info


@torch.no_grad()
def classifier_scores(net: SmallCNN, samples: torch.Tensor, reference: torch.Tensor,
                      ref_features: torch.Tensor | None = None) -> dict:
    """Frechet distance in the classifier's feature space, mean top-class probability, the share of samples
    recognised (top probability >= RECOGNISED), and k-NN precision / recall in feature space."""
    samples = samples.float().clamp(-1, 1)
    feats = net.features(samples)
    ref = net.features(reference.float()) if ref_features is None else ref_features
    probs = net.head(feats).softmax(1).max(1).values
    precision, recall = precision_recall(ref, feats)
    return {"fd": frechet_distance(feats, ref), "confidence": probs.mean().item(),
            "recognised": (probs >= RECOGNISED).float().mean().item(), "precision": precision, "recall": recall}
