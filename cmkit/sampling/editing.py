"""Zero-shot editing with any consistency model (CM paper, Algorithm 4), images in [-1, 1] of shape (B, C, H, W).

An orthogonal operator A maps an image to coefficients, some of which are known (from the user's input y). After
every denoise the known coefficients are put back:

    x <- A^T [ K * (A y) + (1 - K) * (A x) ]        K = 1 on known coefficients

so they are kept exactly in the output. Inpainting: A = identity, K = the user's mask. Colorization: a per-pixel
3x3 orthogonal basis whose first axis is luminance (0.2989, 0.5870, 0.1140); the luminance is known.
Super-resolution: a per-patch orthogonal basis whose first axis is the patch mean; the mean is known.

Given neither ``steps`` nor ``sigmas``, editing runs along the model's editing schedule (``cm.editing_schedule()``:
the ``editing_sigmas`` its folder stores, else 18 points of the Karras grid from sigma_max). One step would be one
denoise with the known pixels pasted back, where the missing pixels never see the known ones.
"""

from __future__ import annotations

import math

import torch

from ..core import check_sigmas, karras_steps
from .samplers import check_batch_fits, eval_mode, multistep, per_sample_noise, resolve_sigmas

LUMA = (0.2989, 0.5870, 0.1140)


def orthonormal_basis(first: torch.Tensor) -> torch.Tensor:
    """A d x d orthogonal matrix whose first row is ``first / |first|`` (QR of [first, I])."""
    d = first.numel()
    m = torch.cat([first.double().reshape(d, 1), torch.eye(d, dtype=torch.float64)], 1)
    q, _ = torch.linalg.qr(m)
    q = q[:, :d].T.contiguous()
    if q[0] @ first.double() < 0:  # QR may flip the sign; keep the first axis pointing along `first`
        q[0] = -q[0]
    return q


class Identity:
    """Pixels themselves are the coefficients (inpainting)."""

    def forward(self, x):
        return x

    def inverse(self, c):
        return c


class ColorBasis:
    """Per-pixel change of colour basis: coefficient 0 is luminance / |luma|."""

    def __init__(self, luma=LUMA):
        self.q = orthonormal_basis(torch.tensor(luma))
        self.norm = math.sqrt(sum(v * v for v in luma))

    def forward(self, x):
        return torch.einsum("ij,bjhw->bihw", self.q.to(x), x)

    def inverse(self, c):
        return torch.einsum("ji,bjhw->bihw", self.q.to(c), c)


class PatchBasis:
    """Per-patch (factor x factor, per channel) change of basis: coefficient 0 is the patch sum / factor, i.e.
    ``factor * mean``."""

    def __init__(self, factor: int):
        self.f = int(factor)
        self.q = orthonormal_basis(torch.ones(self.f * self.f))

    def forward(self, x):
        b, c, h, w = x.shape
        f = self.f
        patches = x.reshape(b, c, h // f, f, w // f, f).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // f, w // f, f * f)
        return torch.einsum("ij,bchwj->bchwi", self.q.to(x), patches)

    def inverse(self, coeffs):
        b, c, hh, ww, _ = coeffs.shape
        f = self.f
        patches = torch.einsum("ji,bchwj->bchwi", self.q.to(coeffs), coeffs)
        return patches.reshape(b, c, hh, ww, f, f).permute(0, 1, 2, 4, 3, 5).reshape(b, c, hh * f, ww * f)


def check_images(cm, x: torch.Tensor, what: str, expect=None, pixels: bool = True) -> None:
    """Refuse what editing cannot mean: a non-image model, no batch, an empty batch, another image shape than
    ``expect`` (default: the model's (C, H, W)), integer pixels or values far outside [-1, 1]."""
    shape = tuple(cm.sample_shape)
    if len(shape) != 3:
        raise ValueError(f"{what} needs an image model; this one takes samples of shape {shape}")
    if not torch.is_tensor(x) or x.ndim != 4:
        raise ValueError(f"{what} wants images of shape (B, C, H, W), got {tuple(getattr(x, 'shape', ()))}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} got an empty batch (0 images)")
    expect = tuple(expect or shape)
    if tuple(x.shape[1:]) != expect:
        raise ValueError(f"{what} wants images of shape {expect} for this {shape} model, got {tuple(x.shape[1:])}; "
                         "resize or convert the input to the model's channels and size")
    if pixels and (not x.is_floating_point() or float(x.abs().max()) > 1.5):
        top = float(x.max()) if x.numel() else 0.0
        raise ValueError(f"{what} wants pixel values in [-1, 1], got {x.dtype} values up to {top:g}; "
                         "scale 0..255 pixels with x / 127.5 - 1")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} got non-finite pixel values (NaN or inf)")


def editing_sigmas(cm, steps: int | None = None, sigmas=None) -> list[float]:
    """The sigmas an edit runs along: ``sigmas``, else ``steps`` steps as sampling takes them, else the model's
    editing schedule (18 Karras points for a model that has none)."""
    if sigmas is not None or steps is not None:
        return resolve_sigmas(cm, steps, sigmas)
    schedule = getattr(cm, "editing_schedule", None)
    sig = schedule() if schedule else karras_steps(18, cm.sigma_min, cm.sigma_max)
    return check_sigmas(sig, cm.sigma_min, cm.sigma_max).tolist()


