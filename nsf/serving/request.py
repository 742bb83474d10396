"""Request fields in, a checked :class:`Job` out.

A request is a mapping of field names to values: multipart/form-data gives bytes, a JSON body gives
typed values with the images as base64 strings, KServe v2 gives named inputs
(:func:`nsf.serving.kserve_protocol.from_kserve_v2`).
:func:`parse_request` checks every field against :class:`~nsf.serving.limits.ServingLimits` and the
option rules of :class:`nsf.StyleConfig`, decodes the images behind the pixel-cap guard, and returns a
:class:`Job`. Anything wrong raises :class:`~nsf.serving.errors.RequestError` naming the field and what
is allowed.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..config import MAX_WEIGHT, PRESETS, StyleConfig, make_config
from ..errors import ConfigError, ImageError
from ..image import load_image, load_mask
from ..optimize.masks import check_mask
from ..style_losses import style_loss
from .errors import RequestError
from .limits import BOOL_CHOICES, CHOICES, HINTS, RANGED, ServingLimits

if TYPE_CHECKING:
    from torch import Tensor

CONTENT = "content"
VIDEO = "video"  # a video request: the clip's bytes instead of content (nsf.video); the answer is an MP4
TEMPORAL_WEIGHT, LATER_STEPS = "temporal_weight", "later_steps"  # a video request's options (nsf.video.frames)
VIDEO_TYPE = "video/mp4"
STYLE = "style"
MASK = "mask"  # regional styles: mask, mask_2... the content mask of style, style_2... (all styles or none)
STYLE_MASK = "style_mask"  # style_mask, style_mask_2...: optional, the part of each style image it is taken from
_NUMBERED = re.compile(r"(style|mask|style_mask)_(\d+)")
STYLE_WEIGHTS = "style_weights"  # the request's name for StyleConfig.style_blend_weights
STREAM, DEADLINE = "stream", "deadline"  # progress messages while it runs; seconds until the best image so far
# The kinds of value a request field holds (JSON Schema's names; "numbers": a list of numbers, "image": an image)
IMAGE, INTEGER, NUMBER, BOOLEAN, TEXT, NUMBERS = "image", "integer", "number", "boolean", "string", "numbers"
# Request-only fields (not StyleConfig options) and their kinds: with the images and the options the server lets
# clients set, they make the one table of request fields (field_kinds) that parse_request, the JSON Schema, the
# KServe v2 metadata and the MLflow signature all read.
REQUEST_OPTIONS = {"preset": TEXT, "format": TEXT, STYLE_WEIGHTS: NUMBERS, STREAM: BOOLEAN, DEADLINE: NUMBER,
                   TEMPORAL_WEIGHT: NUMBER, LATER_STEPS: INTEGER}
VIDEO_ONLY = (TEMPORAL_WEIGHT, LATER_STEPS)
MAX_DEADLINE = 86400.0  # s; a deadline is the client's bound within the worker's own time admission
FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg"}
IMAGE_VALUE = "an image as a base64 string (JSON) or a file (multipart)"
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


@dataclass
class Job:
    """A checked request: decoded RGB images, the resolved config and the output format."""

    content: Image.Image
    styles: list[Image.Image]
    config: StyleConfig
    format: str  # "png" or "jpeg"
    stream: bool = False  # answer with progress messages (nsf.serving.stream), then the image
    deadline: float | None = None  # seconds after the worker took the request: then the best image so far
    # regional styles: one (1, 1, H, W) mask in [0, 1] per style (fields mask, mask_2...), or None
    masks: list[Tensor] | None = None
    # per style, the part of its style image it is taken from (style_mask, style_mask_2...), or None
    style_masks: list[Tensor | None] | None = None

    @property
    def content_type(self) -> str:
        return FORMATS[self.format]

    @property
    def masked(self) -> bool:
        """Whether the request carries masks or style masks (it then runs on its own, never batched)."""
        return self.masks is not None or self.style_masks is not None


@dataclass
class VideoJob:
    """A checked video request: the clip's bytes (probed: a video stream, a constant frame rate, at most
    ``max_video_frames`` frames of at most ``max_pixels`` pixels), its :class:`nsf.video.VideoInfo`, the decoded
    styles, the first frame's config, and the later frames' steps and temporal weight. It always runs alone."""

    video: bytes
    info: Any  # nsf.video.VideoInfo (the video extra is imported only for a video request)
    styles: list[Image.Image]
    config: StyleConfig
    later_steps: int
    temporal_weight: float
    stream: bool = False

    content_type = VIDEO_TYPE
    masked = False
    deadline = None

    @property
    def frames(self) -> int:
        return int(self.info.frames)

    @property
    def size(self) -> tuple[int, int]:
        """The source frames' ``(height, width)``."""
        return int(self.info.height), int(self.info.width)


