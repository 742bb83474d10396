"""Images at the edge: files/PIL/tensors in, tensors through the core, PIL/PNG out.

Decoding is guarded: the pixel count is read from the header and checked against a cap
before any pixel is decoded, so a small file that declares a huge image (a
decompression bomb) is refused cheaply.
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin
from torch import Tensor

from .errors import ImageError, ImageTooLargeError  # noqa: F401 (re-exported: callers catch them from here)
from .geometry import MIN_SIDE, resize, target_size  # noqa: F401 (re-exported: the edge resizes too)

ImageLike = str | os.PathLike | Image.Image | Tensor | bytes

METADATA_KEY = "nsf"
_PIL_LIMIT_LOCK = threading.Lock()


READABLE = "PNG, JPEG, WebP, BMP, TIFF, GIF..."


def _too_large(message: str, what: str, max_pixels: int) -> ImageTooLargeError:
    return ImageTooLargeError(message, field=what, value=None, allowed=f"at most {max_pixels} pixels")


def _open(src: str | os.PathLike | bytes, max_pixels: int, what: str = "image") -> Image.Image:
    name = "image bytes" if isinstance(src, bytes) else f"image file {str(src)!r}"
    if not isinstance(src, bytes):
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(f"{name} does not exist")
        if not path.is_file():
            raise ImageError(f"{name} is not a file", field=what, value=str(src), allowed="an image file")
    fp = io.BytesIO(src) if isinstance(src, bytes) else src
    try:
        with _PIL_LIMIT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # PIL's own bomb check (a process-wide limit) must not override max_pixels, either way.
            old_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
            try:
                img = Image.open(fp)
            finally:
                Image.MAX_IMAGE_PIXELS = old_limit
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _too_large(f"{name} is too large to decode: {e}; allowed: at most {max_pixels} pixels", what,
                         max_pixels) from e
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ImageError(f"{name} is not a readable image ({e}); allowed: {READABLE}", field=what,
                         allowed=READABLE) from e
    w, h = img.size
    if w * h > max_pixels:
        raise _too_large(f"{name} is {w}x{h} = {w * h} pixels; allowed: at most {max_pixels} pixels (max_pixels)",
                         what, max_pixels)
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{name} is truncated or corrupt ({e}); allowed: a complete image file", field=what,
                         allowed="a complete image file") from e
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: EXIF rotation applied, alpha composited on white,
    16/32-bit and float images rescaled (not clipped), CMYK/palette/grey converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            top = max(a.max(initial=0), 1.0)
        elif img.mode.startswith("I;16") or a.max(initial=0) > 255:
            top = 65535.0  # 16 bits per sample: the mode says so, whatever the values
        else:
            top = 255.0  # mode "I" holding 8-bit values
        a = np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8)
        img = Image.fromarray(a, mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")


def load_image(src: ImageLike, *, max_pixels: int = 50_000_000, what: str = "image") -> Image.Image:
    """Open a path, bytes or PIL image as 8-bit RGB, refusing bombs, corrupt files and tiny images.

    Raises:
        nsf.errors.ImageTooLargeError: more than ``max_pixels`` (read from the header, before decoding).
        nsf.errors.ImageError: not an image, truncated, under ``MIN_SIDE`` pixels a side; ``field`` is ``what``.
        FileNotFoundError: a path that does not exist.
    """
    if isinstance(src, Image.Image):
        w, h = src.size
        if w * h > max_pixels:
            raise _too_large(f"{what} is {w}x{h} = {w * h} pixels; allowed: at most {max_pixels} pixels", what,
                             max_pixels)
        img = src
    elif isinstance(src, (str, os.PathLike, bytes)):
        img = _open(src, max_pixels, what)
    else:
        raise ImageError(f"{what} is a {type(src).__name__}; allowed: a path, bytes, a PIL.Image or a tensor",
                         field=what, value=type(src).__name__, allowed="a path, bytes, a PIL.Image or a tensor")
    img = to_rgb(img)
    check_min_side(img.size[1], img.size[0], what)
    return img


def load_mask(src: ImageLike, *, what: str = "mask", max_pixels: int = 50_000_000) -> Tensor:
    """A mask (regional styles) as a ``(1, 1, H, W)`` float tensor in [0, 1]: a path, bytes or PIL image (its
    greyscale, black 0 and white 1; transparency counts as white, as for images), or a tensor ``(H, W)``,
    ``(1, H, W)`` or ``(1, 1, H, W)`` of values in [0, 1].

    Raises:
        nsf.errors.ImageError: unreadable, too small, a tensor of another shape or with values outside [0, 1];
            ``field`` is ``what``.
    """
    if not isinstance(src, Tensor):
        img = load_image(src, max_pixels=max_pixels, what=what)
        a = np.asarray(img.convert("L"), dtype=np.uint8).copy()
        return torch.from_numpy(a)[None, None].float().div_(255.0)
    allowed = "a float tensor (H, W), (1, H, W) or (1, 1, H, W) with values in [0, 1]"
    t = src
    while t.dim() < 4:
        t = t.unsqueeze(0)
    if not torch.is_floating_point(t) or t.dim() != 4 or t.shape[:2] != (1, 1):
        raise ImageError(f"{what} tensor has shape {tuple(src.shape)} and dtype {src.dtype}; allowed: {allowed}",
                         field=what, value=tuple(src.shape), allowed=allowed)
    check_min_side(t.shape[-2], t.shape[-1], what)
    if not bool(torch.isfinite(t).all()) or float(t.min()) < 0 or float(t.max()) > 1:
        raise ImageError(f"{what} tensor has values outside [0, 1]; allowed: {allowed}", field=what,
                         allowed=allowed)
    return t.float()


def check_min_side(h: int, w: int, what: str = "image") -> None:
    if min(h, w) < MIN_SIDE:
        raise ImageError(f"{what} is {w}x{h} pixels; allowed: each side at least {MIN_SIDE} pixels", field=what,
                         value=(w, h), allowed=f"each side at least {MIN_SIDE} pixels")


def pil_to_tensor(img: Image.Image, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """RGB PIL image -> ``(1, 3, H, W)`` tensor in [0, 1]."""
    a = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    t = torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)
    return t.to(device=device, dtype=dtype).div_(255.0)


def tensor_to_pil(t: Tensor) -> Image.Image:
    """``(3, H, W)`` or ``(1, 3, H, W)`` tensor in [0, 1] -> RGB PIL image (values clamped, rounded)."""
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(f"tensor_to_pil takes one image, got a batch of {t.shape[0]}")
        t = t[0]
    a = t.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, mode="RGB")


def check_tensor(t: Tensor, what: str = "image") -> Tensor:
    """Validate an image tensor and return it as ``(B, 3, H, W)``."""
    if not torch.is_floating_point(t):
        raise ImageError(f"{what} tensor has dtype {t.dtype}; allowed: a float tensor with values in [0, 1]",
                         field=what, value=str(t.dtype), allowed="a float tensor with values in [0, 1]")
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or t.shape[1] != 3:
        raise ImageError(f"{what} tensor has shape {tuple(t.shape)}; allowed: (3, H, W) or (B, 3, H, W)",
                         field=what, value=tuple(t.shape), allowed="(3, H, W) or (B, 3, H, W)")
    check_min_side(t.shape[-2], t.shape[-1], what)
    if not bool(torch.isfinite(t).all()):
        raise ImageError(f"{what} tensor has NaN or infinite values; allowed: finite values in [0, 1]", field=what,
                         allowed="finite values in [0, 1]")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ImageError(f"{what} tensor has values in [{lo:.3g}, {hi:.3g}]; allowed: [0, 1]", field=what,
                         value=(lo, hi), allowed="[0, 1]")
    return t


# Luminance/chroma (YIQ, as in Gatys et al. 2016, "Preserving color in neural artistic style transfer").
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def rgb_to_yiq(t: Tensor) -> Tensor:
    m = _RGB2YIQ.to(t.device, t.dtype)
    return torch.einsum("ij,bjhw->bihw", m, t)


def yiq_to_rgb(t: Tensor) -> Tensor:
    m = torch.linalg.inv(_RGB2YIQ.double()).to(t.device, t.dtype)
    return torch.einsum("ij,bjhw->bihw", m, t)


def luminance(t: Tensor) -> Tensor:
    """``(B, 3, H, W)`` RGB -> ``(B, 3, H, W)`` grey (Y repeated), for luminance-only transfer."""
    return rgb_to_yiq(t)[:, :1].expand(-1, 3, -1, -1).contiguous()


def match_luminance(style: Tensor, content: Tensor) -> Tensor:
    """Grey style whose luminance mean and std match the content's (the paper's luminance matching)."""
    ys, yc = rgb_to_yiq(style)[:, :1], rgb_to_yiq(content)[:, :1]
    ys = (ys - ys.mean()) / ys.std().clamp_min(1e-6) * yc.std() + yc.mean()
    return ys.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()


def recolor(output: Tensor, content: Tensor) -> Tensor:
    """The output's luminance with the content's chroma."""
    y = rgb_to_yiq(output)[:, :1]
    iq = rgb_to_yiq(content)[:, 1:]
    return yiq_to_rgb(torch.cat([y, iq], dim=1)).clamp(0, 1)


def _color_stats(t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(B, 3)`` and covariance ``(B, 3, 3)`` of the RGB values of ``(B, 3, H, W)`` images, in float64."""
    flat = t.double().flatten(2)
    mean = flat.mean(-1)
    centered = flat - mean.unsqueeze(-1)
    return mean, centered @ centered.transpose(1, 2) / flat.shape[-1]


