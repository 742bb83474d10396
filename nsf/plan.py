"""A run planned before it starts: per coarse-to-fine scale, whether a step runs on the whole image or
tile by tile (:mod:`nsf.tiling`), the tile size and L-BFGS history that fit a memory budget, and the
predicted peak memory and time.

Memory model, per scale of ``B`` images of ``P`` pixels and ``S`` style pixels (bytes)::

    peak = in_use + 12 (2 m B P + S) + (targets + 10 masks) B P
           + max(act_bytes max(B W, S_window) + fixed + 12 B P step_copies, 12 B P update_copies)

``in_use`` is what the process (CPU: its resident set, plus ``CPU_RUNTIME_BYTES`` it gains beside its tensors during
a run) or the device (CUDA: allocated tensors) holds before the run; ``m`` the L-BFGS pairs (two image-sized float32
vectors each); ``step_copies`` and
``update_copies`` the other image-sized float32 tensors alive during a step's backward and during the
L-BFGS update (image, best iterate, content, gradient; the update's temporaries);
``targets`` the content-target bytes per pixel; ``act_bytes`` the peak bytes per pixel of a
forward+backward, measured on this model (autograd's saved tensors at a small size, plus three of the
largest buffers of the backward) and ``fixed`` the bytes of a step that do not grow with it (measured as
the difference of two sizes); ``W`` the pixels of the largest tile window (``P`` untiled). A tiled scale that keeps
each tile's graph from a cut on between its two passes (:mod:`nsf.tiling`) holds ``kept(cut)`` bytes per pixel of
every window (the saved tensors of the modules from the cut on, measured per module) and the rest of
``act_bytes`` for one window at a time: ``act = kept(cut) sum(W) + (act_bytes - kept(cut)) max(W) + fixed``
(:func:`step_bytes`). On a CPU each term carries the margin measured between this model and a step's peak
resident set (``CPU_MARGINS``).

Time model: seconds per pixel of a forward+backward and of a forward, timed on this device; a tiled step costs a
forward over its windows (pass 1: without a kept graph only as deep as the style layers, over their windows) plus a
forward+backward over them in which only the modules before the cut run their forward again (``FORWARD_SHARE``); on
a CPU a step whose largest activation is over glibc's mmap limit costs ``PAGE_FAULTS`` times more. The rungs of the
ladder (untiled; tiles as large as fit, keeping the graph from the cut that fits, or on a CPU as large as stay under
that limit; fewer L-BFGS pairs where no good tile fits) are ranked by this model's relative cost, the same with or
without a timing run, so ``nsf plan`` shows what a run does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .config import StyleConfig
from .errors import ConfigError, PlanError
from .geometry import MIN_SIDE, target_size

# the memory helpers' home is nsf.memory; imported from here as before
from .memory import AUTO_SHARE as AUTO_SHARE
from .memory import auto_budget as auto_budget
from .memory import format_bytes
from .memory import memory_now as memory_now
from .memory import parse_memory as parse_memory
from .optimize.objective import Objective
from .optimize.scales import LBFGS_HISTORY, Layout, is_refinement, preview_size, refined, schedule, style_side
from .optimize.targets import style_targets
from .style_losses import StyleLoss, style_loss
from .tiling import Geometry, for_layers, geometry, tiles
from .vgg import FeatureExtractor

RGB_BYTES = 12  # one float32 RGB pixel
# Image-sized float32 tensors alive besides the L-BFGS history (counted in optimize._optimize_scale and
# run(): image, best iterate, content at the scale, previous gradient and step, gradient; during the
# L-BFGS update its direction's temporaries), checked against peak RSS in bench/RESULTS.md. The update's own
# temporaries measured 5 image copies above what the loop holds (2048x2048, 4 pairs: 252 MB peak over the resident set
# before it, /proc VmHWM, 2026-12-07). Held: the tensors alive at a tiled step's start at 2048x2048 were the image, the
# best iterate, the content and the previous gradient and step, five copies, and the step adds its gradient
# (bench/resident.py: 0.512 GB with the weights, the targets and one pair, bench/RESULTS.md "memory beside the
# tensors"): 6 held (7 before) + 5.
STEP_COPIES = 6
UPDATE_COPIES = 11
# A CPU step's peak resident set against the saved-tensor model (act_bytes per pixel), measured with bench/ladder.py
# (peak RSS of a step over the resident set before it, bf16 NHWC, 2026-12-07, bench/RESULTS.md "memory ladder"):
# untiled 1.20x (2048x2048) and 1.23x (1024x1024); tiled 1.53x (704 px tiles) and 1.67x (512 px) of the largest
# window's, the kept graphs (pass 1 to pass 2) about 1.2x theirs; glibc keeps some of each tile's freed buffers.
# CUDA's caching allocator is counted as measured (max_memory_allocated; no margin, not re-measured here).
# Tiled: 2.45 since each pass gives the C heap back once, not after every tile (nsf.tiling.TiledFeatures.backward):
# the tiles' freed buffers stay in the heap between tiles, 1.30-1.39x the 1.75 margin's prediction at 352-480 px
# tiles of a 2048 px refinement step, 1.06x at 704 px (bench/RESULTS.md "memory ladder", 2026-12-07).
CPU_MARGINS = {"untiled": 1.25, "tiled": 2.45, "kept": 1.25}
# A CPU run's resident set also grows beside its tensors and a step's buffers: oneDNN's cache of compiled kernels
# (one per convolution shape it has run, up to 1024: every tile window shape of every scale) and heap fragments that
# malloc_trim cannot give back. Measured at a tiled step's start after a trim, over the tensors alive then and over
# the run's own start (bench/resident.py, 2026-12-07, bench/RESULTS.md "memory beside the tensors"): 0.20 GB at
# 1024 px in 16 tiles, 0.28 GB at 2048 px in 25 tiles, of which the kernel cache 0.10 and 0.17 GB (the difference with
# ONEDNN_PRIMITIVE_CACHE_CAPACITY=0). Whole runs had peaked that much over plans without it (0.13-0.44 GB).
CPU_RUNTIME_BYTES = 0.3e9
# glibc serves a buffer of up to 32 MiB from its heap once one that size was freed (its largest mmap threshold) and
# maps a larger one afresh, faulting in its pages, at every use. A CPU step whose largest activation (relu1's output)
# is larger paid PAGE_FAULTS times the step without faults: 1.18x at 512 px, 1.50x at 1024 px, 1.39-1.45x at 2048 px
# (untiled, bf16: the same step with glibc's mmap off, GLIBC_TUNABLES=glibc.malloc.mmap_max=0, which costs 17-40%
# more peak memory); 704 px tiles at 2048 px cost 1.31x the untiled step, 352-416 px tiles (their largest buffer
# under the limit) 1.13-1.14x though they compute more pixels (bench/RESULTS.md "memory ladder", 2026-12-07). The
# planner counts the factor and weighs, on a CPU, the largest tile whose buffers stay under the limit beside the
# largest that fits.
MMAP_LIMIT = 32 * 2**20
PAGE_FAULTS = 1.4
# Tiles smaller than this (owned px per side) spend most of a step on halos: fewer L-BFGS pairs first.
GOOD_TILE = 384
# A forward+backward in forwards, and each cut's share of a forward (the modules before it), measured on the
# 2-core CPU in bf16 NHWC at 512 px (bench/RESULTS.md "memory ladder"): the full-resolution block is 42% of a
# forward (memory-bound), the deep blocks most of the arithmetic. A tiled step without a kept graph costs
# 1 + 1 / FB_FORWARDS = 1.2 untiled steps per window pixel (measured 1.24 in float32, bench/RESULTS.md "large cpu").
# The relu layers' shares (how deep a pass 1 that reads only them runs) are the means at 512 and 1024 px of
# `python bench/ladder.py shares` (2026-12-07, bench/RESULTS.md "memory ladder"); only the pools are cuts.
FB_FORWARDS = 4.9
FORWARD_SHARE = {"relu1_1": 0.14, "pool1": 0.42, "relu2_1": 0.45, "pool2": 0.59, "relu3_1": 0.65, "pool3": 0.81,
                 "relu4_1": 0.83, "relu4_2": 0.85, "pool4": 0.98, "relu5_1": 1.0}
# A content mask's image-sized float32 copies per pixel: at the scale's size, and at each style layer's
# resolution (relu1_1's full size, then a quarter, a sixteenth...: 4/3 of the pixels).
MASK_BYTES = 10
# A content mask's share of a step's time, for admission control's estimate. Measured on the 2-core CPU
# (bench/RESULTS.md "masks step": two soft masks, 0.94-1.13x at 256-512 px, noisy on the shared machine; the upper
# end is taken). Each style loss's own factor is its ``cost`` (nsf.style_losses, measured there).
MASK_WORK = 0.07  # per content mask


def step_cost(cfg: StyleConfig, masks: int = 0) -> float:
    """A step of ``cfg`` with ``masks`` content masks, in gram-loss steps without masks."""
    return style_loss(cfg.style_loss).cost * (1.0 + MASK_WORK * masks)


@dataclass(frozen=True)
class Costs:
    """A model's per-pixel costs on its device, measured once (:func:`measure`)."""

    act_bytes: float  # peak bytes per input pixel of one image's forward+backward
    target_bytes: float  # content-target bytes per input pixel
    geometry: Geometry
    fb_seconds: float | None = None  # seconds per input pixel of a forward+backward
    f_seconds: float | None = None  # seconds per input pixel of a forward without gradient
    calibrated_at: int = 0  # side (px) of the timing run
    fixed_bytes: float = 0.0  # a step's saved tensors that do not grow with the image (bf16 weight copies, Grams)
    kept_bytes: tuple[float, ...] = ()  # [c]: saved bytes per input pixel of the modules c.. (a graph kept from c)
    module_names: tuple[str, ...] = ()
    layers_read: tuple[str, ...] = ()  # the layers these costs were measured (or narrowed) for
    resident: bool = False  # CPU: memory is the resident set, counted with CPU_MARGINS
    pass_one: tuple[str, ...] = ()  # the layers a tiled step's pass 1 reads without a kept graph (): all
    largest_bytes: float = 0.0  # bytes per input pixel of a step's largest activation (relu1's output)

    def margin(self, what: str) -> float:
        return CPU_MARGINS[what] if self.resident else 1.0

    def cuts(self) -> list[int | None]:
        """The cuts the planner weighs: none (pass 2 recomputes all), then after each pooling layer, deepest first
        (each keeps more of pass 1's graph and recomputes less)."""
        after = [self.module_names.index(n) + 1 for n in FORWARD_SHARE
                 if n.startswith("pool") and n in self.module_names[:-1]]
        return [None, *sorted(after, reverse=True)] if self.kept_bytes else [None]

    def for_layers(self, layers: Sequence[str], *, pass_one: Sequence[str] = ()) -> Costs:
        """These costs for a scale that reads other ``layers`` of the same stack (a refinement scale with the preview
        term stops at relu4_2): their halos, and the cuts and kept bytes of the modules it runs; ``pass_one``: the
        layers its tiled steps' pass 1 reads (the style layers: nsf.tiling.TiledFeatures.reading). The per-pixel
        activation bytes stay the whole stack's (an upper bound)."""
        if not self.module_names or set(layers) == set(self.layers_read):
            return replace(self, pass_one=tuple(pass_one)) if tuple(pass_one) != self.pass_one else self
        depth = max(self.module_names.index(n) for n in layers) + 1
        tail = self.kept_bytes[depth] if depth < len(self.kept_bytes) else 0.0
        return replace(self, geometry=for_layers(self.geometry, layers), module_names=self.module_names[:depth],
                       kept_bytes=tuple(k - tail for k in self.kept_bytes[:depth]), layers_read=tuple(layers),
                       pass_one=tuple(pass_one))

    def pass_one_share(self) -> float:
        """Pass 1's forward without a kept graph (to the deepest of ``pass_one``) as a share of a forward of the
        scale's layers (``FORWARD_SHARE``; 1 where the tables do not know a layer)."""
        if not self.pass_one or not self.module_names:
            return 1.0
        deepest = max(self.pass_one, key=self.module_names.index)
        share, whole = FORWARD_SHARE.get(deepest), FORWARD_SHARE.get(self.module_names[-1])
        return min(1.0, share / whole) if share is not None and whole is not None else 1.0

    def faults(self, window: int) -> float:
        """The time factor of a step whose largest window has ``window`` pixels: ``PAGE_FAULTS`` on a CPU where its
        largest activation is over ``MMAP_LIMIT``, else 1."""
        return PAGE_FAULTS if self.resident and window * self.largest_bytes > MMAP_LIMIT else 1.0

    def kept(self, cut: int | None) -> float:
        return 0.0 if cut is None else self.kept_bytes[cut]

    def recompute_share(self, cut: int | None) -> float:
        """The share of a forward that pass 2 runs again with a graph kept from ``cut``."""
        return 1.0 if cut is None else FORWARD_SHARE[self.module_names[cut - 1]]


