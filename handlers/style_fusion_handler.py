"""TorchServe handler of the ``style_fusion`` model: request bytes -> nsf -> image bytes.

A thin adapter. Request parsing and validation are pure functions in ``nsf.protocol``; the
model is ``nsf.style_fusion``, the same library code as the torch.hub model. This file only maps
TorchServe's context (device, model-config.yaml, per-request status and content type) onto them.

Inputs per request (see README, "Serving with TorchServe"):

* multipart/form-data: file fields ``content``, ``style`` (``style_2``... with ``style_weights``) and
  option fields ``size``, ``steps``, ``seed``... -> the image bytes (``image/png`` or ``image/jpeg``);
* a JSON body with the same keys, images as base64 -> the image bytes;
* under TorchServe's KServe envelopes (``kserve``/``kservev2``), the same keys as a v1 instance or
  as v2 inputs -> the image base64-encoded in the envelope's output.

A bad request gets its own 4xx status and a JSON body ``{"error", "field", "allowed"}``; the other
requests of the batch and the worker carry on. A request whose estimated run (from the seconds per
pixel-step the worker measures in ``initialize``) would outrun ``time_budget`` x responseTimeout
gets a 422 naming the largest steps (or size) that fit, before anything runs.
"""

from __future__ import annotations

import base64
import importlib
import json
import logging
import math
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.isdir(os.path.join(_HERE, "nsf")) and sys.path[:1] != [_HERE]:
    # Inside the .mar: use the nsf code packed next to this file, not another one on the path.
    sys.path.insert(0, _HERE)

import torch  # noqa: E402

import nsf  # noqa: E402
from nsf import protocol  # noqa: E402
from nsf.config import StyleConfig, make_config  # noqa: E402
from nsf.errors import OutOfMemory, PlanError  # noqa: E402
from nsf.image import encode, pil_to_tensor, tensor_to_pil  # noqa: E402
from nsf.weights import CAFFE_FILENAME, load_caffe  # noqa: E402

logger = logging.getLogger(__name__)
DEFAULT_RESPONSE_TIMEOUT = 120  # TorchServe's, for a model-config.yaml without responseTimeout


