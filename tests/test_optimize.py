"""nsf.optimize: step splitting, the coarse-to-fine schedule, the objective's formula, the loop."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_image, smooth_image
from torch.testing import assert_close

from nsf import optimize as O
from nsf.config import make_config
from nsf.optimize import loop
from nsf.vgg import VGG19_LAYERS

STYLE = ("relu1_1", "relu2_1", "relu3_1")
CONTENT = ("relu2_2",)
SEED_LAYERS = ("relu4_2", "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def small_cfg(**overrides):
    """One 32 px scale over a shallow slice of VGG-19."""
    base = {"size": 32, "scales": (1.0,), "scale_steps": (1.0,), "tol": 0.0, "content_layers": CONTENT,
            "style_layers": STYLE}
    return make_config(**{**base, **overrides})


def objective_for(extractor, cfg, content, style):
    grams = O.style_grams(extractor, [style], (1.0,), cfg.style_layers, cfg.gram_norm)
    return O.Objective(extractor, cfg, content, grams)


def hand_features(model, x, names):
    """VGG-19 activations computed here: Caffe preprocessing written out, modules run one by one."""
    mean = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    h = x.flip(1) * 255.0 - mean
    out = {}
    with torch.no_grad():
        for name, module in zip(VGG19_LAYERS, model.features, strict=True):
            h = module(h)
            if name in names:
                out[name] = h.clone()
            if len(out) == len(names):
                break
    return out


# --- split_steps / schedule ---------------------------------------------------------------------------


def test_split_steps_hand_values():
    assert O.split_steps(10, (0.6, 0.3, 0.1)) == [6, 3, 1]
    assert O.split_steps(300, (0.6, 0.3, 0.1)) == [180, 90, 30]
    assert O.split_steps(7, (0.5, 0.5)) in ([4, 3], [3, 4])
    assert O.split_steps(1, (0.6, 0.3, 0.1)) == [0, 0, 1]
    assert O.split_steps(5, (1.0, 0.0)) == [4, 1]


@pytest.mark.parametrize("shares", [(0.6, 0.3, 0.1), (0.5, 0.3, 0.2), (1.0,), (0.1, 0.9), (1.0, 1.0, 0.0), (3, 2, 1)])
def test_split_steps_sums_exactly_and_feeds_the_last_scale(shares):
    for steps in range(1, 60):
        out = O.split_steps(steps, shares)
        assert sum(out) == steps, (steps, out)
        assert out[-1] >= 1, (steps, out)
        assert all(n >= 0 for n in out)
        assert len(out) == len(shares)


def test_schedule_keeps_all_scales_when_big_enough():
    cfg = make_config(size=256, steps=10)
    assert O.schedule(256, 256, cfg) == [(0, (64, 64), 6), (1, (128, 128), 3), (2, (256, 256), 1)]


def test_schedule_keeps_aspect():
    # 100x200 content at size 256: 0.25 -> 32x64, 0.5 -> 64x128, 1 -> 128x256.
    cfg = make_config(size=256, steps=10)
    assert O.schedule(100, 200, cfg) == [(0, (32, 64), 6), (1, (64, 128), 3), (2, (128, 256), 1)]


def test_schedule_folds_too_small_scales():
    # 0.25 * 100 = 25 px is below 2 * MIN_SIDE = 32 (relu5_1 would be under 2x2): its steps go to 50 px.
    cfg = make_config(size=100, steps=10)
    assert O.schedule(100, 100, cfg) == [(1, (50, 50), 9), (2, (100, 100), 1)]
    # A 8:1 content at 256 px: short side 8 px at 0.25 and 16 px at 0.5, both fold into the last scale.
    cfg = make_config(size=256, steps=10)
    assert O.schedule(256, 256, cfg)[0] == (0, (64, 64), 6)
    assert O.schedule(512, 64, cfg) == [(2, (256, 32), 10)]
    # Folded steps go to the next kept scale, not straight to the last one.
    assert O.schedule(400, 100, cfg) == [(1, (128, 32), 9), (2, (256, 64), 1)]


def test_schedule_respects_square_resize():
    cfg = make_config(size=64, steps=4, resize="square", scales=(1.0,), scale_steps=(1.0,))
    assert O.schedule(30, 90, cfg) == [(0, (64, 64), 4)]


# --- Objective --------------------------------------------------------------------------------------


def test_seed_preset_loss_formula(model):
    cfg = make_config("seed", size=32)
    content, style, x = smooth_image(32, 32, seed=1), smooth_image(32, 32, seed=2), smooth_image(32, 32, seed=3)
    fc = hand_features(model, content, SEED_LAYERS)
    fs = hand_features(model, style, SEED_LAYERS)
    fx = hand_features(model, x, SEED_LAYERS)

    def plain_gram(f):
        flat = f.reshape(f.shape[1], -1)
        return flat @ flat.T  # F F^T, not normalized

    targets = {n: plain_gram(fs[n]).unsqueeze(0) for n in cfg.style_layers}
    objective = O.Objective(model.extractor(SEED_LAYERS), cfg, content, targets)
    total, parts = objective(x)

    content_term = 100 * ((fx["relu4_2"] - fc["relu4_2"]) ** 2).mean()
    layers = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    weights = dict(zip(layers, (0.85, 0.56, 0.11, 0.15, 0.2), strict=True))
    style_term = 40 * sum(w * ((plain_gram(fx[n]) - targets[n][0]) ** 2).mean() for n, w in weights.items())
    assert_close(parts[0, 0], content_term, rtol=1e-4, atol=0)
    assert_close(parts[0, 1], style_term, rtol=1e-4, atol=0)
    assert float(parts[0, 2]) == 0.0
    assert_close(total.detach()[0], content_term + style_term, rtol=1e-4, atol=0)
    # And nsf's own target Grams are the same plain F F^T.
    grams = O.style_grams(model.extractor(SEED_LAYERS), [style], (1.0,), cfg.style_layers, cfg.gram_norm)
    for n in cfg.style_layers:
        assert_close(grams[n], targets[n], rtol=1e-5, atol=0)


def test_normalized_losses_count_each_layer_alike(model):
    # With normalize_losses each layer's style loss is divided by its value at the content image,
    # so at x = content the style part is style_weight * sum(layer weights), the content part 0.
    cfg = small_cfg(style_weight=2.5, style_layer_weights=(1.0, 2.0, 3.0), content_weight=7.0)
    assert cfg.normalize_losses
    content, style = smooth_image(32, 32, seed=4), random_image(32, 32, seed=5)
    objective = objective_for(model.extractor(CONTENT + STYLE), cfg, content, style)
    total, parts = objective(content)
    assert float(parts[0, 0]) == 0.0
    assert_close(parts[0, 1], torch.tensor(2.5 * 6.0), rtol=1e-5, atol=0)
    assert_close(total.detach()[0], torch.tensor(15.0), rtol=1e-5, atol=0)
    # The content part is normalized by the mean square of the content features.
    x = smooth_image(32, 32, seed=6)
    fx, fc = hand_features(model, x, CONTENT)["relu2_2"], hand_features(model, content, CONTENT)["relu2_2"]
    expected = 7.0 * ((fx - fc) ** 2).mean() / (fc**2).mean()
    assert_close(objective(x)[1][0, 0], expected, rtol=1e-4, atol=0)


def test_tv_part(model):
    cfg = small_cfg(tv_weight=0.5)
    content, style = smooth_image(32, 32, seed=7), smooth_image(32, 32, seed=8)
    objective = objective_for(model.extractor(CONTENT + STYLE), cfg, content, style)
    x = random_image(32, 32, seed=9)
    total, parts = objective(x)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    assert_close(parts[0, 2], 0.5 * (dx + dy), rtol=1e-5, atol=0)
    assert_close(total.detach()[0], parts[0].sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("normalize", [False, True])
def test_batched_objective_is_per_image_losses(model, normalize):
    cfg = small_cfg(normalize_losses=normalize)
    ex = model.extractor(CONTENT + STYLE)
    content = smooth_image(32, 32, seed=10, batch=2)
    style = smooth_image(32, 32, seed=11)
    grams = O.style_grams(ex, [style], (1.0,), STYLE, cfg.gram_norm)
    x = smooth_image(32, 32, seed=12, batch=2)
    both = O.Objective(ex, cfg, content, grams)(x)[0]
    singles = torch.cat([O.Objective(ex, cfg, content[i : i + 1], grams)(x[i : i + 1])[0] for i in range(2)])
    assert_close(both.detach(), singles.detach(), rtol=1e-5, atol=0)


def test_style_grams_blend(model):
    ex = model.extractor(STYLE)
    s1, s2 = smooth_image(32, 32, seed=13), random_image(32, 32, seed=14)
    g1 = O.style_grams(ex, [s1], (1.0,), STYLE, "chw")
    g2 = O.style_grams(ex, [s2], (5.0,), STYLE, "chw")  # a single style's weight normalizes to 1
    blend = O.style_grams(ex, [s1, s2], (3.0, 1.0), STYLE, "chw")
    for n in STYLE:
        assert_close(blend[n], 0.75 * g1[n] + 0.25 * g2[n], rtol=1e-5, atol=0)


@pytest.mark.parametrize("loss", ["mean_cov", "sliced"])
def test_new_losses_are_normalized_to_one_per_layer_at_the_content(model, loss):
    """As the gram loss: at x = content each style layer's normalized term is 1, so weights mean the same."""
    cfg = small_cfg(style_loss=loss, style_weight=2.5, style_layer_weights=(1.0, 2.0, 3.0))
    ex = model.extractor(CONTENT + STYLE)
    content, style = smooth_image(32, 32, seed=4), random_image(32, 32, seed=5)
    objective = O.Objective(ex, cfg, content, O.style_targets(ex, [style], (1.0,), cfg))
    _, parts = objective(content)  # sliced: the projections the normalizers were computed with
    assert_close(parts[0, 1], torch.tensor(2.5 * 6.0), rtol=1e-5, atol=0)


