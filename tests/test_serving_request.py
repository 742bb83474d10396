"""nsf.serving.request and .errors: what a server hands over -> fields -> a checked job, and the
error contract mapped from the library's structured errors.

Pure: no server, no model (images are decoded, nothing is optimized)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_requests import BAD, CONTENT, LEFT, RIGHT, STYLE, STYLE2, b64, mask_png, model_config, truncated_png

from nsf.errors import ConfigError, ImageError, ImageTooLargeError, PlanError
from nsf.serving import (
    RequestError,
    ServingLimits,
    from_config_error,
    from_kserve_v2,
    parse_request,
    request_fields,
    request_schema,
    resolve,
)
from nsf.serving.errors import phrase


@pytest.fixture(scope="module")
def limits() -> ServingLimits:
    return ServingLimits.from_model_config(model_config(), "cpu")


def test_request_fields_recognises_the_shapes():
    assert request_fields({"content": b"x", "style": b"y"}) == ({"content": b"x", "style": b"y"}, False)
    assert request_fields({"body": {"content": "eA=="}}) == ({"content": "eA=="}, False)
    assert request_fields({"body": b'{"size": 3}'}) == ({"size": 3}, False)
    assert request_fields({"content": "eA==", "size": 3}) == ({"content": "eA==", "size": 3}, True)
    with pytest.raises(RequestError):
        request_fields("not a mapping")


def test_from_kserve_v2_unwraps_single_values():
    fields = from_kserve_v2([{"name": "size", "datatype": "INT64", "shape": [1], "data": [64]},
                             {"name": "style_weights", "datatype": "FP32", "shape": [1], "data": [1.0]}])
    assert fields == {"size": 64, "style_weights": [1.0]}
    for bad in ("x", [{"datatype": "BYTES"}], [5]):
        with pytest.raises(RequestError) as e:
            from_kserve_v2(bad)
        assert e.value.field == "inputs" and e.value.status == 400


def test_deep_json_nesting_is_a_400():
    with pytest.raises(RequestError, match="nested too deeply"):
        request_fields({"body": b"[" * 100_000 + b"]" * 100_000})


@pytest.mark.parametrize("row, status, field", BAD.values(), ids=BAD.keys())
def test_bad_request_is_refused_naming_the_field(limits, row, status, field):
    with pytest.raises(RequestError) as e:
        parse_request(request_fields(row)[0], limits)
    err = e.value
    assert (err.status, err.field) == (status, field), err.to_dict()
    assert err.message and err.allowed is not None
    assert json.loads(err.to_json()) == json.loads(json.dumps(err.to_dict(), default=str))


def test_a_good_request_is_a_job(limits):
    job = parse_request({"content": CONTENT, "style": b64(STYLE), "size": b"48", "steps": 2, "format": "jpg",
                         "style_2": {"b64": b64(STYLE)}, "style_weights": "0.7,0.3", "preserve_color": "yes"}, limits)
    assert job.content.size == (64, 48) and [s.size for s in job.styles] == [(40, 40), (40, 40)]
    assert (job.config.size, job.config.steps, job.config.style_blend_weights) == (48, 2, (0.7, 0.3))
    assert job.config.preserve_color == "luminance" and job.config.max_pixels == limits.max_pixels
    assert (job.format, job.content_type) == ("jpeg", "image/jpeg")


@pytest.mark.parametrize("option, value", [("size", 8), ("size", 100_000), ("steps", 0), ("steps", 10**9)])
def test_size_and_steps_out_of_range_name_this_servers_range(limits, option, value):
    with pytest.raises(RequestError) as e:
        resolve("default", {option: value}, limits)
    top = limits.max_size if option == "size" else limits.max_steps
    assert e.value.field == option and f"{option}={value}" in str(e.value)
    assert e.value.allowed == {"min": 16 if option == "size" else 1, "max": top}


def test_config_errors_map_to_fields_from_their_structure_not_their_text(limits):
    err = from_config_error(ConfigError("text that names nothing", field="style_blend_weights", value=-1,
                                        allowed="non-negative"), limits)
    assert (err.field, err.allowed, err.message) == ("style_weights", "non-negative", "text that names nothing")
    err = from_config_error(ConfigError("size=9; allowed: >= 16", field="size", value=9), limits)
    assert (err.field, err.allowed) == ("size", {"min": 16, "max": limits.max_size})  # this server's range
    with pytest.raises(RequestError) as e:  # through resolve: the allowed values come from the check
        resolve("default", {"content_weight": 0, "style_weight": 0}, limits)
    assert (e.value.field, e.value.allowed) == ("content_weight", "either > 0")


def test_library_errors_map_by_type_and_attributes():
    """Status from the error's type, field and allowed from its attributes; a message without 'allowed:'
    loses nothing."""
    cases = [(ImageError("no clue in this text", field="style", allowed="a PNG"), 400),
             (ImageTooLargeError("no clue either", field="content", allowed="at most 9 pixels"), 413),
             (PlanError("nor here", field="size", allowed={"min": 16, "max": 99}), 422),
             (ConfigError("nothing", field="tol", allowed=">= 0"), 400)]
    for error, status in cases:
        err = RequestError.from_error(error)
        assert err.to_dict() == {"error": str(error), "field": error.field, "allowed": error.allowed}
        assert err.status == status and err.phrase == phrase(status)
    err = RequestError.from_error(cases[0][0], field="style_2", message="style_2: unreadable", status=400)
    assert err.to_dict() == {"error": "style_2: unreadable", "field": "style_2", "allowed": "a PNG"}
    assert [phrase(s) for s in (400, 413, 422, 500, 507)] == ["Bad Request", "Payload Too Large",
                                                              "Unprocessable Entity", "Internal Server Error",
                                                              "Insufficient Storage"]


def test_image_errors_reach_the_body_as_the_library_raised_them(limits):
    with pytest.raises(RequestError) as e:
        parse_request({"content": CONTENT, "style": truncated_png()}, limits)
    assert e.value.to_dict() == {"error": e.value.message, "field": "style", "allowed": "a complete image file"}
    assert e.value.message.startswith("style: image bytes is truncated or corrupt")


_FUZZ_KEYS = ["content", "style", "style_2", "style_3", "style_5", "size", "steps", "seed", "content_weight",
              "style_weight", "tv_weight", "preserve_color", "preset", "format", "style_weights", "init", "x",
              "mask", "mask_2", "style_mask", "style_mask_2"]
_FUZZ_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.binary(max_size=24), st.sampled_from([CONTENT, STYLE, truncated_png(), b64(STYLE),
                                                                   "png", "jpeg", "fast", "0.5,0.5"]),
    st.lists(st.one_of(st.floats(), st.integers(), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.sampled_from(["b64", "x"]), st.text(max_size=8), max_size=2),
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # the profile's count (conftest)
@given(st.dictionaries(st.sampled_from(_FUZZ_KEYS), _FUZZ_VALUES, max_size=8))
def test_parse_request_only_ever_raises_request_errors(limits, fields):
    try:
        job = parse_request(fields, limits)
    except RequestError as e:
        assert e.status in (400, 413)
        json.loads(e.to_json())
    else:
        assert job.config.size <= limits.max_size and job.config.steps <= limits.max_steps
        assert len(job.styles) >= 1 and job.format in ("png", "jpeg")


# --- regional styles: mask, mask_2..., style_mask... -----------------------------------------------


def test_masks_come_with_their_styles_as_tensors(limits):
    job = parse_request({"content": CONTENT, "style": STYLE, "style_2": b64(STYLE2), "mask": LEFT,
                         "mask_2": {"b64": b64(RIGHT)}, "style_mask_2": mask_png(32, 32, 255, 128)}, limits)
    assert job.masked and len(job.masks) == 2 and len(job.style_masks) == 2 and job.style_masks[0] is None
    left, right = job.masks
    assert left.shape == right.shape == (1, 1, 48, 64) and left.dtype == right.dtype
    assert (left[..., :32].min(), left[..., 32:].max(), right[..., 32:].min()) == (1.0, 0.0, 1.0)
    assert job.style_masks[1].shape == (1, 1, 32, 32)
    assert abs(float(job.style_masks[1][..., 16:].mean()) - 128 / 255) < 1e-6  # grey: a soft value, /255
    plain = parse_request({"content": CONTENT, "style": STYLE}, limits)
    assert not plain.masked and plain.masks is None and plain.style_masks is None
    only = parse_request({"content": CONTENT, "style": STYLE, "style_2": STYLE2,
                          "style_mask": mask_png(40, 40, 255, 0)}, limits)
    assert only.masks is None and only.style_masks[1] is None  # style masks without masks: allowed


@pytest.mark.parametrize(("extra", "field", "allowed"), [
    ({"style_2": STYLE2, "style_3": STYLE2, "mask": LEFT, "mask_3": RIGHT}, "mask_2", ["mask", "mask_2", "mask_3"]),
    ({"mask_2": RIGHT}, "mask_2", ["mask"]),  # a mask for a style the request lacks
    ({"mask": LEFT, "mask_3": RIGHT, "style_2": STYLE2}, "mask_3", ["mask", "mask_2"]),
    ({"style_mask_4": LEFT}, "style_mask_4", ["style_mask"]),
    ({"mask_5": LEFT}, "mask_5", None),  # past max_styles: an unknown field, naming the numbering
    ({"mask": "@@not base64@@"}, "mask", None),
    ({"mask": truncated_png()}, "mask", "a complete image file"),
    ({"style_mask": b""}, "style_mask", "an image file"),
])
def test_bad_masks_are_refused_naming_their_field(limits, extra, field, allowed):
    with pytest.raises(RequestError) as e:
        parse_request({"content": CONTENT, "style": STYLE, **extra}, limits)
    assert (e.value.status, e.value.field) == (400, field), e.value.to_dict()
    if allowed is not None:
        assert e.value.allowed == allowed
    if field == "mask_5":
        assert "at most 4 style images (mask, mask_2 ... mask_4)" in e.value.message


@pytest.mark.parametrize(("extra", "field", "needle"), [
    ({"mask": mask_png(40, 40)}, "mask", "mask is 40x40 px for an image of 64x48; allowed: the aspect ratio"),
    ({"style_2": STYLE2, "mask": LEFT, "mask_2": mask_png(64, 48, 0)}, "mask_2", "mask_2 is all zero"),
    ({"style_mask": mask_png(64, 48)}, "style_mask", "style_mask is 64x48 px for an image of 40x40"),
    ({"style_mask": mask_png(20, 20, 0)}, "style_mask", "style_mask is all zero"),
])
def test_masks_the_run_would_refuse_are_refused_naming_their_field(limits, extra, field, needle):
    """The run's rules (nsf.model: its image's aspect ratio, some area above zero), checked when parsing so that
    the error names mask_2 rather than the run's argument 'masks'."""
    with pytest.raises(RequestError) as e:
        parse_request({"content": CONTENT, "style": STYLE, **extra}, limits)
    assert (e.value.status, e.value.field) == (400, field) and needle in e.value.message, e.value.to_dict()
    job = parse_request({"content": CONTENT, "style": STYLE, "mask": mask_png(128, 96, 0, 40),  # twice the size
                         "style_mask": mask_png(81, 80)}, limits)  # within the run's 2% tolerance
    assert job.masks[0].shape == (1, 1, 96, 128)


