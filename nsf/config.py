"""Every option of a style transfer run, with its one default, and the named presets.

The CLI builds its flags from these fields and the servers read the same class: a default is written here and
nowhere else, and so is each choice field's set of values (its ``choices`` metadata: validation, the CLI's help
and the request schema read it). Importing this module imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .geometry import MIN_SIDE
from .layers import validate_layers
from .style_losses import GRAM_NORMS, Names
from .style_losses import help_text as style_loss_help

OPTIMIZERS = ("lbfgs", "adam")
INITS = ("content", "noise")
RESIZES = ("long_side", "square")
STROKE_SCALES = ("picture", "pixels")
COLOR_MODES = ("off", "luminance", "histogram")
# preserve_color was a bool before it was a choice: True and False still mean these
COLOR_BOOLS = {True: "luminance", False: "off"}

# Hard bounds that keep a typo from allocating the machine away; the handler sets tighter ones.
MAX_STEPS = 100_000
MAX_SIZE = 8192
MAX_WEIGHT = 1e12


def _opt(default: Any, help: str, **meta: Any) -> Any:
    if isinstance(default, (list, dict)):
        raise TypeError("use immutable defaults")
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class StyleConfig:
    """Options of one style transfer run. Build with :func:`make_config` to validate."""

    size: int = _opt(512, "output size in pixels: the longer side (the content's aspect ratio is kept)")
    steps: int = _opt(150, "optimizer steps in all, summed over the scales of the coarse-to-fine schedule")
    content_weight: float = _opt(1.0, "weight of the content loss (MSE of content-layer features)")
    style_weight: float = _opt(1.0, "weight of the style loss (MSE of Gram matrices)")
    tv_weight: float = _opt(0.0, "weight of the total-variation smoothness loss")
    content_layers: tuple[str, ...] = _opt(("relu4_2",), "VGG-19 layers matched to the content")
    content_layer_weights: tuple[float, ...] | None = _opt(None, "per content layer weights (default: 1 each)")
    style_layers: tuple[str, ...] = _opt(("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"),
                                         "VGG-19 layers whose Gram matrices are matched to the style")
    style_layer_weights: tuple[float, ...] | None = _opt(None, "per style layer weights (default: 1 each)")
    normalize_losses: bool = _opt(True, "divide each layer's loss by its value at the content image, so every layer "
                                  "counts alike and the weights mean the same for any image")
    gram_norm: str = _opt("chw", f"Gram normalization: {' or '.join(GRAM_NORMS)} (F F^T / (C*H*W), or plain); "
                          "style_loss=gram only", choices=GRAM_NORMS)
    # the registered style losses (nsf.style_losses), read when used: a loss registered later is a choice too
    style_loss: str = _opt("gram", style_loss_help(), choices=Names())
    optimizer: str = _opt("lbfgs", f"optimizer: {' or '.join(OPTIMIZERS)}", choices=OPTIMIZERS)
    lr: float = _opt(1.0, "learning rate (L-BFGS step length, or Adam's lr on [0, 1] pixels)")
    iterate_average: float = _opt(0.0, "decay of an exponential moving average of the iterates at each scale "
                                  "(e.g. 0.9; 0: off); the average is returned where it scores better than the "
                                  "best iterate")
    init: str = _opt("content", f"start image: {' or '.join(INITS)} (a start image of your own: init_image)",
                     choices=INITS)
    style_blend_weights: tuple[float, ...] | None = _opt(None, "blend weights of several styles (default: equal)")
    style_scale: float = _opt(1.0, "style image size relative to the output size")
    preserve_color: str = _opt("off", f"colour control: {', '.join(COLOR_MODES)} (luminance: transfer luminance "
                               "only, the output keeps the content's colours; histogram: the style is recoloured to "
                               "the content's colour mean and covariance first; True and False, as before, mean "
                               "luminance and off)",
                               choices=COLOR_MODES, bool_choices=(COLOR_BOOLS[True], COLOR_BOOLS[False]))
    seed: int = _opt(0, "random seed: the same seed on the same device gives the same image")
    scales: tuple[float, ...] = _opt((0.25, 0.5, 1.0), "coarse-to-fine schedule: sizes relative to size, ascending")
    scale_steps: tuple[float, ...] = _opt((0.6, 0.3, 0.1), "share of the steps spent at each scale")
    restore_detail: bool = _opt(True, "coarse-to-fine with init=content: at each finer scale add the content's detail "
                                "that the coarser scale could not hold to the upsampled image")
    base_size: int = _opt(512, "the coarse-to-fine scales run up to this size; a larger output adds refinement "
                          "scales, each twice the last, up to size (0: scales relative to size alone)")
    # 20 at 1024 and 2048 px: at 2048 px, 6 steps scored style/content 0.26/0.69, 20 steps 0.17/0.56
    # (bench/RESULTS.md "large cpu", u2048 vs u2048r20); at 1024 px, 5/10/20 steps 0.22/0.11/0.098 style.
    # 12 from 4096 px on: a scale that starts from its predecessor upsampled needs its steps for its texture up close
    # (relu1_1-relu3_1 at full size against the style at its own size, bar 0.15): 0.35/0.16/0.11 after 4/8/12 steps
    # at 2048 px; at 4096 px 4 steps scored 0.39 and 12 steps 0.18 with refine_content_weight 1: the full-size content
    # term's pull, not too few steps (20 instead of 12 gained 0.015 at a quarter of the size; see below)
    refine_steps: tuple[int, ...] = _opt((20, 20, 12), "steps at each refinement scale above base_size, "
                                         "coarsest first (the last repeats)")
    # 0.25: the full-size content term (relu4_2 at full size) holds the output to the content's own fine structure and
    # fights the style's strokes there; the composition is the preview term's. Prints 8x the base size (the style and
    # content at 128 px, base_size 128, 1024 px: the README's 4096 px prints at a quarter) scored up close 0.11-0.18
    # with 1.0 and 0.06-0.07 with 0.25 on three pairs, thumbnails within 0.004; 20 steps instead of 12 with 1.0 only
    # 0.114 -> 0.099 (bench/RESULTS.md "content at the refinement scales")
    refine_content_weight: float = _opt(0.25, "content_weight is multiplied by this in the full-size objective of the "
                                        "refinement scales, where the composition is settled and the style adds "
                                        "detail (the preview term keeps content_weight)")
    # 1 each by default: at 2048 px from 512 px images, 4 on relu4_1 and relu5_1 took style_ratio 0.17 -> 0.10
    # and content_ratio 0.56 -> 0.90 (bench/RESULTS.md "refinement weights"); a trade, not a gain
    refine_style_layer_weights: tuple[float, ...] | None = _opt(
        None, "style_layer_weights are multiplied by these in the full-size objective of the refinement scales, "
        "one per style layer (default: 1 each; dropped when style_layers change without them), e.g. 1,1,1,4,4 for "
        "more of the style's larger forms in a print; with the preview term only the refine_detail_layers' entries "
        "count (the preview term keeps style_layer_weights)")
    # a print as its preview plus detail (issue 23): without the preview term the refinement scales match the style at
    # pixel scale only and wash out the picture-scale style of the base_size run (a held-out pair at 2048 px: its
    # thumbnail scored style_ratio 0.635 against 0.035 for the 512 px run); bench/RESULTS.md "print = preview + detail"
    refine_preview_weight: float = _opt(
        1.0, "weight of the preview term at the refinement scales above base_size: the output downsampled to the "
        "base_size picture's size, scored by that scale's objective (content and every style layer against the style "
        "at base_size), so a print keeps its preview's look; with it the full-size objective matches only "
        "refine_detail_layers (0: off, every style layer at full size, as before)")
    refine_detail_layers: tuple[str, ...] = _opt(
        ("relu1_1", "relu2_1", "relu3_1"), "with refine_preview_weight > 0, the style layers matched at the full size "
        "of a refinement scale (the detail a print needs; those of style_layers that are named here), against the "
        "style image at its own resolution (stroke_scale=pixels); the deeper layers count in the preview term")
    stroke_scale: str = _opt("pixels", f"{' or '.join(STROKE_SCALES)}: the size of the style's strokes at the "
                             "refinement scales above base_size. pixels: the style image's own (never upscaled; with "
                             "the preview term, refine_preview_weight > 0, the full-size detail layers are matched "
                             "against the style at its native resolution, however large, while the preview term "
                             "keeps the strokes of the base_size picture); picture: relative to the picture (the "
                             "style image is resized with the output, upscaled if need be, a softer style)",
                             choices=STROKE_SCALES)
    tol: float = _opt(1e-4, "stop a scale early when the loss improved by less than this fraction "
                      "over the last `patience` steps (0 disables)")
    patience: int = _opt(20, "window, in steps, of the early-stop test")
    resize: str = _opt("long_side", f"how the content is resized: {' or '.join(RESIZES)} "
                       "(square squashes to size x size)", choices=RESIZES)
    max_pixels: int = _opt(50_000_000, "refuse input images with more pixels than this before decoding them")

    @property
    def layers(self) -> tuple[str, ...]:
        """Every VGG layer a run reads: the content layers, then the style layers, each once."""
        return tuple(dict.fromkeys((*self.content_layers, *self.style_layers)))

    def replace(self, **changes: Any) -> StyleConfig:
        """A validated copy with ``changes`` applied."""
        return make_config(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = tuple(f.name for f in fields(StyleConfig))
CHOICE_FIELDS: dict[str, Sequence[str]] = {f.name: f.metadata["choices"] for f in fields(StyleConfig)
                                           if "choices" in f.metadata}
"""Each choice field and its values (its ``choices`` metadata; the style losses' is the live registry)."""
# what validate() adds to a choice field's message: how to give what the choices do not name
_CHOICE_HINTS = {"init": " (a start image is stylize(init_image=...), --init-image on the command line)"}


def _check_range(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if not isinstance(value, int):  # an int is compared exactly: float(10**400) would overflow
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r} must be a number", field=name, value=value,
                              allowed=_range_text(lo, hi, lo_open)) from None
    nan_or_inf = isinstance(value, float) and not math.isfinite(value)
    if nan_or_inf or value > hi or (value <= lo if lo_open else value < lo):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        allowed = _range_text(lo, hi, lo_open)
        raise ConfigError(f"{name}={shown} is out of range; allowed: {allowed}", field=name, value=value,
                          allowed=allowed)


