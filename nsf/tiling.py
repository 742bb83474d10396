"""Exact tiled passes: a whole image's features, Grams, losses and gradient, computed tile by tile.

A VGG feature at one position depends only on the input pixels of that position's receptive field.
A tile of the input, widened by a halo that covers the field of the deepest layer used and started
on that layer's pooling grid, therefore computes the whole image's features at the positions it
*owns*: each layer's positions are split between the tiles, none twice. The losses are sums over
positions (content MSE) or functions of such sums (Grams; the means and second moments of the mean-covariance
loss), so

- pass 1 (no gradient) adds up each tile's share of every content MSE, Gram and mean, and
- with those sums fixed, pass 2 backpropagates each tile's share, weighted by the loss's derivative
  with respect to the sums, into the tile's pixels; the tiles' input gradients add up (their halos
  overlap) to the whole image's gradient.

Pass 1 runs the network only as deep as the layers whose sums it adds up need, over windows widened by their halos
only: where the content layer lies deeper than the style layers (a refinement scale: relu4_2 against relu1_1-relu3_1)
it reads the style layers, and pass 2 adds up the content MSEs (the loss is linear in them). Pass 2 recomputes each
tile's forward. With a ``cut`` (a module index of the network), pass 1 keeps each tile's
autograd graph from the cut on (the deep layers: small maps, most of the arithmetic) and pass 2 recomputes only the
modules before it: the deep part's backward starts from the kept graph, and its gradient at the cut flows into the
recomputed shallow part. The recomputed activations are the kept graph's inputs op for op, so the step is the same
(measured on the 2-core CPU in bf16: the modules up to pool2 are 59% of a forward, a forward+backward 4.9
forwards, bench/RESULTS.md "memory ladder").

Only the order of floating-point sums differs from the untiled step (tests/test_tiling.py: 1e-9 in
float64). Pure tensor code: no IO, no device or dtype choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import losses
from .memory import release_host_memory

if TYPE_CHECKING:
    from .vgg import FeatureExtractor


@dataclass(frozen=True)
class Reach:
    """The input rows (likewise columns) that feed a layer: position ``k`` reads ``k*stride + lo .. k*stride + hi``."""

    stride: int
    lo: int
    hi: int


def _square(v: int | tuple[int, ...]) -> int:
    if isinstance(v, int):
        return v
    if len(set(v)) != 1:
        raise ValueError(f"tiling needs square kernels, strides and paddings; got {v}")
    return int(v[0])


def _module_geometry(module: nn.Module) -> tuple[int, int, int, int] | None:
    """``(kernel, stride, padding, dilation)`` of a spatial module, ``None`` for a pointwise one."""
    if isinstance(module, nn.Conv2d):
        if not isinstance(module.padding, tuple):
            raise ValueError(f"tiling needs numeric conv padding; got {module.padding!r}")
        return (_square(module.kernel_size), _square(module.stride), _square(module.padding),
                _square(module.dilation))
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        if module.ceil_mode:
            raise ValueError("tiling needs floor-mode pooling (ceil_mode=False)")
        dilation = _square(module.dilation) if isinstance(module, nn.MaxPool2d) else 1
        return (_square(module.kernel_size), _square(module.stride or module.kernel_size), _square(module.padding),
                dilation)
    if isinstance(module, (nn.ReLU, nn.Identity)):
        return None
    raise ValueError(f"tiling does not know the geometry of {module!r}")


@dataclass(frozen=True)
class Geometry:
    """The receptive-field geometry of a feature stack, for the layers an objective reads.

    ``align`` is the largest stride among those layers: tile origins are multiples of it, so every
    layer's pooling grid lines up with the whole image's. ``before``/``after`` are the halos a tile
    needs on each side (``before`` a multiple of ``align``) for its owned positions to be exact.
    """

    modules: tuple[tuple[int, int, int, int] | None, ...]
    index: Mapping[str, int]  # layer name -> position in ``modules``
    reach: Mapping[str, Reach]
    align: int
    before: int
    after: int

    def feature_size(self, n: int, layer: str) -> int:
        """The length of ``layer``'s map along an input side of ``n`` pixels."""
        for spec in self.modules[: self.index[layer] + 1]:
            if spec is not None:
                k, st, p, d = spec
                n = (n + 2 * p - d * (k - 1) - 1) // st + 1
        return n