def test_sliced_with_masks_is_the_runs_refusal_naming_style_loss():
    sliced = ServingLimits.from_model_config(model_config(overrides={"style_loss": "sliced"}), "cpu")
    with pytest.raises(RequestError) as e:
        parse_request({"content": CONTENT, "style": STYLE, "mask": LEFT}, sliced)
    assert (e.value.status, e.value.field, e.value.allowed) == (400, "style_loss", ["gram", "mean_cov"])
    assert parse_request({"content": CONTENT, "style": STYLE}, sliced).masks is None


def test_mask_config_errors_name_the_request_fields(limits):
    err = from_config_error(ConfigError("masks: 1 for 2 styles", field="masks", allowed="one per style"), limits)
    assert (err.status, err.field, err.allowed) == (400, "mask", "one per style")
    err = from_config_error(ConfigError("all zero", field="style_masks", allowed="a mask with some white"), limits)
    assert err.field == "style_mask"
    err = from_config_error(ConfigError("sliced", field="style_loss", allowed=["gram", "mean_cov"]), limits)
    assert (err.field, err.allowed) == ("style_loss", ["gram", "mean_cov"])


def test_the_schema_lists_the_mask_fields(limits):
    props = request_schema(limits)["properties"]
    names = [f"{base}{suffix}" for base in ("mask", "style_mask") for suffix in ("", "_2", "_3", "_4")]
    assert all(props[n]["contentEncoding"] == "base64" for n in names)
    assert "mask_5" not in props and "one per style" in props["mask"]["description"]
