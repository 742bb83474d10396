"""What the optimizer tells its caller while it runs: a step's :class:`Progress`, a scale's :class:`ScaleDone`.

No torch at import: a server's streaming code reads these types without the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives after each step."""

    step: int  # 1-based, counted over all scales
    total: int  # steps planned over all scales (early stopping may end sooner)
    scale: int  # the scale's index: into config.scales, then len(scales) + j for the j-th refinement scale
    size: tuple[int, int]  # (H, W) being optimized at this scale
    loss: float
    content: float
    style: float
    tv: float
    tiles: int = 1  # tiles per step at this scale (1: the step ran on the whole image)


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class ScaleDone:
    """What an ``on_scale`` hook receives when a coarse-to-fine scale ends (a server's progress preview)."""

    scale: int  # the scale's index, as in Progress.scale (schedule() may fold small scales: not 0, 1, 2...)
    number: int  # 1-based position of this scale in the run
    scales: int  # scales in the run's schedule
    size: tuple[int, int]  # (H, W) of this scale
    step: int  # steps done so far over all scales
    total: int  # steps planned over all scales
    loss: float  # the scale's best loss, summed over the batch
    image: Tensor  # (B, 3, H, W) in [0, 1]: the scale's best iterate (detached)
    stopped: bool  # stop() asked to end the run here: the scales after this one do not run


ScaleCallback = Callable[[ScaleDone], None]
