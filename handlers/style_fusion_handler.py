"""TorchServe handler of the ``style_fusion`` model: TorchServe's entry point, a thin adapter around
:class:`nsf.serving.Worker` (the rest of the TorchServe runtime -- the archive, ``nsf serve``, the envelope guard
and the streaming call -- is :mod:`nsf.runtimes.torchserve`).

The serving logic (request checks, admission, warm-up, calibration, batching, retry, errors) is the
server-neutral core in ``nsf/serving/``; this file maps TorchServe's context onto it: the device and
model-config.yaml in ``initialize``; per request its rows (multipart fields, JSON bodies, KServe v1
instances, KServe v2 inputs) in, and each :class:`~nsf.serving.Outcome` out as the request's status,
content type and body.

Inputs per request (see README, "Serving with TorchServe"):

* multipart/form-data: file fields ``content``, ``style`` (``style_2``... with ``style_weights``; regional
  styles: ``mask``, ``mask_2``... and ``style_mask``...) and option fields ``size``, ``steps``, ``seed``...
  -> the image bytes (``image/png`` or ``image/jpeg``);
* a JSON body with the same keys, images as base64 -> the image bytes;
* under TorchServe's KServe envelopes (``kserve``/``kservev2``), the same keys as a v1 instance or
  as v2 inputs -> the image base64-encoded in the envelope's output.

A bad request gets its own 4xx status and a JSON body ``{"error", "field", "allowed"}``; the other
requests of the batch and the worker carry on.
"""

from __future__ import annotations

import base64
import os
import sys
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.isdir(os.path.join(_HERE, "nsf")) and sys.path[:1] != [_HERE]:
    # Inside the .mar: use the nsf code packed next to this file, not another one on the path.
    sys.path.insert(0, _HERE)

import torch  # noqa: E402

from nsf.runtimes.torchserve import EnvelopeError, guard_kserve_envelopes, streamer  # noqa: E402
from nsf.serving import Outcome, RequestError, Worker, from_kserve_v2, request_fields  # noqa: E402
from nsf.serving.stream import MEDIA_TYPE  # noqa: E402
from nsf.weights import CAFFE_FILENAME, load_caffe  # noqa: E402


class StyleFusionHandler:
    """TorchServe entry point: ``initialize(context)`` once per worker, ``handle(data, context)`` per batch."""

    def __init__(self) -> None:
        self.worker: Worker | None = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        guard_kserve_envelopes()
        props = context.system_properties
        gpu_id = props.get("gpu_id")
        cuda = gpu_id is not None and torch.cuda.is_available()
        device = torch.device(f"cuda:{int(gpu_id)}") if cuda else torch.device("cpu")
        # The weights inside the archive must be the Caffe release: load_caffe checks their sha256
        # (a tampered file raises WeightsError, logged by TorchServe); no download, no unpickling.
        weights = load_caffe(os.path.join(props["model_dir"], CAFFE_FILENAME))
        self.worker = Worker.start(context.model_yaml_config or {}, device=device, weights=weights)
        self.initialized = True

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        """One answer per request, in order: image bytes, base64 text (KServe envelopes) or a JSON error."""
        if not data:  # a KServe body without instances/inputs: answer the one request it was
            data = [EnvelopeError("the KServe request has no instances/inputs", envelope="any",
                                  allowed="KServe v1 instances or v2 inputs with content and style")]
        if (len(data) == 1 and isinstance(data[0], EnvelopeError)) or _is_kserve_v2(data):
            try:
                request: dict[str, Any] | RequestError = data[0] if isinstance(data[0], RequestError) \
                    else from_kserve_v2(data)
            except RequestError as e:
                request = e
            (outcome,) = self.worker.answer([request], streams=False)
            # The kservev2 envelope names each output after the input at the same index: name ours.
            context.input_names = ["image" if outcome.ok else "error"]
            return [_reply(context, 0, outcome, as_text=True)]
        requests: list[dict[str, Any] | RequestError] = []
        as_text: list[bool] = []  # answer in JSON-safe form (base64 image, error object): a KServe v1 instance
        for row in data:
            try:
                fields, text = request_fields(row)
            except RequestError as e:
                requests.append(e)
                as_text.append(False)
            else:
                requests.append(fields)
                as_text.append(text)
        # a streamed request sends its previews as TorchServe intermediate responses (chunked HTTP); in a
        # batch of several the frontend would send each message to every request, so previews need batch 1
        progress = streamer(context, MEDIA_TYPE) if len(data) == 1 and not as_text[0] else None
        outcomes = self.worker.answer(requests, progress=progress, streams=not any(as_text))
        return [_reply(context, i, o, t) for i, (o, t) in enumerate(zip(outcomes, as_text))]


def _reply(context: Any, idx: int, outcome: Outcome, as_text: bool) -> Any:
    """Set this request's status and content type; return its body (JSON-safe inside a KServe envelope).

    Under the KServe v1 envelope the answers are the instances of one request: the status goes to it.
    """
    processors = getattr(context, "request_processor", None)
    n = len(processors) if processors else 0
    target = idx if idx < n else 0
    body = outcome.body
    for key, value in outcome.headers.items():
        if n:
            context.set_response_header(target, key, value)
    if isinstance(body, dict):  # an error: {"error", "field", "allowed"}
        if n:
            context.set_response_status(outcome.status, outcome.phrase, target)
            context.set_response_content_type(target, "application/json")
        return body if as_text else outcome.json()
    if n:
        context.set_response_content_type(target, "application/json" if as_text else outcome.content_type)
    return base64.b64encode(body).decode("ascii") if as_text else body


def _is_kserve_v2(data: list[Any]) -> bool:
    """TorchServe's kservev2 envelope hands over the inputs of one request: dicts with a datatype."""
    return (isinstance(data, list) and len(data) > 0
            and all(isinstance(d, dict) and "datatype" in d and "name" in d for d in data))
