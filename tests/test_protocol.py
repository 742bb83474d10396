"""nsf.protocol: admission control (the cost model), and hostile input through the whole handler.

The fuzz runs over what TorchServe hands the handler (multipart field mappings, JSON bodies as
bytes or decoded objects, KServe v2 inputs): random bytes, truncated and dimension-bomb images,
wrong JSON types, huge numbers, NaN/inf, unknown fields, deep nesting, bad base64, missing
fields. Every answer must be a 2xx image or a 4xx JSON error; nothing may raise or be a 5xx.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_handler import MODEL_CONFIG, load_handler_module, make_context

from nsf import protocol
from nsf.config import make_config
from nsf.errors import ConfigError
from nsf.weights import CAFFE_FILENAME, caffe_weights_path

# --- admission control ------------------------------------------------------------------------


def test_pixel_steps_sums_the_coarse_to_fine_schedule():
    cfg = make_config(size=256, steps=200)  # scales 0.25/0.5/1 with 60%/30%/10% of the steps
    assert protocol.pixel_steps(cfg, 256, 256) == 64 * 64 * 120 + 128 * 128 * 60 + 256 * 256 * 20
    wide = protocol.pixel_steps(cfg, 100, 200)  # long side 256: 128 x 256 at full size
    assert wide == 32 * 64 * 120 + 64 * 128 * 60 + 128 * 256 * 20


def test_admit_passes_what_fits_and_names_the_largest_steps_that_fit():
    cost = protocol.CostModel(seconds_per_pixel_step=1e-6, budget=10.0)
    small = make_config(size=128, steps=20)
    cost.admit(small, 128, 128)  # ~ 0.4 s
    big = make_config(size=512, steps=300)
    assert cost.seconds(big, 512, 512) > 10
    with pytest.raises(protocol.RequestError) as e:
        cost.admit(big, 512, 512)
    err = e.value
    assert err.status == 422 and err.field == "steps" and err.phrase == "Unprocessable Entity"
    top = err.allowed["max"]
    assert err.allowed["seconds_limit"] == 10
    assert cost.seconds(big.replace(steps=top), 512, 512) <= 10 < cost.seconds(big.replace(steps=top + 1), 512, 512)
    assert f"at most steps={top}" in err.message and "10 s limit" in err.message


def test_admit_names_the_largest_size_when_no_step_count_fits():
    cost = protocol.CostModel(seconds_per_pixel_step=1e-3, budget=60.0)
    cfg = make_config(size=1024, steps=50, scales=(1.0,), scale_steps=(1.0,))
    with pytest.raises(protocol.RequestError) as e:
        cost.admit(cfg, 1024, 1024)  # one step at 1024 px already takes 1049 s
    err = e.value
    assert err.status == 422 and err.field == "size"
    top = err.allowed["max"]
    assert cost.seconds(cfg.replace(size=top), 1024, 1024) <= 60 < cost.seconds(cfg.replace(size=top + 1), 1024, 1024)


@pytest.mark.parametrize("changes, match", [({"time_budget": 1.5}, "time_budget"),
                                            ({"devices": {"cpu": {"max_size": 512, "max_steps": 300, "compile": False,
                                                                  "calibrate": [8, 1]}}}, "calibrate")])
def test_admission_settings_are_checked_at_load(changes, match):
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    cfg["nsf"].update(changes)
    with pytest.raises(ValueError, match=match):
        protocol.ServingLimits.from_model_config(cfg, "cpu")


def _model_dir(tmp_path, response_timeout=None, **cpu):
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    cfg["nsf"]["devices"]["cpu"].update(cpu)
    if response_timeout is not None:
        cfg["responseTimeout"] = response_timeout
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / CAFFE_FILENAME).symlink_to(caffe_weights_path())
    return tmp_path


def _png(w: int, h: int, seed: int = 0) -> bytes:
    img = Image.effect_noise((w, h), 60 + seed).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_handler_calibrates_and_refuses_what_would_outrun_the_timeout(tmp_path, caplog):
    d = _model_dir(tmp_path, response_timeout=4, calibrate=[64, 3])
    h = load_handler_module().StyleFusionHandler()
    with caplog.at_level("INFO"):
        h.initialize(make_context(d))
    assert h.cost is not None and h.cost.budget == pytest.approx(0.8 * 4)
    assert 1e-9 < h.cost.seconds_per_pixel_step < 1e-4
    assert any("calibrated" in r.getMessage() for r in caplog.records)
    ctx = make_context(d).batch(1)
    (body,) = h.handle([{"content": _png(96, 96), "style": _png(64, 64, 1), "size": b"512", "steps": b"300"}], ctx)
    assert ctx.get_response_status(0)[0] == 422
    err = json.loads(body)
    assert err["field"] in ("steps", "size") and err["allowed"]["seconds_limit"] == 3
    ctx = make_context(d).batch(1)
    (out,) = h.handle([{"content": _png(48, 48), "style": _png(32, 32, 1), "size": b"32", "steps": b"2"}], ctx)
    assert ctx.get_response_status(0)[0] == 200 and Image.open(io.BytesIO(out)).size == (32, 32)


def test_time_budget_zero_turns_admission_off(tmp_path):
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    cfg["nsf"]["time_budget"] = 0
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / CAFFE_FILENAME).symlink_to(caffe_weights_path())
    h = load_handler_module().StyleFusionHandler()
    h.initialize(make_context(tmp_path))
    assert h.cost is None


# --- hostile input through the handler --------------------------------------------------------


@pytest.fixture(scope="module")
def tight_handler(tmp_path_factory):
    """Limits so small that a request that gets through costs a fraction of a second."""
    d = tmp_path_factory.mktemp("tight")
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    cfg["nsf"]["preset"] = "fast"
    cfg["nsf"]["overrides"] = {"size": 32, "steps": 2}
    cfg["nsf"]["devices"]["cpu"].update(max_size=32, max_steps=2, calibrate=[32, 2])
    (d / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    (d / CAFFE_FILENAME).symlink_to(caffe_weights_path())
    h = load_handler_module().StyleFusionHandler()
    h.initialize(make_context(d))
    return h, d


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_header(w: int, h: int) -> bytes:
    """A tiny PNG that declares w x h pixels (its data is a few bytes: decoding it would explode)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + _png_chunk(b"IEND", b"")


