"""run(pixel_loss=...): a per-image loss of the image itself added to the objective outside the network (a video's
temporal term): its gradient is autograd's, and exact under tiling."""

from __future__ import annotations

import copy

import torch
from conftest import assert_tiled_step_equal, random_image, smooth_image
from torch.testing import assert_close

from nsf import optimize as O
from nsf.config import make_config
from nsf.vgg import FeatureExtractor

CFG = make_config(content_layers=("relu4_2",), style_layers=("relu1_1", "relu2_1", "relu3_1"), size=96, steps=3,
                  scales=(1.0,), scale_steps=(1.0,), tol=0.0)


def _extractor(model):
    return FeatureExtractor(copy.deepcopy(model.normalize).double(), copy.deepcopy(model.features).double(),
                            CFG.layers)


def _quadratic(anchor):
    def pixel_loss(x):  # 3 * mean squared distance to the anchor, per image
        return 3.0 * (x - anchor).pow(2).flatten(1).mean(1)
    return pixel_loss


def test_a_quadratic_pixel_term_adds_its_own_gradient_tiled_or_not(model):
    ext = _extractor(model)
    content, style = smooth_image(96, 80, seed=1, batch=2).double(), random_image(64, 64, seed=2).double()
    anchor = random_image(96, 80, seed=3, batch=2).double()
    x = random_image(96, 80, seed=4, batch=2).double()
    targets = O.style_targets(ext, [style], (1.0,), CFG)
    bare = O.Objective(ext, CFG, content, targets)
    term = O.Objective(ext, CFG, content, targets, pixel_loss=_quadratic(anchor))
    tiled = O.Objective(ext, CFG, content, targets, tile=(32, 32), pixel_loss=_quadratic(anchor))
    assert tiled.tiles > 4

    def loss_and_grad(objective):
        xr = x.clone().requires_grad_(True)
        loss, parts = objective(xr)
        return loss.detach(), parts, torch.autograd.grad(loss.sum(), xr)[0]

    (l0, _, g0), (l1, p1, g1) = loss_and_grad(bare), loss_and_grad(term)
    expected = 3.0 * 2 * (x - anchor) / x[0].numel()  # d/dx of 3 * mean((x - a)^2), per image
    assert_close(l1 - l0, _quadratic(anchor)(x), rtol=1e-12, atol=0)
    assert_close(g1 - g0, expected, rtol=1e-9, atol=1e-15)
    assert_close(p1[:, 2], _quadratic(anchor)(x))  # reported with tv (tv_weight 0 here)
    assert_tiled_step_equal(term, tiled, x)


def test_run_takes_the_pixel_term_and_it_pulls_the_image(model):
    ext = _extractor(model)
    content, style = smooth_image(96, 80, seed=5).double(), random_image(64, 64, seed=6).double()
    anchor = torch.zeros(1, 3, 96, 80, dtype=torch.float64)
    plain = O.run(ext, content, [style], CFG)
    pulled = O.run(ext, content, [style], CFG, pixel_loss=lambda x: 1e3 * (x - anchor[..., :x.shape[-2], :x.shape[-1]])
                   .pow(2).flatten(1).mean(1))
    tiled = O.run(ext, content, [style], CFG, layout=[O.Layout((32, 32))],
                  pixel_loss=lambda x: 1e3 * (x - anchor).pow(2).flatten(1).mean(1))
    assert float(pulled.mean()) < float(plain.mean()) - 0.05  # toward black
    assert_close(tiled, pulled, rtol=0, atol=1e-9)