# ---------------------------------------------------------------------------------------------
# What a server hands over -> a field mapping
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Fields -> a checked job
# ---------------------------------------------------------------------------------------------


def numbered(base: str, count: int) -> list[str]:
    """The field names of ``count`` numbered images: ``base``, ``base_2`` ... ``base_<count>``."""
    return [base] + [f"{base}_{i}" for i in range(2, count + 1)]


def field_kinds(limits: ServingLimits) -> dict[str, str]:
    """The one table of request fields under ``limits``: every field a request may carry -> the kind of its value
    (:data:`IMAGE`, :data:`INTEGER`, :data:`NUMBER`, :data:`BOOLEAN`, :data:`TEXT` -- a choice option's name -- or
    :data:`NUMBERS`): the content and numbered style/mask images, the StyleConfig options ``limits.fields`` and the
    request-only :data:`REQUEST_OPTIONS`."""
    kinds = {int: INTEGER, float: NUMBER, bool: BOOLEAN}
    images = [CONTENT, VIDEO,
              *(name for base in (STYLE, MASK, STYLE_MASK) for name in numbered(base, limits.max_styles))]
    options = {name: TEXT if name in CHOICES else kinds[HINTS[name]] for name in limits.fields}
    return {**dict.fromkeys(images, IMAGE), **options, **REQUEST_OPTIONS}


def allowed_fields(limits: ServingLimits) -> list[str]:
    """Every field a request may carry under ``limits`` (the keys of :func:`field_kinds`)."""
    return list(field_kinds(limits))


