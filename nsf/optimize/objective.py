"""The per-step objective: content, style and total-variation losses of a batch of images, whole or tile by tile."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from .. import losses
from ..config import StyleConfig
from ..geometry import resize
from ..style_losses import FEATURES, GRAMS, MEANS, style_loss
from ..tiling import TiledFeatures
from .scales import layer_weights
from .targets import Region, StyleTargets, as_targets

if TYPE_CHECKING:
    from ..vgg import FeatureExtractor

PixelLoss = Callable[[Tensor], Tensor]  # images (B, 3, H, W) -> a per-image loss (B,) added to the objective


class Preview(nn.Module):
    """The preview term of a refinement scale: ``weight`` times ``objective`` (the base scale's objective, at its
    size) of the image downsampled to that size (:func:`nsf.geometry.resize` with ``clamp=False``: not
    clamped: the image the network sees at full size is not clamped either). ``forward(x) -> (loss (B,), parts
    (B, 3))``, weighted; its gradient flows back through the downsampling, so the term is exact under tiling (the
    full-size objective adds it as it adds a pixel loss: autograd on the whole image)."""

    def __init__(self, objective: Objective, weight: float):
        super().__init__()
        self.objective = objective
        self.weight = float(weight)
        self.size = (int(objective.content_size[0]), int(objective.content_size[1]))

    def downsample(self, x: Tensor) -> Tensor:
        return resize(x, self.size, clamp=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        loss, parts = self.objective(self.downsample(x))
        return self.weight * loss, self.weight * parts


class Objective(nn.Module):
    """``forward(x) -> (loss, parts)``: per-image losses ``(B,)`` of a batch ``x`` in [0, 1] and their
    ``(content, style, tv)`` parts ``(B, 3)``. Images do not interact: the gradient of ``loss.sum()``
    with respect to image ``b`` is that of its own loss. This is the function that ``torch.compile``
    wraps; AOTAutograd then compiles its backward too.

    ``style``: :class:`StyleTargets` for ``cfg.style_loss``, or a mapping of target Grams (the Gram loss), or
    a list of :class:`Region` (regional styles with masks; losses that take masks,
    :attr:`nsf.style_losses.StyleLoss.masks`). With a loss that resamples (:mod:`nsf.style_losses`),
    :meth:`resample` draws its new projections from ``generator``; call it before each step.

    With ``tile`` (owned tile ``(th, tw)`` px), :meth:`value_and_grad` computes the same loss and
    gradient tile by tile (:mod:`nsf.tiling`), so only one tile's activations are alive at a time; the
    content targets and normalizers are computed tile by tile too (losses that tile only). ``cut`` (tiled only):
    the module index from which each tile's graph is kept between the two passes (:class:`~nsf.tiling.TiledFeatures`).

    ``pixel_loss``: a per-image loss of the image itself ``(B, 3, H, W) -> (B,)`` (e.g. a video's temporal term),
    added to the loss outside the network (tiled or not, its gradient is autograd's on the whole image); it
    counts in the ``tv`` part.

    ``preview``: a refinement scale's :class:`Preview` term (the image downsampled to the base scale's size, scored
    by that scale's objective), added to the loss as ``pixel_loss`` is (its gradient autograd's on the whole image,
    tiled or not); its content, style and tv parts count in the parts of the same names.
    """

    def __init__(self, extractor: FeatureExtractor, cfg: StyleConfig, content: Tensor,
                 style: Mapping[str, Tensor] | StyleTargets | Sequence[Region], tile: tuple[int, int] | None = None,
                 generator: torch.Generator | None = None, pixel_loss: PixelLoss | None = None,
                 preview: Preview | None = None, cut: int | None = None):
        super().__init__()
        self.content_size = (content.shape[-2], content.shape[-1])
        self.preview = preview
        self.loss = style_loss(cfg.style_loss)
        self.regions: list[Region] | None = None
        if not isinstance(style, (Mapping, StyleTargets)):
            self.regions = list(style)
            if not self.regions:
                raise ValueError("an objective with masks needs one region or more")
            if not self.loss.masks:
                raise self.loss.masks_refusal()
            targets = StyleTargets(cfg.style_loss)
        else:
            targets = as_targets(style)
        for t in [r.targets for r in self.regions] if self.regions else [targets]:
            if t.loss != cfg.style_loss:
                raise ValueError(f"style targets for style_loss={t.loss!r} given to an objective of "
                                 f"style_loss={cfg.style_loss!r}; allowed: targets from style_targets(cfg=...)")
        masks = torch.stack(torch.broadcast_tensors(*[r.mask for r in self.regions])) if self.regions else None
        self.extractor = extractor
        self.style_loss = cfg.style_loss
        self.pixel_loss = pixel_loss
        self.gram_norm = self.loss.gram_norm(cfg)
        self.cw, self.sw, self.tvw = float(cfg.content_weight), float(cfg.style_weight), float(cfg.tv_weight)
        self.content_w = layer_weights(cfg.content_layers, cfg.content_layer_weights)
        self.style_w = layer_weights(cfg.style_layers, cfg.style_layer_weights)
        self.tiled = TiledFeatures(extractor, [*self.content_w, *self.style_w], content.shape[-2], content.shape[-1],
                                   tile, masks=masks, cut=cut if tile is not None else None)
        if not self.loss.tiles and self.tiles > 1:
            raise self.loss.tiling_refusal("cannot run tile by tile")
        self.targets = targets.layers
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        with torch.no_grad():
            sums = self.tiled.sums(content, grams=self._gram_layers, norm=self.gram_norm, means=self._mean_layers,
                                   keep=list(dict.fromkeys([*self.content_w, *self._kept_layers])))
            self.content_targets = {n: sums.kept[n].detach() for n in self.content_w}
            # positions of each style layer's map at this scale (what a resampling loss's targets are resampled to)
            self.positions = {n: f.shape[-2] * f.shape[-1] for n, f in sums.kept.items() if n in self.style_w}
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
        return list(self.style_w) if GRAMS in self.loss.reads else []

    @property
    def _mean_layers(self) -> list[str]:
        return list(self.style_w) if MEANS in self.loss.reads else []

    @property
    def _kept_layers(self) -> list[str]:
        return list(self.style_w) if FEATURES in self.loss.reads else []

    def _floor(self, n: str) -> Tensor:
        """A millionth of the target's own size: the normalizer's floor where the content is the style (with
        masks, the regions' floors weighted as their losses are)."""
        if self.regions is not None:
            shares = self.tiled.mask_shares(n)
            return cast(Tensor, sum(r.weight * shares[i] * self.loss.floor(r.targets.layers[n])
                                    for i, r in enumerate(self.regions)))
        return self.loss.floor(self.targets[n])

    @property
    def tiles(self) -> int:
        """Tiles per step: 1 when the step runs on the whole image."""
        return len(self.tiled.tiles)

    @torch.no_grad()
    def resample(self) -> None:
        """A loss that resamples (the sliced loss: new projection directions from ``generator``, the styles'
        sorted projections on them): its targets updated in place, so a compiled objective sees the new ones.
        Other losses: nothing."""
        if self.preview is not None:
            self.preview.objective.resample()
        if not self.loss.resamples:
            return
        for n in self.style_w:
            self.loss.resample(self.targets[n], self.positions[n], self.generator)

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
        """Each style layer's loss ``(B,)`` before weights and normalizers, from the image's Grams ``(B, C, C)``,
        means ``(B, C)`` or features ``(B, C, h, w)`` (what the loss reads). With masks, the Grams
        ``(B, R, C, C)`` and means ``(B, R, C)`` are the regions' and the loss is their weighted sum
        (:class:`Region`)."""
        d = self.loss.distance
        if self.regions is not None:
            out: dict[str, Tensor] = {}
            for n in self.style_w:
                shares = self.tiled.mask_shares(n)
                terms = [d(r.targets.layers[n], gram=grams[n][:, i] if n in grams else None,
                           mean=means[n][:, i] if n in means else None, features=None)
                         for i, r in enumerate(self.regions)]
                out[n] = cast(Tensor, sum(r.weight * share * t for r, share, t in zip(self.regions, shares, terms)))
            return out
        return {n: d(self.targets[n], gram=grams.get(n), mean=means.get(n),
                     features=feats.get(n) if n in self._kept_layers else None) for n in self.style_w}

    def combine(self, content_mse: dict[str, Tensor], style: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        """The loss from per-layer content MSEs ``(B,)`` and style terms ``(B,)`` (:meth:`style_terms`) of ``x``
        ``(B, 3, H, W)``."""
        # cast: sum() of tensors is typed as possibly its int start (there is at least one layer)
        c = cast(Tensor, sum(w * content_mse[n] * self.content_scale[n] for n, w in self.content_w.items()))
        s = cast(Tensor, sum(w * style[n] * self.style_scale[n] for n, w in self.style_w.items()))
        tv = losses.tv_loss(x) if self.tvw > 0 else x.new_zeros(x.shape[0])
        c, s, tv = self.cw * c, self.sw * s, self.tvw * tv
        if self.pixel_loss is not None:
            tv = tv + self.pixel_loss(x)
        if self.preview is not None:
            p_loss, p_parts = self.preview(x)
            return c + s + tv + p_loss, torch.stack([c, s, tv], dim=1).detach() + p_parts.detach()
        return c + s + tv, torch.stack([c, s, tv], dim=1).detach()

    @property
    def _reads_pixels(self) -> bool:
        return self.tvw > 0 or self.pixel_loss is not None or self.preview is not None

    @torch.no_grad()
    def value(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``forward(x)`` without a gradient, tile by tile (pass 1 of :mod:`nsf.tiling`)."""
        sums = self.tiled.sums(x, grams=self._gram_layers, norm=self.gram_norm, content=self.content_targets,
                               means=self._mean_layers, keep=self._kept_layers)
        return self.combine(sums.content, self.style_terms(sums.grams, sums.means, sums.kept), x)

    def value_and_grad(self, x: Tensor, on_tile: Callable[[int, int], None] | None = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, parts, d loss.sum() / dx)``, tile by tile: only one tile's activations are alive at a time."""
        if not self.loss.tiles:
            raise self.loss.tiling_refusal("cannot run tile by tile")
        # Without a kept graph pass 1 reads only the style layers (a refinement scale's relu1_1-relu3_1: the network
        # run to relu3_1 with their small halos, not to the content's relu4_2) and pass 2 sums the content MSEs on
        # its way. combine() is linear in the MSEs, so their derivatives are the same at any value: zeros stand in
        # for them until pass 2 has summed them, and their terms are added to the loss then.
        kept = self.tiled.cut is not None
        sums = self.tiled.sums(x, grams=self._gram_layers, norm=self.gram_norm,
                               content=self.content_targets if kept else None, means=self._mean_layers, graph=True)
        mse_now = sums.content if kept else {n: x.new_zeros(x.shape[0]) for n in self.content_w}
        with torch.enable_grad():
            # the loss as a function of the whole-image sums; autograd gives its derivatives, so the
            # chain rule through combine() is not written a second time
            leaves_c = {n: v.detach().requires_grad_(True) for n, v in mse_now.items()}
            leaves_g = {n: v.detach().requires_grad_(True) for n, v in sums.grams.items()}
            leaves_m = {n: v.detach().requires_grad_(True) for n, v in sums.means.items()}
            xt = x.detach().requires_grad_(self._reads_pixels)
            loss, parts = self.combine(leaves_c, self.style_terms(leaves_g, leaves_m, {}), xt)
            wrt = [*leaves_c.values(), *leaves_g.values(), *leaves_m.values(), *([xt] if self._reads_pixels else [])]
            d = torch.autograd.grad(loss.sum(), wrt)
        k, g = len(leaves_c), len(leaves_g)
        d_content, d_grams = dict(zip(leaves_c, d[:k])), dict(zip(leaves_g, d[k:k + g]))
        d_means = dict(zip(leaves_m, d[k + g:k + g + len(leaves_m)]))
        # the pixel terms' gradient (the preview term's) is the buffer pass 2 adds its tiles into (dense: autograd
        # may hand back an expanded one)
        pixels = d[-1].contiguous() if self._reads_pixels else None
        del d
        grad, mse = self.tiled.backward(x, d_grams, d_content, self.content_targets, self.gram_norm, on_tile,
                                        d_means=d_means, graphs=sums.graphs, into=pixels)
        sums.graphs.clear()
        loss = loss.detach()
        if not kept:  # the content terms, from the MSEs pass 2 summed
            content = cast(Tensor, sum(d_content[n] * mse[n] for n in self.content_w))
            loss = loss + content
            parts[:, 0] += content  # combine()'s parts are a fresh tensor
        return loss, parts, grad


__all__ = ["Objective", "PixelLoss", "Preview"]
