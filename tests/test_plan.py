"""nsf.plan: the memory budget, the planner's choices and limits, runs that the planner tiles, and an
out-of-memory that still happens (a real allocation failure, under an address-space limit)."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import random_image, smooth_image

import nsf
from nsf import plan as P
from nsf import tiling
from nsf.config import make_config
from nsf.errors import ConfigError, PlanError

REPO = Path(__file__).resolve().parents[1]
GB = 10**9


@pytest.mark.parametrize("text,expected", [("6GB", 6 * GB), ("1.5GiB", 3 * 2**29), ("512MB", 512 * 10**6),
                                           ("2 gb", 2 * GB), (3 * GB, 3 * GB), ("4e9", 4 * GB), ("auto", None),
                                           (None, None)])
def test_parse_memory(text, expected):
    assert P.parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["6XB", "-1GB", "lots", "", True, 0, 10.0, "2PB", float("nan")])
def test_parse_memory_refuses_with_what_is_allowed(bad):
    with pytest.raises(ConfigError, match="max_memory=.*allowed") as e:
        P.parse_memory(bad)
    assert e.value.field == "max_memory"


def test_builder_refuses_a_malformed_budget():
    with pytest.raises(ValueError, match="max_memory='6 gigs'; allowed"):
        nsf.style_fusion(device="cpu", max_memory="6 gigs")


@pytest.fixture(scope="module")
def costs(model):
    return model.costs(model.config)


def test_measured_activation_bytes_are_vgg_sized(costs):
    """Autograd's saved tensors of VGG-19 to relu5_1 in float32, per input pixel: block 1 alone keeps two
    64-channel maps (512 B) and pool indices; the whole step between 1.5 and 3 KB per pixel."""
    assert 1500 < costs.act_bytes < 3000
    assert costs.target_bytes == 512 / 64 * 4  # relu4_2: 512 channels at 1/64 of the pixels, float32
    assert (costs.geometry.align, costs.geometry.before, costs.geometry.after) == (16, 80, 70)


def test_weight_copies_of_a_bf16_step_count_once_not_per_pixel(costs):
    """Autocast keeps a bf16 copy of each weight for the backward: 26 MB to relu5_1 that do not grow with the
    image. Counted at one size (128 px) they made bf16 cost 4.0 KB per pixel against float32's 2.5 (a 512 px bf16
    run's peak was predicted 2.04 GB, measured 1.64); from two sizes they are a fixed cost and bf16's per-pixel
    cost is below float32's."""
    bf16 = nsf.style_fusion(device="cpu", precision="bf16", channels_last=True)
    half = bf16.costs(bf16.config)
    weights = sum(p.numel() for p in bf16.extractor(bf16.config.layers).body.parameters())
    assert half.act_bytes < costs.act_bytes
    assert 2 * weights <= half.fixed_bytes < 2 * weights + 8 * 2**20  # the copies, and Grams of a few MB
    assert costs.fixed_bytes < 8 * 2**20  # float32: the Grams only
    plain = dataclasses.replace(half, fixed_bytes=0.0)  # the same without the fixed part
    hw = (256, 256)
    extra = P._scale_peak(half, 1, hw, 0, None, 1, 0) - P._scale_peak(plain, 1, hw, 0, None, 1, 0)
    assert abs(extra - half.fixed_bytes) <= 1  # in the predicted peak, once


def test_untiled_when_it_fits_and_tiled_within_the_budget(costs):
    cfg = make_config(size=2048)
    free = P.plan(costs, cfg, (2048, 2048), budget=None, in_use=GB)
    assert not free.tiled and [s.size for s in free.scales][-1] == (2048, 2048)
    assert free.peak_bytes > 10 * GB  # about 2.4 KB per pixel at 2048 px
    tight = P.plan(costs, cfg, (2048, 2048), budget=4 * GB, in_use=GB)
    last = tight.scales[-1]
    assert last.tile is not None and last.tiles > 1 and last.tile[0] % 16 == 0
    assert tight.peak_bytes <= 4 * GB
    assert [s.tile for s in tight.scales[:3]] == [None] * 3  # small scales stay untiled
    assert tight.layout()[-1].tile == last.tile


