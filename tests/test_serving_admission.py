"""nsf.serving.admission: the work of a run, the time cost model and its 422s, the memory plan's 422.

Pure: no server, no model."""

from __future__ import annotations

import pytest

from nsf.config import make_config
from nsf.errors import PlanError
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
    """Measured step costs (nsf.plan.LOSS_WORK, MASK_WORK): a sliced step is about two gram steps, a mask adds
    a share; a request that fits as gram can be refused as sliced, naming fewer steps."""
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
