"""nsf.serving.limits and .schema: the ``nsf`` section of model-config.yaml read, checked and described.

Pure: no server, no model."""

from __future__ import annotations

import pytest
from serving_requests import model_config

from nsf.config import PRESETS
from nsf.serving import ServingLimits, allowed_fields, request_schema


@pytest.fixture(scope="module")
def limits() -> ServingLimits:
    return ServingLimits.from_model_config(model_config(), "cpu")


def test_shipped_limits_per_device(limits):
    cfg = model_config()
    assert limits.device == "cpu"
    assert limits.max_size == cfg["nsf"]["devices"]["cpu"]["max_size"]
    assert limits.max_steps == cfg["nsf"]["devices"]["cpu"]["max_steps"]
    # defaults come from StyleConfig's preset; only the pixel cap is the server's
    assert limits.base == PRESETS[cfg["nsf"]["preset"]].replace(max_pixels=cfg["nsf"]["max_pixels"])
    assert set(ServingLimits.all_devices(cfg)) == set(cfg["nsf"]["devices"])
    assert limits.bounds("size") == {"min": 16, "max": limits.max_size}
    assert limits.bounds("steps") == {"min": 1, "max": limits.max_steps}


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
        ServingLimits.from_model_config(model_config(**changes), "cpu")


def test_model_config_needs_a_section_for_the_device():
    with pytest.raises(ValueError, match="nsf.devices.mps"):
        ServingLimits.from_model_config(model_config(), "mps")
    with pytest.raises(ValueError, match="'nsf' section"):
        ServingLimits.from_model_config({"minWorkers": 1}, "cpu")


@pytest.mark.parametrize("changes, match", [({"time_budget": 1.5}, "time_budget"),
                                            ({"devices": {"cpu": {"max_size": 512, "max_steps": 300, "compile": False,
                                                                  "calibrate": [8, 1]}}}, "calibrate")])
def test_admission_settings_are_checked_at_load(changes, match):
    with pytest.raises(ValueError, match=match):
        ServingLimits.from_model_config(model_config(**changes), "cpu")


def test_model_config_max_memory_is_checked_at_load():
    cfg = model_config()
    cfg["nsf"]["devices"]["cpu"]["max_memory"] = "lots"
    with pytest.raises(ValueError, match=r"nsf.devices.cpu.max_memory='lots'; allowed"):
        ServingLimits.from_model_config(cfg, "cpu")
    cfg["nsf"]["devices"]["cpu"]["max_memory"] = "6GB"
    assert ServingLimits.from_model_config(cfg, "cpu").max_memory == "6GB"


def test_request_schema_matches_the_limits(limits):
    schema = request_schema(limits)
    assert schema["required"] == ["style"]
    assert schema["oneOf"] == [{"required": ["content"]}, {"required": ["video"]}]
    assert set(schema["properties"]) == set(allowed_fields(limits))
    assert schema["properties"]["size"]["maximum"] == limits.max_size
    assert schema["properties"]["steps"]["default"] == PRESETS[limits.preset].steps
