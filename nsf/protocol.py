"""The serving contract of ``style_fusion``, as pure functions: request fields in, a checked job out.

A request is a mapping of field names to values: multipart/form-data gives bytes, a JSON body
gives typed values with the images as base64 strings. :func:`parse_request` checks every field
against :class:`ServingLimits` (read from TorchServe's ``model-config.yaml``) and the option rules
of :class:`nsf.StyleConfig`, decodes the images behind the pixel-cap guard, and returns a
:class:`Job`. Anything wrong raises :class:`RequestError`, which carries the HTTP status, the field
and what is allowed.

Nothing here imports TorchServe: ``handlers/style_fusion_handler.py`` is a thin adapter around this
module, another server (or a fuzzer) can call it the same way. Option defaults are not written
here: they come from :class:`nsf.StyleConfig` and its presets; ``model-config.yaml`` holds only the
serving limits and overrides.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
import typing
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .config import FIELD_NAMES, MAX_SIZE, MAX_WEIGHT, PRESETS, StyleConfig, make_config
from .errors import ConfigError, PlanError
from .image import MIN_SIDE, ImageTooLargeError, load_image
from .optimize import schedule
from .plan import Plan, largest, parse_memory

CONTENT = "content"
STYLE = "style"
_EXTRA_STYLE = re.compile(r"style_(\d+)")
STYLE_WEIGHTS = "style_weights"  # the request's name for StyleConfig.style_blend_weights
REQUEST_OPTIONS = ("preset", "format", STYLE_WEIGHTS)
FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg"}
# StyleConfig fields a client may never set: ``init`` names a file on the server, ``max_pixels`` is
# the server's own decompression-bomb guard.
SERVER_ONLY = frozenset({"init", "max_pixels"})
_HINTS = typing.get_type_hints(StyleConfig)
_SCALAR_KINDS = (int, float, bool)
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


_PHRASES = {400: "Bad Request", 413: "Payload Too Large", 422: "Unprocessable Entity"}


class RequestError(ValueError):
    """A bad request: ``status`` (400; 413 too large; 422 would outrun the time limit), the ``field`` at
    fault and what is ``allowed``."""

    def __init__(self, message: str, *, field: str | None = None, allowed: Any = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.field = field
        self.allowed = allowed
        self.status = status

    @property
    def phrase(self) -> str:
        return _PHRASES.get(self.status, "Bad Request")

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field, "allowed": self.allowed}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)


# ---------------------------------------------------------------------------------------------
# Serving limits: the ``nsf`` section of model-config.yaml
# ---------------------------------------------------------------------------------------------

DEFAULT_CALIBRATE = (128, 6)  # (size, steps) of the start-up timing run, where model-config.yaml names none
_DEVICE_KEYS = {"max_size", "max_steps", "compile", "warmup_sizes", "warmup_steps", "calibrate", "max_memory"}
_SECTION_KEYS = {"preset", "overrides", "fields", "max_styles", "max_pixels", "max_request_bytes", "devices",
                 "time_budget"}


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
    # admission control: the share of TorchServe's responseTimeout a request's estimated run may
    # use (0: no estimate, no refusal), and the (size, steps) the handler times at start-up
    time_budget: float = 0.0
    calibrate: tuple[int, int] = DEFAULT_CALIBRATE
    max_memory: str | int = "auto"  # the worker's memory budget (nsf.style_fusion(max_memory=...))
    base: StyleConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", _check_limits(self))

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any] | None, device: str) -> ServingLimits:
        """Read the ``nsf`` section of a parsed model-config.yaml for ``device`` (``"cpu"``, ``"cuda"``...)."""
        section = (model_config or {}).get("nsf")
        if not isinstance(section, Mapping):
            raise ValueError("model-config.yaml has no 'nsf' section; it holds the handler's serving limits")
        _require_keys("nsf", section, _SECTION_KEYS, optional={"time_budget"})
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
        )

    @classmethod
    def all_devices(cls, model_config: Mapping[str, Any]) -> dict[str, ServingLimits]:
        """The limits of every device type the config names."""
        return {dev: cls.from_model_config(model_config, dev) for dev in model_config["nsf"]["devices"]}

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
        if name in SERVER_ONLY or _HINTS[name] not in _SCALAR_KINDS:
            raise ValueError(f"model-config.yaml: nsf.fields may not list {name!r}; allowed: scalar options "
                             f"other than {', '.join(sorted(SERVER_ONLY))}")
    if not MIN_SIDE <= limits.max_size <= MAX_SIZE:
        raise ValueError(f"model-config.yaml: max_size={limits.max_size}; allowed: {MIN_SIDE}..{MAX_SIZE}")
    for name in ("max_steps", "max_styles", "max_pixels", "max_request_bytes"):
        if getattr(limits, name) < 1:
            raise ValueError(f"model-config.yaml: {name}={getattr(limits, name)}; allowed: >= 1")
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


# ---------------------------------------------------------------------------------------------
# Admission: refuse up front what would outrun the response timeout or the memory budget
# ---------------------------------------------------------------------------------------------


def admit_memory(plan: typing.Callable[[], Plan]) -> Plan:
    """The run's plan, or a 422 :class:`RequestError` naming the largest size that fits the worker's memory."""
    try:
        return plan()
    except PlanError as e:
        raise RequestError(f"{e} on this worker", field="size", status=422, allowed=e.allowed) from None


def pixel_steps(cfg: StyleConfig, height: int, width: int) -> int:
    """The work of a run: sum over its coarse-to-fine scales of H * W * steps (early stopping may do less)."""
    return sum(h * w * n for _, (h, w), n in schedule(height, width, cfg))


@dataclass(frozen=True)
class CostModel:
    """``seconds = seconds_per_pixel_step * work``, measured by the worker at start-up.

    ``budget`` is the seconds a request may run: a share (``time_budget``) of TorchServe's
    responseTimeout, so that a request refused here is one that would otherwise have been cut off
    (and its worker restarted) after running for the whole timeout. ``work(cfg, height, width)`` is a
    run's untiled pixel-steps: :func:`pixel_steps`, or a plan's (``nsf.plan.Plan.work``: tiled scales
    cost more per pixel; ``inf`` for a run that cannot fit the memory budget).
    """

    seconds_per_pixel_step: float
    budget: float
    work: typing.Callable[[StyleConfig, int, int], float] = field(default=pixel_steps, compare=False)

    def seconds(self, cfg: StyleConfig, height: int, width: int) -> float:
        return self.seconds_per_pixel_step * self.work(cfg, height, width)

    def admit(self, cfg: StyleConfig, height: int, width: int) -> None:
        """Raise a 422 :class:`RequestError` naming the largest steps (or size) that fit the budget."""
        estimate = self.seconds(cfg, height, width)
        if estimate <= self.budget:
            return
        why = (f"size={cfg.size} with steps={cfg.steps} would take about {estimate:.0f} s on this worker "
               f"({self.seconds_per_pixel_step:.3g} s per pixel-step, measured at start-up), over its "
               f"{self.budget:.0f} s limit per request")
        fits = largest(lambda n: self.seconds(dataclasses.replace(cfg, steps=n), height, width) <= self.budget,
                        1, cfg.steps - 1)
        if fits:
            raise RequestError(f"{why}; at size={cfg.size} at most steps={fits} fit", field="steps", status=422,
                               allowed={"min": 1, "max": fits, "seconds_limit": round(self.budget)})
        fits = largest(lambda n: self.seconds(dataclasses.replace(cfg, size=n), height, width) <= self.budget,
                        MIN_SIDE, cfg.size - 1)
        raise RequestError(f"{why}; with steps={cfg.steps} at most size={fits} fits" if fits else why,
                           field="size", status=422,
                           allowed={"min": MIN_SIDE, "max": fits, "seconds_limit": round(self.budget)})


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    """A checked request: decoded RGB images, the resolved config and the output format."""

    content: Image.Image
    styles: list[Image.Image]
    config: StyleConfig
    format: str  # "png" or "jpeg"

    @property
    def content_type(self) -> str:
        return FORMATS[self.format]


def request_fields(row: Any) -> tuple[dict[str, Any], bool]:
    """One request as a server hands it over -> ``(fields, images_as_text)``.

    Accepts a multipart/form-data field mapping (values bytes), ``{"body": {...}}`` or
    ``{"body": b"<json>"}`` (a JSON body), or a bare field mapping whose images are base64 text
    (a KServe v1 instance). ``images_as_text`` is true when the images came as base64 text without
    a body wrapper, i.e. from a JSON envelope that wants a JSON-safe (base64) answer.
    """
    if not isinstance(row, Mapping):
        raise RequestError("the request has no fields; allowed: multipart/form-data with file fields content "
                           "and style, or a JSON object", field="body", allowed=[CONTENT, STYLE])
    keys = set(row)
    if keys and keys <= {"body", "data"}:
        payload = row.get("body") if row.get("body") is not None else row.get("data")
        if isinstance(payload, (bytes, bytearray, str)):
            payload = _json_body(payload)
        if not isinstance(payload, Mapping):
            raise RequestError(f"the JSON body is a {type(payload).__name__}; allowed: a JSON object with "
                               "base64 images content and style", field="body", allowed="a JSON object")
        return dict(payload), False
    images_as_text = not any(isinstance(v, (bytes, bytearray)) for v in row.values())
    return dict(row), images_as_text


def _json_body(payload: bytes | bytearray | str) -> Any:
    try:
        return json.loads(payload)
    except RecursionError:  # json.loads recurses per nesting level: "[[[[..." a few thousand deep
        raise RequestError("the JSON body is nested too deeply; allowed: a flat JSON object of fields",
                           field="body", allowed="a JSON object") from None
    except (UnicodeDecodeError, ValueError):
        raw = bytes(payload[:16]) if isinstance(payload, (bytes, bytearray)) else b""
        hint = " (it looks like a bare image: send it as the multipart field 'content')" if _looks_like_image(raw) \
            else ""
        raise RequestError(f"the request body is neither multipart/form-data nor JSON{hint}; allowed: "
                           "multipart/form-data with file fields content and style, or a JSON object with "
                           "base64 images", field="body", allowed=["multipart/form-data", "application/json"]
                           ) from None


def _looks_like_image(head: bytes) -> bool:
    return head.startswith((b"\x89PNG", b"\xff\xd8", b"GIF8", b"RIFF", b"BM", b"II*", b"MM\x00"))


def from_kserve_v2(inputs: Any) -> dict[str, Any]:
    """KServe v2 ``inputs`` (as TorchServe's kservev2 envelope passes them) -> a field mapping.

    Each input's ``name`` is a field; BYTES inputs carry base64 text (or the option's text), the
    others a list that is unwrapped when it holds one value.
    """
    if not isinstance(inputs, Sequence) or isinstance(inputs, (str, bytes)):
        raise RequestError("KServe v2 request without an inputs list", field="inputs",
                           allowed="a list of {name, datatype, shape, data}")
    fields: dict[str, Any] = {}
    for item in inputs:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise RequestError(f"KServe v2 input {_show(item)} has no name", field="inputs",
                               allowed="{name, datatype, shape, data}")
        value = item.get("data")
        if isinstance(value, list) and len(value) == 1 and item["name"] != STYLE_WEIGHTS:
            value = value[0]
        fields[item["name"]] = value
    return fields


def allowed_fields(limits: ServingLimits) -> list[str]:
    styles = [STYLE] + [f"style_{i}" for i in range(2, limits.max_styles + 1)]
    return [CONTENT, *styles, *limits.fields, *REQUEST_OPTIONS]


def parse_request(fields: Mapping[str, Any], limits: ServingLimits) -> Job:
    """Check a request's fields and decode its images; raise :class:`RequestError` on anything wrong."""
    total = sum(_size_of(v) for v in fields.values())
    if total > limits.max_request_bytes:
        raise RequestError(f"the request carries {total} bytes; allowed: at most {limits.max_request_bytes}",
                           field="body", allowed=f"at most {limits.max_request_bytes} bytes", status=413)
    allowed = allowed_fields(limits)
    unknown = [k for k in fields if k not in allowed]
    if unknown:
        name = unknown[0]
        m = _EXTRA_STYLE.fullmatch(str(name))
        why = (f"at most {limits.max_styles} style images (style, style_2 ... style_{limits.max_styles})"
               if m and int(m.group(1)) > limits.max_styles else "not a field of this model")
        raise RequestError(f"unknown field {_show(name)}: {why}", field=str(name), allowed=allowed)
    for name in (CONTENT, STYLE):
        if fields.get(name) is None:
            raise RequestError(f"the request has no {name} image", field=name,
                               allowed="an image file (multipart) or base64 string (JSON)")
    style_names = [STYLE] + [f"style_{i}" for i in range(2, limits.max_styles + 1) if f"style_{i}" in fields]
    for i, name in enumerate(style_names[1:], start=2):
        if name != f"style_{i}":
            raise RequestError(f"{name} given without style_{i}; number extra styles style_2, style_3... "
                               "without gaps", field=name, allowed=f"style_{i}")

    options = {name: _coerce(name, fields[name], _HINTS[name], limits) for name in limits.fields if name in fields}
    if STYLE_WEIGHTS in fields:
        weights = _weights(fields[STYLE_WEIGHTS])
        if len(weights) != len(style_names):
            raise RequestError(f"style_weights has {len(weights)} values for {len(style_names)} style images",
                               field=STYLE_WEIGHTS, allowed=f"{len(style_names)} non-negative numbers, one per style")
        options["style_blend_weights"] = weights
    preset = _text(fields["preset"], "preset") if "preset" in fields else limits.preset
    if preset not in PRESETS:
        raise RequestError(f"unknown preset {_show(preset)}", field="preset", allowed=list(PRESETS))
    fmt = _text(fields["format"], "format").lower() if "format" in fields else "png"
    if fmt not in FORMATS:
        raise RequestError(f"unknown format {_show(fmt)}", field="format", allowed=["png", "jpeg"])

    cfg = resolve(preset, options, limits)
    content = _image(fields[CONTENT], CONTENT, limits)
    styles = [_image(fields[name], name, limits) for name in style_names]
    return Job(content, styles, cfg, "jpeg" if fmt == "jpg" else fmt)


