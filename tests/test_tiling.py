"""nsf.tiling: the receptive-field geometry, the tiles, and exact tiled steps proven equal to untiled ones
(loss and gradient, 1e-9 in float64, float32 to its precision) for the default and a deep layer set, with the
gram and the mean-covariance style losses; the sliced loss refuses to tile."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_tiled_step_equal, random_image, smooth_image
from torch.testing import assert_close

from nsf import losses, tiling
from nsf import optimize as O
from nsf.config import make_config
from nsf.errors import ConfigError
from nsf.vgg import FeatureExtractor

DEFAULT = make_config()
# reaches relu5_4 and pool5 (stride 32), with a deep content layer
DEEP = make_config(content_layers=("relu4_2", "relu5_4"), style_layers=("relu1_1", "relu3_2", "relu5_4", "pool5"))


def extractor(model, cfg, dtype=torch.float32, autocast=None):
    layers = tuple(dict.fromkeys((*cfg.content_layers, *cfg.style_layers)))
    return FeatureExtractor(copy.deepcopy(model.normalize).to(dtype), copy.deepcopy(model.features).to(dtype), layers,
                            autocast=autocast)


# --- geometry ------------------------------------------------------------------------------------------


def test_relu5_1_reach_by_hand(model):
    """VGG-19 to relu5_1: 12 3x3 convs and 4 2x2 pools. Position k of relu5_1 reads input rows
    16k - 70 .. 16k + 85: a 156 px receptive field on a 16 px grid."""
    ext = model.extractor(DEFAULT.style_layers + DEFAULT.content_layers)
    geo = tiling.geometry(ext.body, ext.module_names, ["relu5_1"])
    assert geo.reach["relu5_1"] == tiling.Reach(16, -70, 85)
    assert geo.reach["relu1_1"] == tiling.Reach(1, -1, 1)
    assert geo.reach["pool1"] == tiling.Reach(2, -2, 3)
    assert (geo.align, geo.before, geo.after) == (16, 80, 70)  # 70 rounded up to the 16 px grid; 85 - 16 + 1
    deep = tiling.geometry(*_body(model, DEEP), ["pool5"])
    assert deep.align == 32


def _body(model, cfg):
    ext = extractor(model, cfg)
    return ext.body, ext.module_names


@pytest.mark.parametrize("side", [33, 64, 100, 151])
def test_feature_size_matches_the_network(model, side):
    ext = extractor(model, DEEP)
    geo = tiling.geometry(ext.body, ext.module_names, ext.layers)
    with torch.no_grad():
        feats = ext(torch.rand(1, 3, side, side + 7))
    for name, f in feats.items():
        assert tuple(f.shape[-2:]) == (geo.feature_size(side, name), geo.feature_size(side + 7, name)), name


def test_tiles_partition_the_image_on_the_grid(model):
    geo = tiling.geometry(*_body(model, DEFAULT), DEFAULT.style_layers)
    h, w = 200, 333
    cover = torch.zeros(h, w, dtype=torch.int32)
    ts = tiling.tiles(h, w, (64, 96), geo)
    for t in ts:
        cover[t.r0:t.r1, t.c0:t.c1] += 1
        assert t.r0 % 16 == 0 and t.c0 % 16 == 0 and t.wr0 % 16 == 0 and t.wc0 % 16 == 0
        assert 0 <= t.wr0 <= t.r0 < t.r1 <= t.wr1 <= h and 0 <= t.wc0 <= t.c0 < t.c1 <= t.wc1 <= w
        assert t.r0 - t.wr0 in (t.r0, 80) and t.wr1 - t.r1 in (h - t.r1, 70)
    assert bool((cover == 1).all())
    assert len(ts) == 4 * 4
    assert tiling.tiles(h, w, None, geo) == [tiling.Tile(0, h, 0, w, 0, h, 0, w)]
    with pytest.raises(ValueError, match="multiples of 16"):
        tiling.tiles(h, w, (50, 64), geo)


# --- exact tiled steps ----------------------------------------------------------------------------------


def _objectives(ext, cfg, content, style, tile):
    targets = O.style_targets(ext, [style], (1.0,), cfg)
    return O.Objective(ext, cfg, content, targets), O.Objective(ext, cfg, content, targets, tile=tile)


CASES = [  # float64 proves equality (its windows reach the image's edges); float32 adds interior tiles with whole halos
    pytest.param(torch.float64, 1e-9, DEFAULT.replace(tv_weight=0.5), (112, 144), (48, 64), id="f64-default"),
    pytest.param(torch.float64, 1e-9, DEEP, (112, 144), (64, 64), id="f64-deep"),
    pytest.param(torch.float32, 2e-5, DEFAULT.replace(tv_weight=0.5), (256, 288), (64, 96), id="f32-default"),
    pytest.param(torch.float32, 2e-5, DEEP, (200, 256), (64, 96), id="f32-deep"),
    # mean_cov is a function of position sums too (means and F F^T / N): it tiles exactly
    pytest.param(torch.float64, 1e-9, DEFAULT.replace(style_loss="mean_cov"), (112, 144), (48, 64), id="f64-mean-cov"),
    pytest.param(torch.float64, 1e-9, DEEP.replace(style_loss="mean_cov"), (112, 144), (64, 64),
                 id="f64-deep-mean-cov"),
]


@pytest.mark.parametrize("dtype,rtol,cfg,hw,tile", CASES)
def test_tiled_step_equals_untiled(model, dtype, rtol, cfg, hw, tile):
    """Same loss and gradient on a batch of 2, every layer and tile edge exercised."""
    ext = extractor(model, cfg, dtype)
    h, w = hw
    content = random_image(h, w, seed=1, batch=2).to(dtype)
    style = smooth_image(90, 120, seed=2).to(dtype)
    x = random_image(h, w, seed=3, batch=2).to(dtype)
    whole, tiled = _objectives(ext, cfg, content, style, tile)
    assert tiled.tiles > 4
    assert_tiled_step_equal(whole, tiled, x, rtol)
    # the targets and normalizers the tiled objective computed tile by tile are the untiled ones
    for n in cfg.content_layers:
        assert_close(tiled.content_targets[n], whole.content_targets[n], rtol=0, atol=0)
    for n in cfg.style_layers:
        assert_close(tiled.style_scale[n], whole.style_scale[n], rtol=rtol * 10, atol=0)


def _cut(ext, after: str) -> int:
    """The module index just after ``after`` (pass 1 keeps the graph from there on)."""
    return ext.module_names.index(after) + 1


KEPT = [  # (config, tile, the layer after which pass 1 keeps each tile's graph)
    pytest.param(DEFAULT.replace(tv_weight=0.5), (48, 64), "relu1_1", id="default-relu1_1"),
    pytest.param(DEFAULT, (48, 64), "pool1", id="default-pool1"),
    pytest.param(DEFAULT, (48, 64), "pool2", id="default-pool2"),
    pytest.param(DEFAULT, (48, 64), "pool3", id="default-pool3"),
    pytest.param(DEFAULT, (48, 64), "pool4", id="default-pool4"),
    pytest.param(DEFAULT, (112, 144), "pool2", id="default-one-tile-pool2"),
    pytest.param(DEEP, (64, 64), "pool3", id="deep-pool3"),
    pytest.param(DEFAULT.replace(style_loss="mean_cov"), (48, 64), "pool2", id="mean-cov-pool2"),
]


@pytest.mark.parametrize("cfg,tile,after", KEPT)
def test_kept_graph_step_equals_untiled(model, cfg, tile, after):
    """Pass 1 keeps each tile's graph from the cut on and pass 2 recomputes only the modules before it: the
    untiled loss and gradient to 1e-9 in float64, at every cut (content and style layers on both sides)."""
    dtype = torch.float64
    ext = extractor(model, cfg, dtype)
    h, w = 112, 144
    content, x = random_image(h, w, seed=1, batch=2).to(dtype), random_image(h, w, seed=3, batch=2).to(dtype)
    targets = O.style_targets(ext, [smooth_image(90, 120, seed=2).to(dtype)], (1.0,), cfg)
    whole = O.Objective(ext, cfg, content, targets)
    kept = O.Objective(ext, cfg, content, targets, tile=tile, cut=_cut(ext, after))
    assert_tiled_step_equal(whole, kept, x)
    seen = []
    kept.value_and_grad(x, lambda done, total: seen.append(done))
    assert seen == list(range(1, kept.tiles + 1))


def test_kept_graph_step_with_masks_equals_untiled(model):
    dtype = torch.float64
    ext = extractor(model, DEFAULT, dtype)
    h, w = 112, 144
    content, x = random_image(h, w, seed=1).to(dtype), random_image(h, w, seed=3).to(dtype)
    ramp = torch.linspace(0, 1, w, dtype=dtype).view(1, 1, 1, w).expand(1, 1, h, w)
    styles = [smooth_image(90, 120, seed=2).to(dtype), random_image(80, 80, seed=4).to(dtype)]
    regions = [O.Region(O.style_targets(ext, [styles[0]], (1.0,), DEFAULT), ramp, 1.0),
               O.Region(O.style_targets(ext, [styles[1]], (1.0,), DEFAULT), 1 - ramp, 0.5)]
    whole = O.Objective(ext, DEFAULT, content, regions)
    kept = O.Objective(ext, DEFAULT, content, regions, tile=(48, 64), cut=_cut(ext, "pool2"))
    assert_tiled_step_equal(whole, kept, x)


def test_kept_graph_run_equals_untiled_run_in_float64(model):
    cfg = make_config(size=128, steps=4, tol=0.0, base_size=64, refine_steps=(2,), scales=(0.5, 1.0),
                      scale_steps=(0.5, 0.5))
    ext = extractor(model, cfg, torch.float64)
    content = smooth_image(96, 128, seed=8).to(torch.float64)
    style = random_image(64, 64, seed=9).to(torch.float64)
    whole = O.run(ext, content, [style], cfg)
    cut = _cut(ext, "pool2")
    kept = O.run(ext, content, [style], cfg, layout=[O.Layout((16, 32), cut=cut), O.Layout((32, 64), 1, cut)])
    tiled = O.run(ext, content, [style], cfg, layout=[O.Layout((16, 32)), O.Layout((32, 64), 1)])
    assert_close(kept, tiled, rtol=0, atol=1e-9)  # the same history, so the same steps
    assert_close(O.run(ext, content, [style], cfg, layout=[O.Layout((16, 32), cut=cut), O.Layout((32, 64), cut=cut)]),
                 whole, rtol=0, atol=1e-9)


def test_cut_out_of_range_is_refused(model):
    ext = extractor(model, DEFAULT)
    with pytest.raises(ValueError, match="allowed: None or a module index"):
        tiling.TiledFeatures(ext, DEFAULT.layers, 64, 64, (32, 32), cut=ext.depth)


def test_pass_one_runs_only_as_deep_as_its_layers_with_their_halos(model):
    """A pass that reads only shallow layers (a refinement scale's pass 1: relu1_1-relu3_1 against relu4_2's content)
    runs the network to the deepest of them over windows widened by their halos only, and owns the same positions:
    its Grams are the whole image's, and a step whose content MSE pass 2 sums is still the untiled step."""
    cfg = DEFAULT.replace(style_layers=("relu1_1", "relu2_1", "relu3_1"))
    ext = extractor(model, cfg, torch.float64)
    tf = tiling.TiledFeatures(ext, cfg.layers, 96, 80, (32, 40))
    shallow, first = tf.reading(cfg.style_layers)
    assert shallow.depth == ext.module_names.index("relu3_1") + 1 < ext.depth
    assert [(t.r0, t.r1, t.c0, t.c1) for t in first] == [(t.r0, t.r1, t.c0, t.c1) for t in tf.tiles]
    assert all(a.wr0 >= b.wr0 and a.wr1 <= b.wr1 and a.wc0 >= b.wc0 and a.wc1 <= b.wc1
               for a, b in zip(first, tf.tiles))
    assert sum(t.window_pixels for t in first) < sum(t.window_pixels for t in tf.tiles)
    assert tf.reading(cfg.layers) == (ext, tf.tiles)  # the content layer is the deepest: nothing to narrow
    x = random_image(96, 80, seed=3).double()
    sums = tf.sums(x, grams=cfg.style_layers)
    whole = ext(x)
    for n in cfg.style_layers:
        assert_close(sums.grams[n], losses.gram(whole[n], "chw"), rtol=1e-12, atol=0)
    content = random_image(96, 80, seed=4).double()
    targets = O.style_targets(ext, [random_image(64, 64, seed=5).double()], (1.0,), cfg)
    assert_tiled_step_equal(O.Objective(ext, cfg, content, targets),
                            O.Objective(ext, cfg, content, targets, tile=(32, 40)), x)


