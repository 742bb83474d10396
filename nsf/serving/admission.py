"""Admission: refuse up front (422) what would outrun the worker's time limit or its memory budget.

A refused request names the largest steps (or size) that would be admitted, so a client can retry
within the limit instead of waiting for a timeout and a worker restart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..config import StyleConfig
from ..errors import ConfigError, PlanError
from ..geometry import MIN_SIDE
from ..optimize.scales import schedule
from ..plan import Plan, largest, step_cost
from .errors import RequestError


def admit_memory(plan: Callable[[], Plan]) -> Plan:
    """The run's plan, or a 422 :class:`RequestError` naming the largest size that fits the worker's memory (a 400
    for a size too small for the content's aspect ratio)."""
    try:
        return plan()
    except PlanError as e:
        raise RequestError.from_error(e, message=f"{e} on this worker", field="size") from None
    except ConfigError as e:
        raise RequestError.from_error(e) from None


def pixel_steps(cfg: StyleConfig, height: int, width: int, masks: int = 0) -> float:
    """The work of a run: sum over its coarse-to-fine scales of H * W * steps (early stopping may do less), in
    gram-loss steps without masks (:func:`nsf.plan.step_cost`: other style losses and masks cost more)."""
    return sum(h * w * n for _, (h, w), n in schedule(height, width, cfg)) * step_cost(cfg, masks)


@dataclass(frozen=True)
class CostModel:
    """``seconds = seconds_per_pixel_step * work``, measured by the worker at start-up.

    ``budget`` is the seconds a request may run: a share (``time_budget``) of the server's response
    timeout, so that a request refused here is one that would otherwise have been cut off (and its
    worker restarted) after running for the whole timeout. ``work(cfg, height, width)`` is a run's
    untiled pixel-steps: :func:`pixel_steps`, or a plan's (``nsf.plan.Plan.work``: tiled scales cost
    more per pixel; ``inf`` for a run that cannot fit the memory budget).
    """

    seconds_per_pixel_step: float
    budget: float
    work: Callable[[StyleConfig, int, int, int], float] = field(default=pixel_steps, compare=False)

    def seconds(self, cfg: StyleConfig, height: int, width: int, masks: int = 0) -> float:
        return self.seconds_per_pixel_step * self.work(cfg, height, width, masks)

    def admit(self, cfg: StyleConfig, height: int, width: int, masks: int = 0) -> None:
        """Raise a 422 :class:`RequestError` naming the largest steps (or size) that fit the budget (``masks``:
        the request's content masks)."""
        estimate = self.seconds(cfg, height, width, masks)
        if estimate <= self.budget:
            return
        why = (f"size={cfg.size} with steps={cfg.steps} would take about {estimate:.0f} s on this worker "
               f"({self.seconds_per_pixel_step:.3g} s per pixel-step, measured at start-up), over its "
               f"{self.budget:.0f} s limit per request")
        fits = largest(lambda n: self._fits(dataclasses.replace(cfg, steps=n), height, width, masks), 1, cfg.steps - 1)
        if fits:
            raise RequestError(f"{why}; at size={cfg.size} at most steps={fits} fit", field="steps", status=422,
                               allowed={"min": 1, "max": fits, "seconds_limit": round(self.budget)})
        # The sizes searched start at the least this content's aspect ratio allows (the run refuses a smaller
        # one, ConfigError with allowed={"min": ...}), so the answer is this 422, never that error escaping.
        least = self.least_size(cfg, height, width, masks)
        fits = largest(lambda n: self._fits(dataclasses.replace(cfg, size=n), height, width, masks),
                       least, cfg.size - 1)
        if fits:
            raise RequestError(f"{why}; with steps={cfg.steps} at most size={fits} fits", field="size", status=422,
                               allowed={"min": least, "max": fits, "seconds_limit": round(self.budget)})
        # not even the least size fits with these steps: name the steps that fit there
        steps = largest(lambda n: self._fits(dataclasses.replace(cfg, size=least, steps=n), height, width, masks),
                        1, cfg.steps - 1)
        if steps:
            raise RequestError(f"{why}; no size fits with steps={cfg.steps}: at size={least} (the least for this "
                               f"content) at most steps={steps} fit", field="steps", status=422,
                               allowed={"min": 1, "max": steps, "size": least, "seconds_limit": round(self.budget)})
        raise RequestError(f"{why}; not even size={least} with steps=1 fits", field="size", status=422,
                           allowed={"min": least, "max": None, "seconds_limit": round(self.budget)})

    def _fits(self, cfg: StyleConfig, height: int, width: int, masks: int) -> bool:
        try:
            return self.seconds(cfg, height, width, masks) <= self.budget
        except ConfigError:  # a size the run refuses for this content fits nothing
            return False

    def least_size(self, cfg: StyleConfig, height: int, width: int, masks: int = 0) -> int:
        """The least ``size`` a run of this ``height x width`` content takes (each output side at least
        ``MIN_SIDE`` px), from the run's own refusal of a smaller one (its ``allowed["min"]``)."""
        try:
            self.seconds(dataclasses.replace(cfg, size=MIN_SIDE), height, width, masks)
        except ConfigError as e:
            if isinstance(e.allowed, Mapping) and isinstance(e.allowed.get("min"), int):
                return max(MIN_SIDE, int(e.allowed["min"]))
            raise
        return MIN_SIDE
