"""Image geometry on tensors: output sizes and resizing. Core code (no PIL, no files).

The coarse-to-fine loop and the PIL edge (:mod:`nsf.image`) both use these, so they live in neither. The size
arithmetic is on ints: importing this module imports no torch (:mod:`nsf.config` reads ``MIN_SIDE``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

MIN_SIDE = 16  # below this VGG-19's deeper pooled layers have no pixels left; smaller inputs say so


def target_size(h: int, w: int, size: int, mode: str = "long_side") -> tuple[int, int]:
    """(H, W) with the longer side ``size`` and the aspect ratio kept, or ``size x size`` for ``square``."""
    if mode == "square":
        return size, size
    if h >= w:
        return size, max(1, round(w * size / h))
    return max(1, round(h * size / w)), size


def resize(t: Tensor, hw: tuple[int, int], *, clamp: bool = True) -> Tensor:
    """Antialiased bilinear resize of ``(B, 3, H, W)`` to ``hw``, clamped to [0, 1] (``clamp=False``: not, e.g. an
    image being optimized, whose gradient must pass); a no-op when the size already matches."""
    if tuple(t.shape[-2:]) == tuple(hw):
        return t
    import torch.nn.functional as F  # noqa: N812 - here, not at the top: the size arithmetic needs no torch

    out = F.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0, 1) if clamp else out
