"""A serving worker, whatever the server: the model built from a model config, warmed up and timed at
start-up, then requests in, one :class:`Outcome` per request out.

``Worker.start(model_config)`` reads the limits for the device type, builds :func:`nsf.style_fusion`,
runs the warm-up sizes, times a short run for admission control and, when the model compiles, keeps
requests of new shapes from compiling. ``Worker.answer(requests)`` checks every request (parse, memory
and time admission), runs the good ones -- requests with one config and content size as one batched
optimization, a batch that fails retried request by request -- and answers each in order with the
encoded image or its error. A server adapter only maps its own request and response shapes onto this.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import StyleConfig, make_config
from ..errors import ConfigError, OutOfMemory, PlanError
from ..image import encode, pil_to_tensor
from ..model import Result, StyleFusion, style_fusion
from ..optimize.events import Progress, ScaleDone
from ..version import __version__
from ..weights import LoadedWeights
from .admission import CostModel, admit_memory, pixel_steps
from .errors import RequestError, phrase
from .limits import ServingLimits
from .request import VIDEO_TYPE, Job, VideoJob, from_config_error, parse_request, resolve
from .stream import MEDIA_TYPE, PARTIAL_HEADER, StopWhen, frame_preview, line, preview, result, video_result
from .stream import error as error_message

logger = logging.getLogger(__name__)
DEFAULT_RESPONSE_TIMEOUT = 120.0  # TorchServe's, for a model-config.yaml without responseTimeout
JSON = "application/json"


@dataclass(frozen=True)
class Outcome:
    """The answer to one request: 200 and the encoded image, or an error status and its JSON body."""

    status: int  # 200, or the error's status (400, 413, 422, 500, 507)
    body: bytes | dict[str, Any]  # 200: the encoded image; else {"error", "field", "allowed"}
    content_type: str  # "image/png" | "image/jpeg" | "application/json" | "application/x-ndjson" (stream)
    partial: bool = False  # a deadline cut the run short: the best image so far

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def headers(self) -> dict[str, str]:
        """Response headers beyond the content type: ``X-NSF-Partial: true`` on a partial image."""
        return {PARTIAL_HEADER: "true"} if self.partial else {}

    @property
    def phrase(self) -> str:
        """The status's reason phrase (``"Unprocessable Entity"``...)."""
        return phrase(self.status)

    def json(self) -> str:
        """An error's body as JSON text (``ValueError`` for an image)."""
        if not isinstance(self.body, dict):
            raise ValueError("a 200 outcome holds image bytes, not a JSON body")
        return json.dumps(self.body, default=str)

    @classmethod
    def image(cls, data: bytes, content_type: str, partial: bool = False) -> Outcome:
        return cls(200, data, content_type, partial)

    @classmethod
    def refused(cls, error: RequestError) -> Outcome:
        return cls(error.status, error.to_dict(), JSON)

    @classmethod
    def out_of_memory(cls, error: OutOfMemory) -> Outcome:
        """507: the planner said the run fits, the device ran out of memory all the same."""
        return cls(507, {"error": str(error), "field": "size", "allowed": None}, JSON)

    @classmethod
    def failed(cls, error: BaseException) -> Outcome:
        """500: anything else; the worker carries on."""
        return cls(500, {"error": f"internal error: {type(error).__name__}: {error}", "field": None,
                         "allowed": None}, JSON)


@dataclass(frozen=True)
class RunHooks:
    """A front end's view into one request that runs alone (``stream`` or ``deadline``): each step's
    :class:`nsf.Progress`, each tile of a tiled step ``(done, total)``, and the finished :class:`nsf.Result`
    (the float image and its provenance, before the worker encodes it; e.g. for a 16-bit download)."""

    on_step: Callable[[Progress], None] | None = None
    on_tile: Callable[[int, int], None] | None = None
    on_result: Callable[[Result], None] | None = None