class StyleFusionHandler:
    """TorchServe entry point: ``initialize(context)`` once per worker, ``handle(data, context)`` per batch."""

    def __init__(self) -> None:
        self.model: nsf.StyleFusion | None = None
        self.limits: protocol.ServingLimits | None = None
        self.cost: protocol.CostModel | None = None  # admission control, measured in initialize
        self.device = torch.device("cpu")
        self.initialized = False

    # -- lifecycle ------------------------------------------------------------------------

    def initialize(self, context) -> None:
        props = context.system_properties
        gpu_id = props.get("gpu_id")
        if gpu_id is not None and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{int(gpu_id)}")
            torch.cuda.set_device(self.device)
        self.limits = protocol.ServingLimits.from_model_config(context.model_yaml_config, self.device.type)
        # The weights inside the archive must be the Caffe release: load_caffe checks their sha256
        # (a tampered file raises WeightsError, logged by TorchServe); no download, no unpickling.
        weights = load_caffe(os.path.join(props["model_dir"], CAFFE_FILENAME))
        self.model = nsf.style_fusion(weights=weights, device=self.device, compile=self.limits.compile,
                                      max_memory=self.limits.max_memory, preset=self.limits.preset,
                                      **self.limits.overrides)
        logger.info("style_fusion: nsf %s from %s on %s, weights %s sha256 %s, limits %s", nsf.__version__,
                    os.path.dirname(nsf.__file__), self.device, self.model.weights_name,
                    self.model.weights_sha256, self.limits.to_dict())
        self._warm_up()
        timeout = float((context.model_yaml_config or {}).get("responseTimeout", DEFAULT_RESPONSE_TIMEOUT))
        self.cost = self._calibrate(timeout)
        if self.model.compiles:
            # Shapes compiled above (warmup_sizes, calibrate) stay compiled; a request of another shape
            # runs eager (CUDA graphs still apply) instead of compiling inside the request: about 20 s
            # per coarse-to-fine scale on an H100, and past dynamo's recompile limit it would go eager anyway.
            torch.compiler.set_stance("eager_on_recompile")
        self.initialized = True

    def _warm_up(self) -> None:
        """Compile (on CUDA) and run the step once per configured size, so requests do not pay for it."""
        limits = self.limits
        for size in limits.warmup_sizes:
            start = time.perf_counter()
            cfg = protocol.resolve(limits.preset, {"size": size, "steps": max(1, limits.warmup_steps)}, limits)
            content = _probe_image(size)
            self.model.transfer(content, [content.flip(-1)], cfg)
            self._sync()
            logger.info("style_fusion: warm-up at %d px, %d steps: %.1f s", size, cfg.steps,
                        time.perf_counter() - start)

    def _calibrate(self, response_timeout: float) -> protocol.CostModel | None:
        """Time a short single-scale run on this worker: seconds per pixel-step, for admission control."""
        limits = self.limits
        if limits.time_budget <= 0:
            return None
        size, steps = limits.calibrate
        cfg = make_config(limits.base, size=size, steps=steps, scales=(1.0,), scale_steps=(1.0,), tol=0.0)
        content = _probe_image(size)
        self.model.transfer(content, [content.flip(-1)], make_config(cfg, steps=1))  # first-call costs
        self._sync()
        start = time.perf_counter()
        self.model.transfer(content, [content.flip(-1)], cfg)
        self._sync()
        seconds = time.perf_counter() - start
        cost = protocol.CostModel(seconds / protocol.pixel_steps(cfg, size, size),
                                  limits.time_budget * response_timeout, work=self._work)
        logger.info("style_fusion: calibrated %.3g s per pixel-step (%d px, %d steps: %.2f s); requests estimated "
                    "over %.0f s (%.0f%% of responseTimeout %.0f s) are refused with 422", cost.seconds_per_pixel_step,
                    size, steps, seconds, cost.budget, 100 * limits.time_budget, response_timeout)
        return cost

    def _work(self, cfg: StyleConfig, height: int, width: int) -> float:
        """A run's pixel-steps as planned for this worker's memory (tiled scales cost more; inf: cannot fit)."""
        try:
            return self.model.plan_config(cfg, (height, width)).work
        except PlanError:
            return math.inf

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- requests -------------------------------------------------------------------------

    def handle(self, data, context):
        """One answer per request, in order: image bytes, base64 text (KServe envelopes) or a JSON error."""
        if not data:  # a KServe body without instances/inputs: answer the one request it was
            data = [protocol.RequestError("the KServe request has no instances/inputs", field="body",
                                          allowed="KServe v1 instances or v2 inputs with content and style")]
            data[0].envelope = "any"
        envelope = getattr(data[0], "envelope", None) if len(data) == 1 else None
        if envelope or _is_kserve_v2(data):
            try:
                rows = [data[0] if envelope else protocol.from_kserve_v2(data)]
            except protocol.RequestError as e:
                rows = [e]
            answers = self._answer(rows, context, v2=True)
            # The kservev2 envelope names each output after the input at the same index: name ours.
            context.input_names = ["error" if isinstance(answers[0], dict) else "image"]
            return answers
        return self._answer(data, context)

    def _answer(self, rows: list, context, v2: bool = False) -> list:
        """Check every request, run the good ones, answer each in order.

        Requests that share a resolved config and a content size (a TorchServe batch, batchSize > 1)
        run as one batched optimization, each image its own problem; the others run one by one.
        """
        start = time.perf_counter()
        answers: list = [None] * len(rows)
        jobs: dict[int, tuple[protocol.Job, bool]] = {}
        for idx, row in enumerate(rows):
            as_text = v2  # answer in JSON-safe form (base64 image, error object) for a KServe envelope
            try:
                if isinstance(row, protocol.RequestError):
                    raise row
                fields = row
                if not v2:
                    fields, as_text = protocol.request_fields(row)
                job = protocol.parse_request(fields, self.limits)
                hw = (job.content.height, job.content.width)
                protocol.admit_memory(lambda job=job, hw=hw: self.model.plan_config(
                    job.config, hw, style_sizes=[(s.height, s.width) for s in job.styles]))
                if self.cost is not None:
                    self.cost.admit(job.config, *hw)
                jobs[idx] = (job, as_text)
            except protocol.RequestError as e:
                logger.info("style_fusion: request %d refused (%d): %s", idx, e.status, e.message)
                answers[idx] = _error(context, idx, e.status, e.phrase, e.to_dict(), as_text)
            except Exception as e:  # noqa: BLE001 - one failing request must not take the worker or the batch down
                logger.exception("style_fusion: request %d failed", idx)
                answers[idx] = _internal_error(context, idx, e, as_text)
        groups: dict[tuple, list[int]] = {}
        for idx, (job, _) in jobs.items():
            groups.setdefault((job.config, job.content.size), []).append(idx)
        for idxs in groups.values():
            self._run_group(idxs, jobs, answers, context, start)
        return answers

    def _run_group(self, idxs: list[int], jobs: dict, answers: list, context, start: float) -> None:
        try:
            outs = self._run([jobs[i][0] for i in idxs])
        except Exception as e:  # noqa: BLE001 - one failing request must not take the worker or the batch down
            if len(idxs) > 1:  # a batch that fails (or runs out of memory) is retried request by request
                logger.warning("style_fusion: batch %s failed (%s: %s); running its requests one by one", idxs,
                               type(e).__name__, e)
                for i in idxs:
                    self._run_group([i], jobs, answers, context, start)
                return
            (i,) = idxs
            if isinstance(e, OutOfMemory):  # the planner said it fits; another process took the memory
                logger.exception("style_fusion: request %d ran out of memory", i)
                answers[i] = _error(context, i, 507, "Insufficient Storage",
                                    {"error": str(e), "field": "size", "allowed": None}, jobs[i][1])
            else:
                logger.exception("style_fusion: request %d failed", i)
                answers[i] = _internal_error(context, i, e, jobs[i][1])
            return
        for i, out in zip(idxs, outs):
            job, as_text = jobs[i]
            logger.info("style_fusion: request %d: content %dx%d -> %d px, %d steps, seed %d, batch of %d, "
                        "%.2f s", i, *job.content.size, job.config.size, job.config.steps, job.config.seed,
                        len(idxs), time.perf_counter() - start)
            if as_text:
                _set_content_type(context, i, "application/json")  # the envelope's JSON
                answers[i] = base64.b64encode(out).decode("ascii")
            else:
                _set_content_type(context, i, job.content_type)
                answers[i] = out

    def _run(self, jobs: list[protocol.Job]) -> list[bytes]:
        """Jobs with one config and one content size -> their encoded images (one optimization)."""
        cfg = jobs[0].config
        content = torch.cat([pil_to_tensor(job.content) for job in jobs])
        # one entry per style slot: a batch of one, or each request's own image (any size)
        styles = [pil_to_tensor(jobs[0].styles[k]) if len(jobs) == 1 else [pil_to_tensor(j.styles[k]) for j in jobs]
                  for k in range(len(jobs[0].styles))]
        out = self.model.transfer(content, styles, cfg)
        meta = self.model.metadata(cfg)
        return [encode(tensor_to_pil(out[i : i + 1]), job.format, meta) for i, job in enumerate(jobs)]


