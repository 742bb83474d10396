"""KServe's v1 and v2 REST shapes for ``style_fusion``, as pure functions (nothing here imports kserve).

Two runtimes speak them: KServe's own model server (:mod:`nsf.runtimes.kserve`) and TorchServe under its KServe
envelopes (``handlers/style_fusion_handler.py``), so they live in the serving core, not in either. The KServe
runtime maps what kserve's model server hands its
``predict`` onto request fields for :meth:`nsf.serving.Worker.answer`, and the worker's outcomes back:

* v1, ``POST /v1/models/style_fusion:predict``: ``{"instances": [{content, style, size...}, ...]}``, each
  instance the fields of one request (images as base64 text, options as JSON values, as in a JSON body to
  TorchServe); the answer ``{"predictions": [<base64 image>, ...]}``, one per instance, in order;
* v2, ``POST /v2/models/style_fusion/infer``: ``{"id"?, "inputs": [{name, datatype, shape, data}]}``, one
  input per field (``content``/``style`` BYTES as base64 text, or raw bytes with the binary extension;
  ``size`` INT64...); the answer's ``outputs[0]`` is ``image``, BYTES, the image in base64.

An error is a status and the body ``{"error", "field", "allowed"}`` at the top level, as everywhere in nsf
(a v1 request of several instances also carries each instance's answer under ``"predictions"``).
:func:`reshape_error` maps the bodies kserve and FastAPI write themselves (``{"error": ...}``,
``{"detail": ...}``) onto that shape, from their status and keys, never from their message text.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import RequestError
from .request import STYLE_WEIGHTS, show
from .worker import Outcome

# Instances in one v1 request: they run one after another (or as one batch when their options and sizes
# match) inside one HTTP request, so their number is bounded like TorchServe's job queue (job_queue_size=8).
MAX_INSTANCES = 8
# Top-level keys of a v1 request body (a streaming flag would be added here).
V1_KEYS = ("instances",)
INSTANCES_ALLOWED = f"a list of 1..{MAX_INSTANCES} objects {{content, style, size, steps, ...}}"
V2_ALLOWED = "a KServe v2 body {id?, inputs: [{name, datatype, shape, data}], parameters?, outputs?}"
BODY_ALLOWED = [f"KServe v1: application/json {{instances: [{{content, style, ...}}, ...]}} (1..{MAX_INSTANCES})",
                "KServe v2: application/json {inputs: [{name, datatype, shape, data}, ...]}"]
IMAGE_OUTPUT = "image"


def v1_requests(payload: Any) -> list[Mapping[str, Any] | RequestError]:
    """A v1 body (as kserve decoded it) -> one entry per instance: its fields, or its own error.

    Raises:
        RequestError: the body as a whole is not a v1 request (not JSON, no ``instances`` list, too many
            instances, an unknown top-level key).
    """
    if isinstance(payload, (bytes, bytearray, str)):  # kserve passes a non-JSON content type's body as it came
        raise RequestError("the KServe v1 request is not a JSON object; allowed: Content-Type application/json "
                           'and a body {"instances": [{"content": <base64>, "style": <base64>, ...}]}',
                           field="body", allowed=BODY_ALLOWED[0])
    if not isinstance(payload, Mapping):
        raise RequestError(f"the KServe v1 request is a JSON {type(payload).__name__}, not an object",
                           field="body", allowed=BODY_ALLOWED[0])
    unknown = [str(k) for k in payload if k not in V1_KEYS]
    if unknown:
        raise RequestError(f"unknown key {unknown[0]!r} in the KServe v1 request; the fields of a request go "
                           "inside each instance", field=unknown[0], allowed=list(V1_KEYS))
    instances = payload.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RequestError("the KServe v1 request has no instances list (or an empty one)", field="instances",
                           allowed=INSTANCES_ALLOWED)
    if len(instances) > MAX_INSTANCES:
        raise RequestError(f"the KServe v1 request has {len(instances)} instances; allowed: at most "
                           f"{MAX_INSTANCES} per request", field="instances", allowed={"max": MAX_INSTANCES},
                           status=413)
    out: list[Mapping[str, Any] | RequestError] = []
    for i, instance in enumerate(instances):
        if isinstance(instance, Mapping):
            out.append(dict(instance))
        else:
            out.append(RequestError(f"instance {i} is a JSON {type(instance).__name__}, not an object of fields",
                                    field="instances", allowed=INSTANCES_ALLOWED))
    return out


def v1_answer(outcomes: Sequence[Outcome]) -> tuple[int, dict[str, Any]]:
    """The worker's outcomes, one per instance -> ``(status, body)`` of the v1 response.

    All images: 200 ``{"predictions": [<base64>, ...]}``. Otherwise the first failed instance's status and
    body; with several instances, ``predictions`` holds each instance's image or error, in order.
    """
    predictions = [_b64(o.body) if o.ok else o.body for o in outcomes]
    failed = next((o for o in outcomes if not o.ok), None)
    if failed is None:
        return 200, {"predictions": predictions}
    body = dict(_error_body(failed))
    if len(outcomes) > 1:
        body["predictions"] = predictions
    return failed.status, body


def from_kserve_v2(inputs: Any) -> dict[str, Any]:
    """KServe v2 ``inputs`` -> a field mapping.

    Each input's ``name`` is a field; BYTES inputs carry base64 text (or the option's text), the
    others a list that is unwrapped when it holds one value.
    """
    if not isinstance(inputs, Sequence) or isinstance(inputs, (str, bytes)):
        raise RequestError("KServe v2 request without an inputs list", field="inputs",
                           allowed="a list of {name, datatype, shape, data}")
    fields: dict[str, Any] = {}
    for item in inputs:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise RequestError(f"KServe v2 input {show(item)} has no name", field="inputs",
                               allowed="{name, datatype, shape, data}")
        value = item.get("data")
        if isinstance(value, list) and len(value) == 1 and item["name"] != STYLE_WEIGHTS:
            value = value[0]
        fields[item["name"]] = value
    return fields


def v2_request(inputs: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | RequestError:
    """v2 ``inputs`` as ``{name, datatype, shape, data}`` mappings -> the request's fields (or its error)."""
    try:
        seen: set[str] = set()
        for item in inputs:
            name = item.get("name") if isinstance(item, Mapping) else None
            if isinstance(name, str) and name in seen:
                raise RequestError(f"input {name!r} is given twice", field=name, allowed="each input once")
            if isinstance(name, str):
                seen.add(name)
        return from_kserve_v2(list(inputs))
    except RequestError as e:
        return e


