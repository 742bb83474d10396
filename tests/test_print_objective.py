"""A print = its preview + detail (issue 23): at the refinement scales above base_size, the output downsampled to the
base scale's size is scored by the base scale's objective (the preview term, ``refine_preview_weight``), and the
full-size objective matches only ``refine_detail_layers``, against the style at its own resolution.

Weight 0 is the earlier objective exactly; the preview term's gradient is autograd's through the downsampling
(checked against finite differences) and exact under tiling, with a video's pixel term as well."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_tiled_step_equal, random_image, smooth_image
from torch.testing import assert_close

from nsf import optimize as O
from nsf import tiling
from nsf.config import StyleConfig, make_config
from nsf.errors import ConfigError
from nsf.vgg import FeatureExtractor

# content relu4_2 and every default style layer; a 32 px base and a 64-96 px print
CFG = make_config(size=64, base_size=32, steps=4, scales=(1.0,), scale_steps=(1.0,), refine_steps=(2,), tol=0.0)


class Recording(FeatureExtractor):
    """The real extractor, noting the size of every image it runs on (which style sizes a run used)."""

    seen: list[tuple[int, int]]

    def forward(self, images):
        self.seen.append((images.shape[-2], images.shape[-1]))
        return super().forward(images)

    def for_layers(self, layers):  # a shallower scale's extractor notes into the same list
        other = Recording(self.normalize, self.body, layers, autocast=self.autocast, channels_last=self.channels_last)
        other.seen = self.seen
        return other


def _extractor(model, layers=CFG.layers, dtype=torch.float64):
    ext = Recording(copy.deepcopy(model.normalize).to(dtype), copy.deepcopy(model.features).to(dtype), layers)
    ext.seen = []
    return ext


# --- the rule the loop and the planner share ----------------------------------------------------------


def test_preview_size_is_the_base_scales_size_at_refinement_scales_only():
    cfg = make_config(size=2048, base_size=512)
    plan = O.schedule(345, 512, cfg)
    base = [hw for i, hw, _ in plan if not O.is_refinement(cfg, i)][-1]
    assert base == (345, 512)
    sizes = [O.preview_size(345, 512, cfg, i) for i, _, _ in plan]
    assert sizes == [None, None, None, (345, 512), (345, 512)]  # 128, 256, 512 | 1024, 2048
    assert [O.preview_size(345, 512, cfg.replace(refine_preview_weight=0), i) for i, _, _ in plan] == [None] * 5
    assert O.preview_size(640, 480, cfg.replace(resize="square"), 3) == (512, 512)
    small = make_config(size=512)
    assert all(O.preview_size(345, 512, small, i) is None for i, _, _ in O.schedule(345, 512, small))


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_style_side_never_upscales_and_uses_a_large_style_at_its_own_size_with_the_preview(weight):
    cfg = make_config(size=2048, base_size=512, refine_preview_weight=weight)
    refine, coarse = len(cfg.scales), len(cfg.scales) - 1
    # a 512 px style: never upscaled, at every scale, either way
    assert O.style_side((1024, 1024), (512, 384), cfg, refine) == 512
    assert O.style_side((256, 256), (512, 384), cfg, coarse - 1) == 256  # downscaled with the composition
    # a 3000 px scan at a 1024 px refinement scale: its own size with the preview term; the scale's size without
    assert O.style_side((768, 1024), (3000, 2000), cfg, refine) == (3000 if weight else 1024)
    assert O.style_side((384, 512), (3000, 2000), cfg, coarse) == 512  # the coarse scales: as before
    assert O.style_side((768, 1024), (3000, 2000), cfg.replace(style_scale=0.5), refine) == (1500 if weight else 512)
    # stroke_scale=picture: resized with the output, as before
    assert O.style_side((768, 1024), (512, 384), cfg.replace(stroke_scale="picture"), refine) == 1024
    (out,) = O._resize_style(torch.rand(1, 3, 300, 200), (64, 96), cfg, refine)
    assert tuple(out.shape[-2:]) == ((300, 200) if weight else (96, 64))


def test_refined_keeps_every_style_layer_when_the_preview_is_off_and_the_detail_layers_when_on():
    cfg = make_config(size=2048, style_layer_weights=(1, 2, 3, 4, 5), refine_style_layer_weights=(1, 1, 2, 4, 4),
                      refine_content_weight=0.5)
    off = O.refined(cfg.replace(refine_preview_weight=0))
    assert off.style_layers == cfg.style_layers and off.style_layer_weights == (1, 2, 6, 16, 20)
    assert off.content_weight == 0.5
    on = O.refined(cfg.replace(refine_preview_weight=2.0))
    assert on.style_layers == ("relu1_1", "relu2_1", "relu3_1") and on.style_layer_weights == (1, 2, 6)
    assert on.content_weight == 0.5
    picked = O.refined(cfg.replace(refine_detail_layers=("relu3_1", "relu1_1", "relu1_2")))
    assert picked.style_layers == ("relu1_1", "relu3_1")  # in style_layers' order; relu1_2 is not a style layer


# --- the objective ------------------------------------------------------------------------------------


def _preview_objectives(ext, cfg, content, style, tile=None, pixel_loss=None, weight=0.7):
    """The full-size objective of a refinement scale with its preview term, as run() builds them, and the parts."""
    small = (content.shape[-2] // 2, content.shape[-1] // 2)
    base = O.Objective(ext, cfg, O.resize(content, small), O.style_targets(ext, [O.resize(style, small)], (1.0,), cfg))
    detail = O.refined(cfg)
    full_targets = O.style_targets(ext, [style], (1.0,), detail)
    preview = O.Preview(base, weight)
    objective = O.Objective(ext, detail, content, full_targets, tile=tile, pixel_loss=pixel_loss, preview=preview)
    bare = O.Objective(ext, detail, content, full_targets, pixel_loss=pixel_loss)
    return objective, bare, base


def _loss_and_grad(objective, x):
    xr = x.clone().requires_grad_(True)
    loss, parts = objective(xr)
    return loss.detach(), parts, torch.autograd.grad(loss.sum(), xr)[0]


def test_the_preview_term_is_the_base_objective_of_the_downsampled_image_and_its_gradient_is_exact(model):
    ext = _extractor(model)
    content = smooth_image(64, 80, seed=1, batch=2).double()
    style = random_image(64, 64, seed=2).double()
    x = random_image(64, 80, seed=3, batch=2).double()
    objective, bare, base = _preview_objectives(ext, CFG, content, style)
    loss, parts, grad = _loss_and_grad(objective, x)
    l0, p0, g0 = _loss_and_grad(bare, x)
    small = F.interpolate(x, size=(32, 40), mode="bilinear", align_corners=False, antialias=True)
    lb, pb = base(small)
    assert_close(loss, l0 + 0.7 * lb.detach(), rtol=1e-12, atol=0)
    assert_close(parts, p0 + 0.7 * pb, rtol=1e-12, atol=1e-30)  # content and style parts hold the preview's too
    assert float((grad - g0).abs().max()) > 0  # the term pulls the image
    # the term's gradient: autograd's through the downsampling (the chain rule is autograd's, not written again)
    xs = x.clone().requires_grad_(True)
    (gb,) = torch.autograd.grad(base(F.interpolate(xs, size=(32, 40), mode="bilinear", align_corners=False,
                                                   antialias=True))[0].sum(), xs)
    assert_close(grad - g0, 0.7 * gb, rtol=1e-9, atol=1e-15 * float(gb.abs().max()))
    x1 = x[1:].clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(_preview_objectives(ext, CFG, content[1:], style)[0](x1)[0].sum(), x1)
    assert_close(g1, grad[1:], rtol=1e-9, atol=1e-18)


@pytest.mark.slow  # float64 VGG-19 runs: 5-20 CPU s
def test_the_gradient_with_the_preview_term_matches_finite_differences(model):
    """torch.autograd.gradcheck (central differences, float64) of the whole objective with its preview term, on a
    16x20 image and a shallow slice of VGG-19 (few ReLU kinks near the image)."""
    cfg = make_config(content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"),
                      refine_detail_layers=("relu1_1",))
    ext = _extractor(model, cfg.layers)
    content, style = smooth_image(16, 20, seed=14).double(), random_image(16, 16, seed=15).double()
    objective, _, _ = _preview_objectives(ext, cfg, content, style)
    assert objective.preview.size == (8, 10)
    x = random_image(16, 20, seed=16).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: objective(y)[0], (x,), eps=1e-6, atol=1e-8, rtol=1e-4)


@pytest.mark.slow  # float64 VGG-19 runs: 5-20 CPU s
@pytest.mark.parametrize("with_pixel_loss", [False, True], ids=["preview", "preview+pixel-loss"])
def test_tiled_equals_untiled_with_the_preview_term(model, with_pixel_loss):
    """Loss, parts and gradient 1e-9 in float64, a batch of 2; a video's pixel term (pixel_loss) as well."""
    ext = _extractor(model)
    content = smooth_image(96, 112, seed=5, batch=2).double()
    style = random_image(80, 72, seed=6).double()
    x = random_image(96, 112, seed=7, batch=2).double()
    anchor = random_image(96, 112, seed=8, batch=2).double()
    pixel = (lambda y: 2.0 * (y - anchor).pow(2).flatten(1).mean(1)) if with_pixel_loss else None
    whole, _, _ = _preview_objectives(ext, CFG, content, style, pixel_loss=pixel)
    tiled, _, _ = _preview_objectives(ext, CFG, content, style, tile=(32, 48), pixel_loss=pixel)
    assert tiled.tiles > 4
    assert_tiled_step_equal(whole, tiled, x)


