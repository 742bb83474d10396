"""Style targets: what a style loss matches at each style layer, built once per scale from the style images.

The statistics each loss reads and how it blends several styles are the loss's (:mod:`nsf.style_losses`); this
module runs the network over the styles (tile by tile where asked: the same sums) and hands them over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..config import StyleConfig
from ..style_losses import FEATURES, GRAMS, MEANS, Gram, Part, StyleLoss, style_loss
from ..tiling import Sums, TiledFeatures
from .masks import StyleInput, one_part_masks, style_parts

if TYPE_CHECKING:
    from ..vgg import FeatureExtractor


@dataclass
class StyleTargets:
    """What a style loss matches, per style layer, for the blended styles of one scale: ``layers`` maps each style
    layer to its loss's target (:meth:`nsf.style_losses.StyleLoss.target`: the blended Gram matrices
    ``(B|1, C, C)`` of the Gram loss, the :class:`~nsf.losses.Gaussian` of the mean-covariance loss, ...)."""

    loss: str
    layers: dict[str, Any] = field(default_factory=dict)

    @property
    def grams(self) -> dict[str, Any]:
        """The per-layer targets (the Gram loss's blended Grams)."""
        return self.layers

    @property
    def gaussians(self) -> dict[str, Any]:
        """The per-layer targets (the mean-covariance loss's Gaussians)."""
        return self.layers


@dataclass
class Region:
    """One style of a run with masks: its :class:`StyleTargets` (that style alone), where it goes (``mask``
    ``(B|1, 1, H, W)`` in [0, 1] at the scale's size) and its ``weight``.

    Each style layer's loss is ``sum_r weight_r * share_r * d(S_r(x), T_r)``: ``S_r`` the image's statistics
    weighted by mask ``r`` at the layer's resolution, ``share_r`` the mask's mean there. The share makes a
    region's pull per pixel that of an unmasked run whatever the region's area (the masked Gram divides by the
    mask's sum); a position no mask covers has no style loss; a mask of ones is the unmasked run.
    """

    targets: StyleTargets
    mask: Tensor
    weight: float = 1.0


def _style_sums(extractor: FeatureExtractor, layers: Sequence[str], part: Tensor, tile: tuple[int, int] | None,
                mask: Tensor | None, **what: Any) -> Sums:
    """Pass 1 over one style batch ``part`` ``(b, 3, h, w)``; with ``mask`` ``(b|1, 1, h, w)`` its Grams and means
    are mask-weighted (the style mask: where the style's statistics come from)."""
    tf = TiledFeatures(extractor, layers, part.shape[-2], part.shape[-1], tile,
                       masks=mask.unsqueeze(0) if mask is not None else None)
    sums = tf.sums(part, **what)
    if mask is not None:  # one region: (b, 1, C, C) -> (b, C, C)
        sums.grams = {n: g[:, 0] for n, g in sums.grams.items()}
        sums.means = {n: m[:, 0] for n, m in sums.means.items()}
    return sums


def layer_targets(extractor: FeatureExtractor, loss: StyleLoss, styles: Sequence[StyleInput], blend: Sequence[float],
                  layers: Sequence[str], gram_norm: str, tile: tuple[int, int] | None = None,
                  masks: Sequence[Tensor | None] | None = None) -> dict[str, Any]:
    """``{layer: loss.target(...)}`` for ``styles`` blended by ``blend`` (normalized to sum 1): each style's
    statistics (what ``loss`` reads; Grams with ``gram_norm``), per part, handed to the loss."""
    style_masks = one_part_masks(styles, masks)
    if not loss.masks and any(m is not None for m in style_masks):
        raise loss.masks_refusal()
    what: dict[str, Any] = {"grams": layers if GRAMS in loss.reads else (), "norm": gram_norm,
                            "means": layers if MEANS in loss.reads else (),
                            "keep": layers if FEATURES in loss.reads else ()}
    total = float(sum(blend))
    stats = [(w / total, [_style_sums(extractor, layers, p, tile, mask, **what) for p in style_parts(style)])
             for style, w, mask in zip(styles, blend, style_masks)]
    return {n: loss.target([(w, [Part(s.grams.get(n), s.means.get(n), s.kept.get(n)) for s in sums])
                            for w, sums in stats]) for n in layers}


def style_grams(extractor: FeatureExtractor, styles: Sequence[StyleInput], blend: Sequence[float],
                layers: Sequence[str], gram_norm: str, tile: tuple[int, int] | None = None,
                masks: Sequence[Tensor | None] | None = None) -> dict[str, Tensor]:
    """Blended target Gram matrices: ``sum_k w_k G(style_k)`` per layer (weights normalized to sum 1).

    Each style is a ``(B|1, 3, h, w)`` batch, or a list of ``(1, 3, h_i, w_i)`` images of any sizes,
    one per content image (a batch of requests with their own styles). Blending the Grams is
    equivalent to weighting each style's loss for MSE (up to a constant). With ``tile``, an image
    larger than the tile is run tile by tile (:mod:`nsf.tiling`; the same Grams). ``masks``: a style mask
    ``(B|1, 1, h, w)`` or ``None`` per style; a masked style's Grams are mask-weighted.
    """
    return layer_targets(extractor, style_loss(Gram.name), styles, blend, layers, gram_norm, tile, masks)


def style_targets(extractor: FeatureExtractor, styles: Sequence[StyleInput], blend: Sequence[float],
                  cfg: StyleConfig, tile: tuple[int, int] | None = None,
                  masks: Sequence[Tensor | None] | None = None) -> StyleTargets:
    """The :class:`StyleTargets` of ``cfg.style_loss`` for ``styles`` blended by ``blend`` (as :func:`style_grams`;
    each loss blends its own statistics: :meth:`nsf.style_losses.StyleLoss.target`). With ``tile``, an image
    larger than the tile is run tile by tile (the same targets). ``masks``: style masks, as for :func:`style_grams`.
    """
    loss = style_loss(cfg.style_loss)
    return StyleTargets(loss.name, layer_targets(extractor, loss, styles, blend, list(cfg.style_layers),
                                                 loss.gram_norm(cfg), tile, masks))


def as_targets(style: Mapping[str, Tensor] | StyleTargets) -> StyleTargets:
    """``style`` as :class:`StyleTargets`: a mapping of Grams is the Gram loss's targets."""
    return style if isinstance(style, StyleTargets) else StyleTargets(Gram.name, dict(style))