COSTS_FILE = "costs.json"  # in nsf.weights.cache_dir(): measured memory costs by _costs_key


@functools.cache
def _code_fingerprint() -> str:
    """sha256 of the nsf sources a step's saved tensors follow from: a checkout whose objective, losses, network or
    tiling changed (the version string does not move between commits) measures its costs anew."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("optimize/*.py"), *(root / n for n in ("losses.py", "style_losses.py", "vgg.py",
                                                                          "tiling.py", "plan.py", "lbfgs.py"))]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _costs_key(extractor: FeatureExtractor, cfg: StyleConfig, device: torch.device, memory_size: int) -> str:
    """What the memory measurement depends on: the saved tensors' sizes follow from the code (versions and the
    sources' fingerprint), the device type, the dtypes, the layers and the loss (not from the weights' values, nor
    from the machine's load)."""
    from .version import __version__

    dtype = next(extractor.parameters()).dtype
    return json.dumps([__version__, _code_fingerprint(), torch.__version__, device.type, str(dtype),
                       str(extractor.autocast), extractor.channels_last, list(cfg.layers), cfg.gram_norm,
                       cfg.style_loss, memory_size])


def _remembered(key: str, costs: Costs | None = None) -> tuple[float, float, float, tuple[float, ...], float] | None:
    """``(act_bytes, target_bytes, fixed_bytes, kept_bytes, largest_bytes)`` remembered under ``key``; with ``costs``,
    remember them."""
    from .weights import read_store, write_store

    known = read_store(COSTS_FILE)
    if costs is None:
        hit = known.get(key)
        if isinstance(hit, list) and len(hit) == 5 and all(isinstance(v, (int, float)) for v in (*hit[:3], hit[4])) \
                and isinstance(hit[3], list) and all(isinstance(v, (int, float)) for v in hit[3]):
            return float(hit[0]), float(hit[1]), float(hit[2]), tuple(float(v) for v in hit[3]), float(hit[4])
        return None
    known[key] = [costs.act_bytes, costs.target_bytes, costs.fixed_bytes, list(costs.kept_bytes), costs.largest_bytes]
    write_store(COSTS_FILE, known)
    return None