def _range_text(lo: float, hi: float, lo_open: bool) -> str:
    return f"{'>' if lo_open else '>='} {lo} and <= {hi:g}"


def _as_tuple(name: str, value: Any, kind: type) -> tuple[Any, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        value = (value,) if kind in (float, int) or isinstance(value, str) else value
    try:
        return tuple(kind(v) for v in value)
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"{name}={value!r} must be a sequence of {kind.__name__}", field=name, value=value,
                          allowed=f"a sequence of {kind.__name__}") from e


# (layers, one weight per layer): the pairs that are checked against each other and reset together
LAYER_WEIGHTS = (("content_layers", "content_layer_weights"), ("style_layers", "style_layer_weights"),
                 ("style_layers", "refine_style_layer_weights"))


def validate(cfg: StyleConfig) -> StyleConfig:
    """Check every option; raise :class:`~nsf.errors.ConfigError` (a ``ValueError``) naming the field, the bad
    value and what is allowed."""
    for name in ("size", "steps", "patience", "max_pixels", "seed", "base_size"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{name}={v!r} must be an integer", field=name, value=v, allowed="an integer")
    _check_range("size", cfg.size, 16, MAX_SIZE)
    _check_range("steps", cfg.steps, 1, MAX_STEPS)
    _check_range("patience", cfg.patience, 1, MAX_STEPS)
    _check_range("max_pixels", cfg.max_pixels, 256, 2**40)
    _check_range("seed", cfg.seed, 0, 2**63 - 1)
    if cfg.base_size:
        _check_range("base_size", cfg.base_size, 2 * MIN_SIDE, MAX_SIZE)
    if not cfg.refine_steps:
        raise ConfigError("refine_steps=(); allowed: one or more step counts, e.g. 10,6,4,3", field="refine_steps",
                          value=cfg.refine_steps, allowed="one or more step counts, e.g. 10,6,4,3")
    for n in cfg.refine_steps:
        if isinstance(n, bool) or not isinstance(n, int):
            raise ConfigError(f"refine_steps={cfg.refine_steps!r}; allowed: integers", field="refine_steps",
                              value=cfg.refine_steps, allowed="integers")
        _check_range("refine_steps", n, 0, MAX_STEPS)
    for name in ("content_weight", "style_weight", "tv_weight", "refine_content_weight", "refine_preview_weight"):
        _check_range(name, getattr(cfg, name), 0.0, MAX_WEIGHT)
    if cfg.content_weight == 0 and cfg.style_weight == 0:
        raise ConfigError("content_weight and style_weight are both 0: nothing to optimize; allowed: either > 0",
                          field="content_weight", value=cfg.content_weight, allowed="either > 0")
    _check_range("lr", cfg.lr, 0.0, 1e6, lo_open=True)
    _check_range("style_scale", cfg.style_scale, 0.0, 16.0, lo_open=True)
    _check_range("tol", cfg.tol, 0.0, 1.0)
    _check_range("iterate_average", cfg.iterate_average, 0.0, 1.0)
    if cfg.iterate_average == 1.0:  # an average that never moves from the first iterate
        raise ConfigError("iterate_average=1.0; allowed: 0 (off) or a decay in (0, 1), e.g. 0.9",
                          field="iterate_average", value=cfg.iterate_average, allowed="0 (off) or a decay in (0, 1)")
    validate_layers(cfg.content_layers, "content layer", field="content_layers")
    validate_layers(cfg.style_layers, "style layer", field="style_layers")
    validate_layers(cfg.refine_detail_layers, "detail layer", field="refine_detail_layers")
    if cfg.refine_preview_weight > 0 and cfg.base_size and cfg.size > cfg.base_size \
            and not set(cfg.refine_detail_layers) & set(cfg.style_layers):
        rule = f"one or more of the style_layers ({', '.join(cfg.style_layers)}), or refine_preview_weight=0"
        raise ConfigError(f"refine_detail_layers={cfg.refine_detail_layers!r} names none of the style_layers: the "
                          f"refinement scales would match no style at full size; allowed: {rule}",
                          field="refine_detail_layers", value=cfg.refine_detail_layers, allowed=rule)
    for layers_field, what in LAYER_WEIGHTS:
        layers, weights = getattr(cfg, layers_field), getattr(cfg, what)
        if weights is not None:
            if len(weights) != len(layers):
                raise ConfigError(f"{what} has {len(weights)} values for {len(layers)} layers; give one per layer",
                                  field=what, value=weights, allowed=f"{len(layers)} values, one per layer")
            for w in weights:
                _check_range(what, w, 0.0, MAX_WEIGHT)
    if cfg.style_blend_weights is not None:
        for w in cfg.style_blend_weights:
            _check_range("style_blend_weights", w, 0.0, MAX_WEIGHT)
        if sum(cfg.style_blend_weights) <= 0:
            raise ConfigError("style_blend_weights sum to 0; allowed: non-negative values with a positive sum",
                              field="style_blend_weights", value=cfg.style_blend_weights,
                              allowed="non-negative values with a positive sum")
    for name, allowed in CHOICE_FIELDS.items():
        value = getattr(cfg, name)
        if not isinstance(value, str) or value not in allowed:
            what = f"{name}={value!r}" if name in _CHOICE_HINTS else f"unknown {name} {value!r}"
            raise ConfigError(f"{what}; allowed: {', '.join(allowed)}{_CHOICE_HINTS.get(name, '')}", field=name,
                              value=value, allowed=list(allowed))
    if not cfg.scales or list(cfg.scales) != sorted(cfg.scales) or cfg.scales[-1] != 1.0 or cfg.scales[0] <= 0:
        rule = "ascending fractions in (0, 1] ending with 1.0"
        raise ConfigError(f"scales={cfg.scales!r}; allowed: {rule}", field="scales", value=cfg.scales, allowed=rule)
    if len(cfg.scale_steps) != len(cfg.scales) or any(s < 0 for s in cfg.scale_steps) or sum(cfg.scale_steps) <= 0:
        rule = f"one non-negative share per scale ({len(cfg.scales)} here) with a positive sum"
        raise ConfigError(f"scale_steps={cfg.scale_steps!r}; allowed: {rule}", field="scale_steps",
                          value=cfg.scale_steps, allowed=rule)
    return cfg


_TUPLE_FIELDS = {"content_layers": str, "style_layers": str, "content_layer_weights": float,
                 "style_layer_weights": float, "style_blend_weights": float, "scales": float, "scale_steps": float,
                 "refine_steps": int, "refine_style_layer_weights": float, "refine_detail_layers": str}


def make_config(base: StyleConfig | str | None = None, **overrides: Any) -> StyleConfig:
    """A validated config: ``base`` (a preset name or a config) with ``overrides`` applied.

    Unknown option names raise :class:`~nsf.errors.ConfigError` (a ``ValueError``) listing the valid ones.
    Layers may be given as a mapping ``{"relu1_1": 0.5, ...}`` to set names and weights together.
    """
    if base is None:
        base = PRESETS["default"]
    elif isinstance(base, str):
        base = preset(base)
    unknown = sorted(set(overrides) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(FIELD_NAMES)}",
                          field=unknown[0], value=overrides[unknown[0]], allowed=list(FIELD_NAMES))
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in ("content_layers", "style_layers") and isinstance(value, Mapping):
            changes[key] = tuple(str(k) for k in value)
            changes[key[:-1] + "_weights"] = tuple(float(v) for v in value.values())
            continue
        if key in _TUPLE_FIELDS:
            value = _as_tuple(key, value, _TUPLE_FIELDS[key])
        elif key == "preserve_color" and isinstance(value, bool):
            value = COLOR_BOOLS[value]
        changes[key] = value
    for key, weights in LAYER_WEIGHTS:
        # new layers without new weights: drop weights that belonged to the old layers
        if key in changes and weights not in changes and changes[key] != getattr(base, key):
            changes[weights] = None
    return validate(dataclasses.replace(base, **changes))