class Worker:
    """One model on one device serving requests under :class:`ServingLimits`."""

    def __init__(self, limits: ServingLimits, model: StyleFusion, *, response_timeout: float) -> None:
        self.limits = limits
        self.model = model
        self.response_timeout = float(response_timeout)
        self.cost: CostModel | None = None  # time admission, set by calibrate()
        self.ready = False

    @classmethod
    def start(cls, model_config: Mapping[str, Any], *, device: torch.device | str = "cpu",
              weights: str | os.PathLike[str] | LoadedWeights = "caffe",
              response_timeout: float | None = None) -> Worker:
        """Build, warm up and calibrate a worker from a parsed model-config.yaml.

        Args:
            model_config: the mapping with the ``nsf`` section (:class:`ServingLimits` for ``device``'s type).
            device: where the model runs (``"cpu"``, ``"cuda:1"``...).
            weights: as for :func:`nsf.style_fusion` (a server passes ``load_caffe(path)``: sha256-checked).
            response_timeout: the seconds a request may take before the server gives up on it; admission
                refuses what would run over ``time_budget`` of it. Default: the config's ``responseTimeout``
                (TorchServe's key), else 120.

        Returns:
            a worker with ``ready`` set.
        """
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is not None:
            torch.cuda.set_device(dev)
        limits = ServingLimits.from_model_config(model_config, dev.type)
        if response_timeout is None:
            response_timeout = float(model_config.get("responseTimeout", DEFAULT_RESPONSE_TIMEOUT))
        model = style_fusion(weights=weights, device=dev, compile=limits.compile, max_memory=limits.max_memory,
                             preset=limits.preset, **limits.overrides)
        logger.info("style_fusion: nsf %s from %s on %s, weights %s sha256 %s, limits %s", __version__,
                    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), dev, model.weights_name,
                    model.weights_sha256, limits.to_dict())
        worker = cls(limits, model, response_timeout=response_timeout)
        worker.warm_up()
        worker.calibrate()
        if model.compiles:
            # Shapes compiled above (warmup_sizes, calibrate) stay compiled; a request of another shape
            # runs eager (CUDA graphs still apply) instead of compiling inside the request: about 20 s
            # per coarse-to-fine scale on an H100, and past dynamo's recompile limit it would go eager anyway.
            torch.compiler.set_stance("eager_on_recompile")
        worker.ready = True
        return worker

    # -- start-up --------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compile (on CUDA) and run the step once per configured size, so requests do not pay for it."""
        limits = self.limits
        for size in limits.warmup_sizes:
            start = time.perf_counter()
            cfg = resolve(limits.preset, {"size": size, "steps": max(1, limits.warmup_steps)}, limits)
            content = _probe_image(size)
            self.model.transfer(content, [content.flip(-1)], cfg)
            self._sync()
            logger.info("style_fusion: warm-up at %d px, %d steps: %.1f s", size, cfg.steps,
                        time.perf_counter() - start)

    def calibrate(self) -> CostModel | None:
        """Time a short single-scale run on this worker: seconds per pixel-step, for time admission
        (``self.cost``; ``None`` when the limits' ``time_budget`` is 0)."""
        limits = self.limits
        if limits.time_budget <= 0:
            self.cost = None
            return None
        size, steps = limits.calibrate
        cfg = make_config(limits.base, size=size, steps=steps, scales=(1.0,), scale_steps=(1.0,), tol=0.0)
        content = _probe_image(size)
        self.model.transfer(content, [content.flip(-1)], make_config(cfg, steps=1))  # first-call costs
        self._sync()
        start = time.perf_counter()
        self.model.transfer(content, [content.flip(-1)], cfg)
        self._sync()
        seconds = time.perf_counter() - start
        self.cost = CostModel(seconds / pixel_steps(cfg, size, size), limits.time_budget * self.response_timeout,
                              work=self._work)
        logger.info("style_fusion: calibrated %.3g s per pixel-step (%d px, %d steps: %.2f s); requests estimated "
                    "over %.0f s (%.0f%% of responseTimeout %.0f s) are refused with 422",
                    self.cost.seconds_per_pixel_step, size, steps, seconds, self.cost.budget,
                    100 * limits.time_budget, self.response_timeout)
        return self.cost

    def _work(self, cfg: StyleConfig, height: int, width: int, masks: int = 0) -> float:
        """A run's pixel-steps as planned for this worker's memory (tiled scales, other style losses and masks
        cost more; inf: cannot fit)."""
        try:
            return self.model.plan_config(cfg, (height, width), masks=masks).work
        except PlanError:
            return math.inf

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    # -- requests --------------------------------------------------------------------------

    def check(self, fields: Mapping[str, Any]) -> Job | VideoJob:
        """A request's fields -> a job admitted to run; :class:`RequestError` for a bad request or one
        over the worker's memory (422) or time (422) limit."""
        job = parse_request(fields, self.limits)
        if isinstance(job, VideoJob):
            return self._check_video(job)
        hw = (job.content.height, job.content.width)
        masks = len(job.masks) if job.masks is not None else 0
        admit_memory(lambda: self.model.plan_config(job.config, hw,
                                                    style_sizes=[(s.height, s.width) for s in job.styles],
                                                    masks=masks))
        if self.cost is not None:
            self.cost.admit(job.config, *hw, masks=masks)
        return job

    def _check_video(self, job: VideoJob) -> VideoJob:
        """Admit a video request: its first frame must fit the memory budget (a later frame's one full-size scale is
        the first's last), and the whole clip the time budget: the first frame's schedule plus each later frame's
        short one, with the cost model measured at start-up. Over it: a 422 naming the most frames that fit (or,
        when not even the first frame fits, the steps or size that would)."""
        from ..video import later_config

        hw = job.size
        admit_memory(lambda: self.model.plan_config(job.config, hw,
                                                    style_sizes=[(s.height, s.width) for s in job.styles]))
        if self.cost is None:
            return job
        first = self.cost.seconds(job.config, *hw)
        if first > self.cost.budget:
            self.cost.admit(job.config, *hw)  # names the steps (or size) that would fit one frame
        later = self.cost.seconds(later_config(job.config, job.later_steps), *hw)
        estimate = first + (job.frames - 1) * later
        if estimate > self.cost.budget:
            fits = 1 + int((self.cost.budget - first) // later) if later > 0 else job.frames
            raise RequestError(f"the video's {job.frames} frames at size={job.config.size} would take about "
                               f"{estimate:.0f} s on this worker (first frame {first:.1f} s with steps="
                               f"{job.config.steps}, each later one {later:.1f} s with later_steps={job.later_steps}),"
                               f" over its {self.cost.budget:.0f} s limit per request; at most {fits} frames fit",
                               field="video", status=422,
                               allowed={"max_frames": fits, "seconds_limit": round(self.cost.budget)})
        return job

    def estimate(self, job: Job | VideoJob) -> float:
        """A checked job's estimated seconds on this worker (0 without a cost model)."""
        if self.cost is None:
            return 0.0
        if isinstance(job, VideoJob):
            from ..video import later_config

            return self.cost.seconds(job.config, *job.size) + (job.frames - 1) * self.cost.seconds(
                later_config(job.config, job.later_steps), *job.size)
        return self.cost.seconds(job.config, job.content.height, job.content.width)

    def answer(self, requests: Sequence[Mapping[str, Any] | RequestError], *,
               progress: Callable[[int, bytes], None] | None = None,
               gone: Sequence[threading.Event | None] = (), streams: bool = True,
               hooks: Sequence[RunHooks | None] = ()) -> list[Outcome]:
        """One :class:`Outcome` per request, in order (a :class:`RequestError` stands for a request the
        server could not even read: it is answered as it is).

        Requests that share a resolved config and a content size run as one batched optimization, each
        image its own problem; a batch that fails is retried request by request. A run out of memory is
        a 507, any other failure a 500 for that request only.

        A request with masks (regional styles), a ``deadline`` or ``stream`` runs on its own. A run that
        refuses its masks (a :class:`~nsf.errors.ConfigError`: an all-zero mask, one whose aspect ratio is not
        the content's...) is a 400 naming the field, as when parsing. Past its deadline (counted from this
        call) the best image so far is its answer, with ``partial`` set. A streamed request's previews go
        to ``progress(index, line)`` as each scale ends (NDJSON lines, :mod:`nsf.serving.stream`; none
        when the server passes no ``progress``) and its outcome is the last line, the result or the
        error (an error before the first preview is an ordinary error answer). ``gone[index]``, set by
        the server when that request's client has disconnected, stops its run (a batch's run once all its
        clients have gone). ``streams=False``: the
        endpoint cannot stream (a KServe v2 one); ``stream=true`` is then a 400 naming the field.
        ``hooks[index]`` (:class:`RunHooks`) follows that request's steps, tiles and result when it runs alone.

        A video request (a ``video`` field: :class:`~nsf.serving.request.VideoJob`) always runs alone through
        :func:`nsf.video.frames`: its answer is the MP4 (``video/mp4``), streamed as one ``frame`` line per finished
        frame and then the result line; ``gone`` stops it at the next step (no file: a 499 nobody reads).
        """
        start, arrived = time.perf_counter(), time.monotonic()
        outcomes: dict[int, Outcome] = {}
        jobs: dict[int, Job] = {}
        videos: dict[int, VideoJob] = {}
        for idx, request in enumerate(requests):
            try:
                if isinstance(request, RequestError):
                    raise request
                job = self.check(request)
                if job.stream and not streams:
                    raise RequestError("stream=true: this endpoint answers in one piece; allowed: false here, or "
                                       "stream from an endpoint that streams (README, 'Progress while a request "
                                       "runs')", field="stream", allowed=[False])
                if isinstance(job, VideoJob):
                    videos[idx] = job
                else:
                    jobs[idx] = job
            except RequestError as e:
                logger.info("style_fusion: request %d refused (%d): %s", idx, e.status, e.message)
                outcomes[idx] = Outcome.refused(e)
            except Exception as e:  # noqa: BLE001 - one failing request must not take the worker or the batch down
                logger.exception("style_fusion: request %d failed", idx)
                outcomes[idx] = Outcome.failed(e)
        # a masked request is a group of its own: its masks are its run's, not a batch's
        groups: dict[tuple[StyleConfig, tuple[int, int], int | None], list[int]] = {}
        for idx, video in videos.items():  # a video request always runs alone
            outcomes[idx] = self._run_video(idx, video, StopWhen(None, gone[idx] if idx < len(gone) else None),
                                            progress if video.stream else None,
                                            hooks[idx] if idx < len(hooks) else None)
        for idx, job in jobs.items():
            if job.stream or job.deadline is not None:
                stop = StopWhen(None if job.deadline is None else arrived + job.deadline,
                                gone[idx] if idx < len(gone) else None)
                outcomes[idx] = self._run_alone(idx, job, stop, progress if job.stream else None,
                                                hooks[idx] if idx < len(hooks) else None)
            else:
                groups.setdefault((job.config, job.content.size, idx if job.masked else None), []).append(idx)
        for idxs in groups.values():
            events = [e for e in (gone[i] if i < len(gone) else None for i in idxs) if e is not None]
            # a batch stops once every one of its clients has gone (the server saw each disconnect)
            self._run_group(idxs, jobs, outcomes, start, _all_set(events) if len(events) == len(idxs) else None)
        return [outcomes[i] for i in range(len(requests))]

    def _run_alone(self, idx: int, job: Job, stop: StopWhen,
                   progress: Callable[[int, bytes], None] | None, hooks: RunHooks | None = None) -> Outcome:
        """One request with a deadline or a stream: previews to ``progress``, ``stop`` polled every step."""
        start, previews = time.perf_counter(), 0

        def on_scale(done: ScaleDone) -> None:
            nonlocal previews
            if progress is not None and not stop.client_gone:
                progress(idx, line(preview(done)))
                previews += 1

        try:
            (data,), partial = self.run([job], stop=stop, on_scale=on_scale, hooks=hooks)
        except Exception as e:  # noqa: BLE001 - one failing request must not take the worker down
            outcome = self._failure(idx, e)
            return Outcome(200, line(error_message(outcome.status, dict(outcome.body))), MEDIA_TYPE) \
                if previews and isinstance(outcome.body, dict) else outcome
        if stop.client_gone:
            logger.info("style_fusion: request %d: the client went away after %d preview(s); stopped at step %s "
                        "of %d after %.2f s", idx, previews, partial["step"] if partial else job.config.steps,
                        job.config.steps, time.perf_counter() - start)
        else:
            logger.info("style_fusion: request %d: content %dx%d -> %d px, %d steps, seed %d, %s%s, %.2f s", idx,
                        *job.content.size, job.config.size, job.config.steps, job.config.seed,
                        f"streamed with {previews} preview(s)" if job.stream else "alone",
                        f", stopped by its deadline at step {partial['step']}" if partial else "",
                        time.perf_counter() - start)
        if job.stream:
            return Outcome(200, line(result(data, job.content_type, partial is not None)), MEDIA_TYPE,
                           partial is not None)
        return Outcome.image(data, job.content_type, partial is not None)

    def _run_video(self, idx: int, job: VideoJob, stop: StopWhen, progress: Callable[[int, bytes], None] | None,
                   hooks: RunHooks | None = None) -> Outcome:
        """A video request: :func:`nsf.video.frames` over the clip (written to a temporary file), a preview line per
        frame to ``progress`` (streamed), ``stop`` polled every step; the MP4 as the answer."""
        from ..video import frames

        start, done = time.perf_counter(), 0
        hooks = hooks or RunHooks()
        options = {f.name: getattr(job.config, f.name) for f in dataclasses.fields(job.config)}
        try:
            with tempfile.TemporaryDirectory(prefix="nsf-video-") as tmp:
                src, out = os.path.join(tmp, "clip"), os.path.join(tmp, "out.mp4")
                with open(src, "wb") as f:
                    f.write(job.video)
                run = frames(self.model, src, job.styles, out=out, temporal_weight=job.temporal_weight,
                             later_steps=job.later_steps, max_frames=self.limits.max_video_frames, resume=False,
                             stop=stop, callback=hooks.on_step, on_tile=hooks.on_tile, **options)
                while True:
                    try:
                        frame = next(run)
                    except StopIteration as end:
                        finished = end.value
                        break
                    done += 1
                    if progress is not None and not stop.client_gone:
                        progress(idx, line(frame_preview(frame.image, frame.index, frame.total, frame.seconds)))
                if finished.stopped or finished.out is None:
                    raise _Stopped()
                with open(out, "rb") as r:
                    data = r.read()
        except _Stopped:
            logger.info("style_fusion: request %d: video stopped after %d frame(s) of %d, %.2f s: its client left",
                        idx, done, job.frames, time.perf_counter() - start)
            # 499 (nginx's "client closed request"): nobody reads it on a server; the studio's Stop says it
            error = RequestError(f"stopped after {done} of {job.frames} frames: the client went away", field=None,
                                 status=499)
            return Outcome(200, line(error_message(499, error.to_dict())), MEDIA_TYPE) if job.stream \
                else Outcome.refused(error)
        except Exception as e:  # noqa: BLE001 - one failing request must not take the worker down
            outcome = self._failure(idx, e)
            return Outcome(200, line(error_message(outcome.status, dict(outcome.body))), MEDIA_TYPE) \
                if job.stream and done and isinstance(outcome.body, dict) else outcome
        logger.info("style_fusion: request %d: video %dx%d, %d frames -> %d px, steps %d then %d, %s, %.2f s", idx,
                    job.size[1], job.size[0], done, job.config.size, job.config.steps, job.later_steps,
                    "streamed" if job.stream else "alone", time.perf_counter() - start)
        if job.stream:
            return Outcome(200, line(video_result(data, done)), MEDIA_TYPE)
        return Outcome.image(data, VIDEO_TYPE)

    def _run_group(self, idxs: list[int], jobs: dict[int, Job], outcomes: dict[int, Outcome], start: float,
                   stop: Callable[[], bool] | None = None) -> None:
        try:
            images, partial = self.run([jobs[i] for i in idxs], stop=stop)
        except Exception as e:  # noqa: BLE001 - one failing request must not take the worker or the batch down
            if len(idxs) == 1:
                outcomes[idxs[0]] = self._failure(idxs[0], e)
                return
            logger.warning("style_fusion: batch %s failed (%s: %s); running its requests one by one", idxs,
                           type(e).__name__, e)
        else:
            if partial is not None and stop is not None and stop():
                logger.info("style_fusion: request(s) %s: the client(s) went away; stopped at step %s after %.2f s",
                            idxs, partial["step"], time.perf_counter() - start)
            for i, data in zip(idxs, images):
                job = jobs[i]
                logger.info("style_fusion: request %d: content %dx%d -> %d px, %d steps, seed %d, batch of %d, "
                            "%.2f s", i, *job.content.size, job.config.size, job.config.steps, job.config.seed,
                            len(idxs), time.perf_counter() - start)
                outcomes[i] = Outcome.image(data, job.content_type)
            return
        # A batch that failed (or ran out of memory) is retried request by request, outside the except
        # block: the exception's frames, and the failed batch's tensors with them, are gone by now.
        for i in idxs:
            self._run_group([i], jobs, outcomes, start, stop)

    def run(self, jobs: list[Job], *, stop: Callable[[], bool] | None = None,
            on_scale: Callable[[ScaleDone], None] | None = None,
            hooks: RunHooks | None = None) -> tuple[list[bytes], Mapping[str, int] | None]:
        """Jobs with one config and one content size -> their encoded images (one batched optimization;
        a job with masks runs alone, its masks passed as ``(1, 1, H, W)`` tensors), and where ``stop`` cut the
        run short (``None``: it ran to its end; the metadata of a partial PNG says so too).

        ``stop`` and ``on_scale`` are :meth:`nsf.StyleFusion.transfer`'s; ``hooks`` its ``callback`` and ``on_tile``,
        and ``on_result`` receives the :class:`nsf.Result` before it is encoded."""
        cfg = jobs[0].config
        if len(jobs) > 1 and any(job.masked for job in jobs):
            raise ValueError(f"a batch of {len(jobs)} jobs holds a masked one; allowed: a masked job alone")
        content = torch.cat([pil_to_tensor(job.content) for job in jobs])
        # one entry per style slot: a batch of one, or each request's own image (any size)
        styles = [pil_to_tensor(jobs[0].styles[k]) if len(jobs) == 1 else [pil_to_tensor(j.styles[k]) for j in jobs]
                  for k in range(len(jobs[0].styles))]
        hooks = hooks or RunHooks()
        result = self.model.transfer(content, styles, cfg, stop=stop, on_scale=on_scale, masks=jobs[0].masks,
                                     style_masks=jobs[0].style_masks, callback=hooks.on_step, on_tile=hooks.on_tile)
        if hooks.on_result is not None:
            hooks.on_result(result)
        return [encode(result.pil(i), job.format, result.metadata) for i, job in enumerate(jobs)], result.partial

    def _failure(self, idx: int, e: Exception) -> Outcome:
        """The answer to a request whose run raised ``e``: a refused option (its masks...) as when parsing,
        507 out of memory, else 500."""
        if isinstance(e, ConfigError) and not isinstance(e, PlanError):
            error = from_config_error(e, self.limits)
            logger.info("style_fusion: request %d refused by its run (%d): %s", idx, error.status, error.message)
            return Outcome.refused(error)
        return _failure(idx, e)


class _Stopped(Exception):
    """A video run that its ``stop`` ended before the last frame (no file)."""


def _all_set(events: Sequence[threading.Event]) -> Callable[[], bool]:
    """A run's ``stop``: true once every event is set."""
    return lambda: all(e.is_set() for e in events)


def _failure(idx: int, e: Exception) -> Outcome:
    """The answer to a request whose run raised ``e``: 507 out of memory, else 500."""
    if isinstance(e, OutOfMemory):  # the planner said it fits; another process took the memory
        logger.exception("style_fusion: request %d ran out of memory", idx)
        return Outcome.out_of_memory(e)
    logger.exception("style_fusion: request %d failed", idx)
    return Outcome.failed(e)


def _probe_image(size: int) -> torch.Tensor:
    """A smooth synthetic ``(1, 3, size, size)`` image for warm-up and calibration runs."""
    content = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(size))
    return torch.nn.functional.interpolate(content, size=(size, size), mode="bilinear").clamp(0, 1)
