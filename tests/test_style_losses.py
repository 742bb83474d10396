"""nsf.style_losses: each loss one class registered once. A new loss is one class: a toy loss registered here runs
through the options, run() (whole and tile by tile: the same image) and the planner, with no other change."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_image, smooth_image
from torch.testing import assert_close

from nsf import losses
from nsf import optimize as O
from nsf import plan as P
from nsf import style_losses as S
from nsf.config import StyleConfig, make_config
from nsf.errors import ConfigError
from nsf.vgg import FeatureExtractor

CONTENT, STYLE = ("relu4_2",), ("relu1_1", "relu2_1", "relu3_1")


class Means(S.StyleLoss):
    """A toy loss: the mean squared error of each layer's feature means (a sum over positions: it tiles)."""

    name = "toy_means"
    title = "feature-mean"
    summary = "MSE of the feature means"
    reads = frozenset({S.MEANS})
    cost = 1.5

    def target(self, styles):
        return sum(w * torch.cat([p.mean for p in parts]) for w, parts in styles)

    def distance(self, target, *, gram, mean, features):
        return losses.mse_per_image(mean, target)

    def floor(self, target):
        return 1e-6 * target.pow(2).mean(1)


@pytest.fixture
def toy():
    S.register(Means)
    try:
        yield S.style_loss(Means.name)
    finally:
        S.unregister(Means.name)


def test_the_registry_holds_each_loss_once_with_what_the_others_read():
    assert list(S.REGISTRY)[:3] == ["gram", "mean_cov", "sliced"]
    gram, mean_cov, sliced = (S.style_loss(n) for n in ("gram", "mean_cov", "sliced"))
    assert gram.tiles and mean_cov.tiles and not sliced.tiles
    assert gram.masks and mean_cov.masks and not sliced.masks
    assert (gram.cost, mean_cov.cost, sliced.cost) == (1.0, 1.2, 2.0)  # measured (bench/RESULTS.md)
    assert sliced.resamples and not gram.resamples
    with pytest.raises(ValueError, match="registered already"):
        S.register(type(gram))
    with pytest.raises(ConfigError) as e:
        S.style_loss("nope")
    assert e.value.field == "style_loss" and e.value.allowed == list(S.REGISTRY)


def test_the_options_read_the_registry(toy):
    cfg = make_config(style_loss=Means.name)  # registered after nsf.config was imported: a choice all the same
    assert cfg.style_loss == "toy_means"
    for name in ("gram", "mean_cov", "sliced"):
        assert name in StyleConfig.__dataclass_fields__["style_loss"].metadata["help"]
    with pytest.raises(ConfigError) as e:
        make_config(style_loss="nope")
    assert e.value.allowed == ["gram", "mean_cov", "sliced", "toy_means"]


def test_a_new_loss_runs_whole_and_tiled_to_the_same_image_and_is_planned(model, toy):
    cfg = make_config(content_layers=CONTENT, style_layers=STYLE, style_loss=Means.name, size=96, steps=4,
                      scales=(0.5, 1.0), scale_steps=(0.5, 0.5), tol=0.0)
    layers = (*CONTENT, *STYLE)
    ext = FeatureExtractor(copy.deepcopy(model.normalize).double(), copy.deepcopy(model.features).double(), layers)
    content, style = smooth_image(96, 80, seed=1).double(), random_image(64, 64, seed=2).double()
    costs = model.costs(cfg)
    free = P.plan(costs, cfg, (96, 80), budget=None, in_use=0)
    assert not free.tiled and free.step_cost == 1.5 and P.step_cost(cfg, masks=2) == pytest.approx(1.5 * 1.14)
    seen = []
    whole = O.run(ext, content, [style], cfg, callback=seen.append)
    layout = [O.Layout(None), O.Layout((32, 32))]
    tiled = O.run(ext, content, [style], cfg, layout=layout)
    assert_close(tiled, whole, rtol=0, atol=1e-9)
    assert seen[-1].style < seen[0].style  # the toy loss is optimized
    regions = [O.Region(O.style_targets(ext, [style], (1.0,), cfg), torch.ones(1, 1, 96, 80, dtype=torch.float64))]
    plain = O.Objective(ext, cfg, content, O.style_targets(ext, [style], (1.0,), cfg))
    masked = O.Objective(ext, cfg, content, regions)  # reads sums: it takes masks; a mask of ones is the plain run
    assert_close(masked(content)[0], plain(content)[0], rtol=1e-12, atol=0)


def test_a_loss_of_whole_feature_maps_is_refused_tiles_and_masks_by_its_own_words():
    sliced = S.style_loss("sliced")
    e = sliced.tiling_refusal("cannot run tile by tile")
    assert e.field == "style_loss" and e.allowed == ["gram", "mean_cov"]
    assert str(e).startswith("style_loss='sliced' cannot run tile by tile: it sorts each projection over the whole")
    m = sliced.masks_refusal()
    assert m.allowed == ["gram", "mean_cov"] and "built for the Gram and mean-covariance losses" in str(m)
