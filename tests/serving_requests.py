"""Requests as a server hands them to the serving core, shared by the pure serving tests and the
TorchServe handler tests: tiny images, multipart/JSON rows, and the table of bad requests with the
status and field each must get. Imports no server.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import yaml
from hypothesis import strategies as st
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIG = REPO / "deploy" / "model-config.yaml"


def model_config(**nsf_changes) -> dict:
    """The shipped model-config.yaml, parsed, with ``nsf`` keys replaced."""
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    cfg["nsf"].update(nsf_changes)
    return cfg


def png(w: int, h: int, seed: int = 0) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(w: int, h: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png(w, h, seed))).save(buf, format="JPEG")
    return buf.getvalue()


def noise_png(w: int, h: int, seed: int = 0) -> bytes:
    img = Image.effect_noise((w, h), 60 + seed).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


CONTENT, STYLE, STYLE2 = png(64, 48, 0), jpeg(40, 40, 1), png(32, 32, 2)


def multipart(**extra) -> dict:
    """Fields as a server hands over multipart/form-data: bytes or bytearray values."""
    fields = {"content": bytearray(CONTENT), "style": STYLE, "size": b"48", "steps": b"2", "seed": b"3"}
    fields.update({k: v.encode() if isinstance(v, str) else v for k, v in extra.items()})
    return {k: v for k, v in fields.items() if v is not None}


def json_body(**extra) -> dict:
    """A JSON request as a server hands it over: the decoded object under "body"."""
    body = {"content": b64(CONTENT), "style": b64(STYLE), "size": 48, "steps": 2, "seed": 3, **extra}
    return {"body": {k: v for k, v in body.items() if v is not None}}


def mask_png(w: int, h: int, left: int = 255, right: int | None = None) -> bytes:
    """A greyscale mask PNG: ``left`` on the left half, ``right`` (default: ``left``) on the right half."""
    img = Image.new("L", (w, h), left)
    img.paste(left if right is None else right, (w // 2, 0, w, h))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# masks for CONTENT (64x48): the left half, the right half
LEFT, RIGHT = mask_png(64, 48, 255, 0), mask_png(64, 48, 0, 255)


def truncated_png() -> bytes:
    data = png(64, 64, 5)
    return data[: len(data) // 2]


def bomb_png() -> bytes:
    """A small file declaring 6000x5000 = 30 MP (over the 25 MP cap): refused from its header."""
    buf = io.BytesIO()
    Image.new("L", (6000, 5000)).save(buf, format="PNG")
    return buf.getvalue()


# what -> (row, status, field)
BAD = {
    "missing content": (multipart(content=None), 400, "content"),
    "missing style": (multipart(style=None), 400, "style"),
    "content not an image": (multipart(content=b"this is not an image"), 400, "content"),
    "truncated image": (multipart(style=truncated_png()), 400, "style"),
    "image under 16 px": (multipart(content=png(8, 8)), 400, "content"),
    "image over the pixel cap": (multipart(content=bomb_png()), 413, "content"),
    "fields over the size cap": (multipart(style_2=b"\0" * (32 * 2**20 + 1)), 413, "body"),
    "unknown parameter": (multipart(colour="blue"), 400, "colour"),
    "server-only parameter": (json_body(init="/etc/passwd"), 400, "init"),
    "size too large": (multipart(size="4096"), 400, "size"),
    "size too small": (json_body(size=8), 400, "size"),
    "size not a number": (multipart(size="big"), 400, "size"),
    "steps zero": (json_body(steps=0), 400, "steps"),
    "steps too many": (multipart(steps="100000"), 400, "steps"),
    "negative weight": (json_body(content_weight=-1), 400, "content_weight"),
    "weight not finite": (multipart(style_weight="nan"), 400, "style_weight"),
    "absurd weight": (json_body(tv_weight=1e300), 400, "tv_weight"),
    "both weights zero": (json_body(content_weight=0, style_weight=0), 400, "content_weight"),
    "preserve_color not a boolean": (multipart(preserve_color="maybe"), 400, "preserve_color"),
    "unknown preset": (multipart(preset="picasso"), 400, "preset"),
    "preset over the limits": (json_body(preset="seed", size=None, steps=None), 400, "steps"),
    "unknown format": (multipart(format="gif"), 400, "format"),
    "style weights for another count": (multipart(style_weights="0.5,0.5"), 400, "style_weights"),
    "style weights not numbers": (json_body(style_2=b64(STYLE2), style_weights=["a", 1]), 400, "style_weights"),
    "style_3 without style_2": (multipart(style_3=STYLE2), 400, "style_3"),
    "more styles than allowed": (multipart(style_5=STYLE2), 400, "style_5"),
    "bad base64": (json_body(style="@@not base64@@"), 400, "style"),
    "image of the wrong JSON type": (json_body(content=12), 400, "content"),
    "body not JSON": ({"body": bytearray(CONTENT)}, 400, "body"),
    "body a JSON list": ({"body": [1, 2]}, 400, "body"),
    "a mask for one of two styles": (multipart(style_2=STYLE2, mask=LEFT), 400, "mask_2"),
    "mask_2 without style_2": (multipart(mask=LEFT, mask_2=RIGHT), 400, "mask_2"),
    "mask not an image": (multipart(mask=b"not a mask"), 400, "mask"),
    "mask over the pixel cap": (multipart(mask=bomb_png()), 413, "mask"),
    "style_mask_2 without style_2": (json_body(style_mask_2=b64(LEFT)), 400, "style_mask_2"),
}


# --- hostile input: hypothesis strategies over what a server hands over -------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_header(w: int, h: int) -> bytes:
    """A tiny PNG that declares w x h pixels (its data is a few bytes: decoding it would explode)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + _png_chunk(b"IEND", b"")


