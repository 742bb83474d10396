"""The JSON Schema of a request under some :class:`~nsf.serving.limits.ServingLimits` (for the model card)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import MAX_WEIGHT, PRESETS, StyleConfig
from .limits import BOOL_CHOICES, CHOICES, HINTS, RANGED, ServingLimits
from .request import (
    CONTENT,
    DEADLINE,
    LATER_STEPS,
    MASK,
    MAX_DEADLINE,
    STREAM,
    STYLE,
    STYLE_MASK,
    STYLE_WEIGHTS,
    TEMPORAL_WEIGHT,
    VIDEO,
    field_kinds,
    numbered,
)
from .stream import PARTIAL_HEADER


def request_schema(limits: ServingLimits) -> dict[str, Any]:
    """JSON Schema of the JSON request body on ``limits.device``; multipart takes the same fields."""
    base = limits.base
    image = {"type": "string", "contentEncoding": "base64",
             "description": f"an image (PNG, JPEG, WebP, BMP, TIFF, GIF), at most {limits.max_pixels} pixels"}
    props: dict[str, Any] = {CONTENT: {**image, "description": "content image; " + image["description"]},
                             STYLE: {**image, "description": "style image; " + image["description"]}}
    for i in range(2, limits.max_styles + 1):
        props[f"style_{i}"] = {**image, "description": f"style image {i} (blended by style_weights)"}
    styles = numbered(STYLE, limits.max_styles)
    for name, style in zip(numbered(MASK, limits.max_styles), styles):
        props[name] = {**image, "description": f"regional styles: where {style} goes in the content, a greyscale "
                                               "mask with the content's aspect ratio (white: there; grey values "
                                               "blend; where no mask covers, the content stays); give one per "
                                               "style or none"}
    for name, style in zip(numbered(STYLE_MASK, limits.max_styles), styles):
        props[name] = {**image, "description": f"optional: the part of {style} (white) its style is taken from, "
                                               "a greyscale mask with that image's aspect ratio"}
    meta = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(StyleConfig)}
    json_types = {int: "integer", float: "number", bool: "boolean"}
    for name in (n for n in field_kinds(limits) if n in limits.fields):
        if name in CHOICES:
            props[name] = {"enum": [*CHOICES[name], *([True, False] if name in BOOL_CHOICES else [])],
                           "default": getattr(base, name), "description": meta[name]}
            continue
        prop: dict[str, Any] = {"type": json_types[HINTS[name]], "default": getattr(base, name),
                                "description": meta[name]}
        if name in RANGED:
            prop.update(minimum=limits.bounds(name)["min"], maximum=limits.bounds(name)["max"])
        elif HINTS[name] is float:
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
    props[STREAM] = {"type": "boolean", "default": False,
                     "description": "answer with newline-delimited JSON: a preview per coarse-to-fine scale, then "
                                    "the image (README, 'Progress while a request runs')"}
    props[VIDEO] = {"type": "string", "contentEncoding": "base64",
                     "description": f"a video request instead of content: the clip (MP4, MOV, MKV, WebM...), at most "
                                    f"{limits.max_video_bytes} bytes and {limits.max_video_frames} frames of at most "
                                    f"{limits.max_pixels} pixels; size at most {limits.max_video_size}; the answer "
                                    "is an MP4 (video/mp4), streamed: a preview per frame, then the clip"}
    props[TEMPORAL_WEIGHT] = {"type": "number", "minimum": 0, "maximum": MAX_WEIGHT,
                              "description": "video: the weight of the temporal loss holding each frame to the "
                                             "previous output warped along the optical flow (0: off)"}
    props[LATER_STEPS] = {"type": "integer", "minimum": 1, "maximum": limits.max_steps,
                          "default": limits.video_later_steps,
                          "description": "video: the steps of each frame after the first (warm-started)"}
    props[DEADLINE] = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_DEADLINE,
                       "description": "seconds; past it the best image so far is the answer, marked partial "
                                      f"(header {PARTIAL_HEADER}: true, PNG metadata 'partial')"}
    table = field_kinds(limits)  # the one table of request fields: the schema describes each, no more, no less
    if set(props) != set(table):
        raise AssertionError(f"request_schema and field_kinds disagree on {sorted(set(props) ^ set(table))}")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"style_fusion request on {limits.device} (JSON body; multipart/form-data takes the same "
                     "fields, images as files)",
            "type": "object", "required": [STYLE], "oneOf": [{"required": [CONTENT]}, {"required": [VIDEO]}],
            "additionalProperties": False, "properties": props}