def v2_outputs(outcome: Outcome) -> list[dict[str, Any]]:
    """A 200 outcome -> the v2 ``outputs``: one BYTES tensor ``image`` holding the image in base64."""
    if not outcome.ok or not isinstance(outcome.body, (bytes, bytearray)):
        raise ValueError("only a 200 outcome has an image to return")
    return [{"name": IMAGE_OUTPUT, "datatype": "BYTES", "shape": [1], "data": [_b64(outcome.body)]}]


def error_body(outcome: Outcome) -> dict[str, Any]:
    """A failed outcome's ``{error, field, allowed}``."""
    return dict(_error_body(outcome))


def reshape_error(status: int, body: bytes, *, model: str, endpoints: Sequence[str]) -> tuple[int, dict[str, Any]]:
    """An error response written by kserve or FastAPI -> ``(status, {error, field, allowed})``.

    From the status and the body's keys: kserve's ``{"error": ...}`` (400 a body it could not decode, 404 an
    unknown model, 503 not ready, 500...), FastAPI's 422 ``{"detail": [...]}`` for a v2 body that fails the
    request schema (answered 400 here: nsf's 422 means "over this worker's limits, retry within
    ``allowed``"), Starlette's ``{"detail": "Not Found"}`` for an unknown path. A body that already has nsf's
    shape is returned as it is.
    """
    try:
        parsed: Any = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, Mapping) and "error" in parsed and "field" in parsed:
        return status, dict(parsed)
    detail = parsed.get("detail") if isinstance(parsed, Mapping) else None
    message = parsed.get("error") if isinstance(parsed, Mapping) else None
    if message is None:
        message = detail if isinstance(detail, str) else body.decode("utf-8", "replace")[:500] or f"HTTP {status}"
    if status == 422 and isinstance(detail, list):
        return 400, schema_error(detail)
    if status == 400:
        return 400, {"error": str(message), "field": "body", "allowed": BODY_ALLOWED}
    if status == 404 and isinstance(parsed, Mapping) and "error" in parsed:
        return 404, {"error": str(message), "field": "model", "allowed": [model]}
    if status in (404, 405):
        return status, {"error": str(message), "field": "path", "allowed": list(endpoints)}
    return status, {"error": str(message), "field": None, "allowed": None}


def schema_error(detail: Sequence[Any]) -> dict[str, Any]:
    """FastAPI's validation errors of a v2 body (``RequestValidationError.errors()``) -> one 400 body naming
    the first field at fault (from each error's ``loc`` and ``msg``; the offending input is not echoed).

    The infer route takes ``InferenceRequest | bytes``: each problem is listed once per alternative, and the
    ``bytes`` alternative's complaint ("Input should be a valid bytes") says nothing about the request.
    """
    problems = [d for d in detail if isinstance(d, Mapping) and "bytes" not in (d.get("loc") or ())] or \
        [d for d in detail if isinstance(d, Mapping)]
    parts, field = [], "body"
    for d in problems[:5]:
        loc = [str(x) for x in (d.get("loc") or ()) if x not in ("body", "InferenceRequest")]
        if loc and field == "body" and not loc[0].isdigit():
            field = loc[0]
        parts.append(f"{'.'.join(loc) or 'body'}: {d.get('msg', 'invalid')}")
    return {"error": "the KServe v2 request does not match its schema: " + "; ".join(parts or ["invalid body"]),
            "field": field, "allowed": V2_ALLOWED}


def _error_body(outcome: Outcome) -> Mapping[str, Any]:
    if isinstance(outcome.body, Mapping):
        return outcome.body
    return {"error": f"HTTP {outcome.status}", "field": None, "allowed": None}


def _b64(data: Any) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")