def _module_bytes(extractor: FeatureExtractor, x: torch.Tensor, params: set[int]) -> list[int]:
    """Bytes of the tensors each module of ``extractor.body`` saves for the backward of a forward on ``x`` (a
    tensor saved by several modules counts at the first)."""
    seen: set[int] = set()
    out: list[int] = []
    a = x.clone().requires_grad_(True)
    for i in range(extractor.depth):
        mine = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal mine
            storage = t.untyped_storage()
            if storage.data_ptr() not in params and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                mine += storage.nbytes()
            # not t itself: a module's output saved as itself makes a cycle through its graph that no backward
            # breaks here, and the whole graph outlived the measurement (0.085 GB at 256 px, in the memory in use
            # that the run's plan then read: 0.79 instead of 0.63 GB)
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            a, _ = extractor.stage(a, i, i + 1)
        out.append(mine)
    return out


def measure(extractor: FeatureExtractor, cfg: StyleConfig, device: torch.device, *, timing: bool,
            memory_size: int = 128, timing_size: int | None = None, remember: bool = False) -> Costs:
    """Measure :class:`Costs` on ``device``: small forwards+backwards with autograd's saved tensors counted
    (plus three of the largest for the backward's own buffers), and (``timing``) a timed forward+backward and
    forward at ``timing_size`` px.

    The saved tensors are counted at ``memory_size`` and at twice it, and the difference per pixel is what a
    pixel costs: tensors that do not grow with the image (autocast's bf16 copies of the weights, saved for the
    backward, 26 MB to relu5_1; the Gram matrices) would otherwise count as 1.6 KB per pixel at 128 px (a 512 px
    bf16 run's peak was predicted 0.4 GB too high); they are ``fixed_bytes``, counted once.

    ``remember`` (without ``timing``): the memory costs are read from, or written to, ``costs.json`` in
    :func:`nsf.weights.cache_dir`, keyed by everything they depend on (:func:`_costs_key`): they are sizes of
    saved tensors, the same on every run, and measuring them is most of a run's start-up on a CPU (two
    forwards+backwards, 8.8 s of 10.4 s at 256 px on the shared 2-core machine, bench/RESULTS.md "start-up").
    """
    layers = cfg.layers
    geo = geometry(extractor.body, extractor.module_names, layers)
    key = _costs_key(extractor, cfg, device, memory_size) if remember and not timing else None
    hit = _remembered(key) if key is not None else None
    names = extractor.module_names
    if hit is not None:
        return Costs(hit[0], hit[1], geo, fixed_bytes=hit[2], kept_bytes=hit[3], module_names=names,
                     layers_read=tuple(layers), resident=device.type == "cpu", largest_bytes=hit[4])
    params = {p.untyped_storage().data_ptr() for p in extractor.parameters()}

    def step_at(side: int) -> tuple[Objective, torch.Tensor]:
        """An objective whose content and style are one random ``side`` px image, and that image."""
        x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)
        return Objective(extractor, cfg, x, style_targets(extractor, [x], (1.0,), cfg)), x

    def saved_bytes(objective: Objective, x: torch.Tensor) -> tuple[int, int, float]:
        """(saved tensors' bytes, the largest one's, content-target bytes per pixel) of one step."""
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
            return t

        xr = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = objective(xr)
        torch.autograd.grad(loss.sum(), xr)
        targets = sum(f[0].numel() * f.element_size() for f in objective.content_targets.values()) / x.shape[-1]**2
        return sum(saved.values()), max(saved.values()), targets

    small, _, targets = saved_bytes(*step_at(memory_size))
    objective, x = step_at(2 * memory_size)
    large, largest, _ = saved_bytes(objective, x)
    per_pixel = (large - small) / (3 * memory_size**2)
    fixed = max(0.0, small - per_pixel * memory_size**2)
    # the backward holds, besides the saved tensors, a layer's incoming and outgoing gradient and the
    # convolution's own buffer: three of the largest (with two, a 1024 px CPU run peaked at 3.84 GB of
    # RSS against 3.58 GB predicted, bench/RESULTS.md); the largest is relu1's output, image-sized
    act = per_pixel + 3 * largest / (2 * memory_size) ** 2
    # each module's saved tensors per pixel (the difference of two sizes, as above): a graph kept from module c
    # holds the sum from c on
    small_m, large_m = (_module_bytes(extractor, torch.rand(1, 3, n, n, generator=torch.Generator().manual_seed(0))
                                      .to(device), params) for n in (memory_size, 2 * memory_size))
    per_module = [max(0.0, (b - a) / (3 * memory_size**2)) for a, b in zip(small_m, large_m)]
    kept = tuple(sum(per_module[c:]) for c in range(len(per_module)))
    costs = Costs(act, targets, geo, fixed_bytes=fixed, kept_bytes=kept, module_names=names, layers_read=tuple(layers),
                  resident=device.type == "cpu", largest_bytes=largest / (2 * memory_size) ** 2)
    if key is not None:
        _remembered(key, costs)
    if not timing:
        return costs
    side = timing_size or (512 if device.type == "cuda" else 256)
    # at twice memory_size (CPU's default) the step just counted was the forward+backward's warm-up
    warm = side == 2 * memory_size
    if not warm:
        objective, x = step_at(side)

    def fb() -> None:
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(objective(xr)[0].sum(), xr)

    def f() -> None:
        objective.value(x)

    seconds = []
    for fn in (fb, f):
        if not (warm and fn is fb):
            fn()  # warm-up: allocator, cuDNN/oneDNN choices
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        seconds.append((time.perf_counter() - t0) / side**2)
    return replace(costs, fb_seconds=seconds[0], f_seconds=seconds[1], calibrated_at=side)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class ScalePlan:
    """One scale of a planned run."""

    index: int  # the scale's index (optimize.schedule)
    size: tuple[int, int]  # (H, W)
    steps: int
    tile: tuple[int, int] | None  # owned tile (th, tw); None: whole image
    tiles: int
    history: int  # L-BFGS pairs
    peak_bytes: int
    seconds: float | None  # predicted, if the model was timed
    window_pixels: int = 0  # pixels a step runs the network on, per image (halos included when tiled)
    batch: int = 1
    cut: int | None = None  # tiled: the module index from which pass 1 keeps each tile's graph
    step_work: float = 0.0  # a step in forward+backward pixels per image (_step_work: passes 1 and 2 when tiled)
    keeps: str | None = None  # tiled with a cut: the first layer whose graph pass 1 keeps
    preview_pixels: int = 0  # the preview term's pixels per image (a refinement scale's base-size objective)

    @property
    def layout(self) -> Layout:
        return Layout(self.tile, self.history, self.cut)

    @property
    def rung(self) -> str:
        """How a step runs, in words."""
        if self.tile is None:
            return "whole image"
        return f"tiled, graph kept from {self.keeps}" if self.keeps is not None else "tiled"

    @property
    def work(self) -> float:
        """The scale's cost in untiled pixel-steps (what admission control's seconds per pixel-step multiply): a
        tiled step runs pass 1's forward and pass 2's recompute besides a forward+backward, over its windows."""
        return self.batch * self.steps * (self.step_work + self.preview_pixels)