def test_stages_compose_to_the_forward(model):
    ext = extractor(model, DEEP)
    x = random_image(64, 80, seed=1)
    whole = ext(x)
    for k in range(1, ext.depth):
        a, first = ext.stage(x, 0, k)
        _, second = ext.stage(a, k)
        assert set(first) | set(second) == set(whole) and not set(first) & set(second)
        for n, f in {**first, **second}.items():
            assert torch.equal(f, whole[n]), (k, n)


def test_tiled_style_targets_equal_untiled(model):
    cfg = DEFAULT.replace(style_loss="mean_cov")
    ext = extractor(model, cfg, torch.float64)
    style = random_image(130, 170, seed=4).to(torch.float64)
    whole = O.style_targets(ext, [style], (1.0,), cfg)
    tiled = O.style_targets(ext, [style], (1.0,), cfg, tile=(32, 48))
    for n in cfg.style_layers:
        a, b = whole.gaussians[n], tiled.gaussians[n]
        assert_close(b.mean, a.mean, rtol=1e-10, atol=0)
        assert_close(b.cov, a.cov, rtol=1e-10, atol=1e-10 * float(a.cov.abs().max()))


def test_sliced_refuses_to_tile(model):
    cfg = make_config(style_loss="sliced", content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"))
    ext = extractor(model, cfg)
    content, style = random_image(64, 64, seed=1), random_image(48, 48, seed=2)
    targets = O.style_targets(ext, [style], (1.0,), cfg)
    O.Objective(ext, cfg, content, targets, tile=(64, 64))  # one tile is the whole image: fine
    with pytest.raises(ConfigError) as e:
        O.Objective(ext, cfg, content, targets, tile=(32, 32))
    assert e.value.field == "style_loss" and e.value.allowed == ["gram", "mean_cov"]
    assert "allowed: gram, mean_cov" in str(e.value)


def test_tiled_style_grams_equal_untiled(model):
    ext = extractor(model, DEFAULT, torch.float64)
    style = random_image(130, 170, seed=4).to(torch.float64)
    args = ([style], (1.0,), DEFAULT.style_layers, DEFAULT.gram_norm)
    whole, tiled = O.style_grams(ext, *args), O.style_grams(ext, *args, tile=(32, 48))
    for n in DEFAULT.style_layers:
        assert_close(tiled[n], whole[n], rtol=1e-10, atol=0)


def test_bf16_tiled_step_matches_untiled_to_bf16_precision(model):
    """Autocast bf16 features, float32 Grams: the tiles' sums agree with the whole image's as closely as two
    bf16 runs of the same network can (bf16 convolutions round differently per input size)."""
    ext = extractor(model, DEFAULT, autocast=torch.bfloat16)
    content, style, x = random_image(96, 96, seed=5), smooth_image(64, 64, seed=6), random_image(96, 96, seed=7)
    whole, tiled = _objectives(ext, DEFAULT, content, style, (32, 32))
    xr = x.clone().requires_grad_(True)
    loss, _ = whole(xr)
    (grad,) = torch.autograd.grad(loss.sum(), xr)
    loss_t, _, grad_t = tiled.value_and_grad(x)
    assert_close(loss_t, loss.detach(), rtol=2e-2, atol=0)
    cos = torch.nn.functional.cosine_similarity(grad.flatten(), grad_t.flatten(), dim=0)
    assert float(cos) > 0.99


def test_tiled_run_equals_untiled_run_in_float64(model):
    """Whole coarse-to-fine runs (L-BFGS, early-stop bookkeeping, best iterate, restore_detail): a layout that
    tiles every scale gives the untiled run's image."""
    cfg = make_config(size=128, steps=4, tol=0.0, base_size=64, refine_steps=(2,), scales=(0.5, 1.0),
                      scale_steps=(0.5, 0.5))
    ext = extractor(model, cfg, torch.float64)
    content = smooth_image(96, 128, seed=8).to(torch.float64)
    style = random_image(64, 64, seed=9).to(torch.float64)
    plan = O.schedule(96, 128, cfg)
    assert [(hw, n) for _, hw, n in plan] == [((48, 64), 4), ((96, 128), 2)]  # the 24x32 scale folds into 48x64
    whole = O.run(ext, content, [style], cfg)
    tiled = O.run(ext, content, [style], cfg, layout=[O.Layout((16, 32)), O.Layout((32, 64))])
    assert_close(tiled, whole, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="one per scale"):
        O.run(ext, content, [style], cfg, layout=[O.Layout()] * 3)
    # the mean-covariance loss, with an average of iterates scored at each scale's end
    cfg = cfg.replace(style_loss="mean_cov", iterate_average=0.5)
    whole = O.run(ext, content, [style], cfg)
    tiled = O.run(ext, content, [style], cfg, layout=[O.Layout((16, 32)), O.Layout((32, 64))])
    assert_close(tiled, whole, rtol=0, atol=1e-9)


def test_on_tile_reports_each_tile(model):
    ext = extractor(model, DEFAULT)
    whole, tiled = _objectives(ext, DEFAULT, random_image(64, 80, seed=1), random_image(64, 64, seed=2), (32, 32))
    seen = []
    tiled.value_and_grad(random_image(64, 80, seed=3), lambda done, total: seen.append((done, total)))
    assert seen == [(i, 6) for i in range(1, 7)]


MASKED = [
    pytest.param(DEFAULT.replace(tv_weight=0.5), (48, 64), id="f64-default-masks"),
    pytest.param(DEFAULT.replace(style_loss="mean_cov"), (48, 64), id="f64-mean-cov-masks"),
    pytest.param(DEEP, (64, 64), id="f64-deep-masks"),
]


@pytest.mark.parametrize("cfg,tile", MASKED)
def test_tiled_step_with_masks_equals_untiled(model, cfg, tile):
    """Regional styles: soft masks (one per image of the batch for the first region) at each layer's resolution,
    the regions' masked Grams summed over tiles: the untiled loss and gradient to 1e-9 in float64."""
    dtype = torch.float64
    ext = extractor(model, cfg, dtype)
    h, w = 112, 144
    content, x = random_image(h, w, seed=1, batch=2).to(dtype), random_image(h, w, seed=3, batch=2).to(dtype)
    ramp = torch.linspace(0, 1, w, dtype=dtype).view(1, 1, 1, w).expand(2, 1, h, w).clone()
    ramp[1] = ramp[1].flip(-1)
    styles = [smooth_image(90, 120, seed=2).to(dtype), random_image(80, 80, seed=4).to(dtype)]
    style_mask = (torch.arange(120, dtype=dtype) < 60).to(dtype).view(1, 1, 1, 120).expand(1, 1, 90, 120)

    def regions(t):
        return [O.Region(O.style_targets(ext, [styles[0]], (1.0,), cfg, tile=t, masks=[style_mask]), ramp, 1.0),
                O.Region(O.style_targets(ext, [styles[1]], (1.0,), cfg, tile=t), 1 - ramp[:1], 0.5)]

    whole, tiled = O.Objective(ext, cfg, content, regions(None)), O.Objective(ext, cfg, content, regions(tile), tile)
    assert tiled.tiles > 4
    loss, _ = assert_tiled_step_equal(whole, tiled, x)
    assert loss[0] != loss[1]  # the per-image masks differ, and so do the losses


def test_tiled_run_with_masks_equals_untiled_run_in_float64(model):
    cfg = make_config(size=128, steps=4, tol=0.0, base_size=64, refine_steps=(2,), scales=(0.5, 1.0),
                      scale_steps=(0.5, 0.5))
    ext = extractor(model, cfg, torch.float64)
    content = smooth_image(96, 128, seed=8).to(torch.float64)
    styles = [random_image(64, 64, seed=9).to(torch.float64), smooth_image(64, 64, seed=10).to(torch.float64)]
    mask = (torch.arange(128) < 64).to(torch.float64).view(1, 1, 1, 128).expand(1, 1, 96, 128)
    whole = O.run(ext, content, styles, cfg, masks=[mask, 1 - mask])
    tiled = O.run(ext, content, styles, cfg, masks=[mask, 1 - mask], layout=[O.Layout((16, 32)), O.Layout((32, 64))])
    assert_close(tiled, whole, rtol=0, atol=1e-9)
