import math

import pytest
import torch

from cmkit.objectives import distances as losses
from cmkit.objectives.distances import LPIPSDistance, distance, make_distance


def test_pseudo_huber_default_c_and_limits():
    x, y = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    y[0, 0, 0, 0] = 3.0
    c = 0.00054 * math.sqrt(64)
    d = distance("pseudo_huber", x, y)
    assert math.isclose(d[0].item(), math.sqrt(9 + c * c) - c, rel_tol=1e-6)
    assert d[1].item() == 0.0


def test_l2_32_resizes_both_images():
    x, y = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    ref = (torch.nn.functional.interpolate(x, size=32, mode="bilinear")
           - torch.nn.functional.interpolate(y, size=32, mode="bilinear")).pow(2).mean((1, 2, 3))
    torch.testing.assert_close(distance("l2-32", x, y), ref)
    with pytest.raises(ValueError, match="image batches"):
        distance("l2-32", torch.randn(3, 2), torch.randn(3, 2))


def test_lpips_loss_path_with_random_backbone():
    """The wrapper's own work (channels, upsampling, per-sample output, gradients) with a random backbone: the
    real ImageNet weights cannot be downloaded here, and this test does not pretend they are present."""
    torch.manual_seed(0)
    d = LPIPSDistance("alex", random_backbone=True, upsample_to=64)
    x = (torch.rand(2, 1, 16, 16) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 1, 16, 16) * 2 - 1
    out = d(x, y)
    assert out.shape == (2,) and (out > 0).all()
    assert d(y, y).abs().max() < 1e-6
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # grayscale is the same image as its 3-channel repeat
    torch.testing.assert_close(d(x.detach(), y), d(x.detach().repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))
    assert not any(p.requires_grad for p in d.parameters())


def test_lpips_missing_weights_error_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        make_distance("lpips-vgg")
    msg = str(e.value)
    assert "vgg16-397923af.pth" in msg and str(tmp_path / "checkpoints") in msg and "\n" not in msg


def test_unknown_distance():
    with pytest.raises(ValueError, match="unknown objective.distance 'l3'; did you mean"):
        make_distance("l3")
    assert set(losses.WEIGHTINGS) == {"uniform", "inverse_gap"}
