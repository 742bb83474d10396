"""The serving error contract: a :class:`RequestError` is an HTTP status and the body ``{error, field, allowed}``.

The library's errors carry their structure (:class:`nsf.errors.ConfigError`, :class:`~nsf.errors.PlanError`,
:class:`~nsf.errors.ImageError`: ``field``, ``value``, ``allowed``); :meth:`RequestError.from_error` maps
them to a request error from those attributes, never from the message text.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ConfigError, ImageTooLargeError, PlanError

# Reason phrases of the statuses the serving core answers with (written out: http.HTTPStatus renamed
# 413 and 422 in Python 3.13, and a client may compare them).
PHRASES = {200: "OK", 400: "Bad Request", 413: "Payload Too Large", 422: "Unprocessable Entity",
           500: "Internal Server Error", 503: "Service Unavailable", 507: "Insufficient Storage"}
_KEEP = object()


def phrase(status: int) -> str:
    """The reason phrase of ``status`` (``"Bad Request"`` for a 4xx without one of its own)."""
    return PHRASES.get(status, "Bad Request" if 400 <= status < 500 else "Internal Server Error")


class RequestError(ValueError):
    """A bad request: ``status`` (400; 413 too large; 422 would outrun the worker's time or memory), the
    ``field`` at fault and what is ``allowed``."""

    def __init__(self, message: str, *, field: str | None = None, allowed: Any = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.field = field
        self.allowed = allowed
        self.status = status

    @classmethod
    def from_error(cls, error: ConfigError, *, field: str | None = None, message: str | None = None,
                   allowed: Any = _KEEP, status: int | None = None) -> RequestError:
        """The request error of a library error, from its attributes: ``field`` (default the error's own),
        ``allowed`` (default the error's own), ``status`` (default 413 for an image over the pixel cap, 422
        for a run that cannot fit the memory budget, else 400) and ``message`` (default the error's text)."""
        if status is None:
            status = 413 if isinstance(error, ImageTooLargeError) else 422 if isinstance(error, PlanError) else 400
        return cls(str(error) if message is None else message, field=error.field if field is None else field,
                   allowed=error.allowed if allowed is _KEEP else allowed, status=status)

    @property
    def phrase(self) -> str:
        return phrase(self.status)

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field, "allowed": self.allowed}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)
