"""FID/KID through torch-fidelity. The real Inception weights cannot be downloaded here, so the metric path runs on a
randomly initialised Inception saved in torch-fidelity's own format: it checks the plumbing (quantisation, channels,
batching, FID's and KID's definitions), never the published values."""

from unittest import mock

import pytest
import torch

pytest.importorskip("torch_fidelity")

from cmkit.eval import fidelity  # noqa: E402


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    from torch_fidelity import feature_extractor_inceptionv3 as fx

    with mock.patch.object(fx, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(fx.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        torch.manual_seed(0)
        net = fx.FeatureExtractorInceptionV3(fidelity.EXTRACTOR, [fidelity.FEATURE])
    path = tmp_path_factory.mktemp("inception") / fidelity.INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


def test_missing_weights_is_one_line_naming_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        fidelity.find_inception_weights()
    msg = str(e.value)
    assert "\n" not in msg and fidelity.INCEPTION_FILE in msg and str(tmp_path / "checkpoints") in msg
    with pytest.raises(FileNotFoundError, match="do not exist"):
        fidelity.find_inception_weights(tmp_path / "nope.pth")


def test_uint8_rgb_quantises_like_a_png():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5)
    out = fidelity.to_uint8_rgb(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 1, 5)
    assert out[0, :, 0].tolist() == [[0, 64, 128, 255, 255]] * 3  # 63.75 -> 64, 127.5 -> 128 (round half to even)
    with pytest.raises(ValueError, match="1 or 3"):
        fidelity.to_uint8_rgb(torch.zeros(2, 2, 4, 4))


def test_fid_kid_zero_for_the_reference_and_match_their_formulas(random_inception):
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    # the 64-channel first-block features keep the 2048-d matrix square roots out of the test's time
    metric = fidelity.InceptionMetrics(ref, random_inception, device="cpu", batch_size=5, feature="64")
    b = metric.reference
    assert b.shape == (8, 64)
    same = metric.score_features(b)
    a = metric.features(-ref.abs())  # darker images: a different distribution
    other = metric.score_features(a)
    from cmkit.eval.metrics import frechet_distance

    assert other["fid"] == pytest.approx(frechet_distance(a, b), rel=1e-3) and other["fid"] > 0
    assert abs(same["fid"]) < 1e-3 * other["fid"]
    # with subsets as large as the sets, KID is the unbiased MMD² of the whole sets, kernel (x.y / d + 1)^3
    k = lambda x, y: (x @ y.T / x.shape[1] + 1) ** 3  # noqa: E731
    m = len(a)
    off = lambda kk: (kk.sum() - kk.diagonal().sum()) / (m * (m - 1))  # noqa: E731
    want = off(k(a, a)) + off(k(b, b)) - 2 * k(a, b).mean()
    assert other["kid"] == pytest.approx(want.item(), rel=1e-6, abs=1e-12)