def resolve(preset: str, options: Mapping[str, Any], limits: ServingLimits) -> StyleConfig:
    """The run's config: ``preset`` + the server's overrides + the client's options, within the limits."""
    try:
        # max_pixels: the cap the images were checked against, so the provenance record tells the truth
        cfg = make_config(preset, **{**limits.overrides, **options, "max_pixels": limits.max_pixels})
    except ValueError as e:
        raise _from_config_error(e, limits) from None
    for name in _RANGED:
        value, top = getattr(cfg, name), _range(name, limits)["max"]
        if value > top:
            source = "" if name in options else f" (from preset {preset!r}; send {name} to lower it)"
            raise RequestError(f"{name}={value}{source} is over this server's limit on {limits.device}",
                               field=name, allowed=_range(name, limits))
    return cfg


def _from_config_error(e: ValueError, limits: ServingLimits) -> RequestError:
    """Map a StyleConfig validation error (a :class:`ConfigError`: field, value, allowed) to its request field."""
    msg = str(e)
    if not isinstance(e, ConfigError):  # not raised by a check: no field to name
        return RequestError(msg)
    name: str = e.field
    if name in _RANGED:  # this server's range, not the library's
        return RequestError(msg.split(";", 1)[0], field=name, allowed=_range(name, limits))
    if name == "style_blend_weights":
        name = STYLE_WEIGHTS
    return RequestError(msg, field=name, allowed=e.allowed)


