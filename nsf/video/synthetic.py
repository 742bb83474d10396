"""Clips with known motion, made from still images: a camera pan/zoom and an object moving over a still background.

Each frame comes with its true backward flow and the mask of pixels visible in the previous frame, so flow,
warping, the consistency check and the warping error can be checked against the truth (tests, bench/video.py, the
bundled demo clip).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SyntheticFrame:
    image: Tensor  # (1, 3, H, W) in [0, 1]
    backward: Tensor  # (1, 2, H, W): where each pixel was in the previous frame, minus where it is (zeros: frame 0)
    visible: Tensor  # (1, 1, H, W): 1 where the pixel was visible in the previous frame


def _sample(src: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """``src`` ``(1, 3, H, W)`` sampled at pixel coordinates ``xs``, ``ys`` ``(h, w)`` (bilinear)."""
    _, _, h, w = src.shape
    grid = torch.stack([xs * (2 / (w - 1)) - 1, ys * (2 / (h - 1)) - 1], dim=-1).unsqueeze(0)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)


def pan(src: Tensor, n: int, size: tuple[int, int], *, start: tuple[float, float] = (0.0, 0.0),
        velocity: tuple[float, float] = (6.0, 3.0), scale: float = 0.6, zoom: float = 1.0) -> list[SyntheticFrame]:
    """A camera pan (and zoom) over ``src`` ``(1, 3, H, W)``: frame ``t`` shows ``src`` at ``o_t + s_t x`` with
    ``o_t = start + t velocity`` (source pixels) and ``s_t = scale * zoom**t`` (source pixels per frame pixel)."""
    h, w = size
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    out: list[SyntheticFrame] = []
    for t in range(n):
        ox, oy = start[0] + t * velocity[0], start[1] + t * velocity[1]
        s = scale * zoom**t
        image = _sample(src, ox + s * xs, oy + s * ys)
        if t == 0:
            back, visible = torch.zeros(1, 2, h, w), torch.zeros(1, 1, h, w)
        else:
            px, py, ps = ox - velocity[0], oy - velocity[1], scale * zoom ** (t - 1)
            bx = (ox + s * xs - px) / ps - xs
            by = (oy + s * ys - py) / ps - ys
            back = torch.stack([bx, by]).unsqueeze(0)
            sx, sy = xs + bx, ys + by
            visible = ((sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)).float()[None, None]
        out.append(SyntheticFrame(image, back, visible))
    return out


def moving_object(background: Tensor, sprite: Tensor, n: int, size: tuple[int, int], *,
                  start: tuple[float, float] = (0.15, 0.25), velocity: tuple[float, float] = (5.0, 2.0),
                  radius: float = 0.22) -> list[SyntheticFrame]:
    """A disc cut from ``sprite`` moving by ``velocity`` px a frame over ``background`` (both resized to ``size``):
    the background is still; the pixels it uncovers were hidden in the previous frame."""
    h, w = size
    bg = F.interpolate(background, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    r = radius * min(h, w)
    d = int(2 * r + 4)
    tex = F.interpolate(sprite, size=(d, d), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    out: list[SyntheticFrame] = []
    prev_inside: Tensor | None = None
    for t in range(n):
        cx, cy = start[0] * w + r + t * velocity[0], start[1] * h + r + t * velocity[1]
        inside = ((xs - cx) ** 2 + (ys - cy) ** 2 <= r * r)
        # the sprite moves with the disc: its pixel at x is the texture at x - centre (sub-pixel, bilinear)
        tx, ty = xs - cx + d / 2, ys - cy + d / 2
        disc = _sample(tex, tx.clamp(0, d - 1), ty.clamp(0, d - 1))
        image = torch.where(inside[None, None], disc, bg)
        back = torch.zeros(1, 2, h, w)
        if t == 0 or prev_inside is None:
            visible = torch.zeros(1, 1, h, w)
        else:
            back[0, 0][inside], back[0, 1][inside] = -velocity[0], -velocity[1]
            # a disc pixel was in the disc before (it moved with it); a background pixel was visible unless the disc
            # covered it
            visible = (inside | ~prev_inside).float()[None, None]
        prev_inside = inside
        out.append(SyntheticFrame(image, back, visible))
    return out
