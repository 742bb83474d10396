"""The style losses, each one small class registered once: a new loss is one class here (or in a plugin) and one test.

A style loss compares, at each style layer, a statistic of the image's features with a target built from the
style images. Each class says

* its ``name`` (the ``style_loss`` option's value) and a ``summary`` (the option's help text is built from them);
* which statistics of a layer it ``reads``: sums over positions, ``GRAMS`` (second moments ``F F^T / N``, with
  :meth:`StyleLoss.gram_norm`) and ``MEANS``, or whole ``FEATURES`` maps;
* how the per-layer :meth:`~StyleLoss.target` is built from the styles' statistics, its :meth:`~StyleLoss.distance`
  to the image's, and the normalizer's :meth:`~StyleLoss.floor`;
* its measured step ``cost`` relative to the Gram loss (admission control's time estimate, :func:`nsf.plan.step_cost`).

Whether it tiles and takes masks follows from what it reads: a loss of sums over positions runs exactly tile by
tile (:mod:`nsf.tiling` adds up each tile's share of the sums in pass 1, then backpropagates the distance's
derivative with respect to the sums through each tile in pass 2), and its sums have mask-weighted forms
(regional styles, :class:`nsf.optimize.Region`); a loss of whole feature maps (sorted projections) does neither.

The planner, the options' validation and choices, the optimizer and admission control read this registry and
compare no loss names. Importing this module imports no torch (:mod:`nsf.config` reads the names): the math is
:mod:`nsf.losses`' batched functions, imported when a loss is first computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, overload

from .errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from .config import StyleConfig

GRAM_NORMS: tuple[str, ...] = ("chw", "none")  # F F^T / (C*H*W), or plain (the gram loss's gram_norm option)

GRAMS, MEANS, FEATURES = "grams", "means", "features"  # what a loss reads of a style layer's features


def _math() -> Any:
    """:mod:`nsf.losses` (torch), imported when a loss is first computed rather than when the names are read."""
    from . import losses

    return losses


@dataclass
class Part:
    """One style batch's statistics at one layer (what :meth:`StyleLoss.target` blends): its Grams ``(b, C, C)``,
    means ``(b, C)`` and feature maps ``(b, C, h, w)``, each where the loss reads it."""

    gram: Tensor | None = None
    mean: Tensor | None = None
    features: Tensor | None = None


class StyleLoss:
    """A style loss (see the module's docstring). Subclasses set the class attributes and the methods."""

    name: ClassVar[str]
    title: ClassVar[str]  # what messages call it: "Gram", "mean-covariance"
    summary: ClassVar[str]  # the option's help: what it measures
    reads: ClassVar[frozenset[str]]  # GRAMS, MEANS, FEATURES
    cost: ClassVar[float] = 1.0  # a step's time relative to a gram-loss step (admission control), measured
    resamples: ClassVar[bool] = False  # draws something new before each step (resample(); no CUDA graph replay)
    whole_image: ClassVar[str] = "it reads whole feature maps"  # why it cannot tile (FEATURES losses)

    @property
    def tiles(self) -> bool:
        """Runs exactly tile by tile: it reads only sums over positions."""
        return FEATURES not in self.reads

    @property
    def masks(self) -> bool:
        """Takes masks (regional styles): its sums have mask-weighted forms."""
        return FEATURES not in self.reads

    def gram_norm(self, cfg: StyleConfig) -> str:
        """The normalization of the Grams it reads: ``"chw"`` (second moments ``F F^T / (C N)``) unless it says."""
        return "chw"

    def target(self, styles: Sequence[tuple[float, Sequence[Part]]]) -> Any:
        """A layer's target from the styles' statistics: ``[(weight, [part per style batch])]``, the weights summing
        to 1; each style's parts are concatenated along the batch (one per content image, or one for all)."""
        raise NotImplementedError

    def distance(self, target: Any, *, gram: Tensor | None, mean: Tensor | None,
                 features: Tensor | None) -> Tensor:
        """The image's distance to ``target`` at one layer, per image ``(B,)``, from its Grams ``(B, C, C)``,
        means ``(B, C)`` or features ``(B, C, h, w)`` (what it ``reads``; the others are ``None``)."""
        raise NotImplementedError

    def floor(self, target: Any) -> Tensor:
        """A millionth of the target's own size ``(B|1,)``: the normalizer's floor where the content is the style."""
        raise NotImplementedError

    def resample(self, target: Any, positions: int, generator: torch.Generator) -> None:
        """Before each step (``resamples``): update ``target`` in place for the image's ``positions`` at the layer."""

    def tiling_refusal(self, what: str) -> ConfigError:
        """The error for this loss asked to run tile by tile (``what``: why it was)."""
        allowed = [n for n, loss in REGISTRY.items() if loss.tiles]
        return ConfigError(f"style_loss={self.name!r} {what}: {self.whole_image}, which tiled steps do not see at "
                           f"once; allowed: {', '.join(allowed)} (tile exactly), or a smaller size or more "
                           "max_memory", field="style_loss", value=self.name, allowed=allowed)

    def masks_refusal(self) -> ConfigError:
        """The error for this loss given masks."""
        takers = [loss for loss in REGISTRY.values() if loss.masks]
        allowed = [loss.name for loss in takers]
        return ConfigError(f"style_loss={self.name!r} with masks: regional statistics are built for the "
                           f"{' and '.join(loss.title for loss in takers)} losses; allowed: {', '.join(allowed)}",
                           field="style_loss", value=self.name, allowed=allowed)


REGISTRY: dict[str, StyleLoss] = {}
L = TypeVar("L", bound=type[StyleLoss])


def register(cls: L) -> L:
    """Class decorator: add one instance of ``cls`` to the registry under ``cls.name`` (once)."""
    if cls.name in REGISTRY:
        raise ValueError(f"a style loss named {cls.name!r} is registered already ({type(REGISTRY[cls.name])})")
    REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a registered loss (a plugin's, a test's)."""
    del REGISTRY[name]


def style_loss(name: str) -> StyleLoss:
    """The registered loss ``name``; :class:`~nsf.errors.ConfigError` on ``style_loss`` lists the names."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown style_loss {name!r}; allowed: {', '.join(REGISTRY)}", field="style_loss",
                          value=name, allowed=list(REGISTRY)) from None


