"""A weights file that would run code when unpickled is refused before any loader cmkit triggers unpickles it."""

import hashlib
import os

import pytest
import torch

from cmkit.core.files import check_weights_file


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv.weight": torch.ones(2), "x": _RunsCode(marker)}, path)
    return path


def test_a_file_that_runs_code_is_refused_and_plain_weights_pass(tmp_path):
    marker = tmp_path / "ran"
    evil = _plant(tmp_path / "evil.pth", marker)
    with pytest.raises(ValueError, match="not a plain weights file"):
        check_weights_file(evil, "weights")
    assert not marker.exists()
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.ones(3)}, plain)
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()
    assert check_weights_file(plain, "weights", digest[:8]) == plain
    with pytest.raises(ValueError, match="SHA-256 does not start with 00000000"):
        check_weights_file(plain, "weights", "00000000" if digest[:8] != "00000000" else "11111111")
    torch.load(evil, weights_only=False)  # the planted file does run code when unpickled: the test can fail
    assert marker.exists()


def test_inception_weights_that_run_code_are_refused(tmp_path):
    pytest.importorskip("torch_fidelity")
    from cmkit.eval.fidelity import InceptionMetrics

    marker = tmp_path / "ran"
    evil = _plant(tmp_path / "weights-inception-2015-12-05-6726825d.pth", marker)
    with pytest.raises(ValueError, match="Inception weights .* not a plain weights file"):
        InceptionMetrics(torch.zeros(4, 3, 8, 8), weights=evil, device="cpu")
    assert not marker.exists()


def test_an_lpips_backbone_in_the_hub_cache_is_checked_against_its_hash(tmp_path, monkeypatch):
    pytest.importorskip("lpips")
    from cmkit.objectives.distances import LPIPSDistance

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    marker = tmp_path / "ran"
    _plant(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth", marker)
    with pytest.raises(ValueError, match="LPIPS-vgg backbone weights .* SHA-256 does not start with 397923af"):
        LPIPSDistance("vgg")
    assert not marker.exists()
