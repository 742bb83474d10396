"""nsf.config: one default per option, validation that names the bad value, presets."""

from __future__ import annotations

import dataclasses
import math

import pytest

from nsf import config as C
from nsf.config import PRESETS, StyleConfig, make_config, preset
from nsf.errors import ConfigError


def test_defaults_are_defined_once():
    cfg = make_config()
    assert cfg == StyleConfig()
    assert PRESETS["default"] == StyleConfig()
    for f in dataclasses.fields(StyleConfig):
        assert getattr(cfg, f.name) == f.default, f.name
        assert f.metadata.get("help"), f"option {f.name} has no help text"
    assert C.FIELD_NAMES == tuple(f.name for f in dataclasses.fields(StyleConfig))


def test_model_default_config_is_the_dataclass_default(model):
    assert model.config == StyleConfig()


def test_default_values_are_sane():
    cfg = StyleConfig()
    assert cfg.optimizer in C.OPTIMIZERS and cfg.init in C.INITS and cfg.resize in C.RESIZES
    assert cfg.scales[-1] == 1.0 and len(cfg.scale_steps) == len(cfg.scales)
    assert C.validate(cfg) is cfg


def test_mutable_defaults_are_refused():
    with pytest.raises(TypeError):
        C._opt([], "a list")


def test_overrides_and_replace():
    cfg = make_config(size=64, steps=5, optimizer="adam", lr=0.1)
    assert (cfg.size, cfg.steps, cfg.optimizer, cfg.lr) == (64, 5, "adam", 0.1)
    assert cfg.replace(steps=7).steps == 7
    assert cfg.replace(steps=7).size == 64
    assert make_config(cfg, seed=3).optimizer == "adam"
    assert make_config("fast", seed=3) == dataclasses.replace(PRESETS["fast"], seed=3)


def test_sequences_become_tuples():
    cfg = make_config(style_layers=["relu1_1", "relu2_1"], style_layer_weights=[1, 2], content_layers="relu3_1")
    assert cfg.style_layers == ("relu1_1", "relu2_1")
    assert cfg.style_layer_weights == (1.0, 2.0)
    assert cfg.content_layers == ("relu3_1",)
    assert make_config(scales=1.0, scale_steps=1).scales == (1.0,)


def test_layer_mapping_sets_weights():
    cfg = make_config(style_layers={"relu1_1": 0.5, "relu3_1": 2.0}, content_layers={"conv4_2": 3.0})
    assert cfg.style_layers == ("relu1_1", "relu3_1")
    assert cfg.style_layer_weights == (0.5, 2.0)
    assert cfg.content_layers == ("conv4_2",)
    assert cfg.content_layer_weights == (3.0,)


def test_new_layers_drop_old_weights():
    cfg = make_config("seed", style_layers=("relu1_1", "relu2_1"))
    assert cfg.style_layer_weights is None


def test_to_dict_round_trip():
    cfg = make_config("seed")
    assert StyleConfig(**cfg.to_dict()) == cfg


def test_seed_preset_values():
    cfg = preset("seed")
    assert cfg.size == 400
    assert cfg.resize == "square"
    assert cfg.style_layers == ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    assert cfg.style_layer_weights == (0.85, 0.56, 0.11, 0.15, 0.2)
    assert cfg.content_layers == ("relu4_2",)
    assert cfg.content_layer_weights is None
    assert cfg.gram_norm == "none"
    assert cfg.normalize_losses is False
    assert cfg.content_weight == 100
    assert cfg.style_weight == 40
    assert cfg.tv_weight == 0
    assert cfg.optimizer == "adam"
    assert cfg.lr == 0.02
    assert cfg.steps == 2000
    assert cfg.init == "content"
    assert cfg.scales == (1.0,)
    assert C.validate(cfg) is cfg


def test_every_preset_is_valid():
    assert set(PRESETS) == {"default", "seed", "fast", "quality"}
    for name, cfg in PRESETS.items():
        assert make_config(name) == cfg
        assert C.validate(cfg) is cfg