GOOD = noise_png(40, 30, 3)
_buf = io.BytesIO()
Image.open(io.BytesIO(GOOD)).save(_buf, format="JPEG")
GOOD_JPEG = _buf.getvalue()

images = st.one_of(
    st.binary(max_size=64),
    st.integers(1, len(GOOD) - 1).map(lambda n: GOOD[:n]),
    st.integers(1, len(GOOD_JPEG) - 1).map(lambda n: GOOD_JPEG[:n]),
    st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)).map(lambda wh: bomb_header(*wh)),
    st.just(GOOD),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.sampled_from([10**400, -(10**400)]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=16),
                    st.sampled_from(["NaN", "inf", "-1", "1e309", "32", "2", "fast", "jpeg", "0.5,0.5"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=12)
keys = st.sampled_from(["content", "style", "style_2", "style_3", "style_9", "size", "steps", "seed", "preset",
                        "format", "style_weights", "content_weight", "init", "max_pixels", "__proto__", "",
                        "mask", "mask_2", "style_mask"])
multipart_rows = st.dictionaries(keys, st.one_of(images, scalars.map(lambda v: str(v).encode())), max_size=7)
json_objects = st.dictionaries(keys, st.one_of(json_values, images.map(b64), st.text(max_size=20)), max_size=7)
# One request as a server hands it over: a row (multipart fields, a JSON body as bytes or decoded), or a
# list of KServe v2 inputs.
hostile_rows = st.one_of(
    multipart_rows,
    json_objects.map(lambda d: {"body": d}),
    json_objects.map(lambda d: {"body": json.dumps(d, default=str).encode()}),
    st.binary(max_size=200).map(lambda b: {"body": b}),
    st.integers(1, 200_000).map(lambda n: {"body": b"[" * n + b"]" * n}),  # nesting past the recursion limit
    json_values.map(lambda v: {"body": v}),
    st.lists(st.fixed_dictionaries({"name": keys, "datatype": st.sampled_from(["BYTES", "INT64", "FP32", "x"]),
                                    "data": st.lists(json_values, max_size=2)}), min_size=1, max_size=4),
)
# a number past float's range in each kind of numeric field (once a 500: OverflowError)
OVERFLOWS = [{"body": json.dumps({"content": b64(GOOD), "style": b64(GOOD), name: value}).encode()}
             for name, value in (("size", 10**400), ("steps", -(10**400)), ("style_weight", 10**400))]


def tight_model_config() -> dict:
    """Limits so small that a request that gets through costs a fraction of a second."""
    cfg = model_config(preset="fast", overrides={"size": 32, "steps": 2})
    cfg["nsf"]["devices"]["cpu"].update(max_size=32, max_steps=2, calibrate=[32, 2])
    return cfg