_SEED_STYLE = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")

PRESETS: dict[str, StyleConfig] = {
    "default": StyleConfig(),
    # Reproduces the notebook this project grew from. It asked for conv1_1..conv5_1 and conv4_2,
    # but torchvision's in-place ReLU overwrote the stored conv outputs, so what it used were
    # relu1_1..relu5_1 and relu4_2: we name those.
    "seed": StyleConfig(
        size=400, resize="square", steps=2000, optimizer="adam", lr=0.02,
        content_weight=100.0, style_weight=40.0, tv_weight=0.0,
        content_layers=("relu4_2",), style_layers=_SEED_STYLE,
        style_layer_weights=(0.85, 0.56, 0.11, 0.15, 0.2), gram_norm="none", normalize_losses=False,
        scales=(1.0,), scale_steps=(1.0,), tol=0.0,
    ),
    "fast": StyleConfig(size=256, steps=100),
    "quality": StyleConfig(steps=600, scales=(0.25, 0.5, 1.0), scale_steps=(0.5, 0.3, 0.2), tol=1e-5),
}


def preset(name: str) -> StyleConfig:
    """The named preset; :class:`~nsf.errors.ConfigError` (a ``ValueError``) lists the names for an unknown one."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}", field="preset", value=name,
                          allowed=list(PRESETS)) from None