@dataclass(frozen=True)
class Plan:
    """A whole run: its scales, the budget it was planned for and the predicted peak and time."""

    content: tuple[int, int]  # (H, W) of the content image as given
    batch: int
    device: str
    budget: int | None  # bytes; None: no limit known
    in_use: int  # bytes held before the run
    scales: tuple[ScalePlan, ...] = field(default_factory=tuple)
    masks: int = 0  # content masks of the run (regional styles)
    step_cost: float = 1.0  # a step's cost in gram-loss steps without masks (:func:`step_cost`)

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.scales)

    @property
    def seconds(self) -> float | None:
        parts = [s.seconds for s in self.scales]
        return None if any(p is None for p in parts) else float(sum(parts))  # type: ignore[arg-type]

    @property
    def tiled(self) -> bool:
        return any(s.tile is not None for s in self.scales)

    @property
    def work(self) -> float:
        """The run's cost in untiled gram-loss pixel-steps (what admission control's seconds per pixel-step
        multiply)."""
        return sum(s.work for s in self.scales) * self.step_cost

    def layout(self) -> list[Layout]:
        return [s.layout for s in self.scales]

    def to_dict(self) -> dict:
        return {"content": list(self.content), "batch": self.batch, "device": self.device, "budget": self.budget,
                "in_use": self.in_use, "peak_bytes": self.peak_bytes, "seconds": self.seconds,
                "scales": [{"index": s.index, "size": list(s.size), "steps": s.steps,
                            "tile": list(s.tile) if s.tile else None, "tiles": s.tiles, "history": s.history,
                            "cut": s.cut, "rung": s.rung, "peak_bytes": s.peak_bytes, "seconds": s.seconds}
                           for s in self.scales]}

    def table(self) -> str:
        """The plan as a text table, for ``nsf plan`` and logs."""
        budget = format_bytes(self.budget) if self.budget else "no limit"
        lines = [f"device {self.device}, budget {budget} (in use before the run: {format_bytes(self.in_use)})",
                 f"{'scale':>5}  {'size':>11}  {'steps':>5}  {'tiles':>13}  {'keeps':>7}  {'history':>7}  {'peak':>9}  "
                 f"{'time':>8}"]
        for s in self.scales:
            tiles = f"{s.tiles} of {s.tile[1]}x{s.tile[0]}" if s.tile else "whole image"
            keeps = s.keeps or "-"
            secs = f"{s.seconds:.1f} s" if s.seconds is not None else "-"
            lines.append(f"{s.index:>5}  {s.size[1]:>5}x{s.size[0]:<5}  {s.steps:>5}  {tiles:>13}  {keeps:>7}  "
                         f"{s.history:>7}  {format_bytes(s.peak_bytes):>9}  {secs:>8}")
        total = (f"time at most {self.seconds:.0f} s (early stopping may end scales sooner)"
                 if self.seconds is not None else "time not predicted (no timing run)")
        lines.append(f"predicted peak {format_bytes(self.peak_bytes)}, {total}")
        if any(s.cut is not None for s in self.scales):
            lines.append("keeps: pass 1 keeps each tile's graph from that layer on; pass 2 recomputes only the layers "
                         "before it (the same step)")
        return "\n".join(lines)


