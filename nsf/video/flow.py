"""Optical flow between frames (OpenCV's DIS: no network, no weights), warping with ``grid_sample``, the
forward/backward consistency check and the temporal loss of Ruder, Dosovitskiy and Brox ("Artistic style transfer
for videos", GCPR 2016).

Conventions: a flow is a ``(H, W, 2)`` float32 array (or a ``(1, 2, H, W)`` tensor) of ``(dx, dy)`` pixels. The
*backward* flow of frame ``t`` maps each of its pixels ``x`` to where it was in frame ``t-1``: ``x + b(x)``; the
*forward* flow of frame ``t-1`` maps its pixels to frame ``t``. Warping the previous frame by the backward flow
brings it into frame ``t``'s coordinates.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
           "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
DEFAULT_PRESET = "medium"  # bench/video.py: the lowest endpoint error on the test clips, a few ms a pair at 256 px


def grey(frame: Tensor | np.ndarray) -> np.ndarray:
    """A ``(1, 3, H, W)`` tensor in [0, 1] or an ``(H, W, 3)`` uint8 RGB array -> ``(H, W)`` uint8 luma for DIS."""
    if isinstance(frame, Tensor):
        a = frame[0].detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    else:
        a = frame
    return cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2GRAY)


class Flow:
    """DIS optical flow (``cv2.DISOpticalFlow``) with one of :data:`PRESETS`; ``pair(a, b)`` -> ``(forward,
    backward)`` flows between two frames of the same size."""

    def __init__(self, preset: str = DEFAULT_PRESET):
        if preset not in PRESETS:
            raise ConfigError(f"flow_preset={preset!r}; allowed: {', '.join(PRESETS)}", field="flow_preset",
                              value=preset, allowed=list(PRESETS))
        self.preset = preset
        self.dis = cv2.DISOpticalFlow_create(PRESETS[preset])  # type: ignore[attr-defined]

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The flow from grey frame ``a`` to grey frame ``b``: ``a(x) ~ b(x + flow(x))``, ``(H, W, 2)`` float32."""
        return self.dis.calc(a, b, None)

    def pair(self, previous: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(forward flow of previous, backward flow of current)``."""
        return self(previous, current), self(current, previous)


def as_tensor(flow: np.ndarray | Tensor, device: torch.device | str | None = None) -> Tensor:
    """A ``(H, W, 2)`` array -> a ``(1, 2, H, W)`` float32 tensor (a tensor passes through)."""
    if isinstance(flow, Tensor):
        return flow.to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(flow)).permute(2, 0, 1).unsqueeze(0).to(device, torch.float32)


def _grid(flow: Tensor) -> Tensor:
    """``grid_sample``'s grid ``(1, H, W, 2)`` for sampling at ``x + flow(x)`` (align_corners=True)."""
    _, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device, dtype=flow.dtype),
                            torch.arange(w, device=flow.device, dtype=flow.dtype), indexing="ij")
    x = (xs + flow[0, 0]) * (2 / max(w - 1, 1)) - 1
    y = (ys + flow[0, 1]) * (2 / max(h - 1, 1)) - 1
    return torch.stack([x, y], dim=-1).unsqueeze(0)


def warp(image: Tensor, flow: np.ndarray | Tensor) -> Tensor:
    """``image`` ``(B, C, H, W)`` sampled at ``x + flow(x)`` (bilinear; outside the frame: the nearest border pixel,
    which :func:`consistency` masks out). With the backward flow of frame ``t``, the previous frame in frame ``t``'s
    coordinates."""
    f = as_tensor(flow, image.device)
    return F.grid_sample(image, _grid(f).expand(image.shape[0], -1, -1, -1), mode="bilinear",
                         padding_mode="border", align_corners=True)


def consistency(forward: np.ndarray | Tensor, backward: np.ndarray | Tensor) -> Tensor:
    """Where frame ``t``'s backward flow can be trusted: ``(1, 1, H, W)``, 1 there and 0 at disocclusions, motion
    boundaries and pixels whose source lies outside frame ``t-1``.

    ``forward``: the flow of frame ``t-1`` to ``t``; ``backward``: the flow of frame ``t`` to ``t-1``. The test of
    Sundaram, Brox and Keutzer (ECCV 2010) as Ruder et al. use it: the forward flow brought to frame ``t``,
    ``f~(x) = f(x + b(x))``, should undo the backward flow, ``|f~ + b|^2 <= 0.01 (|f~|^2 + |b|^2) + 0.5``; and the
    backward flow should be smooth, ``|grad b_x|^2 + |grad b_y|^2 <= 0.01 |b|^2 + 0.002``.
    """
    b = as_tensor(backward)
    f = as_tensor(forward, b.device)
    _, _, h, w = b.shape
    f_at = warp(f, b)
    undo = (f_at + b).pow(2).sum(1)
    occluded = undo > 0.01 * (f_at.pow(2).sum(1) + b.pow(2).sum(1)) + 0.5
    gx = torch.zeros_like(b)
    gy = torch.zeros_like(b)
    gx[..., :, 1:-1] = (b[..., :, 2:] - b[..., :, :-2]) / 2  # central differences, as the paper's checker
    gy[..., 1:-1, :] = (b[..., 2:, :] - b[..., :-2, :]) / 2
    boundary = (gx.pow(2) + gy.pow(2)).sum(1) > 0.01 * b.pow(2).sum(1) + 0.002
    ys, xs = torch.meshgrid(torch.arange(h, dtype=b.dtype), torch.arange(w, dtype=b.dtype), indexing="ij")
    sx, sy = xs + b[0, 0], ys + b[0, 1]
    outside = (sx < 0) | (sx > w - 1) | (sy < 0) | (sy > h - 1)
    return (~(occluded | boundary | outside)).to(torch.float32).unsqueeze(1)


def temporal_loss(target: Tensor, weights: Tensor, weight: float) -> Callable[[Tensor], Tensor]:
    """Ruder et al.'s short-term temporal loss as a pixel term: ``x -> weight * sum(c * (x - target)^2) / (3 H W)``
    per image ``(B,)``, ``c`` the ``weights`` (the consistency mask, ``(1, 1, H, W)``), ``target`` the previous
    output warped into this frame ``(1, 3, H, W)``. An ``x`` of another size (a coarser scale) is compared with the
    target and weights resized to it."""
    cache: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    def loss(x: Tensor) -> Tensor:
        hw = (x.shape[-2], x.shape[-1])
        if hw not in cache:
            same = tuple(target.shape[-2:]) == hw
            t = target if same else F.interpolate(target, size=hw, mode="bilinear", align_corners=False,
                                                  antialias=True)
            c = weights if same else F.interpolate(weights, size=hw, mode="bilinear", align_corners=False,
                                                   antialias=True)
            cache[hw] = (t.to(x), c.to(x))
        t, c = cache[hw]
        return weight * (c * (x - t).pow(2)).flatten(1).sum(1) / (x.shape[1] * hw[0] * hw[1])

    return loss


def warping_error(current: Tensor, previous: Tensor, backward: np.ndarray | Tensor, mask: Tensor) -> float:
    """The warping error of Lai et al. (ECCV 2018) for one frame: the mean squared difference between output
    ``current`` and output ``previous`` warped by the (input frames') backward flow, over the pixels of ``mask``
    (non-occluded), per channel value in [0, 1]."""
    warped = warp(previous, backward)
    m = mask.to(current)
    return float((m * (current - warped).pow(2)).sum() / (m.sum().clamp_min(1) * current.shape[1]))
