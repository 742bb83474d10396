"""The optimization loop: targets, the per-step objective, coarse-to-fine L-BFGS/Adam.

Pure tensors in, tensors out: no files, no printing, no device choice (everything runs
on the device of the tensors it is given).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from . import losses
from .config import StyleConfig
from .errors import ConfigError
from .geometry import MIN_SIDE, resize, target_size
from .lbfgs import LBFGS
from .tiling import Sums, TiledFeatures

if TYPE_CHECKING:
    from .vgg import FeatureExtractor


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
# A loss term of the image's pixels alone: (B, 3, h, w) at the scale's size -> (B,), differentiable
PixelLoss = Callable[[Tensor], Tensor]


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


def _layer_weights(layers: Sequence[str], weights: Sequence[float] | None) -> dict[str, float]:
    return dict(zip(layers, weights if weights is not None else [1.0] * len(layers)))


@dataclass
class StyleTargets:
    """What a style loss matches, per style layer, for the blended styles of one scale.

    ``gram``: the blended Gram matrices ``(B|1, C, C)``. ``mean_cov``: the :class:`~nsf.losses.Gaussian` of the
    blended styles' features (their mixture's mean and covariance, the style's square root computed once
    here). ``sliced``: each style's features ``(b, C, h, w)`` per part with its blend weight; the targets are
    drawn at each step from fresh projections (:meth:`Objective.resample`).
    """

    loss: str
    grams: dict[str, Tensor] = field(default_factory=dict)
    gaussians: dict[str, losses.Gaussian] = field(default_factory=dict)
    samples: list[tuple[float, list[dict[str, Tensor]]]] = field(default_factory=list)


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


def sliced_refusal(what: str) -> ConfigError:
    """The error for a sliced loss asked to run tile by tile (``what``: why it was)."""
    allowed = [n for n in losses.STYLE_LOSSES if n != "sliced"]
    # Exact tiling would need each projection sorted over the whole image: pass 1 would keep every position's
    # projected values (about 490 bytes per pixel for the default layers, a fifth of an untiled step's
    # activations) and the global ranks; not built.
    return ConfigError(f"style_loss='sliced' {what}: it sorts each projection over the whole image, which tiled "
                       f"steps do not see at once; allowed: {', '.join(allowed)} (tile exactly), or a smaller size "
                       "or more max_memory", field="style_loss", value="sliced", allowed=allowed)


def masks_refusal() -> ConfigError:
    """The error for a sliced loss given masks."""
    allowed = [n for n in losses.STYLE_LOSSES if n != "sliced"]
    # a masked sliced loss would compare weighted quantiles (each position's mask as its probability mass); not built
    return ConfigError(f"style_loss='sliced' with masks: regional statistics are built for the Gram and mean-"
                       f"covariance losses; allowed: {', '.join(allowed)}", field="style_loss", value="sliced",
                       allowed=allowed)


class Objective(nn.Module):
    """``forward(x) -> (loss, parts)``: per-image losses ``(B,)`` of a batch ``x`` in [0, 1] and their
    ``(content, style, tv)`` parts ``(B, 3)``. Images do not interact: the gradient of ``loss.sum()``
    with respect to image ``b`` is that of its own loss. This is the function that ``torch.compile``
    wraps; AOTAutograd then compiles its backward too.

    ``style``: :class:`StyleTargets` for ``cfg.style_loss``, or a mapping of target Grams (the gram loss), or
    a list of :class:`Region` (regional styles with masks; gram and mean_cov losses).
    With ``style_loss="sliced"``, :meth:`resample` draws new projections from ``generator``; call it before
    each step.

    With ``tile`` (owned tile ``(th, tw)`` px), :meth:`value_and_grad` computes the same loss and
    gradient tile by tile (:mod:`nsf.tiling`), so only one tile's activations are alive at a time; the
    content targets and normalizers are computed tile by tile too (gram and mean_cov losses only).

    ``pixel_loss(x) -> (B,)``: a term of the pixels alone (no VGG), added to each image's loss (e.g. video's temporal
    loss). It is evaluated once on the whole image, also in tiled steps, so tiling stays exact.
    """

    def __init__(self, extractor: FeatureExtractor, cfg: StyleConfig, content: Tensor,
                 style: Mapping[str, Tensor] | StyleTargets | Sequence[Region], tile: tuple[int, int] | None = None,
                 generator: torch.Generator | None = None, pixel_loss: PixelLoss | None = None):
        super().__init__()
        self.pixel_loss = pixel_loss
        self.regions: list[Region] | None = None
        if not isinstance(style, (Mapping, StyleTargets)):
            self.regions = list(style)
            if not self.regions:
                raise ValueError("an objective with masks needs one region or more")
            if cfg.style_loss == "sliced":
                raise masks_refusal()
            targets = StyleTargets(cfg.style_loss)
        else:
            targets = style if isinstance(style, StyleTargets) else StyleTargets("gram", grams=dict(style))
        for t in [r.targets for r in self.regions] if self.regions else [targets]:
            if t.loss != cfg.style_loss:
                raise ValueError(f"style targets for style_loss={t.loss!r} given to an objective of "
                                 f"style_loss={cfg.style_loss!r}; allowed: targets from style_targets(cfg=...)")
        masks = torch.stack(torch.broadcast_tensors(*[r.mask for r in self.regions])) if self.regions else None
        self.extractor = extractor
        self.style_loss = cfg.style_loss
        # the mean-covariance loss reads second moments F F^T / N: Grams normalized by C*H*W, times C
        self.gram_norm = cfg.gram_norm if self.style_loss == "gram" else "chw"
        self.cw, self.sw, self.tvw = float(cfg.content_weight), float(cfg.style_weight), float(cfg.tv_weight)
        self.content_w = _layer_weights(cfg.content_layers, cfg.content_layer_weights)
        self.style_w = _layer_weights(cfg.style_layers, cfg.style_layer_weights)
        self.tiled = TiledFeatures(extractor, [*self.content_w, *self.style_w], content.shape[-2], content.shape[-1],
                                   tile, masks=masks)
        if self.style_loss == "sliced" and self.tiles > 1:
            raise sliced_refusal("cannot run tile by tile")
        self.style_targets = targets.grams
        self.gaussians = targets.gaussians
        self.samples = targets.samples
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.directions: dict[str, Tensor] = {}
        self.sliced_targets: dict[str, Tensor] = {}
        with torch.no_grad():
            sliced = self.style_loss == "sliced"
            sums = self.tiled.sums(content, grams=self._gram_layers, norm=self.gram_norm, means=self._mean_layers,
                                   keep=list(dict.fromkeys([*self.content_w, *(self.style_w if sliced else ())])))
            self.content_targets = {n: sums.kept[n].detach() for n in self.content_w}
            # positions of each style layer's map at this scale (what the style's sorted projections are resampled to)
            self.positions = {n: f.shape[-2] * f.shape[-1] for n, f in sums.kept.items() if n in self.style_w}
            if sliced:
                self.resample()
            # Departure from the paper: with normalize_losses each layer's loss is divided by its
            # value at the content image, so layers count alike and weights transfer across images.
            self.content_scale: dict[str, Tensor | float] = {n: 1.0 for n in self.content_w}
            self.style_scale: dict[str, Tensor | float] = {n: 1.0 for n in self.style_w}
            if cfg.normalize_losses:
                for n, f in self.content_targets.items():
                    self.content_scale[n] = 1.0 / losses.wide(f).pow(2).flatten(1).mean(1).clamp_min(1e-12)
                at_content = self.style_terms(sums.grams, sums.means, sums.kept)
                for n, d in at_content.items():
                    self.style_scale[n] = 1.0 / torch.maximum(d, self._floor(n).to(d.dtype)).clamp_min(1e-20)

    @property
    def _gram_layers(self) -> list[str]:
        return list(self.style_w) if self.style_loss in ("gram", "mean_cov") else []

    @property
    def _mean_layers(self) -> list[str]:
        return list(self.style_w) if self.style_loss == "mean_cov" else []

    def _floor(self, n: str) -> Tensor:
        """A millionth of the target's own size: the normalizer's floor where the content is the style (with
        masks, the regions' floors weighted as their losses are)."""
        if self.regions is not None:
            shares = self.tiled.mask_shares(n)
            return cast(Tensor, sum(r.weight * shares[i] * self._target_floor(n, r.targets.grams, r.targets.gaussians)
                                    for i, r in enumerate(self.regions)))
        return self._target_floor(n, self.style_targets, self.gaussians)

    def _target_floor(self, n: str, grams: Mapping[str, Tensor], gaussians: Mapping[str, losses.Gaussian]) -> Tensor:
        if self.style_loss == "gram":
            return 1e-6 * losses.wide(grams[n]).pow(2).flatten(1).mean(1)
        if self.style_loss == "mean_cov":
            g = gaussians[n]
            return 1e-6 * (g.mean.pow(2).sum(-1) + torch.diagonal(g.cov, dim1=-2, dim2=-1).sum(-1)) / g.mean.shape[-1]
        return 1e-6 * self.sliced_targets[n].pow(2).flatten(1).mean(1)

    @property
    def tiles(self) -> int:
        """Tiles per step: 1 when the step runs on the whole image."""
        return len(self.tiled.tiles)

    @torch.no_grad()
    def resample(self) -> None:
        """``style_loss="sliced"``: draw new projection directions (``C`` per layer, from ``generator``) and the
        style's sorted projections on them, resampled to the image's positions and blended (the weighted mean
        of the styles' quantiles: their Wasserstein barycenter along each direction). Tensors are updated in
        place, so a compiled objective sees the new ones. Other losses: nothing."""
        if self.style_loss != "sliced":
            return
        for n in self.style_w:
            first = self.samples[0][1][0][n]
            dirs = losses.directions(first.shape[1], first.shape[1], self.generator).to(first.device)
            target = cast(Tensor, sum(w * torch.cat([losses.resample_sorted(losses.sorted_projections(p[n], dirs),
                                                                            self.positions[n]) for p in parts])
                                      for w, parts in self.samples))
            if n in self.directions:
                self.directions[n].copy_(dirs)
                self.sliced_targets[n].copy_(target)
            else:
                self.directions[n], self.sliced_targets[n] = dirs, target

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.extractor(x)
        if self.regions is not None:  # the regions' masked statistics, (B, R, C, C) and (B, R, C)
            whole = self.tiled.shares(feats, self.tiled.tiles[0], grams=self._gram_layers, norm=self.gram_norm,
                                      means=self._mean_layers)
            grams, means = whole.grams, whole.means
        else:
            grams = {n: losses.gram(feats[n], self.gram_norm) for n in self._gram_layers}
            means = {n: losses.feature_mean(feats[n]) for n in self._mean_layers}
        return self.combine({n: losses.content_loss(feats[n], self.content_targets[n]) for n in self.content_w},
                            self.style_terms(grams, means, feats), x)

    def style_terms(self, grams: Mapping[str, Tensor], means: Mapping[str, Tensor],
                    feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each style layer's loss ``(B,)`` before weights and normalizers, from the image's Grams ``(B, C, C)``
        and means ``(B, C)`` (gram, mean_cov) or its features ``(B, C, h, w)`` (sliced). With masks, the Grams
        ``(B, R, C, C)`` and means ``(B, R, C)`` are the regions' and the loss is their weighted sum
        (:class:`Region`)."""
        if self.regions is not None:
            out: dict[str, Tensor] = {}
            for n in self.style_w:
                shares = self.tiled.mask_shares(n)
                terms = [self._term(grams[n][:, i], means[n][:, i] if n in means else None, r.targets, n)
                         for i, r in enumerate(self.regions)]
                out[n] = cast(Tensor, sum(r.weight * share * d for r, share, d in zip(self.regions, shares, terms)))
            return out
        if self.style_loss == "gram":
            return {n: losses.mse_per_image(grams[n], self.style_targets[n]) for n in self.style_w}
        if self.style_loss == "mean_cov":
            return {n: losses.w2_gaussian(means[n], grams[n] * grams[n].shape[-1], self.gaussians[n])
                    for n in self.style_w}
        return {n: losses.sliced_wasserstein(feats[n], self.directions[n], self.sliced_targets[n])
                for n in self.style_w}

    def _term(self, gram: Tensor, mean: Tensor | None, targets: StyleTargets, n: str) -> Tensor:
        """One region's loss at layer ``n`` ``(B,)`` from its masked Gram ``(B, C, C)`` and mean ``(B, C)``."""
        if self.style_loss == "gram":
            return losses.mse_per_image(gram, targets.grams[n])
        if mean is None:
            raise ValueError(f"style_loss={self.style_loss!r} needs the regions' means")
        return losses.w2_gaussian(mean, gram * gram.shape[-1], targets.gaussians[n])

    def combine(self, content_mse: dict[str, Tensor], style: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        """The loss from per-layer content MSEs ``(B,)`` and style terms ``(B,)`` (:meth:`style_terms`) of ``x``
        ``(B, 3, H, W)``."""
        # cast: sum() of tensors is typed as possibly its int start (there is at least one layer)
        c = cast(Tensor, sum(w * content_mse[n] * self.content_scale[n] for n, w in self.content_w.items()))
        s = cast(Tensor, sum(w * style[n] * self.style_scale[n] for n, w in self.style_w.items()))
        tv = losses.tv_loss(x) if self.tvw > 0 else x.new_zeros(x.shape[0])
        c, s, tv = self.cw * c, self.sw * s, self.tvw * tv
        total = c + s + tv if self.pixel_loss is None else c + s + tv + self.pixel_loss(x)
        return total, torch.stack([c, s, tv], dim=1).detach()

    @torch.no_grad()
    def value(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``forward(x)`` without a gradient, tile by tile (pass 1 of :mod:`nsf.tiling`)."""
        sums = self.tiled.sums(x, grams=self._gram_layers, norm=self.gram_norm, content=self.content_targets,
                               means=self._mean_layers, keep=list(self.style_w) if self.style_loss == "sliced" else ())
        return self.combine(sums.content, self.style_terms(sums.grams, sums.means, sums.kept), x)

    def value_and_grad(self, x: Tensor, on_tile: Callable[[int, int], None] | None = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, parts, d loss.sum() / dx)``, tile by tile: only one tile's activations are alive at a time."""
        if self.style_loss == "sliced":
            raise sliced_refusal("cannot run tile by tile")
        sums = self.tiled.sums(x, grams=self._gram_layers, norm=self.gram_norm, content=self.content_targets,
                               means=self._mean_layers)
        with torch.enable_grad():
            # the loss as a function of the whole-image sums; autograd gives its derivatives, so the
            # chain rule through combine() is not written a second time
            leaves_c = {n: v.detach().requires_grad_(True) for n, v in sums.content.items()}
            leaves_g = {n: v.detach().requires_grad_(True) for n, v in sums.grams.items()}
            leaves_m = {n: v.detach().requires_grad_(True) for n, v in sums.means.items()}
            on_pixels = self.tvw > 0 or self.pixel_loss is not None  # terms of x itself: differentiated here
            xt = x.detach().requires_grad_(on_pixels)
            loss, parts = self.combine(leaves_c, self.style_terms(leaves_g, leaves_m, {}), xt)
            wrt = [*leaves_c.values(), *leaves_g.values(), *leaves_m.values(), *([xt] if on_pixels else [])]
            d = torch.autograd.grad(loss.sum(), wrt)
        k, g = len(leaves_c), len(leaves_g)
        d_content, d_grams = dict(zip(leaves_c, d[:k])), dict(zip(leaves_g, d[k:k + g]))
        d_means = dict(zip(leaves_m, d[k + g:k + g + len(leaves_m)]))
        grad = self.tiled.backward(x, d_grams, d_content, self.content_targets, self.gram_norm, on_tile,
                                   d_means=d_means)
        if on_pixels:
            grad += d[-1]
        return loss.detach(), parts, grad


StyleInput = Tensor | Sequence[Tensor]


def style_parts(style: StyleInput) -> list[Tensor]:
    """A style as a list of batches: ``[batch]`` for a ``(B|1, 3, h, w)`` tensor, else its per-image list."""
    return [style] if isinstance(style, Tensor) else list(style)


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


def _one_part_masks(styles: Sequence[StyleInput], masks: Sequence[Tensor | None] | None) -> list[Tensor | None]:
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
    """``masks`` and ``style_masks`` (:func:`run`) checked against the content ``(B, 3, H, W)`` and ``styles``
    (:func:`check_mask` each; :class:`ConfigError` on ``masks`` or ``style_masks``)."""
    if masks is not None:
        _one_per_style(masks, styles, "masks")
        masks = [check_mask(m, (content.shape[-2], content.shape[-1]), field="masks", name=f"masks {k}",
                            batch=content.shape[0]) for k, m in enumerate(masks, start=1)]
    if style_masks is not None:
        style_masks = [None if m is None else check_mask(m, (style_parts(s)[0].shape[-2], style_parts(s)[0].shape[-1]),
                                                         field="style_masks", name=f"style_masks {k}",
                                                         batch=style_parts(s)[0].shape[0])
                       for k, (m, s) in enumerate(zip(_one_part_masks(styles, style_masks), styles), start=1)]
    return (list(masks) if masks is not None else None), style_masks




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
    total = float(sum(blend))
    out: dict[str, Tensor] = {}
    for style, w, mask in zip(styles, blend, _one_part_masks(styles, masks)):
        grams = [_style_sums(extractor, layers, p, tile, mask, grams=layers, norm=gram_norm).grams
                 for p in style_parts(style)]
        for n in layers:
            g = torch.cat([gr[n] for gr in grams]) * (w / total)
            out[n] = out[n] + g if n in out else g
    return out


def style_targets(extractor: FeatureExtractor, styles: Sequence[StyleInput], blend: Sequence[float],
                  cfg: StyleConfig, tile: tuple[int, int] | None = None,
                  masks: Sequence[Tensor | None] | None = None) -> StyleTargets:
    """The :class:`StyleTargets` of ``cfg.style_loss`` for ``styles`` blended by ``blend`` (as :func:`style_grams`).

    mean_cov blends the styles' means and second moments (the moments of their mixture) and then takes the
    covariance and its square root; sliced keeps each style's features. With ``tile``, an image larger than the
    tile is run tile by tile (the same targets). ``masks``: style masks, as for :func:`style_grams`.
    """
    layers = list(cfg.style_layers)
    if cfg.style_loss == "gram":
        return StyleTargets("gram", grams=style_grams(extractor, styles, blend, layers, cfg.gram_norm, tile, masks))
    total = float(sum(blend))
    style_masks = _one_part_masks(styles, masks)
    if cfg.style_loss == "sliced":
        if any(m is not None for m in style_masks):
            raise masks_refusal()
        return StyleTargets("sliced", samples=[(w / total, [_style_sums(extractor, layers, p, tile, None,
                                                                        keep=layers).kept
                                                            for p in style_parts(style)])
                                               for style, w in zip(styles, blend)])
    means: dict[str, Tensor] = {}
    moments: dict[str, Tensor] = {}
    for style, w, mask in zip(styles, blend, style_masks):
        w = w / total
        sums = [_style_sums(extractor, layers, p, tile, mask, grams=layers, norm="chw", means=layers)
                for p in style_parts(style)]
        for n in layers:
            m = torch.cat([s.means[n] for s in sums]) * w
            g = torch.cat([s.grams[n] * s.grams[n].shape[-1] for s in sums]) * w  # F F^T / N
            means[n] = means[n] + m if n in means else m
            moments[n] = moments[n] + g if n in moments else g
    return StyleTargets("mean_cov", gaussians={n: losses.gaussian(means[n], moments[n]) for n in layers})


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


def run(extractor: FeatureExtractor, content: Tensor, styles: Sequence[StyleInput], cfg: StyleConfig, *,
        init: Tensor | None = None, callback: ProgressCallback | None = None,
        compile_fn: Callable[[nn.Module], Callable] | None = None,
        generator: torch.Generator | None = None, cuda_graph: bool = False,
        layout: Sequence[Layout] | None = None, on_tile: Callable[[int, int], None] | None = None,
        on_scale: ScaleCallback | None = None, stop: Callable[[], bool] | None = None,
        masks: Sequence[Tensor] | None = None, style_masks: Sequence[Tensor | None] | None = None,
        resume: tuple[int, Tensor] | None = None, pixel_loss: PixelLoss | None = None) -> Tensor:
    """Optimize pixels so their features match ``content`` and their Grams match ``styles``.

    Args:
        extractor: maps ``(B, 3, H, W)`` [0, 1] images to ``{layer: features}``; frozen.
        content: ``(B, 3, H, W)`` in [0, 1], any size: it is resized per scale.
        styles: one or more styles, blended by ``cfg.style_blend_weights``; each a ``(B|1, 3, h, w)``
            batch or a list of B ``(1, 3, h_i, w_i)`` images (one per content image).
        init: a start image ``(B|1, 3, h, w)``; else ``cfg.init`` (``content`` or ``noise``).
        compile_fn: wraps the :class:`Objective` (e.g. ``torch.compile``); ``None`` runs eagerly.
        cuda_graph: on CUDA with L-BFGS, record one whole step (objective, gradient, best iterate,
            L-BFGS update) as a CUDA graph after a few eager steps and replay it: no per-kernel
            launch cost. Falls back to eager steps, with a warning, if the capture fails.
        layout: one :class:`Layout` per entry of :func:`schedule` (tile and history per scale), as
            :func:`nsf.plan.plan` chooses them for a memory budget; ``None``: untiled, full history.
            Tiled scales run eagerly (no compile, no CUDA graph).
        on_tile: called with ``(done, total)`` after each tile of a tiled step.
        on_scale: called with a :class:`ScaleDone` (the scale's best image) as each scale ends.
        masks: regional styles: one content mask ``(B|1, 1, h, w)`` in [0, 1] per style, resized with the
            content at each scale (its aspect ratio the content's). Style ``k`` is matched where mask ``k`` is
            (:class:`Region`; overlaps blend by the masks' values, an uncovered area keeps the content only),
            weighted by ``style_blend_weights`` (``w_k * K / sum(w)``: 1 each by default).
        style_masks: one ``(1, 1, h, w)`` mask per style, the style image's size, or ``None``: where in the
            style image its statistics come from.
        stop: polled before each step after the first (on CUDA at each host sync, every ``SYNC_EVERY``
            steps); once it returns true the scale ends with its best iterate (at a scale's first step:
            its start, the previous scale's result upsampled), ``on_scale`` says ``stopped``, and the
            later scales do not run (a client's deadline or disconnect). The result is then that image
            brought to the last scale's size (with the content's detail band, as between scales).
        resume: ``(k, x)``: run entries ``k..`` of :func:`schedule` only (``k >= 1``), from ``x``, the result of
            entry ``k - 1`` (``(B, 3, h, w)``, e.g. a :class:`ScaleDone` image), brought up as between scales;
            the same steps, targets and options as the whole run's last scales (a benchmark of one scale). A
            :class:`ScaleDone` image is clamped to [0, 1] and the image run() hands on is not: where L-BFGS left
            pixels outside, the resumed scale starts from the clamped ones.
        pixel_loss: ``f(x) -> (B,)``, a term of the pixels alone added to every step's loss at every scale (``x``
            at that scale's size; video's temporal loss). Not part of ``Progress``'s content/style/tv.

    Returns:
        ``(B, 3, H, W)`` in [0, 1] at the last scale's size: the best iterate of the last scale.
    """
    b, _, h0, w0 = content.shape
    blend = cfg.style_blend_weights or (1.0,) * len(styles)
    if len(blend) != len(styles):
        raise ValueError(f"style_blend_weights has {len(blend)} values for {len(styles)} style images; "
                         "give one per style")
    for style in map(style_parts, styles):
        one = len(style) == 1 and style[0].shape[0] in (1, b)
        if not one and (len(style) != b or any(p.shape[0] != 1 for p in style)):
            raise ValueError(f"a style of {len(style)} part(s) with batch sizes {[p.shape[0] for p in style]} "
                             f"for a content batch of {b}; allowed: one (1|{b}, 3, h, w) batch or a list of "
                             f"{b} (1, 3, h, w) images, one per content image")
    masks, checked = checked_masks(content, styles, masks, style_masks)
    if masks is not None and cfg.style_loss == "sliced":
        raise masks_refusal()
    style_masks = checked if checked is not None else [None] * len(styles)
    plan = schedule(h0, w0, cfg)
    layout = list(layout) if layout is not None else [Layout()] * len(plan)
    if len(layout) != len(plan):
        raise ValueError(f"layout has {len(layout)} entries for a schedule of {len(plan)} scales; "
                         "allowed: one per scale")
    first, x = 0, None
    if resume is not None:
        first, x = resume[0], resume[1].to(content)
        if not 0 < first < len(plan):
            raise ValueError(f"resume starts at entry {first} of a schedule of {len(plan)} scales; "
                             f"allowed: 1..{len(plan) - 1}")
    total = sum(n for _, _, n in plan[first:])
    step = 0
    for number, ((scale_index, hw, n_steps), lay) in islice(enumerate(zip(plan, layout), start=1), first, None):
        c = resize(content, hw)
        style_long = max(MIN_SIDE, round(max(hw) * cfg.style_scale))
        sized = [_resize_style(s, style_long, cfg) for s in styles]
        sized_masks = [m if m is None else resize(m, (sz[0].shape[-2], sz[0].shape[-1]))
                       for m, sz in zip(style_masks, sized)]
        targets: StyleTargets | list[Region]
        if masks is not None:  # each style its own targets, where its mask is
            k = float(sum(blend)) / len(blend)
            targets = [Region(style_targets(extractor, [st], [1.0], cfg, tile=lay.tile, masks=[sm]), resize(m, hw),
                              w / k) for st, sm, m, w in zip(sized, sized_masks, masks, blend)]
        else:
            targets = style_targets(extractor, sized, blend, cfg, tile=lay.tile, masks=sized_masks)
        scale_cfg = refined(cfg) if scale_index >= len(cfg.scales) else cfg
        objective = Objective(extractor, scale_cfg, c, targets, tile=lay.tile, generator=generator,
                              pixel_loss=pixel_loss)
        tiled = objective.tiles > 1
        loss_fn = compile_fn(objective) if compile_fn is not None and not tiled else objective
        if x is None:
            if init is not None:
                x = resize(init.to(c), hw).expand(b, -1, -1, -1)
            elif cfg.init == "noise":
                x = torch.rand(c.shape, generator=generator, dtype=torch.float32).to(c)
            else:
                x = c
        else:
            x = upsample(x, hw, c if cfg.restore_detail and init is None and cfg.init == "content" else None)
        x = x.detach().clone().contiguous().requires_grad_(True)
        # sliced: new projections are drawn on the host before each step; a replayed CUDA graph would reuse the
        # first step's (not measured on a GPU: none was lent to this work)
        sliced = cfg.style_loss == "sliced"
        x, step, best, stopped = _optimize_scale(loss_fn, x, cfg, n_steps, step, total, scale_index, callback,
                                                 cuda_graph and not tiled and not sliced, history=lay.history,
                                                 tiled=objective if tiled else None, on_tile=on_tile, stop=stop,
                                                 resample=objective.resample if sliced else None)
        if on_scale is not None:
            on_scale(ScaleDone(scale_index, number, len(plan), hw, step, total, float(best.sum()),
                               x.detach().clamp(0, 1), stopped))
        if stopped:
            final = plan[-1][1]
            if hw != final:  # a partial result has the size asked for: the best image so far, upsampled
                keep = cfg.restore_detail and init is None and cfg.init == "content"
                x = upsample(x.detach(), final, resize(content, final) if keep else None)
            break
    if x is None:  # pragma: no cover - schedule() always keeps the last scale
        raise RuntimeError("empty schedule")
    return x.detach().clamp(0, 1)


def refined(cfg: StyleConfig) -> StyleConfig:
    """The options of a refinement scale (above ``base_size``): ``content_weight`` times
    ``refine_content_weight``, each style layer's weight times its ``refine_style_layer_weights`` entry."""
    # Past the style image's own size (stroke_scale=pixels) the deep layers' 156 px fields see a composition
    # laid out at base_size, larger than the style's forms: at 2048 px from 512 px images relu4_1/relu5_1 score
    # 0.36/0.32 with equal weights, the shallow layers 0.02-0.12 (bench/RESULTS.md "refinement weights")
    style = _layer_weights(cfg.style_layers, cfg.style_layer_weights)
    boost = cfg.refine_style_layer_weights or (1.0,) * len(style)
    return replace(cfg, content_weight=cfg.content_weight * cfg.refine_content_weight,
                   style_layer_weights=tuple(w * b for w, b in zip(style.values(), boost)))


def upsample(x: Tensor, hw: tuple[int, int], content: Tensor | None = None) -> Tensor:
    """``x`` resized to ``hw``; with ``content`` (of size ``hw``), plus the content detail that ``x``'s size
    cannot hold (``content - up(down(content))``, a Laplacian band): an ``x`` equal to the downsized
    content comes back as the content itself."""
    up = resize(x, hw)
    if content is None:
        return up
    # Departure from plain coarse-to-fine: its upsampled start is blurred and the finer scale spends
    # steps re-sharpening it (measured: with the band, 150 steps score about as 200 without)
    return up + (content - resize(resize(content, (x.shape[-2], x.shape[-1])), hw))


def _resize_style(style: StyleInput, long_side: int, cfg: StyleConfig) -> list[Tensor]:
    """Each part of ``style`` at ``long_side``; with ``stroke_scale="pixels"`` never above its own size."""
    return [resize(s, target_size(s.shape[-2], s.shape[-1],
                                  min(long_side, max(s.shape[-2:])) if cfg.stroke_scale == "pixels" else long_side,
                                  cfg.resize))
            for s in style_parts(style)]


# How often the loop reads losses back to the host (progress, early stop). Each read waits for the
# device; on CUDA that leaves the GPU idle while Python queues the next step, so it reads every 10.
SYNC_EVERY = {"cuda": 10}
LBFGS_HISTORY = 100


def _optimize_scale(loss_fn: Callable, x: Tensor, cfg: StyleConfig, n_steps: int, step: int, total: int,
                    scale_index: int, callback: ProgressCallback | None,
                    cuda_graph: bool = False, *, history: int | None = None, tiled: Objective | None = None,
                    on_tile: Callable[[int, int], None] | None = None,
                    stop: Callable[[], bool] | None = None,
                    resample: Callable[[], None] | None = None) -> tuple[Tensor, int, Tensor, bool]:
    """Run ``n_steps`` steps at one scale -> ``(best image, steps so far, best loss per image (B,), stopped by
    stop())``.

    ``resample`` runs before each step (the sliced loss's new projections). With ``cfg.iterate_average``, an
    exponential moving average of the iterates (bias-corrected, as in crowsonkb/style-transfer-pytorch) is
    kept and scored once at the end, with the final iterate: it is returned only where its loss is below the
    best iterate's.
    """
    b, hw = x.shape[0], (x.shape[-2], x.shape[-1])
    sync_every = SYNC_EVERY.get(x.device.type, 1)
    # Adam steps are projected onto [0, 1]; L-BFGS's are not, since clipping behind its back corrupts
    # its curvature pairs (measured: 1.5% higher final loss); its result is clamped once at the end.
    project = cfg.optimizer == "adam"
    if project:
        adam = torch.optim.Adam([x], lr=cfg.lr)
    else:
        # n steps make at most n - 1 curvature pairs: a longer history is passes over empty slots
        pairs = max(1, min(LBFGS_HISTORY, n_steps - 1))
        lbfgs = LBFGS(x.detach(), lr=cfg.lr, history_size=min(pairs, history) if history else pairs)
    best = torch.full((b,), float("inf"), device=x.device)
    best_x = x.detach().clone()
    last_loss, last_parts = torch.zeros(b, device=x.device), torch.zeros(3, device=x.device)
    decay = float(cfg.iterate_average)
    average = x.detach().clone() if decay > 0 else None
    averaged = torch.zeros((), device=x.device)  # iterates in the average (a tensor: graph-replayable)

    def advance() -> None:  # one step; every tensor it keeps is updated in place (graph-replayable)
        if project:
            with torch.no_grad():
                x.clamp_(0, 1)  # projected steps: the image scored is the image that may be returned
        if tiled is not None:
            loss, parts, grad = tiled.value_and_grad(x, on_tile)
        else:
            loss, parts = loss_fn(x)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        with torch.no_grad():
            v = loss.detach()
            better = v < best  # the loss is of x before this step's update: keep that x, per image
            best.copy_(torch.where(better, v, best))
            best_x.copy_(torch.where(better.view(-1, *[1] * (x.dim() - 1)), x, best_x))
            last_loss.copy_(v)
            last_parts.copy_(parts.sum(0))
            if project:
                x.grad = grad
                adam.step()
            else:
                lbfgs.step(x, grad)
            if average is not None:  # EMA of the updated iterates, bias-corrected: the first one is itself
                averaged.add_(1)
                weight = (1 - decay) / (1 - torch.pow(decay, averaged))
                average.lerp_(x.detach().clamp(0, 1) if project else x.detach(), weight)

    tiles = tiled.tiles if tiled is not None else 1
    graphed = cuda_graph and not project and x.device.type == "cuda" and n_steps > GRAPH_WARMUP + 1
    step_fn: Callable[[], None] = advance
    values = torch.zeros(n_steps, b, device=x.device)
    parts_log = torch.zeros(n_steps, 3, device=x.device)
    losses_seen: list[float] = []  # the batch's summed loss per step, read back at sync points
    done, end, stopped = 0, False, False
    for i in range(n_steps):
        # asked before a step (once the run has made one, and where every step so far has been
        # reported): at a scale's first step the result is its start, the last scale's best upsampled
        if stop is not None and i == done and step > 0 and stop():
            stopped = True
            break
        if resample is not None:
            resample()
        if graphed and i < GRAPH_WARMUP:
            _on_side_stream(advance)  # warm-up steps (real steps) off the default stream, as capture wants
        else:
            if graphed and i == GRAPH_WARMUP:
                step_fn = _capture(advance) or advance
            step_fn()
        values[i].copy_(last_loss)
        parts_log[i].copy_(last_parts)
        if (i + 1) % sync_every and i + 1 < n_steps:
            continue
        for total_loss, (c, s, tv) in zip(values[done:i + 1].sum(1).tolist(), parts_log[done:i + 1].tolist()):
            losses_seen.append(total_loss)
            step += 1
            if callback is not None:
                callback(Progress(step, total, scale_index, hw, total_loss, c, s, tv, tiles))
            end = end or not _finite(total_loss) or _stalled(losses_seen, cfg)
        done = i + 1
        if end:
            break
    # the final update was never evaluated; evaluate it so the best iterate includes it
    # (with grad mode on, as in the steps, so a compiled objective is not recompiled)
    if project:
        with torch.no_grad():
            x.clamp_(0, 1)
    final = (tiled.value(x) if tiled is not None else loss_fn(x))[0].detach()
    shape = (-1, *[1] * (x.dim() - 1))
    best_x = torch.where((final < best).view(shape), x.detach(), best_x)
    best = torch.minimum(best, final)
    if average is not None:
        # the average was never a step's iterate: scored here, with the same objective (and, sliced, the same
        # projections) as the final iterate, it replaces the best iterate only where it is better
        a = average.detach().clone().requires_grad_(x.requires_grad)
        scored = (tiled.value(a) if tiled is not None else loss_fn(a))[0].detach()
        best_x = torch.where((scored < best).view(shape), average, best_x)
        best = torch.minimum(best, scored)
    return best_x, step, best, stopped


GRAPH_WARMUP = 3  # eager steps before capture: cuDNN/cuBLAS choices and lazy state settle first


def _on_side_stream(fn: Callable[[], None]) -> None:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)


def _capture(fn: Callable[[], None]) -> Callable[[], None] | None:
    """``fn`` recorded as a CUDA graph (recording runs nothing); ``None`` if it cannot be captured."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as err:  # an op that cannot be captured: the eager step still works
        warnings.warn(f"nsf: CUDA graph capture failed ({type(err).__name__}: {err}); running steps eagerly",
                      RuntimeWarning, stacklevel=2)
        return None
    return graph.replay


def _stalled(history: list[float], cfg: StyleConfig) -> bool:
    """Relative improvement of the best loss over the last ``patience`` steps below ``tol``."""
    if cfg.tol <= 0 or len(history) <= cfg.patience:
        return False
    past = history[-1 - cfg.patience]
    return past - min(history) <= cfg.tol * abs(past)


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")