_RANGED = ("size", "steps")  # options whose range the server narrows (max_size, max_steps)


def _range(name: str, limits: ServingLimits) -> dict[str, int]:
    return {"min": MIN_SIDE, "max": limits.max_size} if name == "size" else {"min": 1, "max": limits.max_steps}


def _size_of(value: Any) -> int:
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_size_of(v) for v in value.values())
    return 0


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _text(value: Any, name: str) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"{name} is not UTF-8 text", field=name, allowed="text") from None
    if not isinstance(value, str):
        raise RequestError(f"{name}={_show(value)} is not text", field=name, allowed="text")
    return value.strip()


def _coerce(name: str, value: Any, kind: type, limits: ServingLimits) -> Any:
    """A client's option value (bytes/text from multipart, typed from JSON) as the StyleConfig type."""
    if isinstance(value, (bytes, bytearray)):
        value = _text(value, name)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise RequestError(f"{name}={_show(value)} is not a boolean", field=name, allowed=["true", "false"])
    if kind is int:
        out: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            out = value
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        elif isinstance(value, str) and re.fullmatch(r"[+-]?\d{1,19}", value):
            out = int(value)
        if out is None:  # the range is checked once, by resolve()
            raise RequestError(f"{name}={_show(value)} is not an integer", field=name,
                               allowed=_range(name, limits) if name in _RANGED else "an integer")
        return out
    if kind is float:
        number: float | None = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):  # "abc", or an int past float's range
                number = None
        if number is None or not math.isfinite(number):
            raise RequestError(f"{name}={_show(value)} is not a finite number", field=name,
                               allowed={"min": 0, "max": MAX_WEIGHT} if name.endswith("weight") else "a number")
        return number
    return _text(value, name)