def _probe_image(size: int) -> torch.Tensor:
    """A smooth synthetic ``(1, 3, size, size)`` image for warm-up and calibration runs."""
    content = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(size))
    return torch.nn.functional.interpolate(content, size=(size, size), mode="bilinear").clamp(0, 1)


def _is_kserve_v2(data) -> bool:
    """TorchServe's kservev2 envelope hands over the inputs of one request: dicts with a datatype."""
    return (isinstance(data, list) and len(data) > 0
            and all(isinstance(d, dict) and "datatype" in d and "name" in d for d in data))


def _n_requests(context) -> int:
    processors = getattr(context, "request_processor", None)
    return len(processors) if processors else 0


def _set_content_type(context, idx: int, value: str) -> None:
    n = _n_requests(context)
    if n:
        context.set_response_content_type(idx if idx < n else 0, value)


def _internal_error(context, idx: int, e: Exception, as_object: bool) -> str | dict:
    return _error(context, idx, 500, "Internal Server Error",
                  {"error": f"internal error: {type(e).__name__}: {e}", "field": None, "allowed": None}, as_object)


def _error(context, idx: int, status: int, phrase: str, body: dict, as_object: bool) -> str | dict:
    """Set this request's status and return its JSON body (an object inside a KServe envelope's JSON).

    Under the KServe v1 envelope the answers are the instances of one request: the status goes to it.
    """
    n = _n_requests(context)
    if n:
        target = idx if idx < n else 0
        context.set_response_status(status, phrase, target)
        context.set_response_content_type(target, "application/json")
    return body if as_object else json.dumps(body, default=str)


def _guard_kserve_envelopes() -> None:
    """Make TorchServe's KServe envelopes pass a malformed body on to the handler as a 400.

    Their ``parse_input`` runs before the handler; left alone, a body without a proper ``inputs``/
    ``instances`` list raises there and TorchServe answers 503 "Prediction failed". Wrapped, the
    error reaches :meth:`StyleFusionHandler.handle` as a request error and gets a 400 with a JSON body.
    """
    for module_name, class_name in (("kserve", "KServeEnvelope"), ("kservev2", "KServev2Envelope")):
        try:
            cls = getattr(importlib.import_module(f"ts.torch_handler.request_envelope.{module_name}"), class_name)
        except (ImportError, AttributeError):
            continue
        if getattr(cls.parse_input, "nsf_guarded", False):
            continue

        def parse_input(self, data, _parse=cls.parse_input, _name=module_name):
            try:
                return _parse(self, data)
            except Exception as e:  # noqa: BLE001 - any malformed envelope is the client's error
                error = protocol.RequestError(f"malformed {_name} request: {type(e).__name__}: {e}", field="body",
                                              allowed="KServe v1 {instances: [...]} or v2 {inputs: [...]}")
                error.envelope = _name
                return [error]

        parse_input.nsf_guarded = True
        cls.parse_input = parse_input


_guard_kserve_envelopes()