class Names(Sequence[str]):
    """The registered names, read when used: the ``style_loss`` option's ``choices`` (a loss registered after
    :mod:`nsf.config` was imported is a choice too)."""

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...

    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        return tuple(REGISTRY)[i]

    def __len__(self) -> int:
        return len(REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(REGISTRY))

    def __contains__(self, name: object) -> bool:
        return name in REGISTRY

    def __repr__(self) -> str:
        return repr(tuple(REGISTRY))


def _blend(styles: Sequence[tuple[float, Sequence[Part]]], stat: str) -> Tensor:
    """``sum_k w_k cat(parts_k)`` of one statistic (the order of the sums is the optimizer's since the start)."""
    import torch

    out: Tensor | None = None
    for w, parts in styles:
        t = torch.cat([getattr(p, stat) for p in parts]) * w
        out = t if out is None else out + t
    assert out is not None  # at least one style
    return out


@register
class Gram(StyleLoss):
    """Gatys et al.: the mean squared error between Gram matrices. Blending the styles' Grams is equivalent to
    weighting each style's loss (up to a constant)."""

    name = "gram"
    title = "Gram"
    summary = "MSE of Gram matrices"
    reads = frozenset({GRAMS})

    def gram_norm(self, cfg: StyleConfig) -> str:
        return cfg.gram_norm

    def target(self, styles: Sequence[tuple[float, Sequence[Part]]]) -> Tensor:
        return _blend(styles, "gram")

    def distance(self, target: Tensor, *, gram: Tensor | None, mean: Tensor | None,
                 features: Tensor | None) -> Tensor:
        assert gram is not None
        return _math().mse_per_image(gram, target)

    def floor(self, target: Tensor) -> Tensor:
        return 1e-6 * _math().wide(target).pow(2).flatten(1).mean(1)