def _weights(value: Any) -> tuple[float, ...]:
    if isinstance(value, (bytes, bytearray, str)):
        text = _text(value, STYLE_WEIGHTS)
        items: list[Any] = [t.strip() for t in text.replace(";", ",").split(",") if t.strip()]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        items = [value]
    out = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise ValueError
            number = float(item)
        except (TypeError, ValueError):
            raise RequestError(f"style_weights holds {_show(item)}, not a number", field=STYLE_WEIGHTS,
                               allowed="comma-separated non-negative numbers, one per style") from None
        if not math.isfinite(number):
            raise RequestError(f"style_weights holds {number}", field=STYLE_WEIGHTS,
                               allowed="finite non-negative numbers")
        out.append(number)
    return tuple(out)


def _image(value: Any, name: str, limits: ServingLimits) -> Image.Image:
    """Bytes (multipart) or base64 text (JSON: bare, ``data:`` URL or ``{"b64": ...}``) -> RGB image."""
    if isinstance(value, Mapping) and set(value) == {"b64"}:
        value = value["b64"]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{name} is not valid base64", field=name,
                               allowed="an image as a base64 string (JSON) or a file (multipart)") from None
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise RequestError(f"{name} is a {type(value).__name__}", field=name,
                           allowed="an image as a base64 string (JSON) or a file (multipart)")
    if not data:
        raise RequestError(f"{name} is empty", field=name, allowed="an image file")
    try:
        return load_image(data, max_pixels=limits.max_pixels, what=name)
    except ImageTooLargeError as e:
        raise RequestError(f"{name}: {e}", field=name, allowed=f"at most {limits.max_pixels} pixels",
                           status=413) from None
    except (ValueError, OSError) as e:
        msg = str(e)
        allowed = msg.split("allowed: ", 1)[1] if "allowed: " in msg else "a PNG, JPEG, WebP... image"
        raise RequestError(f"{name}: {msg}", field=name, allowed=allowed) from None