BAD_VALUES = [
        ({"steps": -1}, "steps=-1"),
        ({"steps": 0}, "steps=0"),
        ({"steps": 10**9}, "steps=1000000000"),
        ({"size": -64}, "size=-64"),
        ({"size": 8}, "size=8"),
        ({"size": 100_000}, "size=100000"),
        ({"size": 64.5}, "size=64.5"),
        ({"size": True}, "size=True"),
        ({"steps": "10"}, "steps='10'"),
        ({"content_weight": -1.0}, "content_weight=-1.0"),
        ({"style_weight": -0.5}, "style_weight=-0.5"),
        ({"tv_weight": -2.0}, "tv_weight=-2.0"),
        ({"style_weight": math.nan}, "style_weight=nan"),
        ({"content_weight": math.inf}, "content_weight=inf"),
        ({"style_weight": 1e13}, "style_weight=10000000000000.0"),
        ({"content_weight": 0.0, "style_weight": 0.0}, "both 0"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"tol": 2.0}, "tol=2.0"),
        ({"patience": 0}, "patience=0"),
        ({"seed": -1}, "seed=-1"),
        ({"max_pixels": 10}, "max_pixels=10"),
        ({"style_scale": 0.0}, "style_scale=0.0"),
        ({"optimizer": "sgd"}, "'sgd'"),
        ({"gram_norm": "hw"}, "'hw'"),
        ({"resize": "crop"}, "'crop'"),
        ({"init": ""}, "init=''"),
        ({"style_layers": ("relu1_1", "relu9_1")}, "'relu9_1'"),
        ({"content_layers": ("fc7",)}, "'fc7'"),
        ({"style_layers": ()}, "at least one"),
        ({"style_layer_weights": (1.0, 2.0)}, "2 values for 5 layers"),
        ({"content_layer_weights": (1.0, 1.0)}, "2 values for 1 layers"),
        ({"style_layer_weights": (1.0, -1.0, 1.0, 1.0, 1.0)}, "style_layer_weights=-1.0"),
        ({"style_layer_weights": (1.0, math.nan, 1.0, 1.0, 1.0)}, "style_layer_weights=nan"),
        ({"style_blend_weights": (1.0, -1.0)}, "style_blend_weights=-1.0"),
        ({"style_blend_weights": (0.0, 0.0)}, "sum to 0"),
        ({"scales": (0.25, 0.5), "scale_steps": (0.5, 0.5)}, "scales=(0.25, 0.5)"),
        ({"scales": (1.0, 0.5), "scale_steps": (0.5, 0.5)}, "scales=(1.0, 0.5)"),
        ({"scales": (0.0, 1.0), "scale_steps": (0.5, 0.5)}, "scales=(0.0, 1.0)"),
        ({"scales": (0.5, 1.0)}, "scale_steps=(0.6, 0.3, 0.1)"),
        ({"scale_steps": (0.0, 0.0, 0.0)}, "scale_steps=(0.0, 0.0, 0.0)"),
        ({"scale_steps": (0.5, -0.5, 1.0)}, "scale_steps=(0.5, -0.5, 1.0)"),
        ({"style_layer_weights": ("a", "b")}, "style_layer_weights=('a', 'b')"),
        ({"init": "start.png"}, "init='start.png'"),
        ({"style_layers": "relu1_1,relu2_1"}, "'relu1_1,relu2_1'"),
        ({"style_loss": "wasserstein"}, "'wasserstein'"),
        ({"preserve_color": "sepia"}, "'sepia'"),
        ({"preserve_color": "true"}, "'true'"),  # text is a choice; only the bools True/False are aliases
        ({"iterate_average": -0.1}, "iterate_average=-0.1"),
        ({"iterate_average": 1.0}, "iterate_average=1.0"),
        ({"iterate_average": 1.5}, "iterate_average=1.5"),
]


@pytest.mark.parametrize(("overrides", "needle"), BAD_VALUES)
def test_bad_values_raise_value_error_naming_them(overrides, needle):
    with pytest.raises(ValueError) as e:
        make_config(**overrides)
    msg = str(e.value)
    assert needle in msg
    # ...and says what would be accepted
    assert any(hint in msg for hint in ("allowed", "valid names", "give one per layer", "must be"))