def _windows(hw: tuple[int, int], tile: tuple[int, int], geo: Geometry) -> tuple[int, int]:
    """``(largest, total)`` window pixels of the tiles of an ``hw`` image (as :func:`nsf.tiling.tiles` lays
    them out), side by side: a product of the rows' and the columns' spans, without listing every tile."""
    sides = []
    for n, t in zip(hw, tile):
        spans = [min(n, a + t + geo.after) - max(0, a - geo.before) for a in range(0, n, t)]
        sides.append((max(spans), sum(spans)))
    return sides[0][0] * sides[1][0], sides[0][1] * sides[1][1]


def _even(n: int, t: int, align: int) -> int:
    """The owned tile side that splits ``n`` px into as many tiles as ``t`` does, but evenly."""
    count = math.ceil(n / t)
    return min(t, math.ceil(math.ceil(n / count) / align) * align)


def _scale_peak(costs: Costs, batch: int, hw: tuple[int, int], style_px: int, tile: tuple[int, int] | None,
                history: int, in_use: int, masks: int = 0, cut: int | None = None, preview_px: int = 0) -> int:
    """Predicted peak bytes of one scale (the module's memory model); ``preview_px``: the preview term's pixels
    (its base-size objective's forward+backward and content targets, beside the full-size step)."""
    px = batch * hw[0] * hw[1]
    act = step_bytes(costs, hw, tile, cut=cut, preview_px=preview_px, style_px=style_px, batch=batch)
    state = RGB_BYTES * (2 * history * px + style_px) + (costs.target_bytes + MASK_BYTES * masks) * (px + preview_px)
    runtime = CPU_RUNTIME_BYTES if costs.resident else 0.0
    return int(in_use + runtime + state + max(act + RGB_BYTES * STEP_COPIES * px, RGB_BYTES * UPDATE_COPIES * px))