def test_mean_cov_targets_blend_as_a_mixture(model):
    cfg = small_cfg(style_loss="mean_cov")
    ex = model.extractor(STYLE)
    s1, s2 = smooth_image(32, 32, seed=13), random_image(32, 32, seed=14)
    one, two = (O.style_targets(ex, [s], (1.0,), cfg).gaussians for s in (s1, s2))
    blend = O.style_targets(ex, [s1, s2], (3.0, 1.0), cfg).gaussians
    for n in STYLE:
        mean = 0.75 * one[n].mean + 0.25 * two[n].mean
        assert_close(blend[n].mean, mean)
        # the mixture's covariance: the blended second moments minus the blended mean's outer product
        moment = [g.cov - g.eps.view(-1, 1, 1) * torch.eye(g.cov.shape[-1], dtype=g.cov.dtype)
                  + g.mean.unsqueeze(-1) * g.mean.unsqueeze(-2) for g in (one[n], two[n])]
        cov = 0.75 * moment[0] + 0.25 * moment[1] - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype)
        top = float(moment[0].abs().max())  # float32 moments: compared to their own precision
        assert_close(blend[n].cov - blend[n].eps.view(-1, 1, 1) * eye, cov, rtol=0, atol=1e-6 * top)


# --- the loop ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mean_cov", "sliced"])
def test_tiny_run_lowers_the_new_style_losses(model, loss):
    cfg = small_cfg(steps=10, style_weight=10.0, style_loss=loss)
    ex = model.extractor(CONTENT + STYLE)
    content, style = smooth_image(32, 32, seed=15), random_image(32, 32, seed=16)
    seen = []
    out = O.run(ex, content, [style], cfg, callback=seen.append)
    assert len(seen) == 10
    # scored by one objective (sliced: one fixed set of projections), not by the run's
    objective = O.Objective(ex, cfg, content, O.style_targets(ex, [style], (1.0,), cfg),
                            generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        start, end = objective(content)[1], objective(out)[1]
    assert float(end[0, 1]) < 0.5 * float(start[0, 1]), (start, end)


def test_sliced_runs_are_reproducible_from_the_seed(model):
    cfg = small_cfg(steps=4, style_loss="sliced")
    ex = model.extractor(CONTENT + STYLE)
    content, style = smooth_image(32, 32, seed=17), random_image(40, 24, seed=18)  # style positions != image's

    def once(seed):
        return O.run(ex, content, [style], cfg, generator=torch.Generator().manual_seed(seed))

    a = once(1)
    assert torch.equal(a, once(1))
    assert not torch.equal(a, once(2))  # fresh projections are drawn from the run's generator


def _recorded_scale(cfg, n_steps):
    """_optimize_scale on a quadratic per image, recording every image it scores."""
    target = smooth_image(8, 8, seed=19, batch=2, lo=0.2, hi=0.8)
    scored = []

    def loss_fn(x):
        scored.append(x.detach().clone())
        loss = (x - target).pow(2).flatten(1).sum(1)
        return loss, torch.stack([loss, torch.zeros_like(loss), torch.zeros_like(loss)], dim=1)

    x = smooth_image(8, 8, seed=20, batch=2).requires_grad_(True)
    out, *_ = O._optimize_scale(loss_fn, x, cfg, n_steps, 0, n_steps, 0, None)
    losses = torch.stack([(s - target).pow(2).flatten(1).sum(1) for s in scored])  # (calls, B)
    return out, scored, losses


def test_iterate_average_is_an_ema_scored_before_it_is_returned():
    """Adam with a large step circles the optimum: the average of its iterates is closer than any of them."""
    n, decay = 12, 0.8
    out, scored, losses = _recorded_scale(make_config(optimizer="adam", lr=0.3, tol=0.0, iterate_average=decay), n)
    assert len(scored) == n + 2  # n steps, the final iterate, the average
    iterates = scored[1 : n + 1]  # x_1 .. x_n: the images after each update
    weights = torch.tensor([(1 - decay) * decay ** (n - k) for k in range(1, n + 1)]) / (1 - decay**n)
    expected = sum(w * x for w, x in zip(weights, iterates))
    assert_close(scored[-1], expected, rtol=1e-5, atol=1e-6)
    assert bool((losses[-1] < losses[:-1].min(0).values).all())  # the average won, for both images...
    assert torch.equal(out, scored[-1])  # ...and is what came back


def test_best_iterate_is_kept_when_the_average_is_worse():
    """L-BFGS converges on a quadratic: the average drags its early iterates along, the best iterate wins."""
    n = 6
    out, scored, losses = _recorded_scale(make_config(tol=0.0, iterate_average=0.9), n)
    assert len(scored) == n + 2
    assert bool((losses[-1] > losses[:-1].min(0).values).all())
    best = losses[:-1].argmin(0)  # per image, among the iterates scored
    for b in range(2):
        assert torch.equal(out[b], scored[int(best[b])][b])
    plain, _, _ = _recorded_scale(make_config(tol=0.0), n)
    assert torch.equal(out, plain)  # the same result as without averaging


def test_tiny_run_lowers_the_style_loss(model):
    cfg = small_cfg(steps=10, style_weight=10.0)
    ex = model.extractor(CONTENT + STYLE)
    content, style = smooth_image(32, 32, seed=15), random_image(32, 32, seed=16)
    out = O.run(ex, content, [style], cfg)
    assert out.shape == (1, 3, 32, 32)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    objective = objective_for(ex, cfg, content, style)
    with torch.no_grad():
        start_total, start = objective(content)
        end_total, end = objective(out)
    assert float(end[0, 1]) < 0.5 * float(start[0, 1]), (start, end)
    assert float(end_total) < float(start_total)


def test_progress_is_reported_once_per_step(model):
    cfg = small_cfg(steps=4)
    calls = []
    O.run(model.extractor(CONTENT + STYLE), smooth_image(32, 32, seed=17), [smooth_image(32, 32, seed=18)], cfg,
          callback=calls.append)
    assert [p.step for p in calls] == [1, 2, 3, 4]
    assert all(p.total == 4 and p.scale == 0 and p.size == (32, 32) for p in calls)
    for p in calls:
        assert isinstance(p, O.Progress)
        assert p.loss == pytest.approx(p.content + p.style + p.tv, rel=1e-5)


def test_progress_over_two_scales(model):
    cfg = make_config(size=128, steps=4, scales=(0.5, 1.0), scale_steps=(0.5, 0.5), tol=0.0,
                      content_layers=("relu1_2",), style_layers=("relu1_1",))
    calls = []
    out = O.run(model.extractor(("relu1_2", "relu1_1")), smooth_image(96, 96, seed=19),
                [smooth_image(64, 64, seed=20)], cfg, callback=calls.append)
    assert out.shape == (1, 3, 128, 128)
    assert [p.step for p in calls] == [1, 2, 3, 4]
    assert [p.scale for p in calls] == [0, 0, 1, 1]
    assert [p.size for p in calls] == [(64, 64), (64, 64), (128, 128), (128, 128)]


def _two_scales():
    cfg = make_config(size=128, steps=6, scales=(0.5, 1.0), scale_steps=(0.5, 0.5), tol=0.0,
                      content_layers=("relu1_2",), style_layers=("relu1_1",))
    return cfg, smooth_image(96, 96, seed=19), [smooth_image(64, 64, seed=20)]


def test_on_scale_reports_each_scale_and_the_last_is_the_result(model):
    cfg, content, styles = _two_scales()
    ex = model.extractor(cfg.layers)
    done = []
    out = O.run(ex, content, styles, cfg, on_scale=done.append)
    assert [(d.scale, d.number, d.scales, d.size, d.step, d.total, d.stopped) for d in done] == \
        [(0, 1, 2, (64, 64), 3, 6, False), (1, 2, 2, (128, 128), 6, 6, False)]
    assert torch.equal(done[-1].image, out)
    with torch.no_grad():  # each scale's loss is that of the image it hands over
        for d in done:
            c = O.resize(content, d.size)
            grams = O.style_grams(ex, [O._resize_style(styles[0], d.size, cfg, d.scale)], (1.0,), cfg.style_layers,
                                  cfg.gram_norm)
            assert float(O.Objective(ex, cfg, c, grams)(d.image)[0].sum()) == pytest.approx(d.loss, rel=1e-4)
    # a stop hook that never fires changes nothing
    assert torch.equal(O.run(ex, content, styles, cfg, stop=lambda: False), out)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_resume_runs_the_last_scales_as_the_whole_run_does(model, optimizer):
    # run() hands the next scale its last best iterate unclamped and on_scale reports it clamped: equal
    # where the steps are projected onto [0, 1] (adam), within the clamp's reach with L-BFGS
    cfg, content, styles = _two_scales()
    cfg = cfg.replace(optimizer=optimizer, lr=0.05 if optimizer == "adam" else 1.0)
    ex = model.extractor(cfg.layers)
    done = []
    out = O.run(ex, content, styles, cfg, on_scale=done.append)
    resumed, later = [], []
    again = O.run(ex, content, styles, cfg, callback=resumed.append, on_scale=later.append,
                  resume=(1, done[0].image))
    if optimizer == "adam":
        assert torch.equal(again, out)
    else:
        assert_close(again, out, atol=0.02, rtol=0)
    assert [(p.step, p.total, p.scale, p.size) for p in resumed] == [(1, 3, 1, (128, 128)), (2, 3, 1, (128, 128)),
                                                                     (3, 3, 1, (128, 128))]
    assert [(d.number, d.scales, d.step, d.total) for d in later] == [(2, 2, 3, 3)]
    for k in (0, 2, -1):
        with pytest.raises(ValueError, match="allowed: 1..1"):
            O.run(ex, content, styles, cfg, resume=(k, done[0].image))


def test_stop_ends_the_run_with_the_best_image_so_far_at_full_size(model):
    cfg, content, styles = _two_scales()
    ex = model.extractor(cfg.layers)
    calls, done = [], []
    out = O.run(ex, content, styles, cfg, callback=calls.append, on_scale=done.append,
                stop=lambda: len(calls) >= 2)  # stop in the middle of the first scale
    assert len(calls) == 2 and len(done) == 1
    assert done[0].stopped and done[0].size == (64, 64)
    assert out.shape == (1, 3, 128, 128)
    # the partial result is the first scale's best image brought up like a next scale's start
    expected = O.upsample(done[0].image, (128, 128), O.resize(content, (128, 128))).clamp(0, 1)
    assert_close(out, expected)


def test_stop_between_scales_skips_the_later_ones(model):
    cfg, content, styles = _two_scales()
    calls, done = [], []
    out = O.run(model.extractor(cfg.layers), content, styles, cfg, callback=calls.append, on_scale=done.append,
                stop=lambda: len(calls) >= 3)  # true only once the first scale's 3 steps are done
    # the second scale is stopped before its first step: its start (the first scale's best, upsampled
    # with the content's detail band) is the result
    assert len(calls) == 3 and [(d.stopped, d.step) for d in done] == [(False, 3), (True, 3)]
    assert torch.equal(done[1].image, out)
    assert_close(out, O.upsample(done[0].image, (128, 128), O.resize(content, (128, 128))).clamp(0, 1))
    # a stop asked at the very end of the last scale cuts nothing: not partial
    calls, done = [], []
    O.run(model.extractor(cfg.layers), content, styles, cfg, callback=calls.append, on_scale=done.append,
          stop=lambda: len(calls) >= 6)
    assert len(calls) == 6 and [d.stopped for d in done] == [False, False]


def test_early_stopping(model):
    # tol=1 means "stop unless the loss fell by 100 % over `patience` steps": it stops at patience + 1.
    cfg = small_cfg(steps=10, tol=1.0, patience=2)
    calls = []
    O.run(model.extractor(CONTENT + STYLE), smooth_image(32, 32, seed=21), [random_image(32, 32, seed=22)], cfg,
          callback=calls.append)
    assert len(calls) == 3 < cfg.steps
    assert calls[-1].total == 10


def test_no_early_stop_when_tol_is_zero(model):
    cfg = small_cfg(steps=5, tol=0.0, patience=1)
    calls = []
    O.run(model.extractor(CONTENT + STYLE), smooth_image(32, 32, seed=21), [random_image(32, 32, seed=22)], cfg,
          callback=calls.append)
    assert len(calls) == 5


def test_optimize_scale_returns_the_best_iterate():
    # Adam with lr=1 on a quadratic overshoots: the loss goes 4.32, 23.5, 3.76, 2.89, 11.5 and the
    # final iterate is worse again; the best one (2.89) must be returned, not the last.
    cfg = make_config(optimizer="adam", lr=1.0, tol=0.0)

    def loss_fn(x):
        return ((x - 0.3) ** 2).sum(), torch.zeros(3)

    x = torch.zeros(1, 3, 4, 4, requires_grad=True)
    seen = []
    best, step, _, _ = O._optimize_scale(loss_fn, x, cfg, 5, 0, 5, 0, lambda p: seen.append(p.loss))
    assert step == 5 and len(seen) == 5
    best_loss = float(loss_fn(best)[0])
    assert best_loss == pytest.approx(min(seen))
    assert best_loss < seen[-1]
    assert best_loss < float(loss_fn(x.detach())[0])  # the final iterate is worse


def test_run_returns_an_image_no_worse_than_the_last_step(model):
    # nsf bug: the best iterate is chosen on unclamped pixels, then clamped to [0, 1] on return; with
    # pixels pushed out of range the returned image can score worse than every step reported.
    cfg = small_cfg(steps=8, optimizer="adam", lr=0.3)
    ex = model.extractor(CONTENT + STYLE)
    content, style = smooth_image(32, 32, seed=1), random_image(32, 32, seed=2)
    seen = []
    out = O.run(ex, content, [style], cfg, callback=lambda p: seen.append(p.loss))
    with torch.no_grad():
        returned = float(objective_for(ex, cfg, content, style)(out)[0])
    assert returned <= seen[-1] * (1 + 1e-5), (returned, seen)


def test_noise_init_follows_the_generator(model):
    cfg = small_cfg(steps=1, init="noise", optimizer="adam", lr=0.01)
    ex = model.extractor(CONTENT + STYLE)
    content, style = smooth_image(32, 32, seed=23), smooth_image(32, 32, seed=24)

    def go(seed):
        return O.run(ex, content, [style], cfg, generator=torch.Generator().manual_seed(seed))

    a, b, c = go(0), go(0), go(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # Noise init: far from the content after a single small step.
    assert (a - content).abs().mean() > 0.1


def test_init_image_is_used(model):
    cfg = small_cfg(steps=1, optimizer="adam", lr=1e-4)
    ex = model.extractor(CONTENT + STYLE)
    init = smooth_image(64, 64, seed=25)
    out = O.run(ex, smooth_image(32, 32, seed=26), [smooth_image(32, 32, seed=27)], cfg, init=init)
    # One Adam step moves each pixel by at most ~lr.
    assert_close(out, torch.nn.functional.interpolate(init, size=(32, 32), mode="bilinear", antialias=True),
                 atol=2e-3, rtol=0)


def test_blend_weights_must_match_styles(model):
    cfg = small_cfg(steps=1, style_blend_weights=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="3 values for 2 style images"):
        O.run(model.extractor(CONTENT + STYLE), smooth_image(32, 32), [smooth_image(32, 32)] * 2, cfg)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_a_batch_of_requests_optimizes_as_each_alone(model, optimizer):
    """Batching requests (each with its own style, of its own size) changes no image's result.

    In float64, so that float32 convolutions' batch-dependent rounding, which L-BFGS amplifies
    over steps, does not hide a real coupling between the images.
    """
    cfg = small_cfg(steps=8, optimizer=optimizer, lr=1.0 if optimizer == "lbfgs" else 0.05)
    ex = copy.deepcopy(model.extractor(CONTENT + STYLE)).double()
    content = smooth_image(32, 32, seed=20, batch=2).double()
    styles = [smooth_image(32, 32, seed=21).double(), smooth_image(24, 40, seed=22).double()]
    out = O.run(ex, content, [styles], cfg)
    for i in range(2):
        alone = O.run(ex, content[i : i + 1], [styles[i]], cfg)
        assert_close(out[i : i + 1], alone, rtol=1e-9, atol=1e-12)
    assert float((out[0] - out[1]).abs().max()) > 0.05


@pytest.mark.parametrize("style, needle", [
    (lambda: [smooth_image(32, 32, seed=1)] * 2, "2 part"),  # a per-image list of 2 for a batch of 3
    (lambda: smooth_image(32, 32, seed=1, batch=2), r"batch sizes \[2\]"),  # a batch of 2 for 3
])
def test_a_style_must_fit_the_content_batch(model, style, needle):
    with pytest.raises(ValueError, match=needle):
        O.run(model.extractor(CONTENT + STYLE), smooth_image(32, 32, batch=3), [style()], small_cfg(steps=1))


def test_lbfgs_history_is_sized_to_the_steps_without_changing_the_result(model, monkeypatch):
    """n steps make at most n - 1 curvature pairs, so a history of n - 1 slots is the same iteration
    as the full LBFGS_HISTORY slots (the memory a 512 px run saves: 2 x 100 x 3 x 512 x 512 floats)."""
    cfg = small_cfg(steps=6)
    ex = copy.deepcopy(model.extractor(CONTENT + STYLE)).double()
    content, style = smooth_image(32, 32, seed=30).double(), smooth_image(32, 32, seed=31).double()
    sizes = []

    class Recording(O.LBFGS):
        def __init__(self, x, lr, history_size):
            sizes.append(history_size)
            super().__init__(x, lr, history_size)

    class Full(O.LBFGS):
        def __init__(self, x, lr, history_size):
            super().__init__(x, lr, O.LBFGS_HISTORY)

    monkeypatch.setattr(loop, "LBFGS", Recording)
    trimmed = O.run(ex, content, [style], cfg)
    monkeypatch.setattr(loop, "LBFGS", Full)
    full = O.run(ex, content, [style], cfg)
    assert sizes == [5]
    assert_close(trimmed, full, rtol=1e-10, atol=1e-12)


def test_upsample_restores_the_content_detail_the_coarse_scale_lost():
    content = random_image(32, 48, seed=40)  # all detail: a plain upsample of its 16x24 version is a blur
    coarse = O.resize(content, (16, 24))
    assert_close(O.upsample(coarse, (32, 48), content), content, atol=1e-5, rtol=0)
    blurred = O.upsample(coarse, (32, 48))
    assert_close(blurred, O.resize(coarse, (32, 48)))
    assert float((blurred - content).abs().mean()) > 0.1
    # what the coarse scale changed is kept: the band is added to it, not swapped for it
    moved = coarse + 0.25
    assert_close(O.upsample(moved, (32, 48), content), content + 0.25, atol=1e-5, rtol=0)


@pytest.mark.parametrize("restore", [True, False])
def test_the_finer_scale_starts_from_the_restored_content(model, restore):
    # Adam with a tiny lr barely moves the pixels, so the output is the last scale's start image
    cfg = small_cfg(size=64, steps=4, scales=(0.5, 1.0), scale_steps=(0.5, 0.5), optimizer="adam", lr=1e-6,
                    restore_detail=restore)
    content = random_image(64, 64, seed=41)
    out = O.run(model.extractor(CONTENT + STYLE), content, [smooth_image(32, 32, seed=42)], cfg)
    err = float((out - content).abs().max())
    assert err < 1e-3 if restore else err > 0.3, err


# --- large sizes: refinement scales above base_size ------------------------------------------------


def test_schedule_adds_refinement_scales_above_base_size():
    cfg = make_config(size=2048)  # base 512: 128/256/512 with 90/45/15 steps, then 1024 and 2048
    assert O.schedule(2048, 2048, cfg) == [(0, (128, 128), 90), (1, (256, 256), 45), (2, (512, 512), 15),
                                           (3, (1024, 1024), 20), (4, (2048, 2048), 20)]
    assert [hw for _, hw, _ in O.schedule(3000, 4000, make_config(size=8192))][3:] == [
        (768, 1024), (1536, 2048), (3072, 4096), (6144, 8192)]
    assert [n for *_, n in O.schedule(100, 100, make_config(size=8192))][3:] == [20, 20, 12, 12]
    # a size between doublings ends on itself; the last entry of refine_steps repeats
    assert O.schedule(512, 512, make_config(size=600, refine_steps=(7,)))[3:] == [(3, (600, 600), 7)]
    assert [n for *_, n in O.schedule(512, 512, make_config(size=4096, refine_steps=(5, 2)))][3:] == [5, 2, 2]
    # the final scale always runs (at least one step); a zero-step refinement in between is skipped
    assert O.schedule(512, 512, make_config(size=2048, refine_steps=(0,)))[3:] == [(4, (2048, 2048), 1)]


def test_schedule_at_or_below_base_size_is_unchanged_and_base_size_zero_turns_it_off():
    for size in (256, 512):
        assert O.schedule(512, 512, make_config(size=size)) == O.schedule(512, 512, make_config(size=size, base_size=0))
    assert O.schedule(2048, 2048, make_config(size=2048, base_size=0)) == [
        (0, (512, 512), 90), (1, (1024, 1024), 45), (2, (2048, 2048), 15)]


def test_refined_multiplies_the_weights_of_a_refinement_scale():
    cfg = make_config(style_layer_weights=(2, 1, 1, 1, 1), content_weight=3.0, refine_content_weight=0.5,
                      refine_style_layer_weights=(1, 1, 1, 4, 4), refine_preview_weight=0)  # every layer at full size
    r = O.refined(cfg)
    assert (r.style_layer_weights, r.content_weight) == ((2.0, 1.0, 1.0, 4.0, 4.0), 1.5)
    assert make_config().refine_style_layer_weights is None  # the default: 1 each
    assert O.refined(make_config(refine_preview_weight=0)).style_layer_weights == (1.0,) * 5
    # other layers without their own refinement weights: 1 each; the same layers keep them
    assert make_config(cfg, style_layers=STYLE).refine_style_layer_weights is None
    assert make_config(cfg, style_layers=cfg.style_layers).refine_style_layer_weights == (1.0, 1.0, 1.0, 4.0, 4.0)
    assert make_config(style_layers={"relu1_1": 1.0}, refine_style_layer_weights=(3,)).refine_style_layer_weights \
        == (3.0,)
    with pytest.raises(ValueError, match="refine_style_layer_weights has 2 values for 5 layers"):
        make_config(refine_style_layer_weights=(1, 2))


def test_refine_style_layer_weights_change_the_refinement_scales_only(model):
    content, style = smooth_image(48, 48, seed=21), [smooth_image(48, 48, seed=22)]
    ext = model.extractor(CONTENT + STYLE)

    def out(size, boost):
        cfg = small_cfg(size=size, steps=3, base_size=32, refine_steps=(3,), refine_style_layer_weights=boost)
        return O.run(ext, content, style, cfg)

    assert torch.equal(out(32, (1, 1, 8)), out(32, (1, 1, 1)))  # no refinement scale: no change
    equal, boosted = out(64, (1, 1, 1)), out(64, (1, 1, 8))
    assert equal.shape == boosted.shape == (1, 3, 64, 64)
    assert (equal - boosted).abs().max() > 1e-3


@pytest.mark.parametrize("mode,expected", [("picture", (128, 96)), ("pixels", (64, 48))])
def test_stroke_scale_picture_resizes_the_style_with_the_output_and_pixels_never_upscales(mode, expected):
    cfg = make_config(stroke_scale=mode)
    (out,) = O._resize_style(torch.rand(1, 3, 64, 48), (128, 128), cfg)
    assert tuple(out.shape[-2:]) == expected
    (down,) = O._resize_style(torch.rand(1, 3, 64, 48), (32, 32), cfg)  # downscaling is the same in both
    assert tuple(down.shape[-2:]) == (32, 24)
