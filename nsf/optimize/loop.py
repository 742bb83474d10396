"""The optimization loop: :func:`run` over the coarse-to-fine schedule, and one scale's L-BFGS/Adam steps (CUDA
graphs, iterate averaging, early stopping).

Pure tensors in, tensors out: no files, no printing, no device choice (everything runs
on the device of the tensors it is given).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from itertools import islice
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..config import StyleConfig
from ..geometry import resize, target_size
from ..lbfgs import LBFGS
from ..style_losses import style_loss
from ..tiling import geometry
from .events import Progress, ProgressCallback, ScaleCallback, ScaleDone
from .masks import StyleInput, checked_masks, style_parts
from .objective import Objective, PixelLoss, Preview
from .scales import LBFGS_HISTORY, Layout, is_refinement, preview_size, refined, schedule, style_side, style_tile
from .targets import Region, StyleTargets, style_targets

if TYPE_CHECKING:
    from ..vgg import FeatureExtractor

__all__ = ["GRAPH_WARMUP", "LBFGS", "SYNC_EVERY", "run", "upsample"]


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
        pixel_loss: a loss of the image itself, ``(B, 3, h, w) -> (B,)`` at each scale's size (e.g. a video's
            temporal term against the previous frame), added to the objective outside the network: exact under
            tiling (its gradient is autograd's on the whole image); reported in :class:`Progress`'s ``tv``.

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
    loss = style_loss(cfg.style_loss)
    if masks is not None and not loss.masks:
        raise loss.masks_refusal()
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
    preview: Preview | None = None  # the preview term, the same at every refinement scale: built once
    for number, ((scale_index, hw, n_steps), lay) in islice(enumerate(zip(plan, layout), start=1), first, None):
        c = resize(content, hw)
        scale_cfg = refined(cfg) if is_refinement(cfg, scale_index) else cfg
        # a refinement scale whose full-size objective reads shallower layers (the preview term's detail layers)
        # runs the network only that deep, with the halos those layers need
        ext = extractor.for_layers(scale_cfg.layers)
        targets = _scale_targets(ext, styles, style_masks, masks, blend, scale_cfg, hw, scale_index,
                                 style_tile(hw, lay.tile, loss.tiles, _align(ext)))
        preview_hw = preview_size(h0, w0, cfg, scale_index)
        if preview_hw is not None and preview is None:
            # the base scale's objective at its size: its content, every style layer against the style as the base
            # scale sized it, its normalizers; untiled (the image is the base_size picture)
            base = len(cfg.scales) - 1
            preview = Preview(Objective(extractor, cfg, resize(content, preview_hw),
                                        _scale_targets(extractor, styles, style_masks, masks, blend, cfg, preview_hw,
                                                       base, None), generator=generator),
                              cfg.refine_preview_weight)
        objective = Objective(ext, scale_cfg, c, targets, tile=lay.tile, generator=generator, pixel_loss=pixel_loss,
                              preview=preview if preview_hw is not None else None, cut=lay.cut)
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
        # a resampling loss (sliced) draws new projections on the host before each step; a replayed CUDA graph
        # would reuse the first step's (not measured on a GPU: none was lent to this work)
        redraw = loss.resamples
        x, step, best, stopped = _optimize_scale(loss_fn, x, cfg, n_steps, step, total, scale_index, callback,
                                                 cuda_graph and not tiled and not redraw, history=lay.history,
                                                 tiled=objective if tiled else None, on_tile=on_tile, stop=stop,
                                                 resample=objective.resample if redraw else None)
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


def _align(extractor: FeatureExtractor) -> int:
    """The pooling stride of ``extractor``'s deepest layer (a tile's origins are multiples of it)."""
    return geometry(extractor.body, extractor.module_names, extractor.layers).align


def _scale_targets(extractor: FeatureExtractor, styles: Sequence[StyleInput], style_masks: Sequence[Tensor | None],
                   masks: Sequence[Tensor] | None, blend: Sequence[float], cfg: StyleConfig, hw: tuple[int, int],
                   scale_index: int, tile: tuple[int, int] | None) -> StyleTargets | list[Region]:
    """The style targets of the :func:`schedule` entry ``scale_index`` at size ``hw``: the styles sized for it
    (:func:`~nsf.optimize.scales.style_side`), blended, or with content ``masks`` one :class:`Region` per style."""
    sized = [_resize_style(s, hw, cfg, scale_index) for s in styles]
    sized_masks = [m if m is None else resize(m, (sz[0].shape[-2], sz[0].shape[-1]))
                   for m, sz in zip(style_masks, sized)]
    if masks is not None:  # each style its own targets, where its mask is
        k = float(sum(blend)) / len(blend)
        return [Region(style_targets(extractor, [st], [1.0], cfg, tile=tile, masks=[sm]), resize(m, hw), w / k)
                for st, sm, m, w in zip(sized, sized_masks, masks, blend)]
    return style_targets(extractor, sized, blend, cfg, tile=tile, masks=sized_masks)


def _resize_style(style: StyleInput, hw: tuple[int, int], cfg: StyleConfig, scale_index: int = 0) -> list[Tensor]:
    """Each part of ``style`` as the :func:`schedule` entry ``scale_index`` of size ``hw`` uses it
    (:func:`~nsf.optimize.scales.style_side`: with ``stroke_scale="pixels"`` never above its own size)."""
    return [resize(s, target_size(s.shape[-2], s.shape[-1],
                                  style_side(hw, (s.shape[-2], s.shape[-1]), cfg, scale_index), cfg.resize))
            for s in style_parts(style)]


# How often the loop reads losses back to the host (progress, early stop). Each read waits for the
# device; on CUDA that leaves the GPU idle while Python queues the next step, so it reads every 10.
SYNC_EVERY = {"cuda": 10}


def _optimize_scale(loss_fn: Callable, x: Tensor, cfg: StyleConfig, n_steps: int, step: int, total: int,
                    scale_index: int, callback: ProgressCallback | None,
                    cuda_graph: bool = False, *, history: int | None = None, tiled: Objective | None = None,
                    on_tile: Callable[[int, int], None] | None = None,
                    stop: Callable[[], bool] | None = None,
                    resample: Callable[[], None] | None = None) -> tuple[Tensor, int, Tensor, bool]:
    """Run ``n_steps`` steps at one scale -> ``(best image, steps so far, best loss per image (B,), stopped by
    stop())``.

    ``resample`` runs before each step (a resampling loss's new projections). With ``cfg.iterate_average``, an
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
        # the average was never a step's iterate: scored here, with the same objective (and, resampling, the same
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