def _sym_power(m: Tensor, p: float, floor: float = 1e-8) -> Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(floor).pow(p).unsqueeze(-2)) @ vecs.transpose(-1, -2)


def match_color(style: Tensor, content: Tensor) -> Tensor:
    """The style recoloured to the content's colour statistics: a linear map of its RGB values that gives them
    the content's mean and covariance (Gatys et al. 2017, "Controlling Perceptual Factors in Neural Style
    Transfer", colour histogram matching): ``A (s - mu_s) + mu_c``, clipped to [0, 1], with the symmetric
    ``A = C_c^1/2 C_s^-1/2`` (the eigendecomposition variant the paper names after Image Analogies; its other
    option, Cholesky factors ``L_c L_s^-1``, differs from it by a rotation of the whitened colours).

    ``style`` ``(1|B, 3, h, w)``, ``content`` ``(B, 3, H, W)`` -> ``(B, 3, h, w)``: each content image's own
    statistics. A grey style (singular covariance) keeps its few colours' directions (eigenvalues floored).
    """
    mu_s, cov_s = _color_stats(style)
    mu_c, cov_c = _color_stats(content)
    a = _sym_power(cov_c, 0.5) @ _sym_power(cov_s, -0.5)
    flat = style.double().flatten(2) - mu_s.unsqueeze(-1)
    out = a @ flat + mu_c.unsqueeze(-1)
    b = max(style.shape[0], content.shape[0])
    return out.reshape(b, 3, *style.shape[-2:]).clamp(0, 1).to(style.dtype)


