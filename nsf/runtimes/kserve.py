"""KServe's own Python model server as a runtime of ``style_fusion`` (``nsf serve --runtime kserve``).

``python -m nsf.runtimes.kserve --model-config deploy/model-config.yaml`` serves ``style_fusion`` with kserve's
``ModelServer`` (pinned: ``kserve==0.21.0``, the ``kserve`` extra) on 127.0.0.1:8080; ``nsf serve --runtime
kserve`` (:func:`launch`) runs that in a process group of its own, prints how to call it, says when it is ready
and starts it again when it dies after it was ready. Translation only:

* ``StyleFusionModel`` is a ``kserve.Model`` over the serving core's :class:`~nsf.serving.Worker` behind a
  :class:`~nsf.serving.Runner` (one run at a time off the event loop, 503 past the queue, one HTTP request's
  instances admitted together): v1 (``POST /v1/models/style_fusion:predict``, streamed with ``stream=true``) and
  v2 (``POST /v2/models/style_fusion/infer``) in the shapes of :mod:`nsf.serving.kserve_protocol`;
* :class:`ErrorShape`, an ASGI middleware on kserve's FastAPI app: nsf's ``{error, field, allowed}`` bodies for
  every error, the body size cap, and the client's disconnect (it sets the request's ``gone`` event, which stops
  the run: streamed or not, v1 or v2);
* kserve's REST server binds 0.0.0.0 with no option to change it: :class:`_ModelServer` sets its uvicorn
  config's host (a private attribute of kserve 0.21.0; ``tests/test_kserve_serve.py`` checks the bind)
  before it serves; gRPC is off. The server has no authentication of its own: loopback locally, the
  gateway's or mesh's authentication in a cluster.

The library never imports this module; importing it imports kserve (which reads ``sys.argv`` on import).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import kserve
import kserve.model_server
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve import InferOutput, InferRequest, InferResponse

from ..serving.errors import RequestError
from ..serving.kserve_protocol import (
    error_body,
    reshape_error,
    schema_error,
    v1_answer,
    v1_requests,
    v2_outputs,
    v2_request,
)
from ..serving.limits import ServingLimits
from ..serving.request import field_kinds, wants_stream
from ..serving.runner import QUEUE_SIZE, Runner, Unavailable
from ..serving.stream import PARTIAL_HEADER
from ..serving.worker import Outcome, Worker
from .common import (
    MODEL_CONFIG,
    MODEL_NAME,
    check_free,
    client_host,
    how_to_call,
    is_loopback,
    load_model_config,
    poll_ready,
    project_root,
    resolve_device,
    signal_group,
    start_group,
    stop_group,
)

logger = logging.getLogger(__name__)
DEFAULT_PORT = 8080
# QUEUE_SIZE: requests a worker process holds beyond the one it runs before it answers 503 (nsf.serving.runner;
# in a cluster Knative's queue proxy holds them instead).
QUEUE_ENV = "NSF_KSERVE_QUEUE_SIZE"
# Seconds kserve lets in-flight requests finish after SIGTERM/Ctrl-C before it cancels them.
GRACE_SECONDS = 30
JSON_TYPE = "application/json"
STOP_GRACE = 45.0  # seconds after SIGTERM before SIGKILL: kserve's own grace (30 s) and its shutdown
RESTART_PAUSE = 1.0
# The request's "client has gone" event, set by ErrorShape when the server sees the disconnect
_GONE: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("nsf_gone", default=None)


class ServingError(Exception):
    """An answer other than 200 from ``predict``: its status and ``{error, field, allowed}`` body
    (:class:`ErrorShape` writes the response; kserve's endpoints would answer any exception with a 500)."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        super().__init__(body.get("error"))
        self.status = status
        self.body = dict(body)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class StyleFusionModel(kserve.Model):  # kserve has no type hints: an Any base class
    """``style_fusion`` for kserve's model server: one :class:`~nsf.serving.Worker` per process."""

    def __init__(self, name: str, model_config: Mapping[str, Any], *, device: str = "cpu",
                 response_timeout: float | None = None, queue_size: int = QUEUE_SIZE) -> None:
        super().__init__(name, return_response_headers=True)  # X-NSF-Partial on a deadline's answer
        self.model_config = dict(model_config)
        self.device = device
        # Checked here, in the process that starts the server, before any worker process is spawned.
        self.limits = ServingLimits.from_model_config(self.model_config, _device_type(device))
        self.response_timeout = response_timeout
        self.queue_size = int(queue_size)
        self.worker: Worker | None = None
        self._runner: Runner | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def load(self) -> bool:
        """Build, warm up and calibrate the worker; ``ready`` once it can answer."""
        worker = Worker.start(self.model_config, device=self.device, response_timeout=self.response_timeout)
        self.worker, self._runner = worker, Runner(worker, queue_size=self.queue_size, name=self.name)
        self.ready = worker.ready
        return bool(self.ready)

    def __getstate__(self) -> dict[str, Any]:
        """kserve's ``--workers N`` pickles the model into N spawned processes: each builds its own worker."""
        state = dict(self.__dict__)
        state.update(worker=None, _runner=None, ready=False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """In a spawned worker process: shape the app's errors; load once the app starts, in the background.

        kserve's parent process pings each worker process every 0.5 s and replaces one that does not answer
        within 5 s (its answering thread starts after the unpickling), so the load (seconds to minutes) must
        not hold up the unpickling nor compete with it; until the load is done the model is not ready (503,
        and ``GET /v1/models/style_fusion`` says so).
        """
        self.__dict__.update(state)
        log_to_stderr()
        install_error_shape(kserve.model_server.app, self)
        kserve.model_server.app.add_middleware(_OnStartup, start=self._load_in_background)

    def _load_in_background(self) -> None:
        def load() -> None:
            try:
                self.load()
            except Exception:  # noqa: BLE001 - logged; the process stays up and answers 503 (not ready)
                logger.exception("style_fusion: loading the model failed in worker process %d", os.getpid())

        threading.Thread(target=load, name="nsf-load", daemon=True).start()

    # -- requests -------------------------------------------------------------------------

    def validate(self, payload: Any) -> Any:
        """Leave every check to :meth:`predict` (kserve's own answers a bad v1 body with its 400 shape)."""
        return payload

    async def predict(self, payload: Any, headers: Mapping[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        """A v1 body (dict, or bytes for a non-JSON content type) or a v2 :class:`kserve.InferRequest`.

        Raises:
            ServingError: the answer is not a 200 (its status and ``{error, field, allowed}``).
        """
        if isinstance(payload, InferRequest):
            return await self._predict_v2(payload, response_headers)
        return await self._predict_v1(payload, response_headers)

    async def _predict_v1(self, payload: Any, response_headers: dict[str, str] | None) -> Any:
        try:
            requests = v1_requests(payload)
        except RequestError as e:
            raise ServingError(e.status, e.to_dict()) from None
        if len(requests) == 1 and not isinstance(requests[0], RequestError) and wants_stream(requests[0]):
            return await self._stream(requests[0])
        # several instances share one answer: streaming one of them is a 400 naming the field
        outcomes = await self.answer(requests, streams=False)
        _mark_partial(outcomes, response_headers)
        status, body = v1_answer(outcomes)
        if status != 200:
            raise ServingError(status, body)
        return body

    async def _stream(self, fields: Mapping[str, Any]) -> AsyncIterator[bytes]:
        """``stream=true`` on v1: kserve sends an async iterator from ``predict`` chunk by chunk (no content type).

        The answer starts with the first preview; a request refused or failed before it gets its ordinary
        error status. When the client disconnects, Starlette cancels the response and the worker's ``gone``
        event stops the run before its next step.
        """
        slot = contextlib.ExitStack()
        worker, runner = slot.enter_context(self._slot())
        loop = asyncio.get_running_loop()
        messages: asyncio.Queue[bytes | None] = asyncio.Queue()
        gone = threading.Event()

        def progress(_idx: int, message: bytes) -> None:  # on the runner thread
            loop.call_soon_threadsafe(messages.put_nowait, message)

        done = asyncio.wrap_future(runner.call(worker.answer, [fields], progress=progress, gone=[gone]))
        done.add_done_callback(lambda _: messages.put_nowait(None))  # after the last preview (FIFO)
        try:
            first = await messages.get()
            if first is None:  # nothing sent yet: refused or failed before its first preview
                (outcome,) = await done
                if not outcome.ok:
                    raise ServingError(outcome.status, error_body(outcome))
        except BaseException:
            gone.set()
            slot.close()
            raise

        async def stream() -> AsyncIterator[bytes]:
            try:
                message = first
                while message is not None:
                    yield message
                    message = await messages.get()
                (outcome,) = await done
                if isinstance(outcome.body, bytes):
                    yield outcome.body  # the result (or error) line
            finally:
                gone.set()  # the client went away (cancelled here) or the stream ended: stop either way
                slot.close()

        return stream()

    async def _predict_v2(self, request: InferRequest, response_headers: dict[str, str] | None) -> InferResponse:
        try:
            inputs = [{"name": i.name, "datatype": i.datatype, "shape": i.shape, "data": _input_data(i)}
                      for i in request.inputs]
        except Exception as e:  # noqa: BLE001 - a tensor kserve cannot turn into values is the client's error
            raise ServingError(400, {"error": f"unreadable KServe v2 input: {type(e).__name__}: {e}",
                                     "field": "inputs", "allowed": "JSON data, or BYTES with the binary "
                                                                   "extension"}) from None
        (outcome,) = await self.answer([v2_request(inputs)], streams=False)
        _mark_partial([outcome], response_headers)
        if not outcome.ok:
            raise ServingError(outcome.status, error_body(outcome))
        outputs = [InferOutput(name=o["name"], shape=o["shape"], datatype=o["datatype"], data=o["data"])
                   for o in v2_outputs(outcome)]
        return InferResponse(response_id=request.id or uuid.uuid4().hex, model_name=self.name,
                             infer_outputs=outputs)

    async def answer(self, requests: Sequence[Mapping[str, Any] | RequestError], **kw: Any) -> list[Outcome]:
        """Run ``Worker.answer`` (``kw``: its options) on this process's runner thread (one run at a time);
        503 when not ready or when ``queue_size`` requests already wait. The run stops when the client
        disconnects (the ``gone`` event :class:`ErrorShape` sets)."""
        gone = _GONE.get()
        if gone is not None:
            kw.setdefault("gone", [gone] * len(requests))
        with self._slot() as (worker, runner):
            return list(await asyncio.wrap_future(runner.submit(worker, requests, **kw)))

    @contextlib.contextmanager
    def _slot(self) -> Any:
        """This process's worker and runner, holding a place in its queue; 503 when not ready or full."""
        runner = self._runner
        try:
            if runner is None or not self.ready:
                raise Unavailable(f"{self.name} is not ready: the worker is loading")
            with runner.slot() as worker:
                yield worker, runner
        except Unavailable as e:
            raise ServingError(e.status, e.body) from None

    # -- metadata (GET /v2/models/style_fusion) ---------------------------------------------

    def get_input_types(self) -> list[dict[str, Any]]:
        kinds = {"integer": "INT64", "number": "FP32", "boolean": "BOOL", "numbers": "FP32"}
        return [{"name": name, "datatype": kinds.get(kind, "BYTES"), "shape": [-1] if kind == "numbers" else [1]}
                for name, kind in field_kinds(self.limits).items()]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [{"name": "image", "datatype": "BYTES", "shape": [1]}]


def _mark_partial(outcomes: Sequence[Outcome], response_headers: dict[str, str] | None) -> None:
    """``X-NSF-Partial: true`` when a deadline cut a run short (the PNG's metadata says where)."""
    if response_headers is not None and any(o.partial for o in outcomes):
        response_headers[PARTIAL_HEADER] = "true"


def _input_data(infer_input: Any) -> Any:
    """A v2 input's values: the JSON list, or the decoded tensor of the binary extension."""
    data = infer_input.data
    if isinstance(data, list):
        return data
    array = infer_input.as_numpy()
    return [bytes(v) for v in array.ravel()] if array.dtype == object else array.ravel().tolist()


def _device_type(device: str) -> str:
    return device.split(":", 1)[0]


# ---------------------------------------------------------------------------------------------
# Errors and request size, as an ASGI middleware on kserve's app
# ---------------------------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


class ErrorShape:
    """ASGI middleware: nsf's error bodies for every error the server answers, and the request size cap.

    * a :class:`ServingError` from ``predict`` becomes its status and JSON body;
    * an error response kserve or FastAPI wrote (status >= 400 without nsf's ``field`` key) is reshaped by
      :func:`~nsf.serving.kserve_protocol.reshape_error`;
    * any other exception is a 500 ``{error, field: null, allowed: null}`` (and logged);
    * the client's disconnect, read once the body is in, sets the request's ``gone`` event (:data:`_GONE`): the
      worker stops its run before the next step, streamed or not;
    * a body over ``max_body`` bytes (by its Content-Length, or counted as it arrives) is a 413 before the
      server holds it (uvicorn and kserve set no limit of their own).
    """

    def __init__(self, app: Callable[..., Any], *, model: str, max_body: int) -> None:
        self.app = app
        self.model = model
        self.max_body = max_body
        self.endpoints = [f"POST /v1/models/{model}:predict", f"POST /v2/models/{model}/infer",
                          f"GET /v1/models/{model}", f"GET /v2/models/{model}/ready"]

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        too_large = {"error": f"the request body is over {self.max_body} bytes", "field": "body",
                     "allowed": f"at most {self.max_body} bytes"}
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            await _send_json(send, 413, too_large)
            return
        received = 0
        started = False
        held: dict[str, Any] | None = None  # an error response being rewritten
        chunks: list[bytes] = []
        gone = threading.Event()
        after_body: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        watcher: asyncio.Task[None] | None = None

        async def watch() -> None:
            """Once the body is in, the next message the server has for this request is the client's disconnect:
            set ``gone`` (the run stops) and hand the message on to whoever asks next."""
            while True:
                message = await receive()
                if message.get("type") == "http.disconnect":
                    gone.set()
                await after_body.put(message)
                if message.get("type") == "http.disconnect":
                    return

        async def counting_receive() -> Any:
            nonlocal received, watcher
            if watcher is not None:
                return await after_body.get()
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge
                if not message.get("more_body", False):
                    watcher = asyncio.create_task(watch())
            elif message.get("type") == "http.disconnect":
                gone.set()
            return message

        async def reshaping_send(message: dict[str, Any]) -> None:
            nonlocal started, held
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                status, body = reshape_error(held["status"], b"".join(chunks), model=self.model,
                                             endpoints=self.endpoints)
                await _send_json(send, status, body)
                return
            await send(message)

        token = _GONE.set(gone)
        try:
            await self.app(scope, counting_receive, reshaping_send)
        except ServingError as e:
            if started:
                raise
            await _send_json(send, e.status, e.body)
        except _BodyTooLarge:
            if started:
                raise
            await _send_json(send, 413, too_large)
        except Exception as e:  # noqa: BLE001 - any other failure is this request's 500, in nsf's shape
            logger.exception("style_fusion: request failed")
            if started:
                raise
            await _send_json(send, 500, {"error": f"internal error: {type(e).__name__}: {e}", "field": None,
                                         "allowed": None})
        finally:
            _GONE.reset(token)
            if watcher is not None:
                watcher.cancel()


class _OnStartup:
    """ASGI middleware calling ``start()`` when the server starts the app (its lifespan startup)."""

    def __init__(self, app: Callable[..., Any], *, start: Callable[[], None]) -> None:
        self.app = app
        self.start = start

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope.get("type") != "lifespan":
            await self.app(scope, receive, send)
            return

        async def starting_receive() -> Any:
            message = await receive()
            if message.get("type") == "lifespan.startup":
                self.start()
            return message

        await self.app(scope, starting_receive, send)


async def _send_json(send: Callable[..., Any], status: int, body: Mapping[str, Any]) -> None:
    data = json.dumps(body, default=str).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", JSON_TYPE.encode()), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def max_body_bytes(limits: ServingLimits) -> int:
    """The largest request body: the fields' limit as base64 (4/3) plus 1 MiB for JSON and the options."""
    return math.ceil(limits.max_request_bytes * 4 / 3) + 2**20


def install_error_shape(app: Any, model: StyleFusionModel) -> None:
    """Add :class:`ErrorShape` to kserve's FastAPI app, and answer a v2 body that fails its schema with nsf's
    400 (once; before the app serves its first request)."""
    if not any(getattr(m, "cls", None) is ErrorShape for m in app.user_middleware):
        app.add_middleware(ErrorShape, model=model.name, max_body=max_body_bytes(model.limits))
        # FastAPI's own handler answers 422 and echoes the input back, which fails to serialize when the
        # body held NaN (a 500): this one names the field and echoes nothing.
        app.add_exception_handler(RequestValidationError, _schema_error_response)


async def _schema_error_response(_request: Any, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(schema_error(exc.errors()), status_code=400)


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


class _ModelServer(kserve.ModelServer):  # kserve has no type hints: an Any base class
    """kserve's ModelServer on ``host`` instead of its hard-coded 0.0.0.0.

    ``start()`` builds its REST server (one process, or a parent handing a bound socket to ``workers``
    spawned processes), then calls ``setup_event_loop()`` before anything binds or serves: the host of
    the uvicorn config is set there. ``_rest_server``, ``_rest_multiprocess_server`` and ``config`` are
    kserve 0.21.0's internals (the version is pinned; the bind is tested).
    """

    def __init__(self, *, host: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.host = host

    def setup_event_loop(self) -> None:
        multi = getattr(self, "_rest_multiprocess_server", None)
        for rest in (getattr(self, "_rest_server", None), getattr(multi, "_rest_server", None)):
            if rest is not None:
                rest.config.host = self.host
        super().setup_event_loop()


def serve(model_config: Mapping[str, Any], *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, workers: int = 1,
          device: str | None = None, response_timeout: float | None = None, queue_size: int = QUEUE_SIZE) -> None:
    """Serve ``style_fusion`` in the foreground until SIGINT/SIGTERM.

    ``workers`` > 1: kserve's parent process binds the port and spawns that many processes, each with its
    own model (loaded in the background; each answers 503 until its warm-up is done) and restarts one
    that dies. With one worker the model loads before the port opens.
    """
    if workers < 1:
        raise ValueError(f"workers={workers}; allowed: >= 1")
    model = StyleFusionModel(MODEL_NAME, model_config, device=resolve_device(device),
                             response_timeout=response_timeout, queue_size=queue_size)
    if workers == 1:
        install_error_shape(kserve.model_server.app, model)
        model.load()
    else:
        # The parent only hands the model to its worker processes (pickled: each loads its own worker);
        # kserve registers a model only when it is ready.
        model.ready = True
    logger.info("style_fusion: KServe model server on http://%s:%d, %d worker process(es)", host, port, workers)
    server = _ModelServer(host=host, http_port=port, workers=workers, enable_grpc=False, enable_docs_url=False,
                          grace_period=GRACE_SECONDS)
    server.start([model])


def log_to_stderr() -> None:
    """The serving core's log lines (calibration, each request) on stderr, beside kserve's."""
    nsf_logger = logging.getLogger("nsf")
    if not any(getattr(h, "nsf_kserve", False) for h in nsf_logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)s %(name)s %(levelname)s %(message)s"))
        handler.nsf_kserve = True  # type: ignore[attr-defined]
        nsf_logger.addHandler(handler)
        nsf_logger.setLevel(logging.INFO)
        nsf_logger.propagate = False


def build_parser() -> argparse.ArgumentParser:
    # Names chosen not to collide with the flags kserve.model_server parses from sys.argv at import.
    p = argparse.ArgumentParser(prog="python -m nsf.runtimes.kserve",
                                description="Serve style_fusion with KServe's model server (v1 and v2 REST).")
    p.add_argument("--model-config", required=True, help="model-config.yaml (its nsf section holds the limits)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; the server has no "
                                                        "authentication of its own)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default: {DEFAULT_PORT})")
    p.add_argument("--workers", type=int, default=1, help="worker processes, each with its own model (default: 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: the first GPU, else cpu)")
    p.add_argument("--response-timeout", type=float, default=None,
                   help="seconds a request may take (time admission refuses what would outrun "
                        "time_budget of it; default: the config's responseTimeout)")
    p.add_argument("--queue-size", type=int, default=int(os.environ.get(QUEUE_ENV, QUEUE_SIZE)),
                   help=f"requests a worker process holds beyond the one it runs before answering 503 (default: "
                        f"${QUEUE_ENV}, else {QUEUE_SIZE})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = load_model_config(args.model_config)
    log_to_stderr()
    serve(config, host=args.host, port=args.port, workers=args.workers, device=args.device,
          response_timeout=args.response_timeout, queue_size=args.queue_size)
    return 0


# ---------------------------------------------------------------------------------------------
# The launcher: `nsf serve --runtime kserve` (nsf/runtimes/__init__.py's table points here)
# ---------------------------------------------------------------------------------------------


def launch(*, host: str = "127.0.0.1", port: int = DEFAULT_PORT, workers: int = 1,
           model_config: str | os.PathLike[str] | None = None, device: str | None = None,
           root: str | os.PathLike[str] | None = None) -> int:
    """Run the KServe server in the foreground until Ctrl-C (or SIGTERM); 0 when stopped that way, else its exit
    code. Ctrl-C reaches this process only (the server runs in a session of its own), which then stops the server
    and its worker processes (SIGTERM, kserve's grace period, SIGKILL for what is left); the server is started
    again when it dies after it was ready (with ``workers`` > 1 kserve's parent restarts a worker process)."""
    if workers < 1:
        raise ValueError(f"--workers {workers}; allowed: 1 or more")
    config = Path(model_config) if model_config is not None else project_root(root) / MODEL_CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: pass --model-config PATH (deploy/model-config.yaml)")
    check_free(host, port)
    cmd = [sys.executable, "-m", "nsf.runtimes.kserve", "--model-config", str(config.resolve()),
           "--host", host, "--port", str(port), "--workers", str(workers)]
    if device is not None:
        cmd += ["--device", device]
    url = f"http://{client_host(host)}:{port}"
    print(f"nsf serve: {' '.join(cmd)}", flush=True)
    print(_how_to_call(url, host), flush=True)
    state: dict[str, Any] = {"signal": None, "proc": None}

    def stop(signum: int, _frame: Any) -> None:
        first = state["signal"] is None
        state["signal"] = signum
        proc = state["proc"]
        if proc is not None:  # a second Ctrl-C does not wait for the grace period
            signal_group(proc.pid, signal.SIGTERM if first else signal.SIGKILL)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            proc = start_group(cmd)
            state["proc"] = proc
            ready = threading.Event()
            threading.Thread(target=_report_ready, args=(url, proc, ready), daemon=True).start()
            code = proc.wait()
            stop_group(proc, STOP_GRACE, settle=5.0)
            if state["signal"] is not None:
                return 0
            if not ready.is_set():
                print(f"nsf serve: the KServe server exited with {code} before it was ready", flush=True)
                return code or 1
            print(f"nsf serve: the KServe server exited with {code} after it was ready; starting it again",
                  flush=True)
            time.sleep(RESTART_PAUSE)
            if state["signal"] is not None:
                return 0
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        proc = state["proc"]
        if proc is not None:
            stop_group(proc, STOP_GRACE, settle=5.0)


def _how_to_call(url: str, host: str) -> str:
    exposed = "" if is_loopback(host) else (
        f"\n  WARNING: bound to {host}: the KServe server has no authentication of its own; anyone who reaches "
        "this port can use it. Put an authenticating proxy or gateway in front (docs, serving).\n")
    body = ("python -c \"import base64, json; b = lambda p: base64.b64encode(open(p, 'rb').read()).decode(); "
            "print(json.dumps({'instances': [{'content': b('nsf/assets/astronaut.jpg'), "
            "'style': b('nsf/assets/starry_night.jpg'), 'size': 256, 'steps': 100, 'seed': 0}]}))\" > v1.json")
    example = f"""  {body}
  curl -s -H "Content-Type: application/json" {url}/v1/models/{MODEL_NAME}:predict --data-binary @v1.json \\
    | python -c "import base64, json, sys; open('out.png', 'wb').write(base64.b64decode(json.load(sys.stdin)\\
['predictions'][0]))\""""
    return how_to_call("KServe's model server", {
        "KServe v1": f"{url}/v1/models/{MODEL_NAME}:predict   (readiness: GET {url}/v1/models/{MODEL_NAME})",
        "KServe v2": f"{url}/v2/models/{MODEL_NAME}/infer"}, example, exposed)


def wait_ready(url: str, *, timeout: float = 900.0, proc: subprocess.Popen[Any] | None = None) -> float:
    """Wait until ``GET /v1/models/style_fusion`` says ready (after the warm-up); return the seconds waited."""

    def probe() -> tuple[bool, str]:
        with urllib.request.urlopen(f"{url}/v1/models/{MODEL_NAME}", timeout=5) as r:
            last = r.read().decode()
        return json.loads(last).get("ready") is True, last

    # every 1 s: kserve logs each not-ready answer with its traceback
    return poll_ready(probe, url=url, timeout=timeout, proc=proc, interval=1.0)


def _report_ready(url: str, proc: subprocess.Popen[Any], ready: threading.Event) -> None:
    try:
        seconds = wait_ready(url, proc=proc)
    except (RuntimeError, TimeoutError) as e:
        if proc.poll() is None:
            print(f"nsf serve: {e}; see the server's log above", flush=True)
        return
    ready.set()
    print(f"nsf serve: {MODEL_NAME} is ready on {url} ({seconds:.0f} s after the server started)", flush=True)


def serve_main(args: argparse.Namespace) -> int:
    """``nsf serve --runtime kserve``."""
    if getattr(args, "workdir", None) is not None:
        raise ValueError("--workdir is TorchServe's; the KServe server keeps no files (its log is this output)")
    return launch(host=args.host or "127.0.0.1", port=DEFAULT_PORT if args.port is None else args.port,
                  workers=1 if args.workers is None else args.workers, model_config=args.model_config,
                  device=args.device, root=args.root)


if __name__ == "__main__":
    sys.exit(main())