def parse_request(fields: Mapping[str, Any], limits: ServingLimits) -> Job | VideoJob:
    """Check a request's fields and decode its images; raise :class:`RequestError` on anything wrong. A request
    with a ``video`` field (and no ``content``) is a video request: a :class:`VideoJob`."""
    total = sum(_size_of(v) for v in fields.values())
    if total > limits.max_request_bytes:
        raise RequestError(f"the request carries {total} bytes; allowed: at most {limits.max_request_bytes}",
                           field="body", allowed=f"at most {limits.max_request_bytes} bytes", status=413)
    allowed = allowed_fields(limits)
    unknown = [k for k in fields if k not in allowed]
    if unknown:
        name = unknown[0]
        m = _NUMBERED.fullmatch(str(name))
        why = (f"at most {limits.max_styles} style images ({m.group(1)}, {m.group(1)}_2 ... "
               f"{m.group(1)}_{limits.max_styles})" if m and int(m.group(2)) > limits.max_styles
               else "not a field of this model")
        raise RequestError(f"unknown field {_show(name)}: {why}", field=str(name), allowed=allowed)
    if fields.get(VIDEO) is not None:
        return _parse_video(fields, limits)
    for name in VIDEO_ONLY:
        if name in fields:
            raise RequestError(f"{name} is an option of a video request (a video field); this one has none",
                               field=name, allowed="a video request's option only")
    for name in (CONTENT, STYLE):
        if fields.get(name) is None:
            raise RequestError(f"the request has no {name} image", field=name,
                               allowed="an image file (multipart) or base64 string (JSON)")
    style_names = _style_names(fields, limits)
    mask_names, style_mask_names = _mask_names(fields, style_names, MASK), _mask_names(fields, style_names, STYLE_MASK)
    if any(mask_names) and not all(mask_names):
        wanted = numbered(MASK, len(style_names))
        missing = wanted[mask_names.index(None)]
        raise RequestError(f"the request has masks but no {missing}: mask the styles all or none, one mask per "
                           f"style ({', '.join(wanted)} for {_count(style_names)})", field=missing, allowed=wanted)

    options, preset = _options(fields, style_names, limits)
    fmt = _text(fields["format"], "format").lower() if "format" in fields else "png"
    if fmt not in FORMATS:
        raise RequestError(f"unknown format {_show(fmt)}", field="format", allowed=["png", "jpeg"])

    stream = _coerce(STREAM, fields[STREAM], bool, limits) if STREAM in fields else False
    deadline = _deadline(fields[DEADLINE]) if DEADLINE in fields else None

    cfg = resolve(preset, options, limits)
    if any(mask_names) and not style_loss(cfg.style_loss).masks:  # the run's own refusal, before decoding
        raise from_config_error(style_loss(cfg.style_loss).masks_refusal(), limits)
    content = decode_image(fields[CONTENT], CONTENT, limits)
    styles = [decode_image(fields[name], name, limits) for name in style_names]
    masks = [_checked_mask(decode_mask(fields[name], name, limits), name, content)
             for name in mask_names if name] if any(mask_names) else None
    style_masks = [None if name is None else
                   _checked_mask(decode_mask(fields[name], name, limits), name, style)
                   for name, style in zip(style_mask_names, styles)] \
        if any(style_mask_names) else None
    return Job(content, styles, cfg, "jpeg" if fmt == "jpg" else fmt, stream, deadline, masks, style_masks)


def _parse_video(fields: Mapping[str, Any], limits: ServingLimits) -> VideoJob:
    """A video request's fields -> a :class:`VideoJob` (the clip probed, nothing decoded past its headers)."""
    if fields.get(CONTENT) is not None:
        raise RequestError("the request has both content and video; allowed: one of them (an image or a clip)",
                           field=VIDEO, allowed=[CONTENT, VIDEO])
    try:
        import nsf.video  # noqa: F401 - the video extra (av, opencv-python-headless)
    except ImportError as e:
        raise RequestError(f"this server cannot read video ({e}: the 'video' extra is not installed); allowed: "
                           "content images here", field=VIDEO, allowed=[CONTENT]) from None
    if fields.get(STYLE) is None:
        raise RequestError("the request has no style image", field=STYLE,
                           allowed="an image file (multipart) or base64 string (JSON)")
    for name in fields:
        m = _NUMBERED.fullmatch(str(name))
        if name in (MASK, STYLE_MASK, DEADLINE) or (m and m.group(1) in (MASK, STYLE_MASK)):
            raise RequestError(f"{name}: not with a video request", field=str(name),
                               allowed=f"no {name} in a video request")
    style_names = _style_names(fields, limits)
    options, preset = _options(fields, style_names, limits)
    if "format" in fields and _text(fields["format"], "format").lower() != "mp4":
        raise RequestError(f"format={_show(fields['format'])} for a video request", field="format", allowed=["mp4"])
    stream = _coerce(STREAM, fields[STREAM], bool, limits) if STREAM in fields else False
    later_steps = limits.video_later_steps
    if LATER_STEPS in fields:
        later_steps = _coerce(LATER_STEPS, fields[LATER_STEPS], int, limits)
        if not 1 <= later_steps <= limits.max_steps:
            raise RequestError(f"later_steps={later_steps}", field=LATER_STEPS,
                               allowed={"min": 1, "max": limits.max_steps})
    from ..video import TEMPORAL_WEIGHT as DEFAULT_TEMPORAL_WEIGHT  # the video extra, for a video request only

    temporal_weight = DEFAULT_TEMPORAL_WEIGHT
    if TEMPORAL_WEIGHT in fields:
        temporal_weight = _coerce(TEMPORAL_WEIGHT, fields[TEMPORAL_WEIGHT], float, limits)
        if not 0 <= temporal_weight <= MAX_WEIGHT:
            raise RequestError(f"temporal_weight={temporal_weight}", field=TEMPORAL_WEIGHT,
                               allowed={"min": 0, "max": MAX_WEIGHT})
    cfg = resolve(preset, options, limits)
    top = limits.bounds("size", video=True)
    if cfg.size > top["max"]:
        source = "" if "size" in options else f" (from preset {preset!r}; send size to lower it)"
        raise RequestError(f"size={cfg.size}{source} is over this server's limit for a video request", field="size",
                           allowed=top)
    data = _image_bytes(fields[VIDEO], VIDEO, what="a video file (MP4, MOV, MKV, WebM...)")
    if len(data) > limits.max_video_bytes:
        raise RequestError(f"the video has {len(data)} bytes; allowed: at most {limits.max_video_bytes}",
                           field=VIDEO, allowed=f"at most {limits.max_video_bytes} bytes", status=413)
    info = probe_video(data, limits)
    styles = [decode_image(fields[name], name, limits) for name in style_names]
    return VideoJob(data, info, styles, cfg, later_steps, float(temporal_weight), stream)


