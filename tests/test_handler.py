"""The TorchServe handler under TorchServe's MockContext, and the pure request functions it wraps.

Covers: multipart-like and JSON inputs, every kind of bad request (4xx with a JSON body naming the
field; the handler keeps serving), batches answered in order, the KServe v1/v2 envelopes (with
TorchServe's own envelope classes), the model-config.yaml limits, and a fuzz of ``parse_request``.
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
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nsf import protocol
from nsf.config import PRESETS
from nsf.image import read_metadata
from nsf.weights import CAFFE_FILENAME, VGG19Weights, WeightsError, caffe_weights_path

pytest.importorskip("ts", reason="TorchServe (the 'serve' extra) is not installed")
from ts.context import Context, RequestProcessor  # noqa: E402
from ts.torch_handler.request_envelope.kserve import KServeEnvelope  # noqa: E402
from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope  # noqa: E402
from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIG = REPO / "deploy" / "model-config.yaml"
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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """What TorchServe unpacks a .mar into, as far as the handler reads it: the yaml and the weights."""
    d = tmp_path_factory.mktemp("model_dir")
    shutil.copyfile(MODEL_CONFIG, d / "model-config.yaml")
    (d / CAFFE_FILENAME).symlink_to(caffe_weights_path())
    return d


@pytest.fixture(scope="module")
def handler(model_dir):
    h = load_handler_module().StyleFusionHandler()
    h.initialize(make_context(model_dir))
    return h


@pytest.fixture
def ctx(model_dir) -> Ctx:
    return make_context(model_dir)


def png(w: int, h: int, seed: int = 0) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(w: int, h: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png(w, h, seed))).save(buf, format="JPEG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


CONTENT, STYLE, STYLE2 = png(64, 48, 0), jpeg(40, 40, 1), png(32, 32, 2)


def multipart(**extra) -> dict:
    """Fields as TorchServe hands over multipart/form-data: bytes or bytearray values."""
    fields = {"content": bytearray(CONTENT), "style": STYLE, "size": b"48", "steps": b"2", "seed": b"3"}
    fields.update({k: v.encode() if isinstance(v, str) else v for k, v in extra.items()})
    return {k: v for k, v in fields.items() if v is not None}


def json_body(**extra) -> dict:
    """A JSON request as TorchServe hands it over: the decoded object under "body"."""
    body = {"content": b64(CONTENT), "style": b64(STYLE), "size": 48, "steps": 2, "seed": 3, **extra}
    return {"body": {k: v for k, v in body.items() if v is not None}}


def answer_of(handler, row, ctx):
    out = handler.handle([row], ctx.batch(1))
    assert len(out) == 1
    return out[0], ctx.get_response_status(0)[0], ctx.get_response_content_type(0)


# --- initialize ----------------------------------------------------------------------------


def test_initialize_reads_device_limits_and_weights(handler):
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    assert handler.device.type == "cpu"
    assert handler.limits.device == "cpu"
    assert handler.limits.max_size == cfg["nsf"]["devices"]["cpu"]["max_size"]
    assert handler.limits.max_steps == cfg["nsf"]["devices"]["cpu"]["max_steps"]
    # defaults come from StyleConfig's preset; only the pixel cap is the server's
    assert handler.limits.base == PRESETS[cfg["nsf"]["preset"]].replace(max_pixels=cfg["nsf"]["max_pixels"])
    assert handler.model.weights_sha256 == CAFFE_SHA
    assert handler.initialized


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


def test_initialize_warms_up_at_the_configured_sizes(tmp_path, caplog):
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    cfg["nsf"]["devices"]["cpu"].update(warmup_sizes=[32, 48], warmup_steps=3)
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / CAFFE_FILENAME).symlink_to(caffe_weights_path())
    ctx = make_context(tmp_path)
    ctx.system_properties["gpu_id"] = 0  # TorchServe's GPU id; without CUDA the handler stays on the CPU
    h = load_handler_module().StyleFusionHandler()
    with caplog.at_level("INFO"):
        h.initialize(ctx)
    warm = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert [m.split(" px")[0].rsplit(" ", 1)[1] for m in warm] == ["32", "48"]
    assert h.device.type == "cpu" and h.model.compile is False  # from nsf.devices.cpu.compile


@pytest.mark.parametrize("compile", [True, False])
def test_a_compiling_worker_compiles_no_new_shape_inside_a_request(tmp_path, monkeypatch, compile):
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    cfg["nsf"]["time_budget"] = 0  # no calibration run: nothing is compiled here, only the policy is set
    cfg["nsf"]["devices"]["cpu"].update(compile=compile, warmup_sizes=[])
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / CAFFE_FILENAME).symlink_to(caffe_weights_path())
    stances = []
    monkeypatch.setattr(torch.compiler, "set_stance", lambda stance, **kw: stances.append(stance))
    h = load_handler_module().StyleFusionHandler()
    h.initialize(make_context(tmp_path))
    assert h.model.compiles is compile
    assert stances == (["eager_on_recompile"] if compile else [])


# --- good requests ------------------------------------------------------------------------


def test_multipart_request_returns_png_with_provenance(handler, ctx):
    out, status, ctype = answer_of(handler, multipart(), ctx)
    assert status == 200 and ctype == "image/png"
    img = Image.open(io.BytesIO(out))
    assert img.format == "PNG" and img.size == (48, 36)  # longer side = size, aspect kept
    meta = read_metadata(out)
    assert meta["weights_sha256"] == CAFFE_SHA
    assert meta["seed"] == 3 and meta["params"]["size"] == 48 and meta["params"]["steps"] == 2
    assert meta["params"]["max_pixels"] == handler.limits.max_pixels
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


# --- bad requests -------------------------------------------------------------------------


def truncated_png() -> bytes:
    data = png(64, 64, 5)
    return data[: len(data) // 2]


def bomb_png() -> bytes:
    """A small file declaring 6000x5000 = 30 MP (over the 25 MP cap): refused from its header."""
    buf = io.BytesIO()
    Image.new("L", (6000, 5000)).save(buf, format="PNG")
    return buf.getvalue()


BAD = {
    "missing content": (multipart(content=None), 400, "content"),
    "missing style": (multipart(style=None), 400, "style"),
    "content not an image": (multipart(content=b"this is not an image"), 400, "content"),
    "truncated image": (multipart(style=truncated_png()), 400, "style"),
    "image under 16 px": (multipart(content=png(8, 8)), 400, "content"),
    "image over the pixel cap": (multipart(content=bomb_png()), 413, "content"),
    "fields over the size cap": (multipart(style_2=b"\0" * (32 * 2**20 + 1)), 413, "body"),
    "unknown parameter": (multipart(colour="blue"), 400, "colour"),
    "server-only parameter": (json_body(init="/etc/passwd"), 400, "init"),
    "size too large": (multipart(size="4096"), 400, "size"),
    "size too small": (json_body(size=8), 400, "size"),
    "size not a number": (multipart(size="big"), 400, "size"),
    "steps zero": (json_body(steps=0), 400, "steps"),
    "steps too many": (multipart(steps="100000"), 400, "steps"),
    "negative weight": (json_body(content_weight=-1), 400, "content_weight"),
    "weight not finite": (multipart(style_weight="nan"), 400, "style_weight"),
    "absurd weight": (json_body(tv_weight=1e300), 400, "tv_weight"),
    "both weights zero": (json_body(content_weight=0, style_weight=0), 400, "content_weight"),
    "preserve_color not a boolean": (multipart(preserve_color="maybe"), 400, "preserve_color"),
    "unknown preset": (multipart(preset="picasso"), 400, "preset"),
    "preset over the limits": (json_body(preset="seed", size=None, steps=None), 400, "steps"),
    "unknown format": (multipart(format="gif"), 400, "format"),
    "style weights for another count": (multipart(style_weights="0.5,0.5"), 400, "style_weights"),
    "style weights not numbers": (json_body(style_2=b64(STYLE2), style_weights=["a", 1]), 400, "style_weights"),
    "style_3 without style_2": (multipart(style_3=STYLE2), 400, "style_3"),
    "more styles than allowed": (multipart(style_5=STYLE2), 400, "style_5"),
    "bad base64": (json_body(style="@@not base64@@"), 400, "style"),
    "image of the wrong JSON type": (json_body(content=12), 400, "content"),
    "body not JSON": ({"body": bytearray(CONTENT)}, 400, "body"),
    "body a JSON list": ({"body": [1, 2]}, 400, "body"),
}


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
    real = handler.model.transfer

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:  # the batch of both, then the first request alone
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(handler.model, "transfer", flaky)
    ctx.batch(2)
    out = handler.handle([multipart(size="32"), multipart(size="32")], ctx)
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [500, 200]
    assert "boom" in json.loads(out[0])["error"]
    assert calls["n"] == 3  # a failed batch is retried request by request


def test_requests_of_one_size_and_config_run_as_one_batch(handler, ctx, model_dir, monkeypatch):
    """A TorchServe batch (batchSize > 1): equal requests share one optimization, each its own image."""
    batches = []
    real = handler.model.transfer

    def spy(content, styles, cfg, **kw):
        batches.append(content.shape[0])
        return real(content, styles, cfg, **kw)

    rows = [multipart(size="32"), multipart(size="32", style=STYLE2), multipart(size="48")]
    alone = []
    for row in rows:
        alone.append(handler.handle([row], make_context(model_dir).batch(1))[0])
    monkeypatch.setattr(handler.model, "transfer", spy)
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


# --- the pure functions --------------------------------------------------------------------


@pytest.fixture(scope="module")
def limits() -> protocol.ServingLimits:
    return protocol.ServingLimits.from_model_config(yaml.safe_load(MODEL_CONFIG.read_text()), "cpu")


def test_request_fields_recognises_the_shapes():
    assert protocol.request_fields({"content": b"x", "style": b"y"}) == ({"content": b"x", "style": b"y"}, False)
    assert protocol.request_fields({"body": {"content": "eA=="}}) == ({"content": "eA=="}, False)
    assert protocol.request_fields({"body": b'{"size": 3}'}) == ({"size": 3}, False)
    assert protocol.request_fields({"content": "eA==", "size": 3}) == ({"content": "eA==", "size": 3}, True)
    with pytest.raises(protocol.RequestError):
        protocol.request_fields("not a mapping")


def test_from_kserve_v2_unwraps_single_values():
    fields = protocol.from_kserve_v2([{"name": "size", "datatype": "INT64", "shape": [1], "data": [64]},
                                      {"name": "style_weights", "datatype": "FP32", "shape": [1], "data": [1.0]}])
    assert fields == {"size": 64, "style_weights": [1.0]}


def _config_with(**nsf_changes):
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    cfg["nsf"].update(nsf_changes)
    return cfg


@pytest.mark.parametrize("changes, match", [
    ({"fields": ["size", "init"]}, "init"),
    ({"fields": ["style_layers"]}, "style_layers"),
    ({"fields": ["colour"]}, "colour"),
    ({"preset": "picasso"}, "picasso"),
    ({"overrides": {"max_pixels": 10**12}}, "max_pixels"),
    ({"overrides": {"steps": 5000}}, "exceed"),
    ({"surprise": 1}, "surprise"),
    ({"max_styles": 0}, "max_styles"),
])
def test_model_config_mistakes_are_refused_at_load(changes, match):
    with pytest.raises(ValueError, match=match):
        protocol.ServingLimits.from_model_config(_config_with(**changes), "cpu")


def test_model_config_needs_a_section_for_the_device():
    with pytest.raises(ValueError, match="nsf.devices.mps"):
        protocol.ServingLimits.from_model_config(yaml.safe_load(MODEL_CONFIG.read_text()), "mps")
    with pytest.raises(ValueError, match="'nsf' section"):
        protocol.ServingLimits.from_model_config({"minWorkers": 1}, "cpu")


def test_request_schema_matches_the_limits(limits):
    schema = protocol.request_schema(limits)
    assert schema["required"] == ["content", "style"]
    assert set(schema["properties"]) == set(protocol.allowed_fields(limits))
    assert schema["properties"]["size"]["maximum"] == limits.max_size
    assert schema["properties"]["steps"]["default"] == PRESETS[limits.preset].steps


_FUZZ_KEYS = ["content", "style", "style_2", "style_3", "style_5", "size", "steps", "seed", "content_weight",
              "style_weight", "tv_weight", "preserve_color", "preset", "format", "style_weights", "init", "x"]
_FUZZ_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.binary(max_size=24), st.sampled_from([CONTENT, STYLE, truncated_png(), b64(STYLE),
                                                                   "png", "jpeg", "fast", "0.5,0.5"]),
    st.lists(st.one_of(st.floats(), st.integers(), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.sampled_from(["b64", "x"]), st.text(max_size=8), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_FUZZ_KEYS), _FUZZ_VALUES, max_size=8))
def test_parse_request_only_ever_raises_request_errors(limits, fields):
    try:
        job = protocol.parse_request(fields, limits)
    except protocol.RequestError as e:
        assert e.status in (400, 413)
        json.loads(e.to_json())
    else:
        assert job.config.size <= limits.max_size and job.config.steps <= limits.max_steps
        assert len(job.styles) >= 1 and job.format in ("png", "jpeg")
