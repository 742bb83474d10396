"""Errors that carry their structure: the field at fault, its value and what is allowed.

Raised where the check is; a server maps them to ``{error, field, allowed}`` without reading the text.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """An option with a value that is not allowed: ``field=value; allowed: ...``."""

    def __init__(self, message: str, *, field: str, value: Any = None, allowed: Any = None):
        super().__init__(message)
        self.field, self.value, self.allowed = field, value, allowed


class PlanError(ConfigError):
    """A run that cannot fit the memory budget at any tile size; ``allowed`` names what would."""


class ImageError(ConfigError):
    """An input image that cannot be used: unreadable, truncated, too small, of the wrong type.

    ``field`` names the image (``"content"``, ``"style"``, ``"image"``...), ``allowed`` what would be
    accepted (the text after ``allowed:`` in the message).
    """


class ImageTooLargeError(ImageError):
    """The image declares more pixels than the configured cap (``allowed``: ``"at most N pixels"``)."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory during a run that the plan said would fit (another process took it)."""


class VideoError(ConfigError):
    """A video input or output that cannot be used: not a video, truncated, no video stream, no frames, a variable
    frame rate, past the frame or size limit, an output that cannot be written. ``field`` names it (``"video"``,
    ``"out"``, ``"frames"``...), ``allowed`` what would be accepted."""