# --- whole runs ---------------------------------------------------------------------------------------


def test_weight_0_runs_the_earlier_objective(model):
    """refine_preview_weight=0: no preview term, every style layer at full size, the style sized as before (a style
    larger than a refinement scale is brought down to it): the detail-layer option then changes nothing."""
    ext = _extractor(model, dtype=torch.float32)
    content = smooth_image(48, 64, seed=9)
    style = random_image(120, 100, seed=10)  # larger than the 64 px refinement scale
    off = CFG.replace(refine_preview_weight=0)
    a = O.run(ext, content, [style], off)
    styles_seen = [hw for hw in ext.seen if hw in ((120, 100), (64, 53), (32, 27))]
    assert (120, 100) not in styles_seen and (64, 53) in styles_seen  # the style at the scale's size, as before
    b = O.run(ext, content, [style], off.replace(refine_detail_layers=("relu5_1",)))
    assert torch.equal(a, b)
    c = O.run(ext, content, [style], CFG)  # the preview term on (the default): a different print
    assert (a - c).abs().max() > 1e-3


def test_a_run_with_the_preview_uses_a_large_style_at_its_own_size_and_builds_the_preview_once(model):
    ext = _extractor(model, dtype=torch.float32)
    content = smooth_image(48, 64, seed=9)
    style = random_image(150, 120, seed=10)
    cfg = CFG.replace(size=128, refine_steps=(2, 1))  # two refinement scales: 64 and 128 px
    out = O.run(ext, content, [style], cfg)
    assert out.shape == (1, 3, 96, 128)
    # the style at its own size at each refinement scale, never resized: larger than the scale, it runs in tiles of
    # the scale's long side (its pass needs no more memory than the scale's)
    narrow = tiling.geometry(ext.body, ext.module_names, O.refined(cfg).style_layers)  # the styles: style layers
    for side in (64, 128):
        windows = [(t.wr1 - t.wr0, t.wc1 - t.wc0) for t in tiling.tiles(150, 120, (side, side), narrow)]
        assert all(w in ext.seen for w in windows), side
    assert ext.seen.count((32, 26)) == 2  # the style at the base scale's size: the base scale and one preview
    assert (24, 32) in ext.seen  # the preview: the output downsampled to the base scale's size


