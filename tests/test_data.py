import numpy as np
import pytest
import torch

from cmkit.data import FASHION_DIR, TWO_D, load_dataset


@pytest.mark.parametrize("name", sorted(TWO_D))
def test_named_2d_sets_are_scaled_and_split(name):
    d = load_dataset(name)
    assert d.train.shape == (20_000, 2) and d.test.shape == (5_000, 2)
    assert abs(d.train.std().item() - 0.5) < 1e-3
    assert d.train.mean(0).abs().max() < 1e-4
    assert not torch.equal(d.train[:100], d.test[:100])
    assert torch.equal(load_dataset(name).test, d.test)  # fixed held-out split


def test_s_curve_uses_columns_x_and_z():
    from sklearn.datasets import make_s_curve

    raw, _ = make_s_curve(20_000, noise=0.0, random_state=0)
    d = load_dataset("s_curve")
    corr = np.corrcoef(d.train.numpy()[:, 0], raw[:, 0])[0, 1]
    assert corr > 0.9999


def test_npy_loading_and_errors(tmp_path):
    arr = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    np.save(tmp_path / "ok.npy", arr)
    d = load_dataset(path=str(tmp_path / "ok.npy"))
    assert d.train.shape == (90, 3) and d.test.shape == (10, 3)
    arr[5, 1] = np.nan
    np.save(tmp_path / "bad.npy", arr)
    with pytest.raises(ValueError, match="NaN or inf"):
        load_dataset(path=str(tmp_path / "bad.npy"))
    with pytest.raises(ValueError, match="did you mean 's_curve'"):
        load_dataset("s_curv")


def test_digits_images():
    d = load_dataset("digits")
    assert d.train.shape == (1500, 1, 8, 8) and d.test.shape == (297, 1, 8, 8) and d.num_classes == 10
    assert d.train.min() == -1 and d.train.max() == 1
    assert torch.equal(load_dataset("digits").test, d.test)


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_idx():
    d = load_dataset("fashion_mnist")
    assert d.train.shape == (60000, 1, 28, 28) and d.test.shape == (10000, 1, 28, 28)
    assert d.train.min() >= -1 and d.train.max() <= 1 and int(d.train_labels.max()) == 9


def test_tinted_digits_are_colourings_of_the_digits():
    """Each tinted image is bg + a (fg - bg) per channel, a the digit's stroke intensity: so every channel is an exact
    affine function of the grayscale digit, the held-out digits and labels are the digits' own, and all is fixed."""
    from cmkit.data import TINT_COPIES

    gray, tinted = load_dataset("digits"), load_dataset("tinted_digits")
    assert tinted.train.shape == (TINT_COPIES * len(gray.train), 3, 8, 8) and tinted.test.shape == (297, 3, 8, 8)
    assert tinted.train.min() >= -1 and tinted.train.max() <= 1
    assert torch.equal(tinted.test_labels, gray.test_labels)
    assert torch.equal(tinted.train_labels[::TINT_COPIES], gray.train_labels)
    a = ((gray.test + 1) / 2).reshape(297, 1, 64).expand(-1, 3, -1)
    rgb = (tinted.test + 1) / 2
    vals = rgb.reshape(297, 3, 64).double()  # fit rgb = bg + a (fg - bg) by least squares per image and channel
    design = torch.stack([torch.ones_like(a), a], -1).double()
    coef = torch.linalg.lstsq(design, vals.unsqueeze(-1)).solution
    assert ((design @ coef).squeeze(-1) - vals).abs().max() < 1e-5
    assert (coef[..., 0, 0] <= 0.35 + 1e-6).all()  # dark backgrounds (HSV value <= 0.35)
    assert torch.equal(load_dataset("tinted_digits").test, tinted.test)


def test_an_image_size_a_named_set_ignores_is_refused():
    from cmkit.data.loading import load_dataset

    with pytest.raises(ValueError, match="data.image_size = 16, but data.name 'digits' comes at 8x8"):
        load_dataset("digits", image_size=16)
    assert load_dataset("digits", image_size=8).sample_shape == (1, 8, 8)  # its own size is accepted
    with pytest.raises(ValueError, match="comes at no image size"):
        load_dataset("s_curve", image_size=8)