def test_fewer_history_pairs_before_tiny_tiles(costs):
    """Image-sized L-BFGS pairs compete with the tile for memory: the planner gives up pairs before it would
    fall below a useful tile size."""
    cfg = make_config(size=4096, base_size=4096, scales=(1.0,), scale_steps=(1.0,), steps=40)
    rich = P.plan(costs, cfg, (4096, 4096), budget=40 * GB, in_use=GB).scales[-1]
    poor = P.plan(costs, cfg, (4096, 4096), budget=8 * GB, in_use=GB).scales[-1]
    assert rich.history == 39
    assert poor.history < 39 and min(poor.tile) >= P.GOOD_TILE - 16


def test_a_budget_too_small_for_any_tile_names_the_largest_size_that_fits(costs):
    cfg = make_config(size=8192)
    with pytest.raises(PlanError, match=r"size=8192 does not fit max_memory=3.00 GB.*at most size=\d+ fits") as e:
        P.plan(costs, cfg, (8192, 8192), budget=3 * GB, in_use=GB)
    top = e.value.allowed["max"]
    assert e.value.field == "size" and 512 < top < 8192
    P.plan(costs, cfg.replace(size=top), (8192, 8192), budget=3 * GB, in_use=GB)
    with pytest.raises(PlanError):
        P.plan(costs, cfg.replace(size=top + 1), (8192, 8192), budget=3 * GB, in_use=GB)


def test_sliced_runs_untiled_with_fewer_pairs_or_is_refused(model):
    """The sliced loss sorts over the whole image: the planner gives up L-BFGS pairs rather than tile it (the most
    that fit), and refuses it (a ConfigError on style_loss naming the losses that tile) where even one pair does not
    fit; the same budget tiles the mean-covariance loss."""
    cfg = make_config(size=2048, base_size=2048, scales=(1.0,), scale_steps=(1.0,), steps=40, style_loss="sliced")
    costs = model.costs(cfg)
    free = P.plan(costs, cfg, (2048, 2048), budget=None, in_use=GB)
    budget = free.peak_bytes - GB
    squeezed = P.plan(costs, cfg, (2048, 2048), budget=budget, in_use=GB)
    assert not squeezed.tiled and squeezed.scales[-1].history < free.scales[-1].history
    # the most pairs that fit: one more (two image-sized copies) would not
    assert squeezed.peak_bytes <= budget < squeezed.peak_bytes + 2 * P.RGB_BYTES * 2048 * 2048
    with pytest.raises(ConfigError) as e:
        P.plan(costs, cfg, (2048, 2048), budget=4 * GB, in_use=GB)
    assert not isinstance(e.value, PlanError)
    assert e.value.field == "style_loss" and e.value.allowed == ["gram", "mean_cov"]
    assert "does not fit max_memory=4.00 GB at 2048x2048" in str(e.value)
    mean_cov = cfg.replace(style_loss="mean_cov")
    assert P.plan(model.costs(mean_cov), mean_cov, (2048, 2048), budget=4 * GB, in_use=GB).tiled


def test_plan_table_and_dict(model):
    plan = model.plan((300, 400), size=1024, timing=False)
    assert plan.content == (300, 400) and plan.scales[-1].size == (768, 1024)
    text = plan.table()
    assert "1024x768" in text and "whole image" in text and "predicted peak" in text
    d = plan.to_dict()
    assert d["scales"][-1]["size"] == [768, 1024] and d["peak_bytes"] == plan.peak_bytes


def test_timed_plan_predicts_seconds(model):
    plan = model.plan(size=256, steps=10)
    assert plan.seconds is not None and 0 < plan.seconds < 600
    assert all(s.seconds > 0 for s in plan.scales)