@register
class MeanCov(StyleLoss):
    """The squared Wasserstein-2 distance between the Gaussians with each layer's feature mean and covariance
    (as crowsonkb/style-transfer-pytorch matches them; :func:`nsf.losses.w2_gaussian`). Several styles blend as
    a mixture: their means and second moments are blended, then the covariance and its square root taken once
    per scale (:func:`nsf.losses.gaussian`)."""

    name = "mean_cov"
    title = "mean-covariance"
    summary = "Wasserstein-2 distance between the features' Gaussians, mean and covariance"
    reads = frozenset({GRAMS, MEANS})
    # 2-core CPU, one thread, 256-512 px: 1.01-1.19x a gram step (bench/RESULTS.md "style losses step time")
    cost = 1.2

    def target(self, styles: Sequence[tuple[float, Sequence[Part]]]) -> Any:
        moments = [(w, [Part(gram=p.gram * p.gram.shape[-1]) for p in parts if p.gram is not None])
                   for w, parts in styles]  # F F^T / N
        return _math().gaussian(_blend(styles, "mean"), _blend(moments, "gram"))

    def distance(self, target: Any, *, gram: Tensor | None, mean: Tensor | None,
                 features: Tensor | None) -> Tensor:
        assert gram is not None and mean is not None
        return _math().w2_gaussian(mean, gram * gram.shape[-1], target)

    def floor(self, target: Any) -> Tensor:
        import torch

        g = target
        return 1e-6 * (g.mean.pow(2).sum(-1) + torch.diagonal(g.cov, dim1=-2, dim2=-1).sum(-1)) / g.mean.shape[-1]


@dataclass
class SlicedTarget:
    """A sliced layer's target: the styles' feature maps ``[(weight, [(b, C, h, w)])]``, and the directions
    ``(C, K)`` and blended sorted projections ``(B|1, K, N)`` of the last :meth:`Sliced.resample`."""

    samples: list[tuple[float, list[Tensor]]]
    directions: Tensor | None = None
    values: Tensor | None = None


@register
class Sliced(StyleLoss):
    """The sliced Wasserstein distance between the feature distributions (Heitz et al. 2021): sorted projections
    of the features on fresh random directions each step, against the style's (resampled to the image's
    positions; several styles blend as the weighted mean of their quantiles, their Wasserstein barycenter along
    each direction)."""

    name = "sliced"
    title = "sliced Wasserstein"
    summary = "sliced Wasserstein distance with fresh random projections each step"
    reads = frozenset({FEATURES})
    # 2-core CPU, one thread, 256-512 px: 1.83-1.98x a gram step (bench/RESULTS.md "style losses step time")
    cost = 2.0
    resamples = True
    # Exact tiling would need each projection sorted over the whole image: pass 1 would keep every position's
    # projected values (about 490 bytes per pixel for the default layers, a fifth of an untiled step's
    # activations) and the global ranks; not built. A masked sliced loss would compare weighted quantiles (each
    # position's mask as its probability mass); not built either.
    whole_image = "it sorts each projection over the whole image"

    def target(self, styles: Sequence[tuple[float, Sequence[Part]]]) -> SlicedTarget:
        return SlicedTarget([(w, [p.features for p in parts if p.features is not None]) for w, parts in styles])

    def resample(self, target: SlicedTarget, positions: int, generator: torch.Generator) -> None:
        """Draw ``C`` new directions from ``generator`` and the styles' sorted projections on them, resampled to
        ``positions`` and blended. Tensors are updated in place, so a compiled objective sees the new ones."""
        from typing import cast

        import torch

        m = _math()
        first = target.samples[0][1][0]
        dirs = m.directions(first.shape[1], first.shape[1], generator).to(first.device)
        values = cast(torch.Tensor, sum(w * torch.cat([m.resample_sorted(m.sorted_projections(p, dirs), positions)
                                                      for p in parts]) for w, parts in target.samples))
        if target.directions is not None and target.values is not None:
            target.directions.copy_(dirs)
            target.values.copy_(values)
        else:
            target.directions, target.values = dirs, values

    def distance(self, target: SlicedTarget, *, gram: Tensor | None, mean: Tensor | None,
                 features: Tensor | None) -> Tensor:
        assert features is not None and target.directions is not None and target.values is not None
        return _math().sliced_wasserstein(features, target.directions, target.values)

    def floor(self, target: SlicedTarget) -> Tensor:
        assert target.values is not None
        return 1e-6 * target.values.pow(2).flatten(1).mean(1)


def help_text() -> str:
    """The ``style_loss`` option's help, from the registry."""
    return (f"style loss per layer: {', '.join(REGISTRY)} "
            f"({'; '.join(loss.summary for loss in REGISTRY.values())})")