GOOD = _png(40, 30, 3)
GOOD_JPEG = io.BytesIO()
Image.open(io.BytesIO(GOOD)).save(GOOD_JPEG, format="JPEG")
GOOD_JPEG = GOOD_JPEG.getvalue()

images = st.one_of(
    st.binary(max_size=64),
    st.integers(1, len(GOOD) - 1).map(lambda n: GOOD[:n]),
    st.integers(1, len(GOOD_JPEG) - 1).map(lambda n: GOOD_JPEG[:n]),
    st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)).map(lambda wh: bomb_header(*wh)),
    st.just(GOOD),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.sampled_from([10**400, -(10**400)]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=16),
                    st.sampled_from(["NaN", "inf", "-1", "1e309", "32", "2", "fast", "jpeg", "0.5,0.5"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=12)
keys = st.sampled_from(["content", "style", "style_2", "style_3", "style_9", "size", "steps", "seed", "preset",
                        "format", "style_weights", "content_weight", "init", "max_pixels", "__proto__", ""])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


multipart_rows = st.dictionaries(keys, st.one_of(images, scalars.map(lambda v: str(v).encode())), max_size=7)
json_objects = st.dictionaries(keys, st.one_of(json_values, images.map(_b64), st.text(max_size=20)), max_size=7)
rows = st.one_of(
    multipart_rows,
    json_objects.map(lambda d: {"body": d}),
    json_objects.map(lambda d: {"body": json.dumps(d, default=str).encode()}),
    st.binary(max_size=200).map(lambda b: {"body": b}),
    st.integers(1, 200_000).map(lambda n: {"body": b"[" * n + b"]" * n}),  # nesting past the recursion limit
    json_values.map(lambda v: {"body": v}),
    st.lists(st.fixed_dictionaries({"name": keys, "datatype": st.sampled_from(["BYTES", "INT64", "FP32", "x"]),
                                    "data": st.lists(json_values, max_size=2)}), min_size=1, max_size=4),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(row=rows)
# a number past float's range in each kind of numeric field (once a 500: OverflowError)
@example(row={"body": json.dumps({"content": _b64(GOOD), "style": _b64(GOOD), "size": 10**400}).encode()})
@example(row={"body": json.dumps({"content": _b64(GOOD), "style": _b64(GOOD), "steps": -(10**400)}).encode()})
@example(row={"body": json.dumps({"content": _b64(GOOD), "style": _b64(GOOD), "style_weight": 10**400}).encode()})
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


def test_deep_json_nesting_is_a_400():
    with pytest.raises(protocol.RequestError, match="nested too deeply"):
        protocol.request_fields({"body": b"[" * 100_000 + b"]" * 100_000})


@pytest.mark.parametrize("option, value", [("size", 8), ("size", 100_000), ("steps", 0), ("steps", 10**9)])
def test_size_and_steps_out_of_range_name_this_servers_range(option, value):
    limits = protocol.ServingLimits.from_model_config(yaml.safe_load(MODEL_CONFIG.read_text()), "cpu")
    with pytest.raises(protocol.RequestError) as e:
        protocol.resolve("default", {option: value}, limits)
    top = limits.max_size if option == "size" else limits.max_steps
    assert e.value.field == option and f"{option}={value}" in str(e.value)
    assert e.value.allowed == {"min": 16 if option == "size" else 1, "max": top}


def test_config_errors_map_to_fields_from_their_structure_not_their_text():
    limits = protocol.ServingLimits.from_model_config(yaml.safe_load(MODEL_CONFIG.read_text()), "cpu")
    err = protocol._from_config_error(ConfigError("text that names nothing", field="style_blend_weights", value=-1,
                                                  allowed="non-negative"), limits)
    assert (err.field, err.allowed, err.message) == ("style_weights", "non-negative", "text that names nothing")
    err = protocol._from_config_error(ConfigError("size=9; allowed: >= 16", field="size", value=9), limits)
    assert (err.field, err.allowed) == ("size", {"min": 16, "max": limits.max_size})  # this server's range
    with pytest.raises(protocol.RequestError) as e:  # through resolve: the allowed values come from the check
        protocol.resolve("default", {"content_weight": 0, "style_weight": 0}, limits)
    assert (e.value.field, e.value.allowed) == ("content_weight", "either > 0")


# --- memory admission -------------------------------------------------------------------------


def test_admit_memory_is_a_422_naming_the_largest_size():
    from nsf.errors import PlanError

    def no_room():
        raise PlanError("size=4096 does not fit max_memory=2.00 GB: ...; at most size=1800 fits", field="size",
                        value=4096, allowed={"min": 16, "max": 1800})

    with pytest.raises(protocol.RequestError) as e:
        protocol.admit_memory(no_room)
    err = e.value
    assert (err.status, err.field, err.allowed["max"]) == (422, "size", 1800)
    assert "on this worker" in err.message
    assert protocol.admit_memory(lambda: "the plan") == "the plan"


def test_a_request_over_the_workers_memory_is_refused_up_front(tmp_path):
    """A worker whose budget leaves room for small runs only: a large request gets a 422 naming the largest size
    that fits (from the planner), a small one is served, and time admission sees the plan's work."""
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    cfg["nsf"]["time_budget"] = 0
    (tmp_path / CAFFE_FILENAME).symlink_to(caffe_weights_path())
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    h = load_handler_module().StyleFusionHandler()
    h.initialize(make_context(tmp_path))
    used, _ = __import__("nsf.plan", fromlist=["memory_now"]).memory_now(h.model.device)
    h.model.max_memory = used + 400 * 2**20  # what the worker holds plus 400 MB
    ctx = make_context(tmp_path).batch(1)
    (body,) = h.handle([{"content": _png(96, 96), "style": _png(64, 64, 1), "size": b"2048", "steps": b"3"}], ctx)
    assert ctx.get_response_status(0)[0] == 422
    err = json.loads(body)
    assert err["field"] == "size" and 32 <= err["allowed"]["max"] < 2048 and "does not fit max_memory" in err["error"]
    ctx = make_context(tmp_path).batch(1)
    (out,) = h.handle([{"content": _png(48, 48), "style": _png(32, 32, 1), "size": b"32", "steps": b"2"}], ctx)
    assert ctx.get_response_status(0)[0] == 200 and Image.open(io.BytesIO(out)).size == (32, 32)


def test_model_config_max_memory_is_checked_at_load():
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    cfg["nsf"]["devices"]["cpu"]["max_memory"] = "lots"
    with pytest.raises(ValueError, match=r"nsf.devices.cpu.max_memory='lots'; allowed"):
        protocol.ServingLimits.from_model_config(cfg, "cpu")
    cfg["nsf"]["devices"]["cpu"]["max_memory"] = "6GB"
    assert protocol.ServingLimits.from_model_config(cfg, "cpu").max_memory == "6GB"