@torch.no_grad()
def edit(cm, y: torch.Tensor, transform, known: torch.Tensor, sigmas=None, generator=None, steps: int | None = None,
         **cond) -> torch.Tensor:
    """Algorithm 4 with any orthogonal ``transform`` (``forward``/``inverse``) and a mask ``known`` over its
    coefficients (1 = known; broadcastable). ``y`` holds the known values (unknown ones are ignored)."""
    sig = editing_sigmas(cm, steps, sigmas)
    p = next(iter(cm.parameters()))
    y = y.to(device=p.device, dtype=p.dtype)
    known = known.to(device=p.device, dtype=p.dtype)
    cy = transform.forward(y)
    known = known.expand_as(cy)
    check_batch_fits(cm, y.shape[0], len(sig), p.device)

    def replace(x):
        return transform.inverse(known * cy + (1 - known) * transform.forward(x))

    z = per_sample_noise(y.shape[0], len(sig), y.shape[1:], generator, p.device, p.dtype)
    with eval_mode(cm):
        return multistep(cm, replace(torch.zeros_like(y)) + sig[0] * z[0], sig, noise=z[1:], project=replace, **cond)


def inpaint(cm, images: torch.Tensor, mask: torch.Tensor, sigmas=None, generator=None, steps: int | None = None,
             **cond):
    """Fill the pixels where ``mask == 0``; pixels where ``mask == 1`` are kept exactly."""
    check_images(cm, images, "inpaint")
    mask = torch.as_tensor(mask, dtype=images.dtype)
    try:
        torch.broadcast_shapes(mask.shape, images.shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to images {tuple(images.shape)}") \
            from None
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 (fill) and 1 (keep)")
    return edit(cm, images, Identity(), mask, sigmas, generator, steps, **cond)


def colorize(cm, gray: torch.Tensor, sigmas=None, generator=None, steps: int | None = None,
             **cond):
    """Colour a luminance image (B, 1, H, W); the output's luminance 0.2989 R + 0.5870 G + 0.1140 B equals it."""
    if len(cm.sample_shape) == 3 and cm.sample_shape[0] != 3:
        raise ValueError(f"colorize needs an RGB model; this one makes {cm.sample_shape[0]}-channel images")
    check_images(cm, gray, "colorize", (1, *tuple(cm.sample_shape)[1:]))
    basis = ColorBasis()
    # coefficient 0 = (luma / |luma|) . rgb = gray / |luma|; the others are unknown (zero here)
    y = basis.inverse(torch.cat([gray / basis.norm, torch.zeros_like(gray), torch.zeros_like(gray)], 1))
    known = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    return edit(cm, y, basis, known, sigmas, generator, steps, **cond)


def superres(cm, low_res: torch.Tensor, factor: int, sigmas=None, generator=None, steps: int | None = None,
             **cond):
    """Upsample by an integer ``factor``; each output patch's mean equals the low-resolution pixel."""
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    shape = tuple(cm.sample_shape)
    if len(shape) == 3 and torch.is_tensor(low_res) and low_res.ndim == 4 and low_res.shape[0] and \
            (low_res.shape[1], low_res.shape[2] * factor, low_res.shape[3] * factor) != shape:
        raise ValueError(f"low_res of shape {tuple(low_res.shape[1:])} x{factor} does not give the model's "
                         f"{shape} images")
    check_images(cm, low_res, "superres", (shape[0], *(n // factor for n in shape[1:])) if len(shape) == 3 else None)
    basis = PatchBasis(factor)
    y = low_res.repeat_interleave(factor, 2).repeat_interleave(factor, 3)  # patch mean = the low-res pixel
    known = torch.zeros(factor * factor)
    known[0] = 1
    return edit(cm, y, basis, known, sigmas, generator, steps, **cond)


@torch.no_grad()
def denoise(cm, noisy: torch.Tensor, sigma: float, **cond) -> torch.Tensor:
    """One-step denoising of images with Gaussian noise of known standard deviation ``sigma`` (EDM units)."""
    check_images(cm, noisy, "denoise", pixels=False)
    if not cm.sigma_min <= sigma <= cm.sigma_max:
        raise ValueError(f"sigma {sigma} is outside the model's range [{cm.sigma_min}, {cm.sigma_max}]")
    with eval_mode(cm):
        return cm(noisy, sigma, **cond)


@torch.no_grad()
def interpolate(cm, z0: torch.Tensor, z1: torch.Tensor, alphas, **cond) -> torch.Tensor:
    """Samples along the spherical interpolation (slerp) between two standard-normal noises, one step each, in one
    batch. Returns (len(alphas), *z0.shape)."""
    if len(alphas) < 1:
        raise ValueError("interpolate needs at least one point along the path (--num >= 1)")
    a, b = z0.flatten().double(), z1.flatten().double()
    theta = torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1, 1))
    t = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1, *([1] * z0.ndim))
    z = (torch.sin((1 - t) * theta) * z0.double() + torch.sin(t * theta) * z1.double()) / torch.sin(theta)
    with eval_mode(cm):
        return cm(cm.sigma_max * z.to(z0.dtype), cm.sigma_max, **cond)


@torch.no_grad()
def sdedit(cm, guide: torch.Tensor, sigma_start: float, sigmas=None, generator=None, **cond) -> torch.Tensor:
    """SDEdit-style editing: noise a rough guide (e.g. a stroke painting) to ``sigma_start`` and denoise it with
    the multistep sampler along ``sigmas`` (default: just ``[sigma_start]``)."""
    sig = resolve_sigmas(cm, None, sigmas if sigmas is not None else [sigma_start])
    if abs(sig[0] - sigma_start) > 1e-9 * max(1.0, sigma_start):
        raise ValueError("sigmas must start at sigma_start")
    check_images(cm, guide, "sdedit")
    p = next(iter(cm.parameters()))
    guide = guide.to(device=p.device, dtype=p.dtype)
    z = per_sample_noise(guide.shape[0], len(sig), guide.shape[1:], generator, p.device, p.dtype)
    with eval_mode(cm):
        return multistep(cm, guide + sig[0] * z[0], sig, noise=z[1:], **cond)