def _text_chunks(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The whole record as JSON under ``nsf``, plus a few top-level keys for `exiftool` (ASCII text)."""
    out = {METADATA_KEY: json.dumps(metadata, sort_keys=True, default=str)}
    out.update({key: str(metadata[key]) for key in ("nsf_version", "weights", "weights_sha256", "seed")
                if key in metadata})
    return out


def png_info(metadata: Mapping[str, Any]) -> PngImagePlugin.PngInfo:
    """PNG text chunks (:func:`_text_chunks`) for PIL."""
    info = PngImagePlugin.PngInfo()
    for key, value in _text_chunks(metadata).items():
        info.add_text(key, value)
    return info


def save_png(img: Image.Image | Tensor, path: str | os.PathLike, metadata: Mapping[str, Any],
             bit_depth: int = 8) -> None:
    """Write a PNG with the provenance chunks; a tensor ``(1|, 3, H, W)`` in [0, 1] may be written with 16 bits
    per channel (PIL writes RGB only at 8)."""
    if bit_depth == 16:
        if not isinstance(img, Tensor):
            raise ValueError("bit_depth=16 needs the float image tensor; allowed: a (3, H, W) tensor")
        Path(path).write_bytes(encode_png16(img, metadata))
    elif bit_depth == 8:
        (tensor_to_pil(img) if isinstance(img, Tensor) else img).save(path, format="PNG", pnginfo=png_info(metadata))
    else:
        raise ValueError(f"bit_depth={bit_depth}; allowed: 8, 16")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png16(t: Tensor, metadata: Mapping[str, Any] | None = None) -> bytes:
    """A 16-bit RGB PNG of ``(1|, 3, H, W)`` values in [0, 1] (rounded to 1/65535), with the same text chunks
    as :func:`png_info` writes. Rows use PNG's ``Up`` filter (type 2), which suits smooth images."""
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(f"encode_png16 takes one image, got a batch of {t.shape[0]}")
        t = t[0]
    a = t.detach().float().clamp(0, 1).mul(65535).round().to(torch.int32).permute(1, 2, 0).cpu().numpy()
    h, w, _ = a.shape
    rows = np.ascontiguousarray(a.astype(">u2")).view(np.uint8).reshape(h, w * 6)
    up = rows - np.vstack([np.zeros((1, w * 6), np.uint8), rows[:-1]])  # uint8 arithmetic wraps mod 256
    raw = np.hstack([np.full((h, 1), 2, np.uint8), up]).tobytes()
    text = b"".join(_chunk(b"tEXt", k.encode("latin-1") + b"\0" + v.encode("latin-1", "replace"))
                    for k, v in _text_chunks(metadata or {}).items())
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)) + text
            + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b""))


def encode(img: Image.Image, fmt: str = "png", metadata: Mapping[str, Any] | None = None, quality: int = 95) -> bytes:
    """Encode to PNG (with provenance text chunks) or JPEG bytes."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", pnginfo=png_info(metadata or {}))
    elif fmt in ("jpeg", "jpg"):
        img.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unknown image format {fmt!r}; allowed: png, jpeg")
    return buf.getvalue()


def read_metadata(src: str | os.PathLike | bytes) -> dict[str, Any]:
    """The provenance record stored by :func:`save_png` (``{}`` if there is none)."""
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
        text = getattr(img, "text", {}) or {}
        return json.loads(text[METADATA_KEY]) if METADATA_KEY in text else {}