@pytest.mark.slow
def test_a_run_over_the_budget_is_tiled_and_gives_the_untiled_image(model):
    """The model plans each run: with room to spare it runs untiled; with a budget under the untiled step's
    need (but over a tile's) it runs tiled, and the image is the same."""
    # 512 px: with relu5_1's 150 px halos and the CPU's tiled margin (2.45 against 1.25 untiled) a tile pays only
    # above about 400 px
    content, style = smooth_image(512, 512, seed=1), random_image(128, 128, seed=2)
    opts = {"size": 512, "steps": 3, "scales": (1.0,), "scale_steps": (1.0,), "tol": 0.0}
    first = model.run(content, style, **opts)
    free = first.image
    assert not first.plan.tiled
    tight = nsf.style_fusion(device="cpu", precision="fp32", channels_last=False)  # as `model`
    tight.stylize(content[..., :64, :64], style, **{**opts, "size": 64})  # loads, measures costs: RSS settles
    costs = tight.costs(tight.config)
    used, _ = P.memory_now(tight.device)
    # room for a 256 px tile's 336 px window with the CPU's tiled margin, what a CPU run gains beside its tensors and
    # the loop's image-sized tensors, not for the whole 512 px step's activations (about 90 MB more)
    tight.max_memory = used + int(P.CPU_RUNTIME_BYTES + costs.margin("tiled") * costs.act_bytes * 340 * 340) \
        + 40 * 2**20
    tiled = tight.run(content, style, **opts)
    out, plan = tiled.image, tiled.plan
    assert plan.tiled and plan.scales[-1].tiles > 1, plan.table()
    # float32 sums in another order, through 3 L-BFGS steps (the float64 proof is test_tiling's): the same
    # picture to a fortieth of an 8-bit level on average, no pixel two levels apart
    diff = (out - free).abs()
    assert float(diff.mean()) < 1e-4 and float(diff.max()) < 2 / 255


@pytest.mark.slow
def test_out_of_memory_is_reported_with_advice_and_the_model_stays_usable(tmp_path):
    """A real allocation failure: the address space is capped so that a 768 px step cannot be allocated
    while max_memory claims 100 GB; the error names the plan and what fits now, and the same model then
    runs a small image."""
    script = textwrap.dedent("""
        import resource, torch, nsf
        from nsf.errors import OutOfMemory
        torch.set_num_threads(1)
        m = nsf.style_fusion(device="cpu", max_memory="100GB")
        small = torch.rand(1, 3, 64, 64)
        m.stylize(small, small, size=64, steps=2)
        vm = int(open("/proc/self/statm").read().split()[0]) * 4096
        resource.setrlimit(resource.RLIMIT_AS, (vm + 300_000_000, resource.RLIM_INFINITY))
        try:
            m.stylize(torch.rand(1, 3, 768, 768), small, size=768, steps=2, scales=(1.0,), scale_steps=(1.0,))
            print("NO ERROR")
        except OutOfMemory as e:
            print("OOM:", e)
        print("AFTER", tuple(m.stylize(small, small, size=64, steps=2).shape))
    """)
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs Linux /proc to cap the address space")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OOM: out of memory on cpu" in r.stdout and "can't allocate memory" in r.stdout
    assert "predicted a peak of" in r.stdout and "planner would run it" in r.stdout
    assert "AFTER (1, 3, 64, 64)" in r.stdout


def test_plan_error_reaches_the_caller_before_anything_runs(model):
    tight = nsf.style_fusion(device="cpu", max_memory="300MB")  # less than the process holds already
    with pytest.raises(PlanError, match="does not fit max_memory=300 MB") as e:
        tight.stylize(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64), size=64, steps=1)
    assert e.value.allowed["max"] is None and "no size fits" in str(e.value)


@pytest.mark.parametrize("hw,size,least", [((300, 400), 20, 21), ((400, 300), 16, 21), ((10, 1000), 500, 1550)])
def test_a_size_too_small_for_the_aspect_ratio_is_refused_naming_the_least(model, hw, size, least):
    """round(size * short / long) under 16 px would leave VGG-19's deepest pooling empty (it failed inside it)."""
    from nsf.errors import ConfigError
    from nsf.geometry import MIN_SIDE, target_size

    with pytest.raises(ConfigError) as e:
        model.plan(hw, size=size, timing=False)
    assert e.value.field == "size" and e.value.allowed == {"min": least}
    assert f"allowed: size >= {least}" in str(e.value)
    assert min(target_size(*hw, least)) == MIN_SIDE > min(target_size(*hw, least - 1))
    model.plan(hw, size=least, timing=False)