@pytest.mark.parametrize(("overrides", "needle"), BAD_VALUES)
def test_bad_values_raise_a_config_error_with_field_value_and_allowed(overrides, needle):
    # structured: a server maps it to {error, field, allowed} without reading the message
    with pytest.raises(ConfigError) as e:
        make_config(**overrides)
    err = e.value
    assert err.field in C.FIELD_NAMES and err.field in str(err).replace(" layer name", "_layers"), err
    assert err.allowed, err
    if len(overrides) == 1 and err.field in overrides and "sequence" not in str(err):
        value = overrides[err.field]  # the value at fault: the option, or the one item of it that is out of range
        assert repr(err.value) in repr(value) or repr(value) in repr(err.value), err
    if err.field in ("optimizer", "gram_norm", "resize", "stroke_scale", "init", "style_loss", "preserve_color"):
        assert isinstance(err.allowed, list) and err.value not in err.allowed


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError) as e:
        make_config(stepz=10)
    assert (e.value.field, e.value.value) == ("stepz", 10) and list(C.FIELD_NAMES) == e.value.allowed
    with pytest.raises(ConfigError) as e:
        preset("nope")
    assert (e.value.field, e.value.value, e.value.allowed) == ("preset", "nope", list(PRESETS))
    with pytest.raises(ConfigError) as e:
        make_config(style_layers=("relu1_1", "relu9_1"))
    assert e.value.field == "style_layers" and "relu5_1" in e.value.allowed


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        make_config(stepz=10, colour=True)
    msg = str(e.value)
    assert "colour, stepz" in msg
    for name in C.FIELD_NAMES:
        assert name in msg


def test_unknown_preset_lists_valid_ones():
    for bad in ("nope", None):
        with pytest.raises(ValueError) as e:
            preset(bad)  # type: ignore[arg-type]
        assert repr(bad) in str(e.value)
        assert "default, seed, fast, quality" in str(e.value)
    with pytest.raises(ValueError, match="'nope'"):
        make_config("nope")


def test_validate_catches_direct_construction():
    with pytest.raises(ValueError, match="steps=-3"):
        C.validate(StyleConfig(steps=-3))


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        StyleConfig().steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("option", ["size", "steps", "seed", "content_weight", "lr", "tol", "style_blend_weights"])
@pytest.mark.parametrize("value", [10**400, -(10**400)])
def test_numbers_too_big_for_a_float_are_a_value_error(option, value):
    with pytest.raises(ValueError, match=f"{option}="):
        make_config(**{option: value})


@pytest.mark.parametrize("bad,match", [({"base_size": 20}, "base_size=20 is out of range"),
                                       ({"base_size": 1.5}, "base_size=1.5 must be an integer"),
                                       ({"refine_steps": ()}, "refine_steps=\\(\\); allowed"),
                                       ({"refine_steps": (3, -1)}, "refine_steps=-1 is out of range"),
                                       ({"stroke_scale": "brush"},
                                        "unknown stroke_scale 'brush'; allowed: picture, pixels")])
def test_large_size_options_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        make_config(**bad)


def test_large_size_options_accept_their_forms():
    cfg = make_config(base_size=0, refine_steps=[4, 2], stroke_scale="pixels")
    assert (cfg.base_size, cfg.refine_steps, cfg.stroke_scale) == (0, (4, 2), "pixels")
    assert make_config(refine_steps=3).refine_steps == (3,)


def test_preserve_color_is_a_choice_that_still_takes_bools():
    assert StyleConfig().preserve_color == "off"
    assert make_config(preserve_color=True).preserve_color == "luminance"
    assert make_config(preserve_color=False).preserve_color == "off"
    for mode in C.COLOR_MODES:
        assert make_config(preserve_color=mode).preserve_color == mode
    assert make_config(preserve_color=True).replace(steps=3).preserve_color == "luminance"
    with pytest.raises(ConfigError) as e:  # built directly, a bool is not mapped: validate names the choices
        C.validate(StyleConfig(preserve_color=True))  # type: ignore[arg-type]
    assert e.value.field == "preserve_color" and e.value.allowed == list(C.COLOR_MODES)


def test_style_loss_and_iterate_average_defaults_and_choices():
    cfg = StyleConfig()
    assert (cfg.style_loss, cfg.iterate_average) == ("gram", 0.0)
    for loss in ("gram", "mean_cov", "sliced"):
        assert make_config(style_loss=loss).style_loss == loss
    assert make_config(iterate_average=0.99).iterate_average == 0.99
    with pytest.raises(ConfigError) as e:
        make_config(style_loss="wasserstein")
    assert e.value.allowed == ["gram", "mean_cov", "sliced"]
