"""The KServe runtime's adapter without a server: KServe v1/v2 shapes to request fields and back
(nsf.serving.kserve_protocol, pure), the error shapes kserve 0.21 and FastAPI write (captured from a
running kserve 0.21.0), the ASGI middleware driven by hand, and the kserve.Model over a real worker
called in-process (no HTTP)."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
import yaml
from PIL import Image
from serving import CONTENT, REPO, STYLE, STYLE2, b64
from serving_requests import mask_png

from nsf.serving import Outcome, RequestError
from nsf.serving.kserve_protocol import (
    MAX_INSTANCES,
    reshape_error,
    schema_error,
    v1_answer,
    v1_requests,
    v2_outputs,
    v2_request,
)

try:
    from nsf.runtimes import kserve as kserve_runtime
except ImportError:  # the pure tests above the middleware's run without the 'kserve' extra
    kserve_runtime = None
needs_kserve = pytest.mark.skipif(kserve_runtime is None, reason="the 'kserve' extra is not installed")

MODEL = "style_fusion"
ENDPOINTS = [f"POST /v1/models/{MODEL}:predict", f"POST /v2/models/{MODEL}/infer"]
PNG = b"\x89PNG\r\n\x1a\nfake"


def _refused(status: int = 400, field: str = "size") -> Outcome:
    return Outcome(status, {"error": f"bad {field}", "field": field, "allowed": {"max": 1}}, "application/json")


# --- v1 ------------------------------------------------------------------------------------------


def test_v1_instances_become_requests():
    good = {"content": "AAAA", "style": "BBBB", "size": 64}
    assert v1_requests({"instances": [good, {**good, "size": 32}]}) == [good, {**good, "size": 32}]
    (bad,) = v1_requests({"instances": [[1, 2]]})
    assert isinstance(bad, RequestError) and bad.field == "instances"


@pytest.mark.parametrize("payload, status, field", [
    (b"raw bytes (a non-JSON content type)", 400, "body"),
    ("a JSON string", 400, "body"),
    ([{"content": "AAAA"}], 400, "body"),
    ({"inputs": []}, 400, "inputs"),
    ({"instances": [{}], "stream": True}, 400, "stream"),
    ({}, 400, "instances"),
    ({"instances": []}, 400, "instances"),
    ({"instances": {"content": "AAAA"}}, 400, "instances"),
    ({"instances": [{}] * (MAX_INSTANCES + 1)}, 413, "instances"),
])
def test_v1_bodies_that_are_not_requests(payload, status, field):
    with pytest.raises(RequestError) as e:
        v1_requests(payload)
    assert (e.value.status, e.value.field) == (status, field) and e.value.allowed


def test_v1_answer():
    assert v1_answer([Outcome.image(PNG, "image/png")]) == (200, {"predictions": [b64(PNG)]})
    status, body = v1_answer([_refused(413, "content")])
    assert status == 413 and body == {"error": "bad content", "field": "content", "allowed": {"max": 1}}
    status, body = v1_answer([Outcome.image(PNG, "image/png"), _refused(422, "steps"), _refused(400, "size")])
    assert status == 422 and body["field"] == "steps"  # the first failure, at the top level
    assert body["predictions"][0] == b64(PNG) and body["predictions"][2]["field"] == "size"


# --- v2 ------------------------------------------------------------------------------------------


def test_v2_inputs_become_fields():
    inputs = [{"name": "content", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]},
              {"name": "size", "datatype": "INT64", "shape": [1], "data": [64]},
              {"name": "style_weights", "datatype": "FP32", "shape": [1], "data": [1.0]}]
    assert v2_request(inputs) == {"content": "AAAA", "size": 64, "style_weights": [1.0]}
    dup = v2_request(inputs + [{"name": "size", "datatype": "INT64", "shape": [1], "data": [32]}])
    assert isinstance(dup, RequestError) and dup.field == "size"
    nameless = v2_request([{"datatype": "BYTES", "shape": [1], "data": ["AAAA"]}])
    assert isinstance(nameless, RequestError) and nameless.field == "inputs"


def test_v2_outputs():
    assert v2_outputs(Outcome.image(PNG, "image/png")) == [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(PNG)]}]
    with pytest.raises(ValueError):
        v2_outputs(_refused())


# --- kserve's and FastAPI's own error bodies (as kserve 0.21.0 writes them) -----------------------


@pytest.mark.parametrize("status, body, want_status, want_field", [
    (400, b'{"error":"Unrecognized request format: unexpected end of data: line 1 column 14 (char 13)"}', 400,
     "body"),
    (400, b'{"error":"received byte inputs, but the\'inference-header-content-length\' header is missing."}', 400,
     "body"),
    (404, b'{"error":"Model with name zz does not exist."}', 404, "model"),
    (404, b'{"detail":"Not Found"}', 404, "path"),
    (405, b'{"detail":"Method Not Allowed"}', 405, "path"),
    (503, b'{"error":"Model with name style_fusion is not ready."}', 503, None),
    (500, b'{"error":"ValueError : boom"}', 500, None),
    (500, b"Internal Server Error", 500, None),
    (422, b'{"detail":[{"type":"list_type","loc":["body","InferenceRequest","inputs"],"msg":"Input should be a valid '
          b'list","input":"x"},{"type":"bytes_type","loc":["body","bytes"],"msg":"Input should be a valid bytes",'
          b'"input":{"inputs":"x"}}]}', 400, "inputs"),
    (422, b'{"detail":[{"type":"json_invalid","loc":["body",5],"msg":"JSON decode error","input":{},'
          b'"ctx":{"error":"Expecting value"}}]}', 400, "body"),
])
def test_kserve_error_bodies_get_nsfs_shape(status, body, want_status, want_field):
    got_status, got = reshape_error(status, body, model=MODEL, endpoints=ENDPOINTS)
    assert got_status == want_status and set(got) == {"error", "field", "allowed"} and got["field"] == want_field
    assert got["error"]
    if want_field == "model":
        assert got["allowed"] == [MODEL]
    if want_field == "path":
        assert got["allowed"] == ENDPOINTS


def test_nsfs_own_error_bodies_pass_unchanged():
    ours = {"error": "unknown preset 'x'", "field": "preset", "allowed": ["default"]}
    assert reshape_error(400, json.dumps(ours).encode(), model=MODEL, endpoints=ENDPOINTS) == (400, ours)


def test_schema_errors_name_the_first_field_and_echo_no_input():
    body = schema_error([{"type": "missing", "loc": ("body", "InferenceRequest", "inputs", 0, "name"),
                          "msg": "Field required", "input": {"secret": "x" * 100}}])
    assert body["field"] == "inputs" and "inputs.0.name: Field required" in body["error"]
    assert "secret" not in json.dumps(body)


# --- the ASGI middleware, driven by hand ---------------------------------------------------------


def _call(app, body: bytes = b"{}", headers: list | None = None, chunks: int = 1) -> tuple[int, dict, bytes]:
    """One HTTP request through an ASGI app: (status, headers, body)."""
    sent: list[dict] = []
    parts = [body[i::chunks] for i in range(chunks)] if chunks > 1 else [body]
    queue = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/models/style_fusion:predict",
             "headers": headers if headers is not None else [(b"content-length", str(len(body)).encode())]}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), data


def _app(status: int = 200, body: bytes = b'{"predictions": []}', raise_: Exception | None = None):
    calls = []

    async def app(scope, receive, send):
        calls.append(scope)
        while (await receive()).get("more_body"):
            pass
        if raise_ is not None:
            raise raise_
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"x")]})
        await send({"type": "http.response.body", "body": body})

    return app, calls


def _shape(app, max_body: int = 1000):
    return kserve_runtime.ErrorShape(app, model=MODEL, max_body=max_body)


@needs_kserve
def test_middleware_passes_answers_through():
    app, _ = _app()
    assert _call(_shape(app)) == (200, {b"content-type": b"x"}, b'{"predictions": []}')


@needs_kserve
def test_middleware_answers_a_serving_error():
    app, _ = _app(raise_=kserve_runtime.ServingError(422, {"error": "slow", "field": "steps", "allowed": {"max": 3}}))
    status, headers, body = _call(_shape(app))
    assert status == 422 and headers[b"content-type"] == b"application/json"
    assert json.loads(body) == {"error": "slow", "field": "steps", "allowed": {"max": 3}}


@needs_kserve
def test_middleware_reshapes_kserves_errors_and_catches_the_rest():
    app, _ = _app(400, b'{"error":"Unrecognized request format: x"}')
    status, _, body = _call(_shape(app))
    assert status == 400 and json.loads(body)["field"] == "body"
    app, _ = _app(raise_=RuntimeError("boom"))
    status, _, body = _call(_shape(app))
    assert status == 500 and json.loads(body) == {"error": "internal error: RuntimeError: boom", "field": None,
                                                  "allowed": None}


@needs_kserve
def test_middleware_refuses_a_body_over_the_cap_before_reading_it():
    app, calls = _app()
    status, _, body = _call(_shape(app), b"x" * 10, headers=[(b"content-length", b"5000")])
    assert status == 413 and json.loads(body)["field"] == "body" and calls == []  # the app never saw it
    app, calls = _app()  # no length given (chunked): counted as it arrives
    status, _, body = _call(_shape(app), b"x" * 3000, headers=[], chunks=3)
    assert status == 413 and json.loads(body)["field"] == "body"


@needs_kserve
def test_max_body_fits_the_fields_limit_as_base64():
    cfg = yaml.safe_load((REPO / "deploy" / "model-config.yaml").read_text())
    from nsf.serving import ServingLimits

    limits = ServingLimits.from_model_config(cfg, "cpu")
    assert kserve_runtime.max_body_bytes(limits) > limits.max_request_bytes * 4 / 3


# --- the kserve.Model over a real worker, in-process ------------------------------------------------


@pytest.fixture(scope="module")
def loaded():
    cfg = yaml.safe_load((REPO / "deploy" / "model-config.yaml").read_text())
    cfg["responseTimeout"] = 30
    cfg["nsf"]["devices"]["cpu"]["calibrate"] = [64, 3]
    model = kserve_runtime.StyleFusionModel(MODEL, cfg, device="cpu", queue_size=1)
    assert model.ready is False
    with pytest.raises(kserve_runtime.ServingError) as e:  # not loaded yet: 503
        asyncio.run(model.predict({"instances": [{}]}))
    assert e.value.status == 503
    assert model.load() is True and model.ready
    return model


@needs_kserve
def test_predict_v1_and_v2_give_the_same_image(loaded):
    from kserve import InferInput, InferRequest

    fields = {"content": b64(CONTENT), "style": b64(STYLE), "size": 64, "steps": 2, "seed": 3}
    v1 = asyncio.run(loaded.predict({"instances": [fields]}))
    inputs = [InferInput(name=k, shape=[1], datatype="BYTES" if isinstance(v, str) else "INT64", data=[v])
              for k, v in fields.items()]
    v2 = asyncio.run(loaded.predict(InferRequest(model_name=MODEL, infer_inputs=inputs, request_id="r9")))
    assert v2.id == "r9" and v2.outputs[0].name == "image"
    assert v1["predictions"][0] == v2.outputs[0].data[0]
    assert Image.open(io.BytesIO(base64.b64decode(v1["predictions"][0]))).size == (64, 48)


@needs_kserve
def test_predict_raises_the_answer_of_a_bad_request(loaded):
    with pytest.raises(kserve_runtime.ServingError) as e:
        asyncio.run(loaded.predict({"instances": [{"content": b64(CONTENT), "style": b64(STYLE), "size": 99999}]}))
    assert e.value.status == 400 and e.value.body["field"] == "size"
    with pytest.raises(kserve_runtime.ServingError) as e:
        asyncio.run(loaded.predict(b"not json"))
    assert e.value.status == 400 and e.value.body["field"] == "body"


@needs_kserve
def test_masks_as_v1_instance_fields_and_v2_inputs(loaded):
    """mask, mask_2 and style_mask_2 as base64 fields of a v1 instance and as v2 BYTES inputs: the same image;
    a v1 instance lacking mask_2 is a 400 naming it; the v2 metadata lists the mask inputs."""
    from kserve import InferInput, InferRequest

    fields = {"content": b64(CONTENT), "style": b64(STYLE), "style_2": b64(STYLE2),
              "mask": b64(mask_png(96, 72, 255, 0)), "mask_2": b64(mask_png(96, 72, 0, 255)),
              "style_mask_2": b64(mask_png(48, 48, 255, 0)), "size": 64, "steps": 2, "seed": 3}
    v1 = asyncio.run(loaded.predict({"instances": [fields]}))
    inputs = [InferInput(name=k, shape=[1], datatype="BYTES" if isinstance(v, str) else "INT64", data=[v])
              for k, v in fields.items()]
    v2 = asyncio.run(loaded.predict(InferRequest(model_name=MODEL, infer_inputs=inputs)))
    assert v1["predictions"][0] == v2.outputs[0].data[0]
    assert Image.open(io.BytesIO(base64.b64decode(v1["predictions"][0]))).size == (64, 48)
    with pytest.raises(kserve_runtime.ServingError) as e:
        asyncio.run(loaded.predict({"instances": [{k: v for k, v in fields.items() if k != "mask_2"}]}))
    assert e.value.status == 400 and e.value.body["field"] == "mask_2"
    types = {t["name"]: t["datatype"] for t in loaded.get_input_types()}
    assert types["mask"] == types["mask_4"] == types["style_mask_4"] == "BYTES"


@needs_kserve
def test_a_full_queue_is_a_503(loaded):
    loaded._runner.pending = loaded.queue_size + 1
    try:
        with pytest.raises(kserve_runtime.ServingError) as e:
            asyncio.run(loaded.predict({"instances": [{}]}))
        assert e.value.status == 503 and e.value.body["allowed"] == {"queue": 1}
    finally:
        loaded._runner.pending = 0


@needs_kserve
def test_the_pickled_model_carries_no_worker(loaded):
    state = loaded.__getstate__()
    assert state["worker"] is None and state["_runner"] is None and state["ready"] is False
    assert state["model_config"] == loaded.model_config


# --- the edges: what imports kserve, the CLI's checks ------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["serve", "--workers", "2"], "--workers is for --runtime kserve"),
    (["serve", "--host", "0.0.0.0"], "--host is for --runtime kserve"),
    (["serve", "--runtime", "kserve", "--workdir", "w"], "--workdir is TorchServe's"),
    (["serve", "--runtime", "kserve", "--model-config", "/nonexistent/model-config.yaml"], "does not exist"),
    (["serve", "--runtime", "kserve", "--workers", "0"], "allowed: 1 or more"),
])
def test_nsf_serve_refuses_options_of_the_other_runtime(argv, message, capsys):
    from nsf.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err
