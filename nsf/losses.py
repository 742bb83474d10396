"""Pure tensor math for style transfer: Gram matrices, content/style/TV losses.

Everything here is batched over the leading dimension, returns per-image losses of
shape ``(B,)``, does no IO and never chooses a device or dtype: tensors come in on the
caller's device and the results stay there. Nothing in this module imports nsf.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

GramNorm = Literal["chw", "none"]  # what GRAM_NORMS holds; gram() takes any str and checks it
GRAM_NORMS: tuple[str, ...] = ("chw", "none")


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
