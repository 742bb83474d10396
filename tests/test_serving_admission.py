"""nsf.serving.admission: the work of a run, the time cost model and its 422s, the memory plan's 422.

Pure: no server, no model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsf.config import make_config
from nsf.errors import ConfigError, PlanError
from nsf.serving import CostModel, RequestError, admit_memory, pixel_steps


def test_pixel_steps_sums_the_coarse_to_fine_schedule():
    cfg = make_config(size=256, steps=200)  # scales 0.25/0.5/1 with 60%/30%/10% of the steps
    assert pixel_steps(cfg, 256, 256) == 64 * 64 * 120 + 128 * 128 * 60 + 256 * 256 * 20
    wide = pixel_steps(cfg, 100, 200)  # long side 256: 128 x 256 at full size
    assert wide == 32 * 64 * 120 + 64 * 128 * 60 + 128 * 256 * 20


def test_admit_passes_what_fits_and_names_the_largest_steps_that_fit():
    cost = CostModel(seconds_per_pixel_step=1e-6, budget=10.0)
    small = make_config(size=128, steps=20)
    cost.admit(small, 128, 128)  # ~ 0.4 s
    big = make_config(size=512, steps=300)
    assert cost.seconds(big, 512, 512) > 10
    with pytest.raises(RequestError) as e:
        cost.admit(big, 512, 512)
    err = e.value
    assert err.status == 422 and err.field == "steps" and err.phrase == "Unprocessable Entity"
    top = err.allowed["max"]
    assert err.allowed["seconds_limit"] == 10
    assert cost.seconds(big.replace(steps=top), 512, 512) <= 10 < cost.seconds(big.replace(steps=top + 1), 512, 512)
    assert f"at most steps={top}" in err.message and "10 s limit" in err.message


def test_other_style_losses_and_masks_count_as_more_work():
    """Measured step costs (each registered style loss's cost, MASK_WORK): a sliced step is about two gram steps,
    a mask adds a share; a request that fits as gram can be refused as sliced, naming fewer steps."""
    cfg = make_config(size=256, steps=100)
    gram = pixel_steps(cfg, 256, 256)
    assert pixel_steps(cfg.replace(style_loss="sliced"), 256, 256) == pytest.approx(2.0 * gram)
    assert pixel_steps(cfg, 256, 256, masks=2) == pytest.approx(1.14 * gram)
    cost = CostModel(seconds_per_pixel_step=1.0 / gram, budget=1.5)  # the gram run: 1 s
    cost.admit(cfg, 256, 256)
    cost.admit(cfg, 256, 256, masks=4)  # 1.28 s
    with pytest.raises(RequestError) as e:
        cost.admit(cfg.replace(style_loss="sliced"), 256, 256)
    assert e.value.field == "steps" and e.value.allowed["max"] < 100


def test_admit_names_the_largest_size_when_no_step_count_fits():
    cost = CostModel(seconds_per_pixel_step=1e-3, budget=60.0)
    cfg = make_config(size=1024, steps=50, scales=(1.0,), scale_steps=(1.0,))
    with pytest.raises(RequestError) as e:
        cost.admit(cfg, 1024, 1024)  # one step at 1024 px already takes 1049 s
    err = e.value
    assert err.status == 422 and err.field == "size"
    top = err.allowed["max"]
    assert cost.seconds(cfg.replace(size=top), 1024, 1024) <= 60 < cost.seconds(cfg.replace(size=top + 1), 1024, 1024)


def test_admit_memory_is_a_422_naming_the_largest_size():
    def no_room():
        raise PlanError("size=4096 does not fit max_memory=2.00 GB: ...; at most size=1800 fits", field="size",
                        value=4096, allowed={"min": 16, "max": 1800})

    with pytest.raises(RequestError) as e:
        admit_memory(no_room)
    err = e.value
    assert (err.status, err.field, err.allowed["max"]) == (422, "size", 1800)
    assert "on this worker" in err.message
    assert admit_memory(lambda: "the plan") == "the plan"


def _planned_work(cfg, height, width, masks=0):
    """The worker's work function in miniature: the plan's own refusal of a size whose short side is under 16 px
    for this content (nsf.plan.too_small, a ConfigError with allowed={"min": ...}), else the pixel-steps."""
    from nsf.geometry import MIN_SIDE, target_size
    from nsf.plan import too_small

    if min(target_size(height, width, cfg.size, cfg.resize)) < MIN_SIDE:
        raise too_small(cfg, (height, width))
    return pixel_steps(cfg, height, width, masks)


@pytest.mark.parametrize("size", [1024, 2048])
def test_a_large_size_with_many_steps_is_a_422_not_the_plans_least_size_error(size):
    """Found with kserve.InferenceRESTClient: 1024/2048 px with 300 steps on a 512x345 content answered 500
    "ConfigError: size=16 makes a 16x11 px picture..." (the size search went below this content's least size)."""
    cost = CostModel(seconds_per_pixel_step=6e-5, budget=720.0, work=_planned_work)  # 512 px x 300 fits
    cfg = make_config(size=size, steps=300)
    with pytest.raises(RequestError) as e:
        cost.admit(cfg, 345, 512)
    err = e.value
    assert err.status == 422 and err.field in ("size", "steps"), err.to_dict()
    assert err.allowed["max"] is not None and err.allowed["seconds_limit"] == 720
    if err.field == "size":
        top = err.allowed["max"]
        assert err.allowed["min"] == cost.least_size(cfg, 345, 512) > 16  # 512x345: 24 px at the least
        assert cost.seconds(cfg.replace(size=top), 345, 512) <= 720 < cost.seconds(cfg.replace(size=top + 1), 345, 512)


def test_when_no_size_fits_the_steps_at_the_least_size_are_named():
    cost = CostModel(seconds_per_pixel_step=1.0, budget=2e4, work=_planned_work)
    cfg = make_config(size=1024, steps=300)
    with pytest.raises(RequestError) as e:
        cost.admit(cfg, 345, 512)
    err = e.value
    assert err.status == 422 and err.field == "steps" and err.allowed["size"] == 24, err.to_dict()
    assert cost.seconds(cfg.replace(size=24, steps=err.allowed["max"]), 345, 512) <= 2e4


@settings(max_examples=60, deadline=None)
@given(size=st.integers(16, 2048), steps=st.integers(1, 300), h=st.integers(16, 600), w=st.integers(16, 600),
       rate=st.sampled_from([1e-7, 1e-6, 1e-5, 1e-3]))
def test_admission_over_the_whole_range_answers_or_refuses_with_422(size, steps, h, w, rate):
    """Every size up to the limit x every steps up to the limit, any aspect ratio: admitted, a 422 naming what fits,
    or the run's own 400 for a size under this content's least: never another error."""
    cost = CostModel(seconds_per_pixel_step=rate, budget=60.0, work=_planned_work)
    cfg = make_config(size=size, steps=steps)
    try:
        cost.admit(cfg, h, w)
    except RequestError as e:
        assert e.status == 422 and e.field in ("size", "steps"), e.to_dict()
    except ConfigError as e:  # the size itself is under this content's least: parse/plan say so first (400)
        assert e.field == "size" and size < e.allowed["min"]
