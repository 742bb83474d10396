"""Pure tensor math for style transfer: Gram matrices, content/style/TV losses, and the other style losses
(Wasserstein-2 between per-layer Gaussians, sliced Wasserstein).

Everything here is batched over the leading dimension, returns per-image losses of
shape ``(B,)``, does no IO and never chooses a device or dtype: tensors come in on the
caller's device and the results stay there. Of nsf it imports only the names of the Gram normalizations; which
loss uses which function, and how, is :mod:`nsf.style_losses`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .style_losses import GRAM_NORMS

GramNorm = Literal["chw", "none"]  # what GRAM_NORMS holds; gram() takes any str and checks it


def wide(t: Tensor) -> Tensor:
    """``t`` in float32, or wider: half dtypes are upcast, float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gram(features: Tensor, norm: str = "chw", positions: int | None = None) -> Tensor:
    """Gram matrices of a batch of feature maps.

    Args:
        features: ``(B, C, H, W)`` feature maps.
        norm: ``"chw"`` divides ``F F^T`` by ``C*H*W`` (as neural-style does, so the
            loss does not depend on image size); ``"none"`` returns the plain ``F F^T``
            (as the seed notebook did).
        positions: the ``H*W`` that ``"chw"`` divides by; default the map's own. A tile of a
            larger map passes the whole map's count, so the tiles' Grams sum to the map's.

    Returns:
        ``(B, C, C)`` Gram matrices, in float32 or wider: a bf16/fp16 input is summed over ``H*W``
        in float32 (on CUDA by the half-precision product itself, written out as float32; elsewhere
        by upcasting first), so the sum does not lose precision.
    """
    if features.dim() != 4:
        raise ValueError(f"gram expects (B, C, H, W) features, got shape {tuple(features.shape)}")
    if norm not in GRAM_NORMS:
        raise ValueError(f"unknown gram norm {norm!r}; allowed: {', '.join(GRAM_NORMS)}")
    b, c, h, w = features.shape
    flat = features.reshape(b, c, h * w)
    half = flat.dtype in (torch.float16, torch.bfloat16)
    if half and flat.is_cuda:
        # half inputs are exact (the network's outputs); a float32 product of them would run at the
        # card's plain fp32 rate, about 1/15 of its bf16 rate: this is the largest matmul per step
        g = _HalfGram.apply(flat)
    elif half and flat.requires_grad:
        g = _WideGram.apply(flat)
    else:
        flat = wide(flat)
        g = torch.bmm(flat, flat.transpose(1, 2))
    if norm == "chw":
        g = g / (c * (h * w if positions is None else positions))
    return g