def step_bytes(costs: Costs, hw: tuple[int, int], tile: tuple[int, int] | None, *, cut: int | None = None,
               preview_px: int = 0, style_px: int = 0, batch: int = 1) -> float:
    """A step's own peak bytes (above what the loop holds) at a scale of size ``hw``: the activations of an untiled
    step, or the graphs pass 1 keeps (every window's deep part) and one window's recompute and backward; the
    preview term's forward+backward beside an untiled step's graph, between a tiled step's two passes; the styles'
    pass (tile by tile, an untiled scale's in tiles of its long side: nsf.optimize.scales.style_tile)."""
    px = batch * hw[0] * hw[1]
    if tile is None:
        window = windows = px
    else:
        largest_window, total = _windows(hw, tile, costs.geometry)
        window, windows = batch * largest_window, batch * total
    geo = costs.geometry
    style_window = min(style_px, window if tile is not None else (max(hw) + geo.before + geo.after) ** 2)
    kept = costs.kept(cut) if tile is not None else 0.0
    untiled = costs.margin("untiled") * costs.act_bytes
    preview = untiled * preview_px
    act = costs.margin("kept") * kept * windows + max(costs.margin("tiled") * (costs.act_bytes - kept) * window,
                                                       preview) if tile is not None else untiled * px + preview
    return max(act, untiled * style_window) + costs.fixed_bytes


def _step_work(costs: Costs, hw: tuple[int, int], tile: tuple[int, int] | None, cut: int | None, *,
               batch: int = 1) -> float:
    """A step of one ``hw`` image in forward+backward pixels. Tiled: pass 2's forward+backward over its windows;
    with a cut, pass 1's forward over them and pass 2's recompute of the modules before the cut; without, pass 1's
    forward only as deep as the style layers and over their narrower windows (:meth:`nsf.tiling.TiledFeatures.reading`:
    a refinement scale's pass 1 runs to relu3_1, not to the content's relu4_2). On a CPU, times ``PAGE_FAULTS`` where
    the largest window's largest activation is over ``MMAP_LIMIT`` (:meth:`Costs.faults`)."""
    if tile is None:
        return hw[0] * hw[1] * costs.faults(batch * hw[0] * hw[1])
    largest, windows = _windows(hw, tile, costs.geometry)
    largest *= batch
    if cut is not None:
        return windows * (1.0 + costs.recompute_share(cut) / FB_FORWARDS) * costs.faults(largest)
    first = _windows(hw, tile, for_layers(costs.geometry, costs.pass_one))[1] if costs.pass_one else windows
    return (windows + first * costs.pass_one_share() / FB_FORWARDS) * costs.faults(largest)


