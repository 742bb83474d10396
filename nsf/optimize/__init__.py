"""The optimizer, in rooms by reason to change:

* :mod:`~nsf.optimize.events`: :class:`Progress` and :class:`ScaleDone`, what a run reports (no torch);
* :mod:`~nsf.optimize.scales`: the coarse-to-fine :func:`schedule`, :class:`Layout` (no torch);
* :mod:`~nsf.optimize.masks`: the checks of a run's masks (:func:`checked_masks`, :func:`check_mask`);
* :mod:`~nsf.optimize.targets`: the style targets a loss matches (:func:`style_targets`, :class:`Region`);
* :mod:`~nsf.optimize.objective`: the per-step :class:`Objective`, whole or tile by tile;
* :mod:`~nsf.optimize.loop`: :func:`run` and one scale's steps (CUDA graphs, iterate averaging).

The style losses themselves are :mod:`nsf.style_losses`. Names are loaded from their module when first used, so
``from nsf.optimize import schedule, ScaleDone`` (a server's admission and streaming) does not import the loop.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import StyleConfig
    from ..geometry import resize
    from .events import Progress, ProgressCallback, ScaleCallback, ScaleDone
    from .loop import GRAPH_WARMUP, LBFGS, SYNC_EVERY, _optimize_scale, _resize_style, run, upsample  # noqa: F401 - tests reach these
    from .masks import ASPECT_TOLERANCE, StyleInput, check_mask, checked_masks, masks_refusal, style_parts
    from .objective import Objective, PixelLoss, Preview
    from .scales import (
        LBFGS_HISTORY,
        Layout,
        is_refinement,
        layer_weights,
        preview_size,
        refined,
        schedule,
        split_steps,
        style_side,
    )
    from .targets import Region, StyleTargets, layer_targets, style_grams, style_targets

_HOMES = {
    "events": ("Progress", "ProgressCallback", "ScaleCallback", "ScaleDone"),
    "scales": ("LBFGS_HISTORY", "Layout", "is_refinement", "layer_weights", "preview_size", "refined", "schedule",
               "split_steps", "style_side"),
    "masks": ("ASPECT_TOLERANCE", "StyleInput", "check_mask", "checked_masks", "masks_refusal", "style_parts"),
    "targets": ("Region", "StyleTargets", "layer_targets", "style_grams", "style_targets"),
    "objective": ("Objective", "PixelLoss", "Preview"),
    "loop": ("GRAPH_WARMUP", "LBFGS", "SYNC_EVERY", "_optimize_scale", "_resize_style", "run", "upsample",
             "resize", "StyleConfig"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}

__all__ = ["ASPECT_TOLERANCE", "GRAPH_WARMUP", "LBFGS", "LBFGS_HISTORY", "Layout", "Objective", "PixelLoss", "Preview",
           "Progress", "ProgressCallback", "Region", "SYNC_EVERY", "ScaleCallback", "ScaleDone", "StyleConfig",
           "StyleInput", "StyleTargets", "check_mask", "checked_masks", "is_refinement", "layer_targets",
           "layer_weights", "masks_refusal", "preview_size", "refined", "resize", "run", "schedule", "split_steps",
           "style_grams", "style_parts", "style_side", "style_targets", "upsample"]


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'nsf.optimize' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later reads are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