def test_measured_memory_costs_are_remembered_across_runs(model, tmp_path, monkeypatch):
    """The memory measurement (sizes of saved tensors: the same every run) is most of a CPU run's start-up: it is
    remembered in the user's cache, keyed by what it depends on, and a remembered one equals a fresh one."""
    monkeypatch.setenv("NSF_CACHE_DIR", str(tmp_path))
    cfg = make_config(style_layers=("relu1_1", "relu2_1"), content_layers=("relu2_2",))
    ext = model.extractor(cfg.layers)
    fresh = P.measure(ext, cfg, torch.device("cpu"), timing=False, remember=True)
    assert (tmp_path / P.COSTS_FILE).is_file()
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: pytest.fail("measured again"))
    again = P.measure(ext, cfg, torch.device("cpu"), timing=False, remember=True)
    assert again == fresh
    other = cfg.replace(style_loss="mean_cov")  # another key: measured, not read
    with pytest.raises(pytest.fail.Exception):
        P.measure(ext, other, torch.device("cpu"), timing=False, remember=True)


@pytest.mark.parametrize("hw,tile", [((200, 333), (64, 96)), ((1380, 2048), (352, 352)), ((96, 96), (96, 96)),
                                     ((100, 700), (32, 688))])
def test_window_sums_equal_the_tiles_laid_out(costs, hw, tile):
    ws = [t.window_pixels for t in tiling.tiles(*hw, tile, costs.geometry)]
    assert P._windows(hw, tile, costs.geometry) == (max(ws), sum(ws))


def test_kept_bytes_fall_with_the_cut(costs):
    """A graph kept from module c holds the saved tensors of modules c..: all of the network's at c = 0 (under
    the whole step's, which adds the losses' and the backward's buffers), less at each deeper cut."""
    kept = costs.kept_bytes
    assert len(kept) == len(costs.module_names) and costs.cuts()[0] is None
    assert all(a >= b for a, b in zip(kept, kept[1:]))
    assert 0 < kept[0] < costs.act_bytes
    pool2 = costs.module_names.index("pool2") + 1
    assert kept[pool2] < kept[0] / 2  # the full-resolution blocks hold most of it
    assert costs.recompute_share(None) == 1.0 and costs.recompute_share(pool2) == P.FORWARD_SHARE["pool2"]


def test_the_ladder_keeps_a_graph_where_it_is_cheaper(costs):
    """Where the budget leaves room beside the tile, the planner keeps pass 1's deep graph (pass 2 recomputes only
    the shallow blocks): the same tiles or larger, a cheaper step, within the budget; the work that admission
    control multiplies counts it."""
    cfg = make_config(size=2048, refine_preview_weight=0)  # every layer at full size: the deepest stack, every cut
    plain = dataclasses.replace(costs, kept_bytes=())  # no graph kept: tiles recompute the whole forward
    for budget in (GB * b for b in (3, 4, 6, 8, 10)):
        ladder = P.plan(costs, cfg, (1380, 2048), budget=budget, in_use=GB)
        before = P.plan(plain, cfg, (1380, 2048), budget=budget, in_use=GB)
        assert ladder.peak_bytes <= budget and before.peak_bytes <= budget
        assert ladder.work <= before.work
        last = ladder.scales[-1]
        assert last.tile is not None
        if last.cut is not None:
            assert last.layout.cut == last.cut and "graph kept from" in last.rung
            assert last.work < P.ScalePlan(**{**last.__dict__, "cut": None,
                                              "step_work": P._step_work(costs, last.size, last.tile, None)}).work
            assert "keeps" in ladder.table() and ladder.to_dict()["scales"][-1]["cut"] == last.cut
    assert any(s.cut is not None for b in (3, 4, 6, 8, 10)
               for s in P.plan(costs, cfg, (1380, 2048), budget=b * GB, in_use=GB).scales)


