"""The TorchServe handler under TorchServe's MockContext: the adapter between TorchServe and the serving core.

Covers: initialize (the context's model dir, weights and GPU id), multipart-like and JSON inputs, every
kind of bad request (4xx with a JSON body naming the field; the handler keeps serving), batches answered
in order, each outcome's status, phrase and content type on the context, the KServe v1/v2 envelopes (with
TorchServe's own envelope classes, guarded from ``initialize``), and a fuzz of hostile rows through the
whole handler. The serving logic itself is tested without TorchServe in ``tests/test_serving_*.py``.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from PIL import Image
from serving_requests import (
    BAD,
    CONTENT,
    GOOD,
    GOOD_JPEG,
    LEFT,
    MODEL_CONFIG,
    OVERFLOWS,
    STYLE,
    STYLE2,
    b64,
    hostile_rows,
    json_body,
    mask_png,
    multipart,
    noise_png,
    tight_model_config,
)

from nsf.config import PRESETS
from nsf.image import read_metadata
from nsf.serving import Outcome
from nsf.weights import CAFFE_FILENAME, VGG19Weights, WeightsError, caffe_weights_path

pytest.importorskip("ts", reason="TorchServe (the 'serve' extra) is not installed")
from ts.context import Context, RequestProcessor  # noqa: E402
from ts.torch_handler.request_envelope.kserve import KServeEnvelope  # noqa: E402
from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope  # noqa: E402
from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAFFE_SHA = VGG19Weights.CAFFE.value.sha256


def load_handler_module(path: Path = REPO / "handlers" / "style_fusion_handler.py"):
    spec = importlib.util.spec_from_file_location("style_fusion_handler", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("style_fusion_handler", module)
    spec.loader.exec_module(module)
    return module


class Ctx(MockContext):
    """MockContext plus the per-request parts of ts.context.Context the handler uses."""

    set_response_status = Context.set_response_status
    get_response_status = Context.get_response_status
    set_response_content_type = Context.set_response_content_type
    get_response_content_type = Context.get_response_content_type
    set_response_header = Context.set_response_header
    get_response_headers = Context.get_response_headers
    get_request_id = Context.get_request_id

    def batch(self, n: int) -> Ctx:
        self.request_processor = [RequestProcessor({}) for _ in range(n)]
        self.request_ids = {i: f"request-{i}" for i in range(n)}
        return self

    @property
    def request_processor(self):
        return self._request_processor

    @request_processor.setter
    def request_processor(self, value):
        self._request_processor = value


def make_context(model_dir: Path) -> Ctx:
    ctx = Ctx(model_pt_file=None, model_dir=str(model_dir), model_file=None, model_name="style_fusion",
              model_yaml_config_file="model-config.yaml")
    ctx.manifest = {"model": {"modelName": "style_fusion", "modelVersion": "0.1.0",
                              "handler": "style_fusion_handler.py"}}
    return ctx


def model_dir_with(d: Path, cfg: dict | None = None) -> Path:
    """What TorchServe unpacks a .mar into, as far as the handler reads it: the yaml and the weights."""
    if cfg is None:
        shutil.copyfile(MODEL_CONFIG, d / "model-config.yaml")
    else:
        (d / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    (d / CAFFE_FILENAME).symlink_to(caffe_weights_path())
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return model_dir_with(tmp_path_factory.mktemp("model_dir"))


@pytest.fixture(scope="module")
def handler(model_dir):
    h = load_handler_module().StyleFusionHandler()
    h.initialize(make_context(model_dir))
    return h


@pytest.fixture
def ctx(model_dir) -> Ctx:
    return make_context(model_dir)


def answer_of(handler, row, ctx):
    out = handler.handle([row], ctx.batch(1))
    assert len(out) == 1
    return out[0], ctx.get_response_status(0)[0], ctx.get_response_content_type(0)


# --- initialize ----------------------------------------------------------------------------


def test_initialize_reads_device_limits_and_weights(handler):
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    worker = handler.worker
    assert worker.model.device.type == "cpu" and worker.ready and handler.initialized
    assert worker.limits.device == "cpu"
    assert worker.limits.max_size == cfg["nsf"]["devices"]["cpu"]["max_size"]
    assert worker.limits.max_steps == cfg["nsf"]["devices"]["cpu"]["max_steps"]
    # defaults come from StyleConfig's preset; only the pixel cap is the server's
    assert worker.limits.base == PRESETS[cfg["nsf"]["preset"]].replace(max_pixels=cfg["nsf"]["max_pixels"])
    assert worker.model.weights_sha256 == CAFFE_SHA
    assert worker.response_timeout == cfg["responseTimeout"]  # the time budget's base, from the context's yaml


def test_initialize_refuses_a_model_dir_without_weights(tmp_path):
    shutil.copyfile(MODEL_CONFIG, tmp_path / "model-config.yaml")
    with pytest.raises(FileNotFoundError, match=CAFFE_FILENAME):
        load_handler_module().StyleFusionHandler().initialize(make_context(tmp_path))


def test_initialize_refuses_tampered_weights(tmp_path):
    shutil.copyfile(MODEL_CONFIG, tmp_path / "model-config.yaml")
    data = bytearray(caffe_weights_path().read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: still a loadable file, no longer the Caffe release
    (tmp_path / CAFFE_FILENAME).write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=f"sha256 mismatch for .*{CAFFE_FILENAME}"):
        load_handler_module().StyleFusionHandler().initialize(make_context(tmp_path))


def test_a_gpu_id_without_cuda_stays_on_the_cpu(tmp_path):
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    cfg["nsf"]["time_budget"] = 0
    ctx = make_context(model_dir_with(tmp_path, cfg))
    ctx.system_properties["gpu_id"] = 0  # TorchServe's GPU id; without CUDA the handler stays on the CPU
    h = load_handler_module().StyleFusionHandler()
    h.initialize(ctx)
    assert h.worker.model.device.type == "cpu" and h.worker.model.compile is False  # nsf.devices.cpu.compile


def test_handler_calibrates_and_refuses_what_would_outrun_the_timeout(tmp_path):
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    cfg["responseTimeout"] = 4
    cfg["nsf"]["devices"]["cpu"]["calibrate"] = [64, 3]
    d = model_dir_with(tmp_path, cfg)
    h = load_handler_module().StyleFusionHandler()
    h.initialize(make_context(d))
    assert h.worker.cost is not None and h.worker.cost.budget == pytest.approx(0.8 * 4)
    ctx = make_context(d).batch(1)
    (body,) = h.handle([{"content": noise_png(96, 96), "style": noise_png(64, 64, 1), "size": b"512",
                         "steps": b"300"}], ctx)
    assert ctx.get_response_status(0) == (422, "Unprocessable Entity")
    err = json.loads(body)
    assert err["field"] in ("steps", "size") and err["allowed"]["seconds_limit"] == 3
    ctx = make_context(d).batch(1)
    (out,) = h.handle([{"content": noise_png(48, 48), "style": noise_png(32, 32, 1), "size": b"32",
                        "steps": b"2"}], ctx)
    assert ctx.get_response_status(0)[0] == 200 and Image.open(io.BytesIO(out)).size == (32, 32)


# --- outcomes onto the context ---------------------------------------------------------------


OUTCOMES = [Outcome(200, b"\x89PNG...", "image/png"), Outcome(200, b"\xff\xd8...", "image/jpeg"),
            *(Outcome(status, {"error": "e", "field": f, "allowed": None}, "application/json")
              for status, f in ((400, "size"), (413, "body"), (422, "steps"), (500, None), (507, "size")))]
PHRASES = {200: "OK", 400: "Bad Request", 413: "Payload Too Large", 422: "Unprocessable Entity",
           500: "Internal Server Error", 507: "Insufficient Storage"}


@pytest.mark.parametrize("outcome", OUTCOMES, ids=lambda o: f"{o.status}-{o.content_type}")
@pytest.mark.parametrize("as_text", [False, True], ids=["raw", "envelope"])
def test_each_outcome_sets_its_status_phrase_and_content_type(ctx, outcome, as_text):
    """Every status the core answers with, as TorchServe sends it: the body bytes, or inside a KServe
    envelope base64 text / the error object."""
    module = load_handler_module()
    ctx.batch(1)
    body = module._reply(ctx, 0, outcome, as_text)
    if outcome.ok:
        assert ctx.get_response_content_type(0) == ("application/json" if as_text else outcome.content_type)
        assert body == (base64.b64encode(outcome.body).decode() if as_text else outcome.body)
    else:
        assert ctx.get_response_status(0) == (outcome.status, PHRASES[outcome.status])
        assert ctx.get_response_content_type(0) == "application/json"
        assert (body if as_text else json.loads(body)) == outcome.body


# --- good requests ------------------------------------------------------------------------


def test_multipart_request_returns_png_with_provenance(handler, ctx):
    out, status, ctype = answer_of(handler, multipart(), ctx)
    assert status == 200 and ctype == "image/png"
    img = Image.open(io.BytesIO(out))
    assert img.format == "PNG" and img.size == (48, 36)  # longer side = size, aspect kept
    meta = read_metadata(out)
    assert meta["weights_sha256"] == CAFFE_SHA
    assert meta["seed"] == 3 and meta["params"]["size"] == 48 and meta["params"]["steps"] == 2
    assert meta["params"]["max_pixels"] == handler.worker.limits.max_pixels
    assert meta["nsf_version"]


def test_json_request_and_jpeg(handler, ctx):
    out, status, ctype = answer_of(handler, json_body(format="jpeg", preserve_color=True), ctx)
    assert status == 200 and ctype == "image/jpeg"
    assert Image.open(io.BytesIO(out)).format == "JPEG"
    assert Image.open(io.BytesIO(out)).size == (48, 36)


def test_json_body_as_bytes_and_data_url(handler, ctx):
    body = {"content": "data:image/png;base64," + b64(CONTENT), "style": {"b64": b64(STYLE)}, "size": "32",
            "steps": 2, "preserve_color": "true"}
    out, status, _ = answer_of(handler, {"body": bytearray(json.dumps(body).encode())}, ctx)
    assert status == 200
    assert Image.open(io.BytesIO(out)).size == (32, 24)


def test_same_seed_same_image(handler, ctx):
    a, _, _ = answer_of(handler, multipart(seed="11"), ctx)
    b, _, _ = answer_of(handler, multipart(seed="11"), ctx)
    assert a == b


def test_several_styles_with_weights(handler, ctx):
    out, status, _ = answer_of(handler, multipart(style_2=STYLE2, style_weights="0.7,0.3"), ctx)
    assert status == 200, out
    assert read_metadata(out)["params"]["style_blend_weights"] == [0.7, 0.3]


def test_batch_of_two_answers_in_order(handler, ctx):
    ctx.batch(2)
    out = handler.handle([multipart(size="32"), json_body(size=48)], ctx)
    assert [Image.open(io.BytesIO(o)).size for o in out] == [(32, 24), (48, 36)]
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [200, 200]


def test_batch_with_a_bad_request_answers_each(handler, ctx):
    ctx.batch(3)
    out = handler.handle([multipart(size="5000"), multipart(size="32"), json_body(style=None)], ctx)
    assert [ctx.get_response_status(i)[0] for i in range(3)] == [400, 200, 400]
    assert json.loads(out[0])["field"] == "size"
    assert Image.open(io.BytesIO(out[1])).size == (32, 24)
    assert json.loads(out[2])["field"] == "style"
    assert ctx.get_response_content_type(0) == "application/json"


@pytest.mark.parametrize("row, status, field", BAD.values(), ids=BAD.keys())
def test_bad_request_gets_4xx_naming_the_field(handler, ctx, row, status, field):
    out, got, ctype = answer_of(handler, row, ctx)
    assert got == status
    assert ctype == "application/json"
    body = json.loads(out)
    assert body["field"] == field, body
    assert body["error"] and body["allowed"] is not None, body


def test_handler_keeps_serving_after_bad_requests(handler, ctx):
    rows = [row for row, _, _ in BAD.values()]
    ctx.batch(len(rows))
    out = handler.handle(rows, ctx)
    assert all(400 <= ctx.get_response_status(i)[0] < 500 for i in range(len(rows)))
    assert len(out) == len(rows)
    good, status, _ = answer_of(handler, multipart(size="32"), ctx)
    assert status == 200 and Image.open(io.BytesIO(good)).size == (32, 24)


def test_unexpected_failure_is_a_500_for_that_request_only(handler, ctx, monkeypatch):
    calls = {"n": 0}
    real = handler.worker.model.transfer

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:  # the batch of both, then the first request alone
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(handler.worker.model, "transfer", flaky)
    ctx.batch(2)
    out = handler.handle([multipart(size="32"), multipart(size="32")], ctx)
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [500, 200]
    assert "boom" in json.loads(out[0])["error"]
    assert calls["n"] == 3  # a failed batch is retried request by request


def test_requests_of_one_size_and_config_run_as_one_batch(handler, ctx, model_dir, monkeypatch):
    """A TorchServe batch (batchSize > 1): equal requests share one optimization, each its own image."""
    batches = []
    real = handler.worker.model.transfer

    def spy(content, styles, cfg, **kw):
        batches.append(content.shape[0])
        return real(content, styles, cfg, **kw)

    rows = [multipart(size="32"), multipart(size="32", style=STYLE2), multipart(size="48")]
    alone = []
    for row in rows:
        alone.append(handler.handle([row], make_context(model_dir).batch(1))[0])
    monkeypatch.setattr(handler.worker.model, "transfer", spy)
    out = handler.handle(rows, ctx.batch(3))
    assert sorted(batches) == [1, 2]  # the two 32 px requests together, the 48 px one alone
    assert [ctx.get_response_status(i)[0] for i in range(3)] == [200, 200, 200]
    for got, ref in zip(out, alone):
        a = np.asarray(Image.open(io.BytesIO(got)), dtype=np.float32)
        b = np.asarray(Image.open(io.BytesIO(ref)), dtype=np.float32)
        assert a.shape == b.shape and np.abs(a - b).mean() < 1.0  # float32: the same up to rounding


# --- KServe envelopes (TorchServe's own classes around the handler) ------------------------


def v2_inputs(**extra) -> list[dict]:
    inputs = [{"name": "content", "datatype": "BYTES", "shape": [1], "data": [b64(CONTENT)]},
              {"name": "style", "datatype": "BYTES", "shape": [1], "data": [b64(STYLE)]},
              {"name": "size", "datatype": "INT64", "shape": [1], "data": [32]},
              {"name": "steps", "datatype": "INT64", "shape": [1], "data": [2]}]
    inputs += [{"name": k, "datatype": dt, "shape": [len(v)], "data": v} for k, (dt, v) in extra.items()]
    return inputs


def test_kservev2_envelope_returns_base64_image(handler, ctx):
    envelope = KServev2Envelope(handler.handle)
    out = envelope.handle([{"body": {"id": "r1", "inputs": v2_inputs(preserve_color=("BOOL", [True]))}}],
                          ctx.batch(1))
    assert ctx.get_response_status(0)[0] == 200
    response = json.loads(json.dumps(out[0]))  # what TorchServe serializes
    assert response["id"] == "r1" and response["model_name"] == "style_fusion"
    (output,) = response["outputs"]
    assert output["name"] == "image" and output["datatype"] == "BYTES" and output["shape"] == [1]
    img = Image.open(io.BytesIO(base64.b64decode(output["data"][0])))
    assert img.format == "PNG" and img.size == (32, 24)


def test_kservev2_bad_request_is_a_400_with_the_error(handler, ctx):
    envelope = KServev2Envelope(handler.handle)
    out = envelope.handle([{"body": {"inputs": v2_inputs(size=("INT64", [9999]))}}], ctx.batch(1))
    assert ctx.get_response_status(0)[0] == 400
    (output,) = json.loads(json.dumps(out[0]))["outputs"]
    assert output["name"] == "error" and output["data"][0]["field"] == "size"


@pytest.mark.parametrize("body", [{"inputs": "x"}, {"nothing": 1}, {"inputs": []}, [1, 2]],
                         ids=["inputs not a list", "no inputs", "empty inputs", "not an object"])
def test_kservev2_malformed_envelope_is_a_400_not_a_503(handler, ctx, body):
    envelope = KServev2Envelope(handler.handle)
    out = envelope.handle([{"body": body}], ctx.batch(1))
    assert ctx.get_response_status(0)[0] == 400
    (output,) = json.loads(json.dumps(out[0]))["outputs"]
    assert output["name"] == "error" and output["data"][0]["field"] == "body"


def test_kserve_v1_envelope_answers_each_instance(handler, ctx):
    envelope = KServeEnvelope(handler.handle)
    good = {"content": b64(CONTENT), "style": {"b64": b64(STYLE)}, "size": 32, "steps": 2}
    out = envelope.handle([{"body": {"instances": [good, {**good, "size": 48}]}}], ctx.batch(1))
    assert ctx.get_response_status(0)[0] == 200
    predictions = json.loads(json.dumps(out[0]))["predictions"]
    assert [Image.open(io.BytesIO(base64.b64decode(p))).size for p in predictions] == [(32, 24), (48, 36)]
    out = envelope.handle([{"body": {"instances": [good, {**good, "preset": "nope"}]}}], ctx.batch(1))
    assert ctx.get_response_status(0)[0] == 400
    assert json.loads(json.dumps(out[0]))["predictions"][1]["field"] == "preset"
    out = envelope.handle([{"body": {"no_instances": []}}], ctx.batch(1))
    assert ctx.get_response_status(0)[0] == 400


def test_masked_requests_in_a_batch_and_as_kserve_v2_inputs(handler, ctx):
    """Masks as multipart files and JSON base64 (a batch: the masked requests answered in order, one refused
    naming its missing mask), and as kservev2 BYTES inputs."""
    ctx.batch(3)
    masked = multipart(size="32", style_2=STYLE2, mask=LEFT, mask_2=mask_png(64, 48, 0, 255))
    out = handler.handle([masked, json_body(size=32, style_2=b64(STYLE2), mask=b64(LEFT)), multipart(size="32")],
                         ctx)
    assert [ctx.get_response_status(i)[0] for i in range(3)] == [200, 400, 200]
    assert Image.open(io.BytesIO(out[0])).size == (32, 24) and json.loads(out[1])["field"] == "mask_2"
    envelope = KServev2Envelope(handler.handle)
    out = envelope.handle([{"body": {"inputs": v2_inputs(mask=("BYTES", [b64(LEFT)]))}}], ctx.batch(1))
    assert ctx.get_response_status(0)[0] == 200, out
    (output,) = json.loads(json.dumps(out[0]))["outputs"]
    assert Image.open(io.BytesIO(base64.b64decode(output["data"][0]))).size == (32, 24)


# --- hostile input through the handler --------------------------------------------------------


@pytest.fixture(scope="module")
def tight_handler(tmp_path_factory):
    """Limits so small that a request that gets through costs a fraction of a second."""
    d = model_dir_with(tmp_path_factory.mktemp("tight"), tight_model_config())
    h = load_handler_module().StyleFusionHandler()
    h.initialize(make_context(d))
    return h, d


# the examples' count is the profile's (tests/conftest.py: 600 in a full run and CI, 25 in the fast loop)
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(row=hostile_rows)
@example(row=OVERFLOWS[0])
@example(row=OVERFLOWS[1])
@example(row=OVERFLOWS[2])
def test_hostile_requests_get_a_4xx_never_a_5xx(tight_handler, row):
    handler, d = tight_handler
    ctx = make_context(d).batch(1)
    try:
        (answer,) = handler.handle([row] if not isinstance(row, list) else row, ctx)
    except Exception as e:  # pragma: no cover - the failure this test exists to catch
        pytest.fail(f"the handler raised {type(e).__name__}: {e}")
    status = ctx.get_response_status(0)[0]
    assert status == 200 or 400 <= status < 500, (status, answer if isinstance(answer, (str, dict)) else "...")
    if status != 200:
        err = answer if isinstance(answer, dict) else json.loads(answer)
        assert err["error"] and "field" in err and "allowed" in err


def test_the_fuzz_reaches_the_optimizer_too(tight_handler):
    """A valid request through the same tight handler: the fuzz's 200 branch is not dead code."""
    handler, d = tight_handler
    ctx = make_context(d).batch(1)
    (out,) = handler.handle([{"content": GOOD, "style": GOOD_JPEG}], ctx)
    assert ctx.get_response_status(0)[0] == 200 and Image.open(io.BytesIO(out)).size == (32, 24)