def geometry(body: nn.Sequential, names: Sequence[str], layers: Iterable[str]) -> Geometry:
    """The :class:`Geometry` of ``body`` (modules named ``names``) for ``layers``."""
    specs = tuple(_module_geometry(m) for m in body)
    reach: dict[str, Reach] = {}
    stride, lo, hi = 1, 0, 0
    for name, spec in zip(names, specs):
        if spec is not None:
            k, st, p, d = spec
            lo, hi, stride = lo - p * stride, hi + (d * (k - 1) - p) * stride, stride * st
        reach[name] = Reach(stride, lo, hi)
    return for_layers(Geometry(specs, {n: i for i, n in enumerate(names)}, reach, 1, 0, 0), layers)


def for_layers(geo: Geometry, layers: Iterable[str]) -> Geometry:
    """``geo`` for another set of its stack's ``layers`` (e.g. a refinement scale's, which may stop shallower): the
    alignment and halos those layers need."""
    used = [geo.reach[n] for n in layers]
    align = max(r.stride for r in used)
    before = max(0, *(-r.lo for r in used))
    before = -(-before // align) * align
    after = max(0, *(r.hi - r.stride + 1 for r in used))
    return Geometry(geo.modules, geo.index, geo.reach, align, before, after)


@dataclass(frozen=True)
class Tile:
    """Owned input rows ``[r0, r1)`` and columns ``[c0, c1)``, and the window ``[wr0, wr1) x [wc0, wc1)`` run."""

    r0: int
    r1: int
    c0: int
    c1: int
    wr0: int
    wr1: int
    wc0: int
    wc1: int

    @property
    def window_pixels(self) -> int:
        return (self.wr1 - self.wr0) * (self.wc1 - self.wc0)


def _spans(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def tiles(height: int, width: int, tile: tuple[int, int] | None, geo: Geometry) -> list[Tile]:
    """The tiles of a ``height x width`` image with owned tiles of ``tile`` = ``(th, tw)`` px (multiples of
    ``geo.align``); ``None`` (or a tile as large as the image) is one tile, the whole image."""
    th, tw = tile if tile is not None else (height, width)
    if tile is not None and (th % geo.align or tw % geo.align or th <= 0 or tw <= 0):
        raise ValueError(f"tile={tile}; allowed: positive multiples of {geo.align} (this layer set's stride)")
    out = []
    for r0, r1 in _spans(height, th):
        for c0, c1 in _spans(width, tw):
            out.append(Tile(r0, r1, c0, c1, max(0, r0 - geo.before), min(height, r1 + geo.after),
                            max(0, c0 - geo.before), min(width, c1 + geo.after)))
    return out


def _owned(t: Tile, geo: Geometry, layer: str, height: int, width: int) -> tuple[slice, slice, slice, slice]:
    """``(local rows, local cols, global rows, global cols)`` of ``layer``'s positions owned by ``t``."""
    s = geo.reach[layer].stride
    gh, gw = geo.feature_size(height, layer), geo.feature_size(width, layer)
    gr = slice(t.r0 // s, gh if t.r1 == height else t.r1 // s)
    gc = slice(t.c0 // s, gw if t.c1 == width else t.c1 // s)
    lr = slice(gr.start - t.wr0 // s, gr.stop - t.wr0 // s)
    lc = slice(gc.start - t.wc0 // s, gc.stop - t.wc0 // s)
    return lr, lc, gr, gc


@dataclass
class Sums:
    """What pass 1 adds up: per-image content MSEs ``{layer: (B,)}``, Grams ``{layer: (B, C, C)}``, feature
    means ``{layer: (B, C)}``, and whole feature maps ``{layer: (B, C, h, w)}`` assembled from the tiles' owned
    positions."""

    content: dict[str, Tensor] = field(default_factory=dict)
    grams: dict[str, Tensor] = field(default_factory=dict)
    kept: dict[str, Tensor] = field(default_factory=dict)
    means: dict[str, Tensor] = field(default_factory=dict)
    # with a cut and graph=True: per tile, the cut's activation (a leaf) and the deep layers' shares with their graph
    graphs: list[tuple[Tensor, Sums]] = field(default_factory=list)


class TiledFeatures:
    """Runs an extractor over the tiles of one image size and hands out each tile's share.

    Args:
        extractor: ``images -> {layer: features}`` whose ``body``/``module_names`` describe the stack.
        layers: the layers whose positions must be exact (those an objective reads).
        height, width: the image size.
        tile: owned tile ``(th, tw)`` in px, multiples of the stack's alignment; ``None`` for untiled.
        cut: a module index of ``extractor.body``: pass 1 (:meth:`sums` with ``graph=True``) keeps each tile's graph
            from this module on and :meth:`backward` recomputes only the modules before it; ``None``: pass 2
            recomputes the whole forward (the least memory).
        masks: ``(R, B|1, 1, height, width)`` region masks in [0, 1], or ``None``. With masks, the Grams and
            means are the regions' mask-weighted ones (:func:`nsf.losses.masked_gram`), ``(B, R, C, C)`` and
            ``(B, R, C)``; each layer reads the masks brought to its resolution by area averaging.
    """

    def __init__(self, extractor: FeatureExtractor, layers: Sequence[str], height: int, width: int,
                 tile: tuple[int, int] | None, masks: Tensor | None = None, cut: int | None = None):
        self.extractor = extractor
        if cut is not None and not 0 < cut < extractor.depth:
            raise ValueError(f"cut={cut}; allowed: None or a module index 1..{extractor.depth - 1}")
        self.cut = cut
        self._index = {n: i for i, n in enumerate(extractor.module_names)}
        self.height, self.width = height, width
        if masks is not None and (masks.dim() != 5 or masks.shape[2] != 1 or masks.shape[-2:] != (height, width)):
            raise ValueError(f"masks of shape {tuple(masks.shape)}; allowed: (R, B|1, 1, {height}, {width})")
        self.masks = masks
        self._layer_masks: dict[str, tuple[Tensor, Tensor]] = {}
        # untiled, the one tile is the image and no geometry is needed (any feature stack works)
        self.geo = geometry(extractor.body, extractor.module_names, layers) if tile is not None else None
        self.tile = tile
        self.tiles = tiles(height, width, tile, self.geo) if self.geo is not None \
            else [Tile(0, height, 0, width, 0, height, 0, width)]
        self._narrow: dict[tuple[str, ...], tuple[FeatureExtractor, list[Tile]]] = {}

    def positions(self, layer: str) -> int | None:
        """Positions of ``layer``'s whole map (what its Gram and MSE are averaged over); ``None`` untiled
        (a map's own)."""
        if self.geo is None:
            return None
        return self.geo.feature_size(self.height, layer) * self.geo.feature_size(self.width, layer)

    def _owned(self, t: Tile, layer: str) -> tuple[slice, slice, slice, slice]:
        if self.geo is None:
            return (slice(None),) * 4
        return _owned(t, self.geo, layer, self.height, self.width)

    def layer_masks(self, layer: str, hw: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """The region masks at ``layer``'s resolution ``(R, B|1, 1, h, w)`` and their sums ``(R, B|1)``; ``hw``:
        the layer's whole-map size (needed once, untiled: the map's own)."""
        if self.masks is None:
            raise ValueError("layer_masks() of features without masks")
        if layer not in self._layer_masks:
            if self.geo is not None:
                hw = (self.geo.feature_size(self.height, layer), self.geo.feature_size(self.width, layer))
            if hw is None:
                raise ValueError(f"the size of {layer}'s map is not known yet; allowed: after a pass over the image")
            r, b = self.masks.shape[:2]
            m = torch.nn.functional.adaptive_avg_pool2d(self.masks.reshape(r * b, 1, self.height, self.width), hw)
            m = m.reshape(r, b, 1, *hw)
            self._layer_masks[layer] = (m, m.sum(dim=(2, 3, 4)))
        return self._layer_masks[layer]

    def mask_shares(self, layer: str) -> Tensor:
        """Each region's share of ``layer``'s map, the mean of its mask there ``(R, B|1)``."""
        m, total = self.layer_masks(layer)
        return total / (m.shape[-2] * m.shape[-1])

    def _region_stats(self, f: Tensor, t: Tile, n: str, norm: str | None) -> Tensor:
        """Tile ``t``'s share of the regions' Grams ``(B, R, C, C)`` (``norm``) or means ``(B, R, C)`` (None)."""
        lr, lc, gr, gc = self._owned(t, n)
        masks, totals = self.layer_masks(n, (f.shape[-2], f.shape[-1]))
        owned = f[..., lr, lc]
        if norm is None:
            return torch.stack([losses.masked_mean(owned, m[..., gr, gc], positions=s)
                                for m, s in zip(masks, totals)], dim=1)
        return torch.stack([losses.masked_gram(owned, m[..., gr, gc], norm, positions=s)
                            for m, s in zip(masks, totals)], dim=1)

    def shares(self, feats: Mapping[str, Tensor], t: Tile, *, grams: Sequence[str] = (), norm: str = "chw",
               content: Mapping[str, Tensor] | None = None, means: Sequence[str] = ()) -> Sums:
        """Tile ``t``'s share of the Grams of ``grams``, the means of ``means`` (the regions' with masks) and the
        MSEs against ``content`` (whole maps)."""
        out = Sums()
        for n in grams:
            lr, lc, _, _ = self._owned(t, n)
            out.grams[n] = losses.gram(feats[n][..., lr, lc], norm, positions=self.positions(n)) \
                if self.masks is None else self._region_stats(feats[n], t, n, norm)
        for n in means:
            lr, lc, _, _ = self._owned(t, n)
            out.means[n] = losses.feature_mean(feats[n][..., lr, lc], positions=self.positions(n)) \
                if self.masks is None else self._region_stats(feats[n], t, n, None)
        for n, target in (content or {}).items():
            lr, lc, gr, gc = self._owned(t, n)
            out.content[n] = losses.content_loss(feats[n][..., lr, lc], target[..., gr, gc],
                                                 positions=self.positions(n))
        return out

    def _deep(self, layers: Sequence[str]) -> list[str]:
        """Those of ``layers`` computed at or after the cut."""
        return [n for n in layers if self.cut is not None and self._index[n] >= self.cut]

    def _shallow(self, layers: Sequence[str]) -> list[str]:
        return [n for n in layers if self.cut is None or self._index[n] < self.cut]

    def reading(self, layers: Iterable[str]) -> tuple[FeatureExtractor, list[Tile]]:
        """The extractor and tiles of a pass that reads only ``layers``: the network run only as deep as the deepest
        of them, each tile's window widened only by their halos (the same owned positions, so the shares are the
        same). Pass 1 of a step whose content layer lies deeper than its style layers (a refinement scale: relu4_2
        against relu1_1-relu3_1) needs only the style layers: the content MSE is summed in pass 2 instead."""
        order = self._index
        names = tuple(sorted(set(layers), key=order.__getitem__))
        if not names or max(map(order.__getitem__, names)) + 1 >= self.extractor.depth:
            return self.extractor, self.tiles
        if names not in self._narrow:
            geo = self.geo
            narrow = tiles(self.height, self.width, self.tile, for_layers(geo, names)) \
                if geo is not None and len(self.tiles) > 1 else self.tiles
            self._narrow[names] = (self.extractor.for_layers(names), narrow)
        return self._narrow[names]

    def _kept(self, window: Tensor, cut: int) -> tuple[dict[str, Tensor], Tensor]:
        """A window's features, those from ``cut`` on with their graph, and the cut's activation as the graph's
        leaf."""
        a, feats = self.extractor.stage(window, 0, cut)
        a = a.detach().requires_grad_(True)
        with torch.enable_grad():
            _, deep = self.extractor.stage(a, cut)
        return {**feats, **deep}, a

    @torch.no_grad()
    def sums(self, images: Tensor, *, grams: Sequence[str] = (), norm: str = "chw",
             content: Mapping[str, Tensor] | None = None, keep: Sequence[str] = (), means: Sequence[str] = (),
             graph: bool = False) -> Sums:
        """Pass 1 over ``images`` ``(B, 3, H, W)``: whole-image Grams, means, MSEs and kept maps, no gradient.
        ``graph`` (with a cut): each tile's deep part and its shares are kept with their graph in ``Sums.graphs``,
        for :meth:`backward`. Without a kept graph the network runs only as deep as the layers asked for need
        (:meth:`reading`)."""
        total = Sums()
        cut = self.cut if graph else None
        extractor, tile_list = (self.extractor, self.tiles) if cut is not None \
            else self.reading([*grams, *means, *keep, *(content or {})])
        for t in tile_list:
            window = images[..., t.wr0:t.wr1, t.wc0:t.wc1]
            feats, leaf = self._kept(window, cut) if cut is not None else (extractor(window), None)
            if leaf is not None:
                targets = content or {}
                with torch.enable_grad():
                    deep = self.shares(feats, t, grams=self._deep(grams), norm=norm, means=self._deep(means),
                                       content={n: targets[n] for n in self._deep(list(targets))})
                total.graphs.append((leaf, deep))
                shallow = self.shares(feats, t, grams=self._shallow(grams), norm=norm, means=self._shallow(means),
                                      content={n: targets[n] for n in self._shallow(list(targets))})
                part = Sums({**shallow.content, **deep.content}, {**shallow.grams, **deep.grams}, {},
                            {**shallow.means, **deep.means})
            else:
                part = self.shares(feats, t, grams=grams, norm=norm, content=content, means=means)
            for mine, theirs in ((total.grams, part.grams), (total.content, part.content), (total.means, part.means)):
                _add(mine, theirs)
            for n in keep:
                f = feats[n].detach()
                if self.geo is None or len(self.tiles) == 1:
                    total.kept[n] = f
                    continue
                if n not in total.kept:
                    shape = (*f.shape[:2], self.geo.feature_size(self.height, n), self.geo.feature_size(self.width, n))
                    total.kept[n] = f.new_empty(shape)
                lr, lc, gr, gc = self._owned(t, n)
                total.kept[n][..., gr, gc] = f[..., lr, lc]
        if len(tile_list) > 1:
            release_host_memory(images.device)  # once a pass: see backward()
        return total

    def backward(self, images: Tensor, d_grams: Mapping[str, Tensor], d_content: Mapping[str, Tensor],
                 content: Mapping[str, Tensor], norm: str = "chw",
                 on_tile: Callable[[int, int], None] | None = None,
                 d_means: Mapping[str, Tensor] | None = None, graphs: Sequence[tuple[Tensor, Sums]] = (),
                 into: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Pass 2: the gradient of a loss of the whole-image sums, given its derivatives ``d_grams``
        (``(B, C, C)`` per layer), ``d_content`` (``(B,)`` per layer) and ``d_means`` (``(B, C)`` per layer) with
        respect to them. ``graphs``: pass 1's kept deep parts (:meth:`sums` with ``graph=True``), one per tile:
        each tile then recomputes only the modules before the cut.

        ``into``: a gradient of the images' shape that the tiles' gradients are added to, in place (a refinement
        scale's pixel terms': one image-sized buffer, not two, while the tiles run).

        Returns ``(B, 3, H, W)``: each tile's gradient of ``sum(d * its share)``, added over the tiles (into ``into``
        where given); and the whole-image content MSEs ``{layer: (B,)}`` of the ``d_content`` layers this pass
        computed (with ``graphs`` those before the cut), as :meth:`sums` adds them up: a pass 1 that does not read the
        content layers leaves them to this pass.
        """
        # what ran since pass 1 (the loss of the sums; a refinement scale's preview term, a forward+backward at the
        # base size) left its buffers in the C heap: pass 2's tiles start without them
        release_host_memory(images.device)
        grad = torch.zeros_like(images) if into is None else into
        mse: dict[str, Tensor] = {}
        d_means = d_means or {}
        if graphs and len(graphs) != len(self.tiles):
            raise ValueError(f"{len(graphs)} kept graphs for {len(self.tiles)} tiles; allowed: one per tile")
        for i, t in enumerate(self.tiles):
            window = images[..., t.wr0:t.wr1, t.wc0:t.wc1].detach().requires_grad_(True)
            with torch.enable_grad():
                outputs: list[Tensor] = []
                weights: list[Tensor] = []
                if graphs:
                    leaf, deep = graphs[i]
                    deep_loss = _weighted(deep, d_grams, d_content, d_means)
                    # the deep part's gradient at the cut, from the graph pass 1 kept (which it frees)
                    (at_cut,) = torch.autograd.grad(deep_loss, leaf) if deep_loss.requires_grad \
                        else (torch.zeros_like(leaf),)
                    a, feats = self.extractor.stage(window, 0, self.cut)
                    outputs, weights = [a], [at_cut]
                else:
                    feats = self.extractor(window)
                layers = self._shallow if graphs else list  # the layers this recompute reaches
                part = self.shares(feats, t, grams=layers(list(d_grams)), norm=norm, means=layers(list(d_means)),
                                   content={n: content[n] for n in layers(list(d_content))})
                _add(mse, part.content)
                surrogate = _weighted(part, d_grams, d_content, d_means)
                if surrogate.requires_grad:
                    outputs, weights = [surrogate, *outputs], [torch.ones_like(surrogate), *weights]
                (g,) = torch.autograd.grad(outputs, window, weights)
            grad[..., t.wr0:t.wr1, t.wc0:t.wc1] += g
            del window, part, surrogate, g, outputs, weights, feats  # the next tile runs without this one's buffers
            if on_tile is not None:
                on_tile(i + 1, len(self.tiles))
        # The C heap's free memory goes back to the OS once a pass, not after each tile: the next tile reuses the
        # last one's freed buffers (the same sizes) instead of faulting in fresh pages. Trimming after every tile
        # made a 2048 px step in 25 tiles of 416 px 1.29x slower (19.5 s against 15.1 s) for a 0.17 GB lower
        # peak (bench/RESULTS.md "memory ladder"); the planner's CPU margin for a tiled step counts that 0.17 GB.
        release_host_memory(images.device)
        return grad, mse


def _add(total: dict[str, Tensor], part: Mapping[str, Tensor]) -> None:
    """Add a tile's shares ``part`` into the whole image's ``total``, layer by layer, without their graph."""
    for n, v in part.items():
        v = v.detach()
        total[n] = total[n] + v if n in total else v


def _weighted(part: Sums, d_grams: Mapping[str, Tensor], d_content: Mapping[str, Tensor],
              d_means: Mapping[str, Tensor]) -> Tensor:
    """``sum(d * share)`` over a tile's shares: the surrogate whose gradient is the tile's share of the loss's."""
    terms = [(d_grams[n] * g).sum() for n, g in part.grams.items()] \
        + [(d_content[n] * c).sum() for n, c in part.content.items()] \
        + [(d_means[n] * m).sum() for n, m in part.means.items()]
    return torch.stack(terms).sum() if terms else torch.zeros(())
