"""FID and KID in Inception-v3 features, through torch-fidelity (the optional ``fid`` extra).

The Inception weights are torch-fidelity's port of the TF-slim 2015-12-05 network that the published FID
numbers use. torch-fidelity downloads them on first use; where that is impossible (this project's machines, clusters
without network) they must be put in torch's hub cache by hand, and a missing file is reported in one line that says
where. Images of any size and 1 or 3 channels in [-1, 1] are quantised to uint8 (as saved PNGs would be) and resized
to 299 by torch-fidelity's TF-compatible bilinear resize; grayscale is repeated to RGB.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.files import check_weights_file

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
EXTRACTOR = "inception-v3-compat"
FEATURE = "2048"  # the pool3 features both FID and KID use
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000


def _torch_fidelity():
    try:
        import torch_fidelity
    except ImportError:
        raise ImportError("FID/KID need torch-fidelity: pip install 'cmkit[fid]' (or pip install torch-fidelity)") \
            from None
    return torch_fidelity


def find_inception_weights(path=None) -> Path:
    """The Inception weights file: ``path`` if given, else torch-fidelity's file in torch's hub cache
    (``$TORCH_HOME/hub/checkpoints``). A one-line FileNotFoundError names the file, the URL and the folder when it
    is absent."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights {str(p)!r} do not exist; download {INCEPTION_URL}")
        return p
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    p = folder / INCEPTION_FILE
    if not p.is_file():
        raise FileNotFoundError(f"FID/KID need torch-fidelity's Inception weights {INCEPTION_FILE}, not in {folder}; "
                                f"download {INCEPTION_URL} where there is network access and put it there (or pass "
                                "its path), or leave FID/KID out")
    return p


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """(n, 1 or 3, H, W) in [-1, 1] -> (n, 3, H, W) uint8, rounded as an 8-bit image file would be."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"FID/KID take images of shape (n, 1 or 3, H, W), got {tuple(images.shape)}")
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionMetrics:
    """``score(samples) -> {"fid": ..., "kid": ...}`` against a fixed reference set, whose Inception features are
    computed once. KID is the mean unbiased polynomial-kernel MMD² over ``KID_SUBSETS`` random subsets of size
    min(1000, both set sizes), as torch-fidelity computes it."""

    def __init__(self, reference: torch.Tensor, weights=None, device=None, batch_size: int = 64,
                 feature: str = FEATURE):
        _torch_fidelity()
        from torch_fidelity.utils import create_feature_extractor

        # torch-fidelity unpickles the file with weights_only=False: it is read safely first
        path = check_weights_file(find_inception_weights(weights), "Inception weights")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        # feature: "2048" (pool3) is what FID and KID are defined on; "64", "192", "768" are earlier, cheaper layers
        self.extractor = create_feature_extractor(EXTRACTOR, [feature], cuda=False, verbose=False,
                                                  feature_extractor_weights_path=str(path)).to(self.device)
        self.reference = self.features(reference)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = to_uint8_rgb(images)
        out = [self.extractor(x[i:i + self.batch_size].to(self.device))[0].cpu()
               for i in range(0, len(x), self.batch_size)]
        return torch.cat(out).double()

    def __call__(self, samples: torch.Tensor) -> dict:
        return self.score_features(self.features(samples))

    def score_features(self, feats: torch.Tensor) -> dict:
        from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
        from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

        fid = fid_statistics_to_metric(fid_features_to_statistics(feats), fid_features_to_statistics(self.reference),
                                       verbose=False)[KEY_METRIC_FID]
        size = min(KID_SUBSET_SIZE, len(feats), len(self.reference))
        kid = kid_features_to_metric(feats, self.reference, kid_subsets=KID_SUBSETS, kid_subset_size=size,
                                     verbose=False)[KEY_METRIC_KID_MEAN]
        return {"fid": float(fid), "kid": float(kid)}