# ---------------------------------------------------------------------------------------------
# The request schema (for the model card)
# ---------------------------------------------------------------------------------------------


def request_schema(limits: ServingLimits) -> dict[str, Any]:
    """JSON Schema of the JSON request body on ``limits.device``; multipart takes the same fields."""
    base = limits.base
    image = {"type": "string", "contentEncoding": "base64",
             "description": f"an image (PNG, JPEG, WebP, BMP, TIFF, GIF), at most {limits.max_pixels} pixels"}
    props: dict[str, Any] = {CONTENT: {**image, "description": "content image; " + image["description"]},
                             STYLE: {**image, "description": "style image; " + image["description"]}}
    for i in range(2, limits.max_styles + 1):
        props[f"style_{i}"] = {**image, "description": f"style image {i} (blended by style_weights)"}
    meta = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(StyleConfig)}
    json_types = {int: "integer", float: "number", bool: "boolean"}
    for name in limits.fields:
        prop: dict[str, Any] = {"type": json_types[_HINTS[name]], "default": getattr(base, name),
                                "description": meta[name]}
        if name in ("size", "steps"):
            prop.update(minimum=_range(name, limits)["min"], maximum=_range(name, limits)["max"])
        elif _HINTS[name] is float:
            prop.update(minimum=0, maximum=MAX_WEIGHT)
        elif name == "seed":
            prop.update(minimum=0)
        props[name] = prop
    props[STYLE_WEIGHTS] = {"type": "array", "items": {"type": "number", "minimum": 0},
                            "description": "blend weights, one per style image (multipart: comma-separated); "
                                           "default: equal"}
    props["preset"] = {"enum": list(PRESETS), "default": limits.preset,
                       "description": "named option set the request starts from"}
    props["format"] = {"enum": ["png", "jpeg"], "default": "png",
                       "description": "response image format; PNG carries the provenance metadata"}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"style_fusion request on {limits.device} (JSON body; multipart/form-data takes the same "
                     "fields, images as files)",
            "type": "object", "required": [CONTENT, STYLE], "additionalProperties": False, "properties": props}