def _scale_seconds(costs: Costs, batch: int, work: float, windows: int, style_px: int, steps: int,
                   preview_px: int = 0) -> float | None:
    """Seconds of a scale whose steps cost ``work`` forward+backward pixels per image (:func:`_step_work`) and the
    preview term's forward+backward on ``preview_px``; its setup runs forwards over ``windows`` pixels."""
    if costs.fb_seconds is None or costs.f_seconds is None:
        return None
    step = costs.fb_seconds * (work + preview_px)
    # content targets, final evaluation, style Grams, the preview's targets
    setup = costs.f_seconds * (2 * windows + style_px + 2 * preview_px)
    return batch * (steps * step + setup)


def _style_pixels(hw: tuple[int, int], cfg: StyleConfig, style_sizes: Sequence[tuple[int, int]],
                  scale_index: int = 0) -> int:
    """Pixels of the style images as the :func:`schedule` entry ``scale_index`` of size ``hw`` uses them
    (:func:`~nsf.optimize.scales.style_side`; a style of unknown size as large as the scale)."""
    total = 0
    for sh, sw in style_sizes or [hw]:
        th, tw = target_size(sh, sw, style_side(hw, (sh, sw), cfg, scale_index), cfg.resize)
        total += th * tw
    return total


def plan(costs: Costs, cfg: StyleConfig, content: tuple[int, int], *, batch: int = 1,
         style_sizes: Sequence[tuple[int, int]] = (), budget: int | None, in_use: int,
         device: str = "cpu", masks: int = 0) -> Plan:
    """Plan a run of ``cfg`` on a ``content`` = ``(H, W)`` image (``batch`` of them) within ``budget`` bytes.

    Each scale runs untiled where it fits; else tiled, with the largest tile that fits next to the
    full L-BFGS history, or, where that tile would be under ``GOOD_TILE`` px, next to the most pairs that leave room
    for one.
    Raises :class:`PlanError` naming the largest ``size`` that fits when no tile fits at all.
    A style loss that cannot tile (:attr:`nsf.style_losses.StyleLoss.tiles`) runs its scales untiled, with the most
    pairs that fit, and raises a :class:`~nsf.errors.ConfigError` on ``style_loss`` (naming the losses that tile)
    when even one pair does not fit.
    ``masks``: the run's content masks (regional styles), whose image-sized copies count (``MASK_BYTES``).
    """
    runs = schedule(*content, cfg)
    loss = style_loss(cfg.style_loss)
    if min(runs[-1][1]) < MIN_SIDE:
        raise too_small(cfg, content)
    scales = []
    whole = costs
    for index, hw, steps in runs:
        # a refinement scale reads its own layers (with the preview term, the detail layers: shallower, smaller
        # halos) and adds the preview term's base-size objective
        scale_cfg = refined(cfg) if is_refinement(cfg, index) else cfg
        costs = whole.for_layers(scale_cfg.layers, pass_one=scale_cfg.style_layers)
        preview_hw = preview_size(*content, cfg, index)
        preview_px = batch * preview_hw[0] * preview_hw[1] if preview_hw is not None else 0
        style_px = _style_pixels(hw, cfg, style_sizes, index) * (batch if not style_sizes else 1)
        want = max(1, min(LBFGS_HISTORY, steps - 1)) if cfg.optimizer == "lbfgs" else 1

        choice = _rung(costs, batch, hw, style_px, preview_px, want, budget, in_use, masks, loss)
        if choice is None:
            # what the planner could not fit: one tile of the scale's alignment and one pair, as _rung counted it
            smallest = _scale_peak(costs, batch, hw, style_px, (costs.geometry.align,) * 2, 1, in_use, masks, None,
                                   preview_px)
            raise _too_big(whole, cfg, content, batch, style_sizes, budget, in_use, hw, masks,
                           (costs.geometry.align, smallest))
        tile, m, cut = choice
        if tile is not None and tile[0] >= hw[0] and tile[1] >= hw[1]:
            tile, cut = None, None
        windows = [t.window_pixels for t in tiles(*hw, tile, costs.geometry)]
        work = _step_work(costs, hw, tile, cut, batch=batch)
        scales.append(ScalePlan(index, hw, steps, tile, len(windows), m,
                                _scale_peak(costs, batch, hw, style_px, tile, m, in_use, masks, cut, preview_px),
                                _scale_seconds(costs, batch, work, sum(windows), style_px, steps, preview_px),
                                sum(windows), batch, cut, work,
                                costs.module_names[cut] if cut is not None else None, preview_px // batch))
    return Plan(content, batch, device, budget, in_use, tuple(scales), masks, step_cost(cfg, masks))


def _rung(costs: Costs, batch: int, hw: tuple[int, int], style_px: int, preview_px: int, want: int,
          budget: int | None, in_use: int, masks: int, loss: StyleLoss
          ) -> tuple[tuple[int, int] | None, int, int | None] | None:
    """The cheapest way to run a scale within ``budget``: ``(tile, L-BFGS pairs, cut)``. Untiled with ``want`` pairs
    where it fits; else each cut's largest tile next to ``want`` pairs (on a CPU also its largest tile without page
    faults, ``Costs.faults``), ranked by the step's cost; fewer pairs only where no tile of ``GOOD_TILE`` px fits,
    then the most pairs next to which one does. A loss that cannot tile: untiled with the most pairs that fit.
    ``None`` when not even one pair and the smallest tile fit."""
    align = costs.geometry.align

    def fits(tile: tuple[int, int] | None, m: int, cut: int | None = None) -> bool:
        return budget is None or \
            _scale_peak(costs, batch, hw, style_px, tile, m, in_use, masks, cut, preview_px) <= budget

    if fits(None, want):
        return None, want, None
    if not loss.tiles:
        # untiled with the most pairs that fit, as a tiled scale keeps the most that leave room for a good tile
        most = largest(lambda m: fits(None, m), 1, want - 1)
        if most is None:
            raise loss.tiling_refusal(f"does not fit max_memory={format_bytes(budget or 0)} at {hw[1]}x{hw[0]} "
                                      "untiled (a step would run tile by tile)")
        return None, most, None

    @functools.cache  # the search for fewer pairs below asks again for the count it settles on
    def best_tile(m: int) -> tuple[tuple[int, int], int, int | None] | None:
        """The cheapest tile and cut next to ``m`` pairs: each cut's largest tile, ranked by the step's cost
        (halos, pass 1, the recompute), among those of ``GOOD_TILE`` px (any tile with one pair)."""
        top = math.ceil(max(hw) / align)
        options: list[tuple[float, tuple[int, int], int | None, int]] = []
        halo = costs.geometry.before + costs.geometry.after
        for cut in costs.cuts():
            def fits_tile(k: int, m: int = m, cut: int | None = cut) -> bool:
                return fits((k * align, k * align), m, cut)

            k = largest(fits_tile, 1, top)
            if k is None:
                continue
            # on a CPU also the largest tile whose buffers stay under glibc's mmap limit (fault-free, Costs.faults)
            def fault_free(j: int, halo: int = halo) -> bool:
                return costs.faults(batch * (j * align + halo) ** 2) == 1.0

            free = largest(fault_free, 1, k)
            for j in dict.fromkeys([k, free or k]):  # both ranked by cost, judged GOOD_TILE by the one that fits
                even = (_even(hw[0], j * align, align), _even(hw[1], j * align, align))
                options.append((_step_work(costs, hw, even, cut, batch=batch), even, cut, k * align))
        good = [o for o in options if o[3] >= min(GOOD_TILE, max(hw))] or (options if m == 1 else [])
        if not good:
            return None
        best = min(good, key=lambda o: o[0])
        return best[1], m, best[2]

    # the most pairs next to which a good tile fits (fewer pairs leave more memory for tiles)
    found = best_tile(want)
    fewer = largest(lambda m: best_tile(m) is not None, 1, want - 1) if found is None else None
    return best_tile(fewer) if fewer is not None else found


def too_small(cfg: StyleConfig, content: tuple[int, int]) -> ConfigError:
    """The error for a ``size`` whose output's short side is under ``MIN_SIDE`` for this content's aspect ratio
    (VGG-19's deepest pooling would have no pixel left)."""
    h, w = content
    # the short side is round(size * short / long): it reaches MIN_SIDE near size = (MIN_SIDE - 1/2) * long / short
    first = max(cfg.size + 1, math.floor((MIN_SIDE - 0.5) * max(h, w) / max(1, min(h, w))) - 2)
    least = next(s for s in range(first, first + 16) if min(target_size(h, w, s, cfg.resize)) >= MIN_SIDE)
    out_h, out_w = target_size(h, w, cfg.size, cfg.resize)
    return ConfigError(f"size={cfg.size} makes a {out_w}x{out_h} px picture of this {w}x{h} content; allowed: size "
                       f">= {least} for its aspect ratio (each side at least {MIN_SIDE} px)", field="size",
                       value=cfg.size, allowed={"min": least})


def _too_big(costs: Costs, cfg: StyleConfig, content: tuple[int, int], batch: int,
             style_sizes: Sequence[tuple[int, int]], budget: int | None, in_use: int,
             hw: tuple[int, int], masks: int, smallest: tuple[int, int]) -> PlanError:
    """The error for a run that fits no rung at the scale of size ``hw``, naming the largest ``size`` that fits;
    ``smallest``: ``(tile side, peak bytes)`` of the least that scale could run with."""
    def ok(size: int) -> bool:
        try:
            plan(costs, cfg.replace(size=size), content, batch=batch, style_sizes=style_sizes, budget=budget,
                 in_use=in_use, masks=masks)
            return True
        except PlanError:
            return False

    fits = largest(ok, 2 * MIN_SIDE, cfg.size - 1)
    what = f"at most size={fits} fits" if fits else "no size fits"
    return PlanError(f"size={cfg.size} does not fit max_memory={format_bytes(budget or 0)}: even one "
                     f"{smallest[0]} px tile with one L-BFGS pair needs {format_bytes(smallest[1])} at "
                     f"{hw[1]}x{hw[0]} ({format_bytes(in_use)} already in use); {what}",
                     field="size", value=cfg.size, allowed={"min": MIN_SIDE, "max": fits})


def largest(ok: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The largest n in [lo, hi] with ok(n), for ok true up to some n and false after; None if none."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo
