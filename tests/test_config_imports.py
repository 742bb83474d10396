"""Import hygiene in one subprocess: the options, the schedule, the run's events and the style-loss registry load
without torch; `import nsf` builds no network; building the model imports no torchvision. And every choice
option carries its choices as metadata, once."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from nsf.config import CHOICE_FIELDS, StyleConfig, make_config
from nsf.errors import ConfigError

CODE = r"""
import json, sys
seen = {}
import nsf.config, nsf.style_losses, nsf.layers, nsf.geometry
from nsf.optimize import schedule, ScaleDone, Layout
schedule(300, 400, nsf.config.make_config())
seen["torch after the options, schedule and events"] = "torch" in sys.modules
import torch.nn as nn
calls = []
orig = nn.Conv2d.__init__
def spy(self, *a, **k):
    calls.append(1)
    orig(self, *a, **k)
nn.Conv2d.__init__ = spy
import nsf, nsf.cli
seen["convs built by import nsf"] = len(calls)
from nsf.optimize import run
from nsf.vgg import vgg19_features
vgg19_features(device="meta")
seen["torchvision after building VGG-19"] = "torchvision" in sys.modules
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_imports_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == {"torch after the options, schedule and events": False,
                                                       "convs built by import nsf": 0,
                                                       "torchvision after building VGG-19": False}


def test_every_choice_field_has_its_choices_as_metadata():
    strs = [f.name for f in dataclasses.fields(StyleConfig) if f.type in ("str", str)]
    assert sorted(CHOICE_FIELDS) == sorted(strs) == sorted(["gram_norm", "style_loss", "optimizer", "init",
                                                            "preserve_color", "stroke_scale", "resize"])
    for name, choices in CHOICE_FIELDS.items():
        default = getattr(StyleConfig(), name)
        assert default in choices, name
        with pytest.raises(ConfigError) as e:
            make_config(**{name: "nope"})
        assert e.value.field == name and e.value.allowed == list(choices)
        for value in choices:
            assert getattr(make_config(**{name: value}), name) == value


def test_the_request_schema_lists_each_choice_field_from_the_metadata():
    from serving_requests import model_config

    from nsf.serving import ServingLimits, request_schema

    fields = [n for n in CHOICE_FIELDS if n != "init"]  # init names a file on the server: never a client's
    schema = request_schema(ServingLimits.from_model_config(model_config(fields=fields), "cpu"))
    for name in fields:
        choices = CHOICE_FIELDS[name]
        assert [v for v in schema["properties"][name]["enum"] if isinstance(v, str)] == list(choices), name