def test_the_preview_term_counts_and_narrows_the_refinement_scales(costs):
    """At a refinement scale the preview term's base-size objective counts in the work admission control multiplies
    and in the peak; the full-size objective reads the detail layers and relu4_2 only, so its tiles need the
    halos of those layers (40/38 px, not relu5_1's 80/70) and no cut past them."""
    cfg = make_config(size=2048)
    on, off = (P.plan(costs, cfg.replace(refine_preview_weight=w), (345, 512), budget=None, in_use=GB)
               for w in (1.0, 0.0))
    for a, b in zip(on.scales, off.scales):
        extra = a.steps * 345 * 512 if a.index >= len(cfg.scales) else 0
        assert a.preview_pixels == (345 * 512 if extra else 0)
        assert a.work == pytest.approx(b.work + extra)
        assert a.peak_bytes >= b.peak_bytes
    narrow = costs.for_layers(P.refined(cfg).layers)
    assert (narrow.geometry.before, narrow.geometry.after, narrow.geometry.align) == (40, 38, 8)
    assert narrow.module_names[-1] == "relu4_2" and all(c is None or c < len(narrow.module_names)
                                                        for c in narrow.cuts())
    tight = P.plan(costs, cfg, (1380, 2048), budget=3 * GB, in_use=GB).scales[-1]
    assert tight.tile is not None and tight.tile[0] % 8 == 0
    ws = [t.window_pixels for t in tiling.tiles(1380, 2048, tight.tile, narrow.geometry)]
    assert tight.window_pixels == sum(ws)


def test_cpu_steps_count_page_faults_and_the_planner_weighs_a_fault_free_tile(costs, monkeypatch):
    """On a CPU a step whose largest activation (relu1's output) is over glibc's mmap limit pays PAGE_FAULTS (its
    pages faulted in at every use); a GPU's costs never do. The planner counts it, and where a tile whose buffers
    stay under the limit is cheaper than the largest tile that fits, takes it."""
    assert costs.largest_bytes == 64 * 4  # relu1's output in float32
    side = math.isqrt(P.MMAP_LIMIT // 256)
    assert costs.faults(side**2) == 1.0 and costs.faults((side + 1) ** 2) == P.PAGE_FAULTS
    assert dataclasses.replace(costs, resident=False).faults(10**9) == 1.0
    cfg = make_config(size=2048)
    untiled = P.plan(costs, cfg, (2048, 2048), budget=None, in_use=GB).scales[-1]
    assert untiled.work == pytest.approx(untiled.steps * (2048**2 * P.PAGE_FAULTS + untiled.preview_pixels))
    narrow = costs.for_layers(P.refined(cfg).layers, pass_one=P.refined(cfg).style_layers)
    differ = 0
    for budget in (GB * b for b in (3, 3.5, 4, 6)):
        chosen = P.plan(costs, cfg, (2048, 2048), budget=budget, in_use=GB).scales[-1]
        with monkeypatch.context() as m:
            m.setattr(P, "MMAP_LIMIT", 10**18)  # no limit: the largest tile that fits, as before
            largest = P.plan(costs, cfg, (2048, 2048), budget=budget, in_use=GB).scales[-1]
        assert chosen.peak_bytes <= budget and chosen.tile is not None and largest.tile is not None
        assert chosen.tile[0] * chosen.tile[1] <= largest.tile[0] * largest.tile[1]
        assert P._step_work(narrow, (2048, 2048), chosen.tile, chosen.cut) <= \
            P._step_work(narrow, (2048, 2048), largest.tile, largest.cut)
        differ += chosen.tile != largest.tile
    assert differ


def test_a_refinement_pass_one_reads_the_style_layers_only(costs):
    """A refinement scale's tiled pass 1 without a kept graph runs to relu3_1 over relu3_1's windows, not to the
    content's relu4_2 over its windows: the planner's step work counts the narrower pass."""
    cfg = make_config(size=2048)
    layers, style = P.refined(cfg).layers, P.refined(cfg).style_layers
    narrow, wide = costs.for_layers(layers, pass_one=style), costs.for_layers(layers)
    assert narrow.pass_one_share() == pytest.approx(P.FORWARD_SHARE["relu3_1"] / P.FORWARD_SHARE["relu4_2"])
    assert wide.pass_one_share() == 1.0
    for tile in ((344, 344), (704, 704)):
        assert P._step_work(narrow, (2048, 2048), tile, None) < P._step_work(wide, (2048, 2048), tile, None)
    assert costs.cuts() == [None, *sorted((costs.module_names.index(n) + 1 for n in ("pool1", "pool2", "pool3",
                                                                                       "pool4")), reverse=True)]