def probe_video(data: bytes, limits: ServingLimits) -> Any:
    """A clip's bytes -> its :class:`nsf.video.VideoInfo` (headers and packets only), or the request error: not a
    video, no video stream, no frames, a variable frame rate (400); more than ``max_video_frames`` frames or
    frames over ``max_pixels`` (413)."""
    import tempfile

    from ..errors import VideoError
    from ..video import probe

    with tempfile.TemporaryDirectory(prefix="nsf-video-") as tmp:
        path = f"{tmp}/clip"
        with open(path, "wb") as f:
            f.write(data)
        try:
            info = probe(path, max_frames=limits.max_video_frames, max_pixels=2**62)
        except VideoError as e:
            if e.field == "frames":  # more frames than the limit: the probe stopped counting there
                raise RequestError(f"the video has more than {limits.max_video_frames} frames", field=VIDEO,
                                   allowed=f"at most {limits.max_video_frames} frames", status=413) from None
            raise RequestError.from_error(e, field=VIDEO, message=f"video: {e}") from None
    if info.width * info.height > limits.max_pixels:
        raise RequestError(f"the video's frames have {info.width}x{info.height} = {info.width * info.height} pixels",
                           field=VIDEO, allowed=f"at most {limits.max_pixels} pixels a frame", status=413)
    return info


def _checked_mask(mask: Tensor, name: str, image: Image.Image) -> Tensor:
    """``mask`` if the run would take it (:func:`nsf.optimize.check_mask`: its image's aspect ratio, some area above
    zero); else a 400 naming the request field (the run's own error names only its argument, ``masks``)."""
    try:
        return check_mask(mask, (image.height, image.width), field=name)
    except ConfigError as e:
        raise RequestError.from_error(e) from None


def _count(style_names: Sequence[str]) -> str:
    return f"{len(style_names)} style image{'s' if len(style_names) > 1 else ''}"


def _mask_names(fields: Mapping[str, Any], style_names: Sequence[str], base: str) -> list[str | None]:
    """The ``base`` fields (``mask``... or ``style_mask``...) of a request's styles, ``None`` where not given.
    One given for a style the request lacks is refused, naming it."""
    names = numbered(base, len(style_names))
    for name in fields:
        m = _NUMBERED.fullmatch(str(name))
        if (name == base or (m and m.group(1) == base)) and name not in names:
            style = STYLE + name[len(base):]
            raise RequestError(f"{name} given without {style}: {base}_<k> goes with style_<k>, one per style "
                               f"({', '.join(names)} for {_count(style_names)})", field=name,
                               allowed=names)
    return [name if name in fields else None for name in names]