class _HalfGram(torch.autograd.Function):
    """``F F^T`` of half-precision ``(B, C, N)`` ``F`` (CUDA), accumulated and written in float32.

    torch's ``bmm(..., out_dtype=float32)`` has no derivative; this is it: ``dF = (dG + dG^T) F``, in
    ``F``'s dtype, as autocast's backward would compute it.
    """

    @staticmethod
    def forward(ctx: Any, flat: Tensor) -> Tensor:
        ctx.save_for_backward(flat)
        return torch.bmm(flat, flat.transpose(1, 2), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (flat,) = ctx.saved_tensors
        return torch.bmm((grad + grad.transpose(1, 2)).to(flat.dtype), flat)


class _WideGram(torch.autograd.Function):
    """``F F^T`` of half-precision ``(B, C, N)`` ``F`` computed in float32 (CPU), keeping ``F`` itself for the
    backward instead of its float32 copy.

    Autograd through ``bmm(F.float(), F.float()^T)`` keeps the float32 copy of every style layer's map for the
    whole step: measured on the default layers in bf16 (nsf.plan's per-pixel costs), 490 of 1406 saved bytes per
    pixel, and the largest tensor of the step (relu1_1's copy, 256 B per pixel), which the planner counts three
    times for the backward's buffers. The backward upcasts ``F`` again: ``dF = (dG + dG^T) F``, in float32, then
    cast to ``F``'s dtype, as autograd's cast would.
    """

    @staticmethod
    def forward(ctx: Any, flat: Tensor) -> Tensor:
        ctx.save_for_backward(flat)
        w = wide(flat)
        return torch.bmm(w, w.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (flat,) = ctx.saved_tensors
        return torch.bmm(grad + grad.transpose(1, 2), wide(flat)).to(flat.dtype)


# --- masked (regional) statistics -----------------------------------------------------------------------------
# Gatys et al. (2017) weight the features by guidance channels before the Gram, F diag(m)^2 F^T. Here a mask
# weights each position once, G = F diag(m) F^T / (C * sum m): the mask-weighted mean of f f^T, so a region's
# statistics are comparable with a whole style image's (a mask of ones is the plain Gram, exactly), and a soft
# edge blends linearly between the regions' statistics.


def masked_gram(features: Tensor, mask: Tensor, norm: str = "chw", positions: Tensor | None = None) -> Tensor:
    """Mask-weighted Gram matrices ``F diag(m) F^T`` ``(B, C, C)``, divided by ``C * sum(m)`` for ``"chw"``.

    Args:
        features: ``(B, C, H, W)`` feature maps.
        mask: ``(B|1, 1, H, W)`` weights in [0, 1] at the features' resolution.
        norm: as for :func:`gram`.
        positions: ``(B|1,)`` the ``sum(m)`` that ``"chw"`` divides by; default the mask's own. A tile of a
            larger map passes the whole mask's sum, so the tiles' Grams sum to the map's.

    Computed in float32 or wider. The backward, ``dF = ((dG + dG^T) F) diag(m)``, keeps only ``F`` (which the
    network keeps anyway) and ``m``: autograd through ``bmm(F * m, F^T)`` would keep ``F * m``, one extra
    feature map per mask and layer for the whole step.
    """
    if features.dim() != 4 or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != features.shape[-2:]:
        raise ValueError(f"masked_gram expects (B, C, H, W) features and a (B|1, 1, H, W) mask; got "
                         f"{tuple(features.shape)} and {tuple(mask.shape)}")
    if norm not in GRAM_NORMS:
        raise ValueError(f"unknown gram norm {norm!r}; allowed: {', '.join(GRAM_NORMS)}")
    b, c, h, w = features.shape
    flat = wide(features).reshape(b, c, h * w)
    m = mask.reshape(mask.shape[0], 1, h * w).to(flat.dtype)
    g = _MaskedGram.apply(flat, m)
    if norm == "chw":
        total = m.sum(dim=(1, 2)) if positions is None else positions.to(g.dtype)
        g = g / (c * total.clamp_min(1e-12)).view(-1, 1, 1)
    return g


class _MaskedGram(torch.autograd.Function):
    """``F diag(m) F^T`` of ``(B, C, N)`` ``F`` and ``(B|1, 1, N)`` weights ``m`` (no gradient for ``m``)."""

    @staticmethod
    def forward(ctx: Any, flat: Tensor, m: Tensor) -> Tensor:
        ctx.save_for_backward(flat, m)
        return torch.bmm(flat * m, flat.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        flat, m = ctx.saved_tensors
        return torch.bmm(grad + grad.transpose(1, 2), flat) * m, None


def masked_mean(features: Tensor, mask: Tensor, positions: Tensor | None = None) -> Tensor:
    """Mask-weighted feature means ``sum(m f) / sum(m)`` ``(B, C)`` of ``(B, C, H, W)`` features and a
    ``(B|1, 1, H, W)`` mask; ``positions`` ``(B|1,)``: the ``sum(m)`` divided by (a tile passes the whole mask's)."""
    m = mask.to(wide(features).dtype)
    total = m.sum(dim=(1, 2, 3)) if positions is None else positions.to(m.dtype)
    return (wide(features) * m).sum(dim=(2, 3)) / total.clamp_min(1e-12).view(-1, 1)


def mse_per_image(x: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per batch element: ``(B, ...)`` vs ``(B|1, ...)`` -> ``(B,)``."""
    diff = wide(x) - wide(target)
    return diff.pow(2).flatten(1).mean(dim=1)


def content_loss(features: Tensor, target: Tensor, positions: int | None = None) -> Tensor:
    """MSE between feature maps ``(B, C, H, W)`` and their targets, per image ``(B,)``.

    ``positions``: the ``H*W`` the squared errors are averaged over; default the map's own. A tile of
    a larger map passes the whole map's count, so the tiles' losses sum to the map's.
    """
    if positions is None:
        return mse_per_image(features, target)
    diff = wide(features) - wide(target)
    return diff.pow(2).flatten(1).sum(dim=1) / (features.shape[1] * positions)


def style_loss(features: Tensor, target_gram: Tensor, norm: str = "chw") -> Tensor:
    """MSE between the Gram matrices of ``features`` and ``target_gram`` ``(B|1, C, C)``, per image."""
    return mse_per_image(gram(features, norm), target_gram)


def tv_loss(images: Tensor) -> Tensor:
    """Total variation per image: mean |horizontal step| + mean |vertical step|, ``(B,)``.

    A 0/1 checkerboard scores 2 (every neighbour differs by 1); a flat image scores 0.
    """
    if images.dim() != 4:
        raise ValueError(f"tv_loss expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(dim=1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(dim=1)
    return dx + dy


# --- mean and covariance: squared Wasserstein-2 distance between Gaussians ------------------------------------

# Both covariances get eps * I, eps = W2_EPS * the style's mean variance: the cross term's derivative is
# (C_s^1/2 C_x C_s^1/2)^-1/2 / 2, unbounded where a covariance is singular (a layer with more channels than
# positions, e.g. relu5_1 at a coarse scale: 16 positions for 512 channels). With eps the eigenvalues of the
# cross term stay >= eps^2, the distance between equal covariances is still 0.
W2_EPS = 1e-4
# The covariance, the cross term and its eigenvalues are computed in float64 whatever the features' dtype.
# Measured on astronaut vs Starry Night features at 256 px, float64 as the reference: in float32 the gradient
# with respect to the features was off by 0.3-3.6% per layer (relu1_1..relu5_1; with respect to the second
# moments by 3-57%), the loss by 4e-5..3e-4; float32 moments fed to a float64 cross term were off by 1e-5 at
# most, so the moments stay float32. Cost: 336 ms per step for the default layers on one CPU thread, against
# 162 ms in float32 (bench/RESULTS.md has the whole-run cost).
W2_DTYPE = torch.float64


def feature_mean(features: Tensor, positions: int | None = None) -> Tensor:
    """``(B, C, H, W)`` features -> their mean over positions ``(B, C)``, in float32 or wider.

    ``positions``: the count divided by; default the map's own ``H*W``. A tile of a larger map passes the
    whole map's count, so the tiles' means sum to the map's.
    """
    b, c, h, w = features.shape
    return wide(features).sum(dim=(2, 3)) / (h * w if positions is None else positions)


def covariance(mean: Tensor, moment: Tensor) -> Tensor:
    """``(B, C, C)`` covariances from means ``(B, C)`` and second moments ``E[f f^T]`` ``(B, C, C)``."""
    return moment - mean.unsqueeze(-1) * mean.unsqueeze(-2)


def _eye_like(m: Tensor) -> Tensor:
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)


def sqrtm_psd(m: Tensor) -> Tensor:
    """Square roots ``(B, C, C)`` of symmetric positive semi-definite ``(B, C, C)`` matrices (by eigh; negative
    rounding-error eigenvalues count as 0). Not meant for backpropagation: :func:`w2_gaussian` differentiates
    only through eigenvalues."""
    vals, vecs = torch.linalg.eigh((m + m.transpose(-1, -2)) / 2)
    return (vecs * vals.clamp_min(0).sqrt().unsqueeze(-2)) @ vecs.transpose(-1, -2)


@dataclass(frozen=True)
class Gaussian:
    """A layer's target: mean ``(B|1, C)``, covariance with ``eps * I`` ``(B|1, C, C)``, its square root and
    ``eps`` ``(B|1,)``; built once per scale by :func:`gaussian` (the root is the costly part)."""

    mean: Tensor
    cov: Tensor
    cov_sqrt: Tensor
    eps: Tensor


def _w2_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, W2_DTYPE)


def gaussian(mean: Tensor, moment: Tensor, rel_eps: float = W2_EPS) -> Gaussian:
    """The :class:`Gaussian` target of a style layer from its mean ``(B, C)`` and second moment ``(B, C, C)``
    (in float64, :data:`W2_DTYPE`)."""
    mean, moment = mean.to(_w2_dtype(mean)), moment.to(_w2_dtype(moment))
    cov = covariance(mean, moment)
    c = cov.shape[-1]
    eps = rel_eps * torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1).clamp_min(0) / c + 1e-12
    cov = cov + eps.view(-1, 1, 1) * _eye_like(cov)
    return Gaussian(mean, cov, sqrtm_psd(cov), eps)


def w2_gaussian(mean: Tensor, moment: Tensor, target: Gaussian) -> Tensor:
    """Squared Wasserstein-2 distance between the Gaussian of features with ``mean`` ``(B, C)`` and second
    moment ``moment`` ``(B, C, C)`` and ``target``, divided by ``C``, per image ``(B,)``:

        (|mu_x - mu_s|^2 + tr(C_x + C_s - 2 (C_s^1/2 C_x C_s^1/2)^1/2)) / C

    The trace of the matrix square root is the sum of the square roots of the eigenvalues of
    ``C_s^1/2 C_x C_s^1/2`` (symmetric PSD): its gradient, ``V diag(1 / 2 sqrt(l)) V^T``, needs the eigenvalues
    only, none of the ``1 / (l_i - l_j)`` terms of an eigenvector's derivative, so equal eigenvalues are harmless.
    Eigenvalues under ``eps^2 / 2`` (rounding error: the true ones are >= ``eps^2``) are clamped there.
    Computed in float64 (:data:`W2_DTYPE`); returned in the moments' dtype (float32 or wider).
    """
    out = wide(moment).dtype
    dt = _w2_dtype(moment)
    mean, moment = mean.to(dt), moment.to(dt)
    c = mean.shape[-1]
    eps = target.eps.view(-1, 1, 1).to(dt)
    cov = covariance(mean, moment) + eps * _eye_like(moment)
    root = target.cov_sqrt.to(dt)
    cross = root @ cov @ root
    vals = torch.linalg.eigvalsh((cross + cross.transpose(-1, -2)) / 2)
    tr_sqrt = vals.clamp_min(eps.view(-1, 1) ** 2 / 2).sqrt().sum(-1)
    trace = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) + torch.diagonal(target.cov, dim1=-2, dim2=-1).sum(-1).to(dt)
    return (((mean - target.mean.to(dt)).pow(2).sum(-1) + trace - 2 * tr_sqrt) / c).to(out)


# --- sliced Wasserstein -------------------------------------------------------------------------------------


def directions(channels: int, count: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """``count`` random unit vectors in ``R^channels`` as the columns of a ``(channels, count)`` matrix, drawn
    from ``generator`` (on its device)."""
    d = torch.randn(channels, count, generator=generator, dtype=dtype,
                    device=generator.device if generator is not None else None)
    return d / d.norm(dim=0, keepdim=True).clamp_min(1e-12)


def sorted_projections(features: Tensor, dirs: Tensor) -> Tensor:
    """``(B, C, H, W)`` features projected on ``dirs`` ``(C, K)``, each projection sorted: ``(B, K, H*W)``."""
    b, c, h, w = features.shape
    flat = wide(features).reshape(b, c, h * w)
    proj = torch.einsum("bcn,ck->bkn", flat, dirs.to(flat.dtype))
    return proj.sort(dim=-1).values


def resample_sorted(values: Tensor, n: int) -> Tensor:
    """Sorted ``(B, K, M)`` values (a distribution's quantiles) at ``n`` evenly spaced ranks ``(B, K, n)``,
    by linear interpolation (the same values when ``M == n``)."""
    if values.shape[-1] == n:
        return values
    return torch.nn.functional.interpolate(values, size=n, mode="linear", align_corners=True)


def sliced_wasserstein(features: Tensor, dirs: Tensor, target: Tensor) -> Tensor:
    """Sliced (squared) Wasserstein-2 distance per image ``(B,)``: the mean over the ``K`` directions ``dirs``
    ``(C, K)`` and the ``N = H*W`` positions of the squared difference between the sorted projections of
    ``features`` ``(B, C, H, W)`` and ``target`` ``(B|1, K, N)`` (the style's sorted projections on the same
    directions, resampled to ``N``). Invariant to any permutation of the positions."""
    mine = sorted_projections(features, dirs)
    return (mine - target.to(mine.dtype)).pow(2).flatten(1).mean(dim=1)
