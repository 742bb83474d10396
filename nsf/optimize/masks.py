"""Masks a run takes (regional styles) checked before any work: one per style, the image's aspect ratio, some area.

Light: a server checks a request's masks with these before it queues the request, without the optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..errors import ConfigError

StyleInput = Tensor | Sequence[Tensor]


def style_parts(style: StyleInput) -> list[Tensor]:
    """A style as a list of batches: ``[batch]`` for a ``(B|1, 3, h, w)`` tensor, else its per-image list."""
    return [style] if isinstance(style, Tensor) else list(style)


ASPECT_TOLERANCE = 0.02  # a mask's aspect ratio may differ from its image's by this share (rounded resizes)


def check_mask(mask: Tensor, image_hw: tuple[int, int], *, field: str, name: str | None = None,
               batch: int = 1) -> Tensor:
    """``mask`` ``(1|batch, 1, h, w)`` if a run takes it for an image of ``image_hw``: its aspect ratio (within
    ``ASPECT_TOLERANCE``) and some area above zero; else a :class:`ConfigError` on ``field`` (``name``: what the
    message calls the mask, default ``field``)."""
    name = name or field
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch):
        raise ConfigError(f"{name}: shape {tuple(mask.shape)}; allowed: (1|{batch}, 1, h, w)", field=field,
                          value=tuple(mask.shape), allowed=f"(1|{batch}, 1, h, w)")
    (h, w), (mh, mw) = image_hw, mask.shape[-2:]
    if abs(mh * w - mw * h) > ASPECT_TOLERANCE * h * mw:
        allowed = f"the aspect ratio of its image ({w}x{h} px), e.g. {w}x{h}"
        raise ConfigError(f"{name} is {mw}x{mh} px for an image of {w}x{h}; allowed: {allowed}", field=field,
                          value=(mw, mh), allowed=allowed)
    if not bool((mask.flatten(1).amax(1) > 0).all()):
        allowed = "a mask with some area above zero (white: where the style goes or comes from)"
        raise ConfigError(f"{name} is all zero (black); allowed: {allowed}", field=field, value="all zero",
                          allowed=allowed)
    return mask


def _one_per_style(given: Sequence[Any], styles: Sequence[StyleInput], field: str) -> None:
    if len(given) != len(styles):
        raise ConfigError(f"{field}: {len(given)} for {len(styles)} style image(s); allowed: {len(styles)}, "
                          "one per style", field=field, value=len(given), allowed=f"{len(styles)}, one per style")


def one_part_masks(styles: Sequence[StyleInput], masks: Sequence[Tensor | None] | None) -> list[Tensor | None]:
    """Style masks, one per style or ``None``, checked against ``styles`` (a mask needs a style given once)."""
    if masks is None:
        return [None] * len(styles)
    _one_per_style(masks, styles, "style_masks")
    for k, (style, m) in enumerate(zip(styles, masks), start=1):
        if m is not None and len(style_parts(style)) != 1:
            raise ConfigError(f"style_masks {k}: a mask for a style given per content image; allowed: a mask "
                              "for a style given once", field="style_masks", allowed="a style given once")
    return list(masks)


def checked_masks(content: Tensor, styles: Sequence[StyleInput], masks: Sequence[Tensor] | None,
                  style_masks: Sequence[Tensor | None] | None
                  ) -> tuple[list[Tensor] | None, list[Tensor | None] | None]:
    """``masks`` and ``style_masks`` (:func:`nsf.optimize.run`) checked against the content ``(B, 3, H, W)`` and
    ``styles`` (:func:`check_mask` each; :class:`ConfigError` on ``masks`` or ``style_masks``)."""
    if masks is not None:
        _one_per_style(masks, styles, "masks")
        masks = [check_mask(m, (content.shape[-2], content.shape[-1]), field="masks", name=f"masks {k}",
                            batch=content.shape[0]) for k, m in enumerate(masks, start=1)]
    if style_masks is not None:
        style_masks = [None if m is None else check_mask(m, (style_parts(s)[0].shape[-2], style_parts(s)[0].shape[-1]),
                                                         field="style_masks", name=f"style_masks {k}",
                                                         batch=style_parts(s)[0].shape[0])
                       for k, (m, s) in enumerate(zip(one_part_masks(styles, style_masks), styles), start=1)]
    return (list(masks) if masks is not None else None), style_masks


def masks_refusal(loss: str) -> ConfigError:
    """The error for style loss ``loss`` given masks, where it takes none (:attr:`nsf.style_losses.StyleLoss.masks`)."""
    from ..style_losses import style_loss

    return style_loss(loss).masks_refusal()