def wants_stream(fields: Mapping[str, Any]) -> bool:
    """Whether a request asks for ``stream=true`` (a value that is not a boolean is left to :func:`parse_request`,
    which refuses it naming the field)."""
    value = fields.get(STREAM)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    return value is True or (isinstance(value, str) and value.strip().lower() in _TRUE) or \
        (isinstance(value, int) and not isinstance(value, bool) and value == 1)


def _deadline(value: Any) -> float:
    allowed = {"min_exclusive": 0, "max": MAX_DEADLINE}
    try:
        seconds = float(_text(value, DEADLINE) if isinstance(value, (bytes, bytearray, str)) else value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"deadline={_show(value)} is not a number of seconds", field=DEADLINE,
                           allowed=allowed) from None
    if isinstance(value, bool) or not 0 < seconds <= MAX_DEADLINE:  # also NaN
        raise RequestError(f"deadline={_show(value)}; allowed: seconds in (0, {MAX_DEADLINE:g}]", field=DEADLINE,
                           allowed=allowed)
    return seconds


def resolve(preset: str, options: Mapping[str, Any], limits: ServingLimits) -> StyleConfig:
    """The run's config: ``preset`` + the server's overrides + the client's options, within the limits."""
    try:
        # max_pixels: the cap the images were checked against, so the provenance record tells the truth
        cfg = make_config(preset, **{**limits.overrides, **options, "max_pixels": limits.max_pixels})
    except ConfigError as e:
        raise from_config_error(e, limits) from None
    except ValueError as e:  # not raised by a check: no field to name
        raise RequestError(str(e)) from None
    for name in RANGED:
        value, top = getattr(cfg, name), limits.bounds(name)["max"]
        if value > top:
            source = "" if name in options else f" (from preset {preset!r}; send {name} to lower it)"
            raise RequestError(f"{name}={value}{source} is over this server's limit on {limits.device}",
                               field=name, allowed=limits.bounds(name))
    return cfg


# library argument names whose request fields are named otherwise
_REQUEST_FIELD = {"style_blend_weights": STYLE_WEIGHTS, "masks": MASK, "style_masks": STYLE_MASK}


def from_config_error(e: ConfigError, limits: ServingLimits) -> RequestError:
    """A StyleConfig validation error (field, value, allowed), or one of a run's masks, as the request error
    of its request field (``masks`` -> ``mask``, ``style_masks`` -> ``style_mask``)."""
    if e.field in RANGED:  # this server's range, not the library's
        return RequestError.from_error(e, message=str(e).split(";", 1)[0], allowed=limits.bounds(e.field))
    return RequestError.from_error(e, field=_REQUEST_FIELD.get(e.field, e.field))


def decode_image(value: Any, name: str, limits: ServingLimits) -> Image.Image:
    """Bytes (multipart) or base64 text (JSON: bare, ``data:`` URL or ``{"b64": ...}``) -> RGB image."""
    data = _image_bytes(value, name)
    try:
        return load_image(data, max_pixels=limits.max_pixels, what=name)
    except ImageError as e:  # unreadable, truncated, too small (400) or over the pixel cap (413)
        raise RequestError.from_error(e, field=name, message=f"{name}: {e}") from None
    except (ValueError, OSError) as e:  # PIL failing past the checks (a broken EXIF block...)
        raise RequestError(f"{name}: {e}", field=name, allowed="a PNG, JPEG, WebP... image") from None


def decode_mask(value: Any, name: str, limits: ServingLimits) -> Tensor:
    """A mask field, sent like an image (:func:`decode_image`, the same pixel cap and errors) -> its
    ``(1, 1, H, W)`` greyscale tensor in [0, 1] (:func:`nsf.image.load_mask`)."""
    data = _image_bytes(value, name)
    try:
        return load_mask(data, max_pixels=limits.max_pixels, what=name)
    except ImageError as e:
        raise RequestError.from_error(e, field=name, message=f"{name}: {e}") from None
    except (ValueError, OSError) as e:
        raise RequestError(f"{name}: {e}", field=name, allowed="a PNG, JPEG, WebP... image") from None