@pytest.mark.slow  # float64 VGG-19 runs: 5-20 CPU s
@pytest.mark.parametrize("resume", [False, True])
def test_tiled_run_equals_untiled_run_with_the_preview_in_float64(model, resume):
    cfg = CFG.replace(size=96, refine_steps=(2,), refine_preview_weight=0.5)
    ext = _extractor(model)
    content = smooth_image(72, 96, seed=11).double()
    style = random_image(80, 80, seed=12).double()
    plan = O.schedule(72, 96, cfg)
    assert [hw for _, hw, _ in plan] == [(24, 32), (48, 64), (72, 96)]
    kw = {"resume": (1, smooth_image(24, 32, seed=13).double())} if resume else {}
    whole = O.run(ext, content, [style], cfg, **kw)
    tiled = O.run(ext, content, [style], cfg, layout=[O.Layout(), O.Layout((16, 32)), O.Layout((32, 48))], **kw)
    assert_close(tiled, whole, rtol=0, atol=1e-9)


# --- options ------------------------------------------------------------------------------------------


def test_the_options_validate_with_field_and_allowed():
    assert StyleConfig().refine_detail_layers == ("relu1_1", "relu2_1", "relu3_1")
    assert make_config(refine_detail_layers="relu2_1").refine_detail_layers == ("relu2_1",)
    with pytest.raises(ConfigError) as e:
        make_config(refine_detail_layers=("relu1_1", "relu9_9"))
    assert e.value.field == "refine_detail_layers" and "relu1_1" in e.value.allowed and "relu9_9" in str(e.value)
    with pytest.raises(ConfigError) as e:
        make_config(refine_preview_weight=-1)
    assert e.value.field == "refine_preview_weight" and e.value.allowed == ">= 0.0 and <= 1e+12"
    with pytest.raises(ConfigError) as e:
        make_config(refine_preview_weight="heavy")
    assert e.value.field == "refine_preview_weight"
    # detail layers that name none of the style layers, where a run has refinement scales and the term is on
    with pytest.raises(ConfigError) as e:
        make_config(size=1024, style_layers=("relu4_1", "relu5_1"))
    assert e.value.field == "refine_detail_layers" and "relu4_1, relu5_1" in e.value.allowed
    make_config(size=512, style_layers=("relu4_1", "relu5_1"))  # no refinement scale: nothing to match
    make_config(size=1024, style_layers=("relu4_1",), refine_preview_weight=0)  # the term off: the earlier objective
