"""The coarse-to-fine schedule: which sizes a run optimizes, with how many steps each, and how each scale runs.

Integer arithmetic on the options: no torch at import (admission control and the planner read it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..config import StyleConfig
from ..geometry import MIN_SIDE, target_size

LBFGS_HISTORY = 100  # L-BFGS curvature pairs at most


def layer_weights(layers: Sequence[str], weights: Sequence[float] | None) -> dict[str, float]:
    """``{layer: weight}``, 1 each where ``weights`` is ``None``."""
    return dict(zip(layers, weights if weights is not None else [1.0] * len(layers)))


def split_steps(steps: int, shares: Sequence[float]) -> list[int]:
    """Split ``steps`` over the scales by ``shares``, exactly (largest remainder), at least 1 at the last scale."""
    total = float(sum(shares))
    raw = [steps * s / total for s in shares]
    out = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[: steps - sum(out)]:
        out[i] += 1
    if out[-1] == 0:
        donor = max(range(len(out)), key=out.__getitem__)
        out[donor] -= 1
        out[-1] += 1
    return out


def schedule(h: int, w: int, cfg: StyleConfig) -> list[tuple[int, tuple[int, int], int]]:
    """``[(scale index, (H, W), steps)]`` for an ``h x w`` content.

    The coarse-to-fine ``scales`` run relative to ``min(size, base_size)`` (scales too small for VGG
    fold their steps into the next); a larger ``size`` then adds refinement scales, each twice the
    last and the final one ``size``, with ``refine_steps`` each (at least 1 at the final scale).
    """
    base = min(cfg.size, cfg.base_size) if cfg.base_size else cfg.size
    plan: list[tuple[int, tuple[int, int], int]] = []
    carry = 0
    for i, (scale, n) in enumerate(zip(cfg.scales, split_steps(cfg.steps, cfg.scale_steps))):
        hw = target_size(h, w, max(1, round(base * scale)), cfg.resize)
        if i < len(cfg.scales) - 1 and min(hw) < 2 * MIN_SIDE:  # relu5_1 keeps >= 2x2 px
            carry += n
            continue
        if n + carry > 0:
            plan.append((i, hw, n + carry))
        carry = 0
    sizes: list[int] = []
    while (sizes or [base])[-1] < cfg.size:
        sizes.append(min(cfg.size, 2 * (sizes or [base])[-1]))
    for j, long_side in enumerate(sizes):
        n = cfg.refine_steps[min(j, len(cfg.refine_steps) - 1)]
        if n > 0 or j == len(sizes) - 1:
            plan.append((len(cfg.scales) + j, target_size(h, w, long_side, cfg.resize), max(1, n)))
    return plan


@dataclass(frozen=True)
class Layout:
    """How one scale runs within a memory budget (see :mod:`nsf.plan`)."""

    tile: tuple[int, int] | None = None  # owned tile (th, tw) px of exact tiled steps; None: whole image
    history: int | None = None  # L-BFGS curvature pairs; None: as many as the scale's steps can use
    cut: int | None = None  # tiled: the module index from which pass 1 keeps each tile's graph (nsf.tiling)


def is_refinement(cfg: StyleConfig, scale_index: int) -> bool:
    """Whether the :func:`schedule` entry of ``scale_index`` is a refinement scale (above ``base_size``)."""
    return scale_index >= len(cfg.scales)


def preview_size(h: int, w: int, cfg: StyleConfig, scale_index: int) -> tuple[int, int] | None:
    """The ``(H, W)`` of the preview term at the :func:`schedule` entry of ``scale_index`` for an ``h x w`` content:
    the base scale's size (the ``base_size`` picture) at a refinement scale with ``refine_preview_weight > 0``;
    ``None`` where the entry has no preview term (a coarse scale, or the term is off).

    The loop scores the output downsampled to this size with the base scale's objective, and the planner counts that
    objective's memory and time, from this one rule.
    """
    if not is_refinement(cfg, scale_index) or cfg.refine_preview_weight <= 0:
        return None
    return target_size(h, w, min(cfg.size, cfg.base_size) if cfg.base_size else cfg.size, cfg.resize)


def style_side(hw: tuple[int, int], style_hw: tuple[int, int], cfg: StyleConfig, scale_index: int) -> int:
    """The long side a style image of size ``style_hw`` is used at, at the :func:`schedule` entry ``scale_index`` of
    size ``hw`` (its full-size objective; the preview term's style is the base scale's).

    ``stroke_scale="picture"``: the scale's long side times ``style_scale`` (upscaled if need be). ``"pixels"``: the
    same, never above the style's own size; at a refinement scale with the preview term (its full-size objective
    matches the detail layers only) the style's own size, however large (a 2000-6000 px scan: the print's detail is
    the style's own), times ``style_scale`` where that is below 1.
    """
    long_side = max(MIN_SIDE, round(max(hw) * cfg.style_scale))
    own = max(style_hw)
    if cfg.stroke_scale != "pixels":
        return long_side
    if is_refinement(cfg, scale_index) and cfg.refine_preview_weight > 0:
        return min(own, max(MIN_SIDE, round(own * cfg.style_scale)))
    return min(long_side, own)


def style_tile(hw: tuple[int, int], tile: tuple[int, int] | None, tiles: bool, align: int) -> tuple[int, int] | None:
    """The tile the style images of a scale of size ``hw`` run in (a pass without gradient, for their targets): the
    scale's own; an untiled scale's style larger than the scale (a scan used at its own resolution) in tiles of the
    scale's long side, so its pass never needs more than the scale's; ``None`` for a loss that cannot tile."""
    if tile is not None or not tiles:
        return tile
    side = -(-max(hw) // align) * align
    return (side, side)


def refined(cfg: StyleConfig) -> StyleConfig:
    """The options of a refinement scale's full-size objective (above ``base_size``): ``content_weight`` times
    ``refine_content_weight``, each style layer's weight times its ``refine_style_layer_weights`` entry; with the
    preview term (``refine_preview_weight > 0``) only the style layers named in ``refine_detail_layers``."""
    # Past the style image's own size (stroke_scale=pixels) the deep layers' 156 px fields see a composition
    # laid out at base_size, larger than the style's forms: at 2048 px from 512 px images relu4_1/relu5_1 score
    # 0.36/0.32 with equal weights, the shallow layers 0.02-0.12 (bench/RESULTS.md "refinement weights")
    style = layer_weights(cfg.style_layers, cfg.style_layer_weights)
    boost = cfg.refine_style_layer_weights or (1.0,) * len(style)
    weights = {n: w * b for (n, w), b in zip(style.items(), boost)}
    if cfg.refine_preview_weight > 0:  # the deeper layers count in the preview term, at the base scale's size
        weights = {n: w for n, w in weights.items() if n in cfg.refine_detail_layers}
    return replace(cfg, content_weight=cfg.content_weight * cfg.refine_content_weight,
                   style_layers=tuple(weights), style_layer_weights=tuple(weights.values()))
