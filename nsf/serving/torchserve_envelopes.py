"""TorchServe's KServe envelopes, made to pass a malformed body on to the handler as a 400.

TorchServe runs an envelope's ``parse_input`` before the handler; left alone, a body without a proper
``inputs``/``instances`` list raises there and TorchServe answers 503 "Prediction failed". Guarded,
the failure reaches the handler as an :class:`EnvelopeError` and gets a 400 with a JSON body. ``ts`` is
imported when :func:`guard_kserve_envelopes` is called (from the handler's ``initialize``), never on import.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import RequestError

ENVELOPES = (("kserve", "KServeEnvelope"), ("kservev2", "KServev2Envelope"))


class EnvelopeError(RequestError):
    """A request that its KServe envelope could not read: ``envelope`` names it (``"kserve"``, ``"kservev2"``,
    or ``"any"`` for a body without instances/inputs)."""

    def __init__(self, message: str, *, envelope: str, field: str | None = "body", allowed: Any = None):
        super().__init__(message, field=field, allowed=allowed)
        self.envelope = envelope


def guard_kserve_envelopes() -> list[str]:
    """Wrap the ``parse_input`` of TorchServe's KServe envelopes (once); return the envelopes guarded now."""
    guarded = []
    for module_name, class_name in ENVELOPES:
        try:
            cls = getattr(importlib.import_module(f"ts.torch_handler.request_envelope.{module_name}"), class_name)
        except (ImportError, AttributeError):
            continue
        if getattr(cls.parse_input, "nsf_guarded", False):
            continue

        def parse_input(self: Any, data: Any, _parse: Any = cls.parse_input, _name: str = module_name) -> Any:
            try:
                return _parse(self, data)
            except Exception as e:  # noqa: BLE001 - any malformed envelope is the client's error
                return [EnvelopeError(f"malformed {_name} request: {type(e).__name__}: {e}", envelope=_name,
                                      allowed="KServe v1 {instances: [...]} or v2 {inputs: [...]}")]

        parse_input.nsf_guarded = True  # type: ignore[attr-defined]
        cls.parse_input = parse_input
        guarded.append(module_name)
    return guarded
