"""What a request may ask for on one device type: :class:`ServingLimits`, read from the ``nsf`` section
of TorchServe's ``model-config.yaml`` (any server can hand over the same parsed mapping).

Option defaults are not written here: they come from :class:`nsf.StyleConfig` and its presets; the
config holds only the serving limits and overrides. A config that could not serve its own defaults,
or that lets clients set what they must not, is refused when it is read (``ValueError``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from ..config import FIELD_NAMES, MAX_SIZE, PRESETS, StyleConfig, make_config
from ..errors import ConfigError
from ..geometry import MIN_SIDE
from ..memory import parse_memory

# StyleConfig fields a client may never set: ``init`` names a file on the server, ``max_pixels`` is
# the server's own decompression-bomb guard.
SERVER_ONLY = frozenset({"init", "max_pixels"})
RANGED = ("size", "steps")  # options whose range the server narrows (max_size, max_steps)
HINTS = typing.get_type_hints(StyleConfig)
_SCALAR_KINDS = (int, float, bool)
# str options with a fixed set of values (StyleConfig metadata "choices"; "bool_choices": the values true and
# false mean, for an option that used to be a bool): a client sends one of the names, or a boolean there
CHOICES = {f.name: tuple(f.metadata["choices"]) for f in dataclasses.fields(StyleConfig) if "choices" in f.metadata}
BOOL_CHOICES = {f.name: tuple(f.metadata["bool_choices"]) for f in dataclasses.fields(StyleConfig)
                if "bool_choices" in f.metadata}
DEFAULT_CALIBRATE = (128, 6)  # (size, steps) of the start-up timing run, where model-config.yaml names none
_DEVICE_KEYS = {"max_size", "max_steps", "compile", "warmup_sizes", "warmup_steps", "calibrate", "max_memory"}
_SECTION_KEYS = {"preset", "overrides", "fields", "max_styles", "max_pixels", "max_request_bytes", "devices",
                 "time_budget", "video"}
_VIDEO_KEYS = {"max_bytes", "max_frames", "max_size", "later_steps"}
# a video request's limits where model-config.yaml's nsf.video names none
DEFAULT_VIDEO = {"max_bytes": 16 * 2**20, "max_frames": 300, "max_size": 512, "later_steps": 20}


@dataclass(frozen=True)
class ServingLimits:
    """What a request may ask for on one device type, from the ``nsf`` section of model-config.yaml."""

    device: str
    preset: str  # the preset requests start from unless they name another
    overrides: Mapping[str, Any]  # StyleConfig overrides applied to every request, before the client's fields
    fields: tuple[str, ...]  # StyleConfig fields a client may set
    max_styles: int
    max_pixels: int  # per input image, refused from the header before decoding (413)
    max_request_bytes: int  # sum of the fields' sizes (413); the server's max_request_size guards the body
    max_size: int
    max_steps: int
    compile: bool | str  # passed to nsf.style_fusion(compile=...)
    warmup_sizes: tuple[int, ...] = ()
    warmup_steps: int = 0
    # admission control: the share of the server's response timeout a request's estimated run may
    # use (0: no estimate, no refusal), and the (size, steps) the worker times at start-up
    time_budget: float = 0.0
    calibrate: tuple[int, int] = DEFAULT_CALIBRATE
    max_memory: str | int = "auto"  # the worker's memory budget (nsf.style_fusion(max_memory=...))
    # video requests (the ``video`` field, nsf.video): the clip's bytes (413 past it), its frames (413), the
    # output size (``size`` of a video request; its range), and a later frame's steps unless the request names them
    max_video_bytes: int = DEFAULT_VIDEO["max_bytes"]
    max_video_frames: int = DEFAULT_VIDEO["max_frames"]
    max_video_size: int = DEFAULT_VIDEO["max_size"]
    video_later_steps: int = DEFAULT_VIDEO["later_steps"]
    base: StyleConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", _check_limits(self))

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any] | None, device: str) -> ServingLimits:
        """Read the ``nsf`` section of a parsed model-config.yaml for ``device`` (``"cpu"``, ``"cuda"``...)."""
        section = (model_config or {}).get("nsf")
        if not isinstance(section, Mapping):
            raise ValueError("model-config.yaml has no 'nsf' section; it holds the handler's serving limits")
        _require_keys("nsf", section, _SECTION_KEYS, optional={"time_budget", "video"})
        video = {**DEFAULT_VIDEO, **(section.get("video") or {})}
        _require_keys("nsf.video", video, _VIDEO_KEYS)
        devices = section["devices"]
        if not isinstance(devices, Mapping) or device not in devices:
            raise ValueError(f"model-config.yaml has no nsf.devices.{device} section; "
                             f"found: {', '.join(devices) if isinstance(devices, Mapping) else devices!r}")
        per_device = devices[device]
        _require_keys(f"nsf.devices.{device}", per_device, _DEVICE_KEYS,
                      optional={"warmup_sizes", "warmup_steps", "calibrate", "max_memory"})
        compile_ = per_device["compile"]
        calibrate = per_device.get("calibrate") or DEFAULT_CALIBRATE
        if not (isinstance(calibrate, Sequence) and len(calibrate) == 2):
            raise ValueError(f"model-config.yaml: nsf.devices.{device}.calibrate={calibrate!r}; allowed: [size, steps]")
        return cls(
            device=device,
            preset=str(section["preset"]),
            overrides=dict(section["overrides"] or {}),
            fields=tuple(section["fields"] or ()),
            max_styles=int(section["max_styles"]),
            max_pixels=int(section["max_pixels"]),
            max_request_bytes=int(section["max_request_bytes"]),
            max_size=int(per_device["max_size"]),
            max_steps=int(per_device["max_steps"]),
            compile=compile_ if isinstance(compile_, bool) else str(compile_),
            warmup_sizes=tuple(int(s) for s in per_device.get("warmup_sizes") or ()),
            warmup_steps=int(per_device.get("warmup_steps") or 0),
            time_budget=cls.time_budget if section.get("time_budget") is None else float(section["time_budget"]),
            calibrate=(int(calibrate[0]), int(calibrate[1])),
            max_memory=per_device.get("max_memory") or "auto",
            max_video_bytes=int(video["max_bytes"]),
            max_video_frames=int(video["max_frames"]),
            max_video_size=int(video["max_size"]),
            video_later_steps=int(video["later_steps"]),
        )

    @classmethod
    def all_devices(cls, model_config: Mapping[str, Any]) -> dict[str, ServingLimits]:
        """The limits of every device type the config names."""
        return {dev: cls.from_model_config(model_config, dev) for dev in model_config["nsf"]["devices"]}

    def bounds(self, name: str, *, video: bool = False) -> dict[str, int]:
        """This server's range of a :data:`RANGED` option: ``{"min": ..., "max": ...}`` (``video``: a video
        request's, whose size is at most ``max_video_size``)."""
        if name == "size":
            return {"min": MIN_SIDE, "max": min(self.max_size, self.max_video_size) if video else self.max_size}
        if name == "steps":
            return {"min": 1, "max": self.max_steps}
        raise KeyError(f"{name!r} is not a ranged option; allowed: {', '.join(RANGED)}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "base"}
        d["overrides"] = dict(self.overrides)
        return d


def _require_keys(where: str, section: Any, keys: Set[str], optional: Set[str] = frozenset()) -> None:
    if not isinstance(section, Mapping):
        raise ValueError(f"model-config.yaml: {where} must be a mapping, got {section!r}")
    unknown = sorted(set(section) - keys)
    missing = sorted(keys - optional - set(section))
    if unknown:
        raise ValueError(f"model-config.yaml: unknown key(s) {', '.join(unknown)} in {where}; "
                         f"allowed: {', '.join(sorted(keys))}")
    if missing:
        raise ValueError(f"model-config.yaml: {where} lacks {', '.join(missing)}")


def _check_limits(limits: ServingLimits) -> StyleConfig:
    """Refuse a config that could not serve its own defaults or lets clients set what they must not."""
    if limits.preset not in PRESETS:
        raise ValueError(f"model-config.yaml: nsf.preset {limits.preset!r} is unknown; allowed: {', '.join(PRESETS)}")
    bad = SERVER_ONLY & set(limits.overrides)
    if bad:
        raise ValueError(f"model-config.yaml: nsf.overrides may not set {', '.join(sorted(bad))} (server-only)")
    base = make_config(limits.preset, **limits.overrides, max_pixels=limits.max_pixels)
    try:
        parse_memory(limits.max_memory)
    except ConfigError as e:
        raise ValueError(f"model-config.yaml: nsf.devices.{limits.device}.{e}") from None
    for name in limits.fields:
        if name not in FIELD_NAMES:
            raise ValueError(f"model-config.yaml: nsf.fields names {name!r}, not a StyleConfig field; "
                             f"valid: {', '.join(FIELD_NAMES)}")
        if name in SERVER_ONLY or (HINTS[name] not in _SCALAR_KINDS and name not in CHOICES):
            raise ValueError(f"model-config.yaml: nsf.fields may not list {name!r}; allowed: scalar or choice "
                             f"options other than {', '.join(sorted(SERVER_ONLY))}")
    if not MIN_SIDE <= limits.max_size <= MAX_SIZE:
        raise ValueError(f"model-config.yaml: max_size={limits.max_size}; allowed: {MIN_SIDE}..{MAX_SIZE}")
    for name in ("max_steps", "max_styles", "max_pixels", "max_request_bytes", "max_video_bytes", "max_video_frames",
                 "video_later_steps"):
        if getattr(limits, name) < 1:
            raise ValueError(f"model-config.yaml: {name}={getattr(limits, name)}; allowed: >= 1")
    if not MIN_SIDE <= limits.max_video_size <= MAX_SIZE:
        raise ValueError(f"model-config.yaml: nsf.video.max_size={limits.max_video_size}; allowed: "
                         f"{MIN_SIDE}..{MAX_SIZE}")
    if limits.max_video_bytes > limits.max_request_bytes:
        raise ValueError(f"model-config.yaml: nsf.video.max_bytes={limits.max_video_bytes}; allowed: at most "
                         f"max_request_bytes ({limits.max_request_bytes})")
    if base.size > limits.max_size or base.steps > limits.max_steps:
        raise ValueError(f"model-config.yaml: the serving defaults (preset {limits.preset!r} with overrides: "
                         f"size={base.size}, steps={base.steps}) exceed the {limits.device} limits "
                         f"(max_size={limits.max_size}, max_steps={limits.max_steps})")
    if not 0.0 <= limits.time_budget <= 1.0:
        raise ValueError(f"model-config.yaml: time_budget={limits.time_budget}; allowed: 0 (off) .. 1, the share "
                         "of responseTimeout a request may use")
    size, steps = limits.calibrate
    if not (2 * MIN_SIDE <= size <= limits.max_size and steps >= 2):
        raise ValueError(f"model-config.yaml: calibrate=[{size}, {steps}]; allowed: a size {2 * MIN_SIDE}..max_size "
                         "and at least 2 steps")
    if any(s < MIN_SIDE or s > limits.max_size for s in limits.warmup_sizes):
        raise ValueError(f"model-config.yaml: warmup_sizes {limits.warmup_sizes}; allowed: {MIN_SIDE}..max_size")
    return base
