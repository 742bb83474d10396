"""Progress while a request runs, server-neutral: one message per coarse-to-fine scale, then the result.

A client that sends ``stream=true`` gets newline-delimited JSON (``application/x-ndjson``), one object
per line, flushed as the optimization proceeds:

* ``{"event": "preview", "scale": 1, "scales": 3, "size": [h, w], "step": 50, "total": 150, "loss": ...,
  "content_type": "image/jpeg", "image": "<base64>"}`` as each scale ends (a JPEG at most
  :data:`PREVIEW_SIDE` px on its longer side);
* a video request (a ``video`` field) sends ``{"event": "frame", "index": 0, "total": 48, "size": [h, w],
  "seconds": ..., "content_type": "image/jpeg", "image": "<base64>"}`` as each frame is done, and its result line
  is ``{"event": "result", "partial": false, "frames": 48, "content_type": "video/mp4", "video": "<base64>"}``;
* then ``{"event": "result", "partial": false, "content_type": "image/png", "image": "<base64>"}`` (the
  same bytes a non-streamed request gets), or ``{"event": "error", "status": 4xx/5xx, "error", "field",
  "allowed"}``.

:class:`StopWhen` is the run's ``stop`` hook: a request's deadline (past it the best image so far is the
result, marked ``partial``) and the server's signal that the client has gone (the work stops).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import TYPE_CHECKING, Any

from ..geometry import target_size
from ..image import encode, resize, tensor_to_pil
from ..optimize.events import ScaleDone

if TYPE_CHECKING:
    from torch import Tensor

MEDIA_TYPE = "application/x-ndjson"
PREVIEW_SIDE = 256  # px, longer side of a preview: a few KB of JPEG, enough to judge the picture
PARTIAL_HEADER = "X-NSF-Partial"  # "true" on a non-streamed answer that a deadline cut short


class StopWhen:
    """``stop()`` for a run: true once ``deadline`` (``time.monotonic()`` seconds) has passed or ``gone`` is set."""

    def __init__(self, deadline: float | None = None, gone: threading.Event | None = None):
        self.deadline = deadline
        self.gone = gone if gone is not None else threading.Event()

    @classmethod
    def after(cls, seconds: float | None, gone: threading.Event | None = None) -> StopWhen:
        """A deadline ``seconds`` from now (``None``: none)."""
        return cls(None if seconds is None else time.monotonic() + seconds, gone)

    @property
    def client_gone(self) -> bool:
        return self.gone.is_set()

    def __call__(self) -> bool:
        return self.gone.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)


def preview(done: ScaleDone, index: int = 0) -> dict[str, Any]:
    """The message for a finished scale: its size, loss and image ``index`` of the batch as a small JPEG."""
    image = done.image[index : index + 1]
    h, w = image.shape[-2:]
    if max(h, w) > PREVIEW_SIDE:
        image = resize(image, target_size(h, w, PREVIEW_SIDE))
    jpeg = encode(tensor_to_pil(image), "jpeg", quality=80)
    return {"event": "preview", "scale": done.number, "scales": done.scales, "size": [h, w], "step": done.step,
            "total": done.total, "loss": done.loss, "content_type": "image/jpeg",
            "image": base64.b64encode(jpeg).decode("ascii")}


def frame_preview(image: Tensor, index: int, total: int, seconds: float) -> dict[str, Any]:
    """A video request's message for a finished frame: its index (0-based) of ``total``, its seconds and the
    frame as a small JPEG (at most :data:`PREVIEW_SIDE` px on its longer side)."""
    h, w = image.shape[-2:]
    if max(h, w) > PREVIEW_SIDE:
        image = resize(image, target_size(h, w, PREVIEW_SIDE))
    jpeg = encode(tensor_to_pil(image[:1]), "jpeg", quality=80)
    return {"event": "frame", "index": index, "total": total, "size": [h, w], "seconds": round(seconds, 3),
            "content_type": "image/jpeg", "image": base64.b64encode(jpeg).decode("ascii")}


def video_result(data: bytes, frames: int) -> dict[str, Any]:
    """The last message of a video request's stream: the MP4 (the bytes a non-streamed request gets)."""
    return {"event": "result", "partial": False, "frames": frames, "content_type": "video/mp4",
            "video": base64.b64encode(data).decode("ascii")}


def result(image: bytes, content_type: str, partial: bool) -> dict[str, Any]:
    """The last message of a stream that produced an image."""
    return {"event": "result", "partial": partial, "content_type": content_type,
            "image": base64.b64encode(image).decode("ascii")}


def error(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """The last message of a stream that ended in an error (``body``: ``{error, field, allowed}``)."""
    return {"event": "error", "status": status, **body}


def line(message: dict[str, Any]) -> bytes:
    """One NDJSON line."""
    return json.dumps(message, default=str).encode() + b"\n"