def _image_bytes(value: Any, name: str, what: str = IMAGE_VALUE) -> bytes:
    """An image (or video) field's bytes: as sent (multipart) or decoded from base64 text (bare, ``data:`` URL,
    ``{"b64": ...}``)."""
    if isinstance(value, Mapping) and set(value) == {"b64"}:
        value = value["b64"]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{name} is not valid base64", field=name, allowed=what) from None
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise RequestError(f"{name} is a {type(value).__name__}", field=name, allowed=what)
    if not data:
        raise RequestError(f"{name} is empty", field=name, allowed="an image file" if what == IMAGE_VALUE else what)
    return data


# ---------------------------------------------------------------------------------------------
# Coercion: multipart text and JSON values -> StyleConfig types
# ---------------------------------------------------------------------------------------------


def _size_of(value: Any) -> int:
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_size_of(v) for v in value.values())
    return 0


def show(value: Any, limit: int = 60) -> str:
    """A client's value for an error message: its repr, cut at ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


_show = show


def _text(value: Any, name: str) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"{name} is not UTF-8 text", field=name, allowed="text") from None
    if not isinstance(value, str):
        raise RequestError(f"{name}={_show(value)} is not text", field=name, allowed="text")
    return value.strip()


def _style_names(fields: Mapping[str, Any], limits: ServingLimits) -> list[str]:
    """The request's style fields in order: ``style``, ``style_2``... numbered without gaps."""
    style_names = [STYLE] + [f"style_{i}" for i in range(2, limits.max_styles + 1) if f"style_{i}" in fields]
    for i, name in enumerate(style_names[1:], start=2):
        if name != f"style_{i}":
            raise RequestError(f"{name} given without style_{i}; number extra styles style_2, style_3... "
                               "without gaps", field=name, allowed=f"style_{i}")
    return style_names


def _options(fields: Mapping[str, Any], style_names: Sequence[str],
             limits: ServingLimits) -> tuple[dict[str, Any], str]:
    """The request's config options (``style_weights`` as the blend, one per style) and its preset, checked."""
    options = {name: _coerce(name, fields[name], HINTS[name], limits) for name in limits.fields if name in fields}
    if STYLE_WEIGHTS in fields:
        weights = _weights(fields[STYLE_WEIGHTS])
        if len(weights) != len(style_names):
            raise RequestError(f"style_weights has {len(weights)} values for {len(style_names)} style images",
                               field=STYLE_WEIGHTS, allowed=f"{len(style_names)} non-negative numbers, one per style")
        options["style_blend_weights"] = weights
    preset = _text(fields["preset"], "preset") if "preset" in fields else limits.preset
    if preset not in PRESETS:
        raise RequestError(f"unknown preset {_show(preset)}", field="preset", allowed=list(PRESETS))
    return options, preset


def _coerce(name: str, value: Any, kind: type, limits: ServingLimits) -> Any:
    """A client's option value (bytes/text from multipart, typed from JSON) as the StyleConfig type."""
    if isinstance(value, (bytes, bytearray)):
        value = _text(value, name)
    if name in CHOICES:  # a name; or, for an option that was a bool, a boolean (or its text) meaning one
        on_off = BOOL_CHOICES.get(name)
        if on_off and (isinstance(value, bool) or (isinstance(value, str) and value.lower() in _TRUE | _FALSE)):
            return on_off[0] if (value if isinstance(value, bool) else value.lower() in _TRUE) else on_off[1]
        if isinstance(value, str) and value.strip() in CHOICES[name]:
            return value.strip()
        allowed = [*CHOICES[name], *(["true", "false"] if on_off else [])]
        raise RequestError(f"{name}={_show(value)} is not one of {', '.join(allowed)}", field=name, allowed=allowed)
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
                               allowed=limits.bounds(name) if name in RANGED else "an integer")
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
