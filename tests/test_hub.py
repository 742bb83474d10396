"""hubconf.py: offline local load, the public entry points, and the docstring torch.hub.help shows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def local_repo(monkeypatch):
    """Make torch.hub.list/help (GitHub-only in this torch) resolve to this checkout."""
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *a, **k: str(REPO))


def test_local_load_offline_and_stylize(empty_torch_home, tmp_path):
    model = torch.hub.load(str(REPO), "style_fusion", source="local", device="cpu")
    assert type(model).__name__ == "StyleFusion"
    assert model.weights_name == "caffe"
    content = Image.new("RGB", (48, 32), (200, 60, 60))
    style = Image.effect_noise((40, 40), 60).convert("RGB")
    out = model.stylize(content, style, size=40, steps=3, seed=0)
    assert isinstance(out, Image.Image)
    assert out.size == (40, 27)  # longer side = size, aspect kept (48x32 -> 40x26.7)
    assert list(empty_torch_home.iterdir()) == []  # nothing was downloaded or cached


def test_new_options_through_the_hub(empty_torch_home):
    """style_loss, iterate_average and preserve_color (a choice; True/False as before) as hub kwargs: the
    model's defaults, and per call."""
    model = torch.hub.load(str(REPO), "style_fusion", source="local", device="cpu", style_loss="mean_cov",
                           iterate_average=0.5, preserve_color=True)
    assert (model.config.style_loss, model.config.iterate_average, model.config.preserve_color) == \
        ("mean_cov", 0.5, "luminance")
    content = Image.new("RGB", (40, 32), (200, 60, 60))
    style = Image.effect_noise((40, 40), 60).convert("RGB")
    result = model.run(content, style, size=32, steps=2, style_loss="sliced", preserve_color="histogram")
    assert isinstance(result.pil(), Image.Image)
    params = result.metadata["params"]
    assert (params["style_loss"], params["iterate_average"], params["preserve_color"]) == \
        ("sliced", 0.5, "histogram")
    with pytest.raises(ValueError, match="allowed: gram, mean_cov, sliced"):
        torch.hub.load(str(REPO), "style_fusion", source="local", device="cpu", style_loss="w2")


def test_masks_through_the_hub(empty_torch_home):
    """Regional styles from a hub model: PIL masks, one per style; the provenance records them."""
    model = torch.hub.load(str(REPO), "style_fusion", source="local", device="cpu")
    content = Image.new("RGB", (40, 32), (200, 60, 60))
    styles = [Image.effect_noise((40, 40), 60).convert("RGB"), Image.new("RGB", (40, 40), (20, 40, 200))]
    left = Image.new("L", (40, 32), 0)
    left.paste(255, (0, 0, 20, 32))
    right = Image.eval(left, lambda v: 255 - v)
    result = model.run(content, styles, masks=[left, right], style_masks=[None, right.resize((40, 40))], size=32,
                       steps=2, seed=0)
    assert result.pil().size == (32, 26)
    assert result.metadata["masks"] == result.masks == {"masks": 2, "style_masks": 1}


def test_list_shows_only_public_entry_points(local_repo):
    assert torch.hub.list("owner/nsf", trust_repo=True) == ["style_fusion"]


def test_help_documents_args_returns_and_offline_example(local_repo):
    doc = torch.hub.help("owner/nsf", "style_fusion", trust_repo=True)
    for needle in ("Args:", "Returns:", "weights", "device", "compile", 'source="local"', "stylize("):
        assert needle in doc


def test_hubconf_declares_dependencies_that_import():
    import importlib.util

    ns: dict = {}
    exec((REPO / "hubconf.py").read_text(), ns)
    assert {"torch", "torchvision", "PIL"} <= set(ns["dependencies"])
    assert all(importlib.util.find_spec(d) is not None for d in ns["dependencies"])


def test_entry_point_is_keyword_only():
    ns: dict = {}
    exec((REPO / "hubconf.py").read_text(), ns)
    with pytest.raises(TypeError):
        ns["style_fusion"]("caffe")
