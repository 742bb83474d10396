"""``nsf studio``: a browser app (Gradio) over the serving worker.

The page runs every job through :class:`nsf.serving.Worker`, the same worker the servers use: the same request
fields, image checks (type, size, pixel cap), memory and time admission, errors and provenance. One job runs at a
time per device (the run event's ``concurrency_limit=1``; Gradio shows the queue position on the outputs), with
per-scale previews streamed while it runs, per-step and per-tile progress, and Stop (the worker's ``gone`` event:
the run ends at its next step with the best image so far, marked partial).

The parts a browser does not need -- building a request from the page's values, the plan line, the masks painted
in the image editor, running a job as a stream of :class:`Update` s, encoding downloads -- live on
:class:`Studio` and are plain Python (tested without a browser). :func:`build_app` lays them out as a
``gradio.Blocks``; gradio is imported there and in :func:`launch`, never when ``nsf`` is imported.

Files: everything the app writes -- Gradio's upload cache (``GRADIO_TEMP_DIR``), previews, results -- goes under
one temporary folder per app (``nsf-studio-*`` in the system temp dir), removed when the app stops; a session's
uploads and results are removed when its browser tab closes.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFilter

from .config import PRESETS
from .image import encode, encode_png16, read_metadata
from .plan import format_bytes
from .serving.admission import admit_memory
from .serving.errors import RequestError
from .serving.limits import CHOICES
from .serving.request import STYLE_WEIGHTS, VideoJob, decode_image, numbered
from .serving.stream import MEDIA_TYPE
from .serving.worker import Outcome, RunHooks, Worker

if TYPE_CHECKING:
    import gradio as gr

    from .model import Result
    from .optimize import Progress

logger = logging.getLogger(__name__)

DOWNLOADS = ("PNG 8-bit", "PNG 16-bit", "JPEG")
GALLERY = 8  # results kept in a session's gallery
EDITOR_SIDE = 768  # px, longer side of the content shown in the mask editor (the masks are scaled to the content)
BRUSH = 8  # the brush's radius: the editor image's longer side / BRUSH (the brush size tool changes it)
FEATHER = 0.015  # soft mask edges: Gaussian blur radius as a share of the mask's longer side
STEP_EVERY = 0.25  # s between progress updates of the page while a run goes on (previews are never held back)
LAYER_COLOURS = ("#e0402a", "#2a7be0", "#2ab04a", "#b02ad0")  # brush colour of style 1, 2, ... (one per layer)


def default_model_config() -> Path:
    """``deploy/model-config.yaml`` of the checkout this package runs from."""
    return Path(__file__).resolve().parents[1] / "deploy" / "model-config.yaml"


def read_model_config(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """A parsed model-config.yaml (the servers' file; ``nsf`` holds the limits), default the checkout's."""
    import yaml

    p = Path(path) if path is not None else default_model_config()
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist: pass --model-config PATH (a model-config.yaml with an 'nsf' "
                                "section, as deploy/model-config.yaml)")
    config = yaml.safe_load(p.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{p} is not a YAML mapping")
    return config


@dataclass(frozen=True)
class Update:
    """One step of a job as the page shows it.

    ``kind``: ``"queued"`` (waiting for the device), ``"progress"`` (a step or a tile), ``"preview"`` (a scale
    ended, or a video's frame is done: ``preview`` holds its image), ``"result"`` (a video job: ``video`` holds the
    MP4) (``png`` holds the worker's encoded image, ``result`` the
    :class:`nsf.Result`, ``partial`` whether Stop cut it short) or ``"error"`` (``error``: ``{error, field,
    allowed}`` and ``status``). ``text`` is the status line.
    """

    kind: str
    text: str
    preview: Image.Image | None = None
    png: bytes | None = None
    result: Result | None = None
    partial: bool = False
    status: int = 200
    error: Mapping[str, Any] | None = None
    seconds: float = 0.0
    video: bytes | None = None  # a video job's result: the worker's MP4 (``png`` is then None)


def refusal(error: RequestError) -> str:
    """A refused request as the page says it: status, message, and the largest value that fits when known."""
    text = f"**Refused ({error.status} {error.phrase}):** {error.message}"
    allowed = error.allowed
    if isinstance(allowed, Mapping) and allowed.get("max") is not None and error.field in ("size", "steps"):
        text += f". Largest that fits: **{error.field} = {allowed['max']}**."
    return text


def masks_from_layers(layers: Sequence[Image.Image | None], styles: int, size: tuple[int, int], *,
                      feather: float = FEATHER) -> list[Image.Image] | None:
    """The image editor's layers (one per style, painted where that style goes) -> one greyscale mask per style at
    ``size`` ``(W, H)`` (the content's), or ``None`` when no layer is painted.

    A layer's alpha is its mask, blurred by ``feather`` times the longer side (soft edges). Styles whose layer is
    empty share the area no painted layer covers; a painted layer past ``styles`` is refused (``mask_<k>``).
    """
    alphas: list[np.ndarray | None] = []
    for layer in layers:
        if layer is None:
            alphas.append(None)
            continue
        a = np.asarray(layer.convert("RGBA").getchannel("A").resize(size, Image.Resampling.BILINEAR), np.float32)
        alphas.append(a / 255.0 if a.max() > 0 else None)
    extra = [k for k, a in enumerate(alphas) if a is not None and k >= styles]
    if extra:
        name = numbered("mask", extra[0] + 1)[-1]
        raise RequestError(f"the layer of style {extra[0] + 1} is painted, but the page has {styles} style "
                           f"image{'s' if styles > 1 else ''}; clear that layer or add style {extra[0] + 1}",
                           field=name, allowed=f"layers of styles 1..{styles}")
    painted = alphas[:styles] + [None] * (styles - len(alphas[:styles]))
    if all(a is None for a in painted):
        return None
    radius = feather * max(size)
    soft = [None if a is None else np.asarray(Image.fromarray(np.uint8(np.round(a * 255)), "L")
                                              .filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255.0
            for a in painted]
    covered = np.clip(sum(s for s in soft if s is not None), 0.0, 1.0)
    rest = 1.0 - covered
    return [Image.fromarray(np.uint8(np.round((rest if s is None else s) * 255)), "L") for s in soft]


class Studio:
    """The app's state: a started :class:`Worker`, its device lock, the temp folder and the sessions' files."""

    def __init__(self, worker: Worker, *, tmp: str | os.PathLike[str] | None = None) -> None:
        self.worker = worker
        self.limits = worker.limits
        self.lock = threading.Lock()  # one job at a time on this device (the page's queue also holds it to one)
        self.tmp = Path(tmp) if tmp is not None else Path(tempfile.mkdtemp(prefix="nsf-studio-"))
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._stops: dict[str, threading.Event] = {}
        self._files: dict[str, set[Path]] = {}
        self._guard = threading.Lock()

    @classmethod
    def start(cls, model_config: Mapping[str, Any], *, device: str = "cpu", weights: str = "caffe",
              tmp: str | os.PathLike[str] | None = None) -> Studio:
        """Start the worker (build, warm up, calibrate: as a server does) and the app's temp folder."""
        return cls(Worker.start(model_config, device=device, weights=weights), tmp=tmp)

    @property
    def device(self) -> str:
        return str(self.worker.model.device)

    def close(self) -> None:
        """Remove the temp folder and everything in it (uploads, previews, results)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- a request from the page's values ---------------------------------------------------------

    def request(self, content: str | None, styles: Sequence[str | None], *, weights: Sequence[float] = (),
                preset: str | None = None, size: float | None = None, steps: float | None = None,
                seed: float | None = None, preserve_color: str | None = None, style_loss: str | None = None,
                layers: Sequence[Image.Image | None] | None = None, session: str | None = None) -> dict[str, Any]:
        """The request fields of the page's values (image files as the bytes the user gave, options as the
        servers take them), ready for :meth:`Worker.check` / :meth:`Worker.answer`.

        Raises:
            RequestError: no content or no style image (``field`` names it), or a painted layer without its style.
        """
        if not content:
            raise RequestError("add a content image (upload, drop, paste or webcam)", field="content",
                               allowed="an image file")
        given = [(k, s) for k, s in enumerate(styles) if s]
        if not given:
            raise RequestError("add a style image (upload, drop, paste or webcam)", field="style",
                               allowed="an image file")
        for path in (content, *(s for _, s in given)):
            self._own(session, path)
        fields: dict[str, Any] = {"content": Path(content).read_bytes()}
        for name, (_, path) in zip(numbered("style", len(given)), given):
            fields[name] = Path(path).read_bytes()
        if len(given) > 1:
            w = [float(weights[k]) if k < len(weights) and weights[k] is not None else 1.0 for k, _ in given]
            fields[STYLE_WEIGHTS] = ",".join(f"{x:g}" for x in w)
        options = {"size": size, "steps": steps, "seed": seed, "preserve_color": preserve_color,
                   "style_loss": style_loss}
        for name, value in options.items():
            if value is not None and name in self.limits.fields:
                fields[name] = int(value) if isinstance(value, float) and value.is_integer() else value
        if preset:
            fields["preset"] = preset
        if layers:
            img = self._content_image(fields["content"])  # its size, read with the worker's checks
            masks = masks_from_layers(layers, len(given), img.size)
            if masks is not None:
                for name, mask in zip(numbered("mask", len(given)), masks):
                    fields[name] = encode(mask, "png")
        return fields

    def video_request(self, video: str | None, style: str | None, *, size: float | None = None,
                      steps: float | None = None, later_steps: float | None = None,
                      temporal_weight: float | None = None, session: str | None = None) -> dict[str, Any]:
        """The request fields of the Video tab's values: the clip's and the style's bytes as the user gave them and
        the options as the servers take them (a video request: ``video`` instead of ``content``).

        Raises:
            RequestError: no clip or no style image (``field`` names it).
        """
        if not video:
            raise RequestError("add a video clip (MP4, MOV, MKV, WebM...)", field="video", allowed="a video file")
        if not style:
            raise RequestError("add a style image (upload, drop or paste)", field="style", allowed="an image file")
        for path in (video, style):
            self._own(session, path)
        fields: dict[str, Any] = {"video": Path(video).read_bytes(), "style": Path(style).read_bytes()}
        for name, value in {"size": size, "steps": steps, "later_steps": later_steps,
                            "temporal_weight": temporal_weight}.items():
            if value is not None and (name in self.limits.fields or name in ("later_steps", "temporal_weight")):
                fields[name] = int(value) if isinstance(value, float) and value.is_integer() else value
        return fields

    def _content_image(self, data: bytes) -> Image.Image:
        """The content image decoded as the worker decodes it (:func:`nsf.serving.decode_image`: the same checks
        and messages)."""
        return decode_image(data, "content", self.limits)

    # -- the plan line -------------------------------------------------------------------------------

    def plan_line(self, fields: Mapping[str, Any] | RequestError) -> str:
        """What a run of these fields will do, before it runs (Markdown): its scales and tiles, predicted peak
        memory and time, from the worker's planner and its start-up timing; or why it would be refused."""
        if isinstance(fields, RequestError):
            asked = fields.field in ("content", "style", "video") and "add a" in fields.message
            return f"*{fields.message}.*" if asked else refusal(fields)
        try:
            job = self.worker.check(fields)
        except RequestError as e:
            return refusal(e)
        if isinstance(job, VideoJob):
            seconds = self.worker.estimate(job) if self.worker.cost is not None else None
            when = f", about {seconds:.0f} s" if seconds is not None else ""
            return (f"**Plan:** {job.frames} frames of {job.size[1]}×{job.size[0]} at size {job.config.size}: the "
                    f"first {job.config.steps} steps, each later one {job.later_steps} steps{when} on {self.device}.")
        h, w = job.content.height, job.content.width
        masks = len(job.masks) if job.masks is not None else 0
        try:  # the memory in use may have grown since check() planned it
            plan = admit_memory(lambda: self.worker.model.plan_config(
                job.config, (h, w), style_sizes=[(s.height, s.width) for s in job.styles], masks=masks))
        except RequestError as e:
            return refusal(e)
        out_h, out_w = plan.scales[-1].size
        seconds = self.worker.cost.seconds(job.config, h, w, masks) if self.worker.cost is not None else plan.seconds
        scales = " → ".join(f"{s.size[1]}×{s.size[0]}" + (f" in {s.tiles} tiles" if s.tile else "")
                            for s in plan.scales)
        budget = f" of {format_bytes(plan.budget)}" if plan.budget else ""
        when = f", about {seconds:.0f} s" if seconds is not None else ""
        tiled = " Tiled: the page shows progress per tile." if plan.tiled else ""
        regions = f", {masks} painted regions" if masks else ""
        return (f"**Plan:** {out_w}×{out_h} px, {job.config.steps} steps over {len(plan.scales)} scale"
                f"{'s' if len(plan.scales) > 1 else ''} ({scales}){regions}; predicted peak "
                f"{format_bytes(plan.peak_bytes)}{budget}{when} on {self.device}.{tiled}")

    # -- running a job -------------------------------------------------------------------------------

    def stop_event(self, session: str) -> threading.Event:
        """A fresh stop event for ``session``'s next run (Stop sets it)."""
        event = threading.Event()
        with self._guard:
            self._stops[session] = event
        return event

    def stop(self, session: str) -> bool:
        """Stop ``session``'s run at its next step; whether one was running."""
        with self._guard:
            event = self._stops.get(session)
        if event is None or event.is_set():
            return False
        event.set()
        return True

    def run(self, fields: Mapping[str, Any], stop: threading.Event) -> Iterator[Update]:
        """Run one job through the worker as a stream: progress, previews, then the result or the error.

        Waits for the device (one job at a time), asks the worker to stream (``stream=true``: the servers'
        previews), and follows the steps and tiles through :class:`RunHooks`. ``stop`` set (Stop, or the page
        went away: the generator is closed) ends the run at its next step with the best image so far.
        """
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        got: dict[str, Any] = {}
        request = {**fields, "stream": "true"}

        def on_result(result: Result) -> None:
            got["result"] = result

        hooks = RunHooks(on_step=lambda p: events.put(("step", p)),
                         on_tile=lambda done, total: events.put(("tile", (done, total))), on_result=on_result)

        def work() -> None:
            try:
                if not self.lock.acquire(blocking=False):
                    events.put(("queued", None))
                    self.lock.acquire()
                try:
                    if stop.is_set():  # stopped while it waited: nothing ran
                        events.put(("done", None))
                        return
                    events.put(("started", time.perf_counter()))
                    outcome = self.worker.answer([request], progress=lambda _, data: events.put(("line", data)),
                                                 gone=[stop], hooks=[hooks])[0]
                finally:
                    self.lock.release()
                events.put(("done", outcome))
            except BaseException as e:  # noqa: BLE001 - the page must hear of it; the worker carries on
                logger.exception("nsf studio: a job failed")
                events.put(("done", Outcome.failed(e)))

        threading.Thread(target=work, name="nsf-studio-job", daemon=True).start()
        start = time.perf_counter()
        where: dict[str, Any] = {"scale": "", "tile": ""}
        last = 0.0
        try:
            while True:
                kind, value = events.get()
                if kind == "queued":
                    yield Update("queued", "Waiting for the device: another job is running.")
                elif kind == "started":
                    start = value
                    yield Update("progress", "Started.")
                elif kind == "step":
                    p: Progress = value
                    tiles = f" in {p.tiles} tiles" if p.tiles > 1 else ""
                    where["scale"] = f"{p.size[1]}×{p.size[0]}{tiles}"
                    where["tile"] = ""
                    where["step"] = f"step {p.step}/{p.total}, loss {p.loss:.4g}"
                    now = time.perf_counter()
                    if now - last >= STEP_EVERY:
                        last = now
                        yield Update("progress", f"Running: {where['scale']}, {where['step']}.")
                elif kind == "tile":
                    done, total = value
                    yield Update("progress", f"Running: {where['scale']}, {where.get('step', 'first step')}; "
                                             f"tile {done}/{total}.")
                elif kind == "line":
                    message = json.loads(value)
                    if message.get("event") == "frame":  # a video's frame is done
                        image = Image.open(io.BytesIO(base64.b64decode(message["image"])))
                        image.load()
                        yield Update("preview", f"Frame {message['index'] + 1}/{message['total']} done "
                                                f"({message['size'][1]}×{message['size'][0]}, "
                                                f"{message['seconds']:.1f} s).", preview=image)
                    elif message.get("event") == "preview":
                        image = Image.open(io.BytesIO(base64.b64decode(message["image"])))
                        image.load()
                        yield Update("preview", f"Preview: scale {message['scale']}/{message['scales']} "
                                                f"({message['size'][1]}×{message['size'][0]}), step "
                                                f"{message['step']}/{message['total']}, loss {message['loss']:.4g}.",
                                     preview=image)
                elif kind == "done":
                    if value is None:
                        yield Update("error", "Stopped before it started.", status=499,
                                     error={"error": "stopped before it started", "field": None, "allowed": None})
                    else:
                        yield self._finish(value, got.get("result"), time.perf_counter() - start)
                    return
        finally:
            stop.set()  # the page went away (a closed generator): the worker stops at its next step

    def _finish(self, outcome: Outcome, result: Result | None, seconds: float) -> Update:
        body: Any = outcome.body
        if outcome.ok and outcome.content_type == MEDIA_TYPE:
            body = json.loads(bytes(body))
            if body.get("event") == "error":
                body = {k: body.get(k) for k in ("error", "field", "allowed")} | {"status": body.get("status")}
        if isinstance(body, dict) and "error" in body:
            status = int(body.pop("status", None) or outcome.status)
            error = RequestError(str(body["error"]), field=body.get("field"), allowed=body.get("allowed"),
                                 status=status)
            if status == 499:  # Stop ended a video job between frames: no file
                return Update("error", f"**Stopped:** {error.message}.", status=status, error=body, seconds=seconds)
            return Update("error", refusal(error) if status < 500 else f"**Failed ({status}):** {error.message}",
                          status=status, error=body, seconds=seconds)
        if isinstance(body, dict) and "video" in body:  # a video job: the MP4
            return Update("result", f"**Done:** {body.get('frames')} frames in {seconds:.1f} s.",
                          video=base64.b64decode(body["video"]), seconds=seconds)
        data = base64.b64decode(body["image"]) if isinstance(body, dict) else bytes(body)
        partial = bool(body.get("partial")) if isinstance(body, dict) else outcome.partial
        meta = read_metadata(data)
        where = meta.get("partial") or {}
        text = (f"**Partial result** (stopped at step {where.get('step')}/{where.get('total')}, scale "
                f"{where.get('scale')}/{where.get('scales')}) in {seconds:.1f} s: the best image so far."
                if partial else f"**Done** in {seconds:.1f} s.")
        return Update("result", text, png=data, result=result, partial=partial, seconds=seconds)

    # -- downloads and files --------------------------------------------------------------------------

    def save(self, update: Update, fmt: str, *, session: str | None = None) -> Path:
        """The result of ``update`` as a file to download: ``"PNG 8-bit"`` (the worker's own bytes, provenance
        in its ``nsf`` chunk), ``"PNG 16-bit"`` (the float image, the same provenance) or ``"JPEG"``."""
        if fmt not in DOWNLOADS:
            raise RequestError(f"download format {fmt!r}", field="format", allowed=list(DOWNLOADS))
        if update.png is None:
            raise ValueError("no result to save")
        folder = self.tmp / "results" / (session or "local")
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"nsf-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        if fmt == "PNG 8-bit":
            path, data = folder / f"{stem}.png", update.png
        elif fmt == "PNG 16-bit":
            if update.result is None:
                raise ValueError("a 16-bit PNG needs the run's float image")
            path = folder / f"{stem}-16bit.png"
            data = encode_png16(update.result.image[:1].cpu(), {**update.result.metadata, "bit_depth": 16})
        else:
            path, data = folder / f"{stem}.jpg", encode(Image.open(io.BytesIO(update.png)).convert("RGB"), "jpeg")
        path.write_bytes(data)
        self._own(session, path)
        return path

    def save_video(self, update: Update, *, session: str | None = None) -> Path:
        """A video job's MP4 as a file to download (the worker's own bytes, provenance in the container)."""
        if update.video is None:
            raise ValueError("no video to save")
        folder = self.tmp / "results" / (session or "local")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"nsf-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.mp4"
        path.write_bytes(update.video)
        self._own(session, path)
        return path

    def editor_background(self, content: str | None, session: str | None = None) -> tuple[Path | None, str | None]:
        """The content image as the mask editor's background (checked as the worker checks it, at most
        :data:`EDITOR_SIDE` px), or ``(None, why not)``."""
        if not content:
            return None, None
        try:
            img = self._content_image(Path(content).read_bytes())
        except RequestError as e:
            return None, refusal(e)
        img.thumbnail((EDITOR_SIDE, EDITOR_SIDE))
        folder = self.tmp / "editor" / (session or "local")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{uuid.uuid4().hex[:8]}.png"
        img.save(path)
        self._own(session, path)
        return path, None

    def _own(self, session: str | None, path: str | os.PathLike[str]) -> None:
        if session is not None:
            with self._guard:
                self._files.setdefault(session, set()).add(Path(path))

    def forget(self, session: str) -> int:
        """The tab of ``session`` closed: stop its run and remove its files (uploads, masks, results) that lie
        in this app's temp folder; how many were removed."""
        self.stop(session)
        with self._guard:
            files = self._files.pop(session, set())
            self._stops.pop(session, None)
        removed = 0
        root = self.tmp.resolve()
        for path in files:
            p = path.resolve()
            if root in p.parents and p.is_file():
                p.unlink()
                removed += 1
        for sub in ("results", "editor"):
            shutil.rmtree(self.tmp / sub / session, ignore_errors=True)
        return removed


# ------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------


def _raw_upload(image: Any) -> Any:
    """``image`` (a ``gr.Image`` of ``type="filepath"``) made to hand the function the uploaded file as it is (a
    path), unopened: the worker's own checks (type, size, pixel cap) then judge it, with their messages, instead of
    Gradio's decoder. (An instance attribute: a subclass of a Gradio component would write a ``.pyi`` file next to
    this module.)"""
    preprocess = image.preprocess

    def raw(payload: Any) -> Any:
        if payload is None or getattr(payload, "path", None) is None:  # none, or an image sent inline
            return preprocess(payload)
        return str(payload.path)

    image.preprocess = raw
    return image


def build_app(studio: Studio) -> gr.Blocks:
    """The page (``gradio.Blocks``) over ``studio``."""
    import gradio as gr

    def Upload(**kw: Any) -> Any:  # noqa: N802 - stands for the component class
        return _raw_upload(gr.Image(type="filepath", image_mode=None, sources=sources, height=260, **kw))

    limits = studio.limits
    base = limits.base
    n_styles = limits.max_styles
    sources: list[Any] = ["upload", "webcam", "clipboard"]
    try:  # the video extra (nsf.video: av, opencv) gives the temporal weight's default
        from .video import TEMPORAL_WEIGHT as TEMPORAL_WEIGHT_DEFAULT
    except ImportError:
        TEMPORAL_WEIGHT_DEFAULT = 500.0  # noqa: N806 - the same constant when the extra is not installed
    css = "#plan {min-height: 3em} #status {min-height: 2.5em}"
    with gr.Blocks(title="nsf studio", delete_cache=(600, 3600)) as app:
        gr.Markdown("## nsf studio: neural style transfer\nDrop a content image and one or more style images, "
                    "check the plan, press **Run**. Paint regions in *Regional styles* to place each style.")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Image", id="image", elem_id="image-tab"):
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Row():
                            content = Upload(label="Content", elem_id="content")
                            style_images = [Upload(label=f"Style {k + 1}", elem_id=f"style-{k + 1}", visible=k < 2)
                                            for k in range(n_styles)]
                        more = gr.Button("+ another style", size="sm", visible=n_styles > 2, elem_id="more-styles")
                        with gr.Row():
                            weights = [gr.Number(value=1.0, minimum=0, label=f"Weight of style {k + 1}", visible=k < 2,
                                                 elem_id=f"weight-{k + 1}") for k in range(n_styles)]
                        with gr.Row():
                            preset = gr.Dropdown(list(PRESETS), value=limits.preset, label="Preset", elem_id="preset")
                            size = gr.Number(value=min(base.size, limits.max_size), precision=0,
                                             label="Size (px, longer side)", elem_id="size")
                            steps = gr.Number(value=min(base.steps, limits.max_steps), precision=0, label="Steps",
                                              elem_id="steps")
                            seed = gr.Number(value=base.seed, precision=0, label="Seed", elem_id="seed")
                        with gr.Row():
                            colour = gr.Dropdown(list(CHOICES["preserve_color"]), value=base.preserve_color,
                                                 label="Colour control", elem_id="preserve-color",
                                                 visible="preserve_color" in limits.fields)
                            loss = gr.Dropdown(list(CHOICES["style_loss"]), value=base.style_loss, label="Style loss",
                                               elem_id="style-loss", visible="style_loss" in limits.fields)
                        with gr.Accordion("Regional styles: paint where each style goes (one layer per style)",
                                          open=False):
                            editor = gr.ImageEditor(
                                label="Regions", type="pil", image_mode="RGBA", sources=[], elem_id="editor",
                                layers=gr.LayerOptions(allow_additional_layers=False,
                                                       layers=[f"style {k + 1}" for k in range(n_styles)]),
                                brush=gr.Brush(colors=list(LAYER_COLOURS[:n_styles]), color_mode="fixed"),
                                transforms=(), height=420, canvas_size=(EDITOR_SIDE, EDITOR_SIDE))
                            gr.Markdown("Layer *style k* is style k's region (soft edges). Styles with an empty "
                                        "layer share what no layer covers; with no layer painted, the styles cover "
                                        "the whole image.")
                        plan = gr.Markdown("*Add a content image and a style image to see the plan.*", elem_id="plan")
                        with gr.Row():
                            run = gr.Button("Run", variant="primary", elem_id="run")
                            stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    with gr.Column(scale=2):
                        status = gr.Markdown("", elem_id="status")
                        preview = gr.Image(label="Preview (each scale as it ends)", type="pil", interactive=False,
                                           elem_id="preview", height=300, format="png")
                        result_image = gr.Image(label="Result", type="filepath", interactive=False, elem_id="result",
                                                height=300, format="png")
                        with gr.Row():
                            fmt = gr.Radio(list(DOWNLOADS), value=DOWNLOADS[0], label="Download as", elem_id="format")
                            download = gr.DownloadButton("Download", value=None, elem_id="download", interactive=False)
                        provenance = gr.JSON(label="Provenance (the PNG's nsf chunk)", elem_id="provenance", open=False)
                        gallery = gr.Gallery(label="Results so far", columns=4, height=200, elem_id="gallery",
                                             allow_preview=True)
            with gr.Tab("Video", id="video", elem_id="video-tab"):
                gr.Markdown("Upload a clip and a style image, press **Run**: the first frame runs the whole schedule, "
                            "each later one starts from the previous output warped along the optical flow (frames "
                            "arrive below as they are done). **Stop** ends it between frames.")
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Row():
                            v_clip = gr.Video(label="Clip", sources=["upload"], include_audio=True,
                                              elem_id="video-clip", height=260)
                            v_style = Upload(label="Style", elem_id="video-style")
                        with gr.Row():
                            v_size = gr.Number(value=min(base.size, limits.max_video_size, limits.max_size),
                                               precision=0, label="Size (px, longer side)", elem_id="video-size")
                            v_steps = gr.Number(value=min(base.steps, limits.max_steps), precision=0,
                                                label="Steps (first frame)", elem_id="video-steps")
                            v_later = gr.Number(value=limits.video_later_steps, precision=0,
                                                label="Steps (each later frame)", elem_id="video-later-steps")
                            v_weight = gr.Number(value=TEMPORAL_WEIGHT_DEFAULT, minimum=0, label="Temporal weight",
                                                 elem_id="video-temporal-weight")
                        v_plan = gr.Markdown("*Add a clip and a style image to see the plan.*", elem_id="video-plan")
                        with gr.Row():
                            v_run = gr.Button("Run", variant="primary", elem_id="video-run")
                            v_stop = gr.Button("Stop", variant="stop", elem_id="video-stop")
                    with gr.Column(scale=2):
                        v_status = gr.Markdown("", elem_id="video-status")
                        v_preview = gr.Image(label="Frames as they are done", type="pil", interactive=False,
                                             elem_id="video-preview", height=300, format="png")
                        v_result = gr.Video(label="Result", interactive=False, elem_id="video-result", height=300)
                        v_download = gr.DownloadButton("Download MP4", value=None, elem_id="video-download",
                                                       interactive=False)
        last = gr.State(None)  # the last Update with a result (for re-encoding downloads)
        shown = gr.State([])  # the gallery's (path, caption) pairs
        n_shown = gr.State(2)  # style slots shown
        runs = gr.State(0)  # runs so far in this session

        option_inputs = [content, *style_images, *weights, preset, size, steps, seed, colour, loss, editor]

        def fields_of(values: Sequence[Any], session: str | None) -> dict[str, Any] | RequestError:
            c, *rest = values
            st, rest = rest[:n_styles], rest[n_styles:]
            w, rest = rest[:n_styles], rest[n_styles:]
            pr, sz, stp, sd, col, ls, ed = rest
            layers = (ed or {}).get("layers") if isinstance(ed, dict) else None
            try:
                return studio.request(c, st, weights=w, preset=pr, size=sz, steps=stp, seed=sd, preserve_color=col,
                                      style_loss=ls, layers=layers, session=session)
            except RequestError as e:
                return e

        def on_plan(values: Sequence[Any], request: Any) -> str:
            return studio.plan_line(fields_of(values, _session(request)))

        def on_content(path: str | None, request: gr.Request) -> tuple[Any, str]:
            background, why = studio.editor_background(path, _session(request))
            if background is None:
                return gr.update(value=None), why or ""
            with Image.open(background) as img:
                radius = max(2, round(max(img.size) / BRUSH))
            return gr.update(value={"background": str(background), "layers": [], "composite": str(background)},
                             brush=gr.Brush(default_size=radius, colors=list(LAYER_COLOURS[:n_styles]),
                                            color_mode="fixed")), why or ""

        def on_more(n: int) -> tuple[Any, ...]:
            n = min(n + 1, n_styles)
            return (n, *[gr.update(visible=k < n) for k in range(n_styles)],
                    *[gr.update(visible=k < n) for k in range(n_styles)], gr.update(visible=n < n_styles))

        def on_run(values: Sequence[Any], request: Any) -> Iterator[dict[Any, Any]]:
            *values_, fmt_value, shown_value, n = values
            n = int(n or 0) + 1  # the session's run number: each status line names its run

            def say(line: str) -> str:
                return f"**Run {n}** · {line}"

            session = _session(request)
            fields = fields_of(values_, session)
            if isinstance(fields, RequestError):
                yield {status: say(studio.plan_line(fields)), runs: n}
                return
            stop_event = studio.stop_event(session)
            yield {status: say("Checking the request…"), preview: None, download: gr.update(interactive=False),
                   runs: n}
            for update in studio.run(fields, stop_event):
                if update.kind == "preview":
                    yield {status: say(update.text), preview: update.preview}
                elif update.kind != "result":
                    yield {status: say(update.text)}
                else:
                    path = studio.save(update, fmt_value, session=session)
                    png = studio.save(update, "PNG 8-bit", session=session) if fmt_value != "PNG 8-bit" else path
                    meta = read_metadata(update.png or b"")
                    caption = f"run {n}{', partial' if update.partial else ''}, seed {meta.get('seed', '')}"
                    shown_value = [(str(png), caption), *shown_value][:GALLERY]
                    yield {status: say(update.text), result_image: str(png), provenance: meta,
                           download: gr.update(value=str(path), interactive=True), last: update,
                           gallery: shown_value, shown: shown_value}

        def on_format(fmt_value: str, update: Update | None, request: gr.Request) -> Any:
            if update is None:
                return gr.update(value=None, interactive=False)
            return gr.update(value=str(studio.save(update, fmt_value, session=_session(request))), interactive=True)

        def on_stop(request: gr.Request) -> str:
            return ("Stopping at the next step…" if studio.stop(_session(request))
                    else "Nothing is running.")

        video_inputs = [v_clip, v_style, v_size, v_steps, v_later, v_weight]

        def video_fields(values: Sequence[Any], session: str | None) -> dict[str, Any] | RequestError:
            clip, st, sz, stp, later, weight = values
            try:
                return studio.video_request(clip, st, size=sz, steps=stp, later_steps=later, temporal_weight=weight,
                                            session=session)
            except RequestError as e:
                return e

        def on_video_plan(values: Sequence[Any], request: Any) -> str:
            return studio.plan_line(video_fields(values, _session(request)))

        def on_video_run(values: Sequence[Any], request: Any) -> Iterator[dict[Any, Any]]:
            session = _session(request)
            fields = video_fields(values, session)
            if isinstance(fields, RequestError):
                yield {v_status: studio.plan_line(fields)}
                return
            stop_event = studio.stop_event(session)
            yield {v_status: "Checking the request…", v_preview: None, v_result: None,
                   v_download: gr.update(value=None, interactive=False)}
            for update in studio.run(fields, stop_event):
                if update.kind == "preview":
                    yield {v_status: update.text, v_preview: update.preview}
                elif update.kind == "result" and update.video is not None:
                    path = str(studio.save_video(update, session=session))
                    yield {v_status: update.text, v_result: path, v_download: gr.update(value=path, interactive=True)}
                else:
                    yield {v_status: update.text}

        def on_unload(request: gr.Request) -> None:
            studio.forget(_session(request))

        for fn in (on_content, on_format, on_stop, on_unload):
            # Gradio finds its Request argument by the annotation, resolved at run time: these handlers' string
            # annotations name a module gradio is not imported into (it is imported only here)
            fn.__annotations__ = {"request": gr.Request}
        plan_fn = _with_request(gr, on_plan, len(option_inputs))
        run_fn = _with_request(gr, on_run, len(option_inputs) + 3, generator=True)
        for component in option_inputs:
            trigger = component.upload if isinstance(component, gr.Image) else component.change
            trigger(plan_fn, option_inputs, plan, concurrency_limit=4, show_progress="hidden",
                    trigger_mode="always_last")
        for image in (content, *style_images):
            image.clear(plan_fn, option_inputs, plan, concurrency_limit=4, show_progress="hidden")
        content.upload(on_content, content, [editor, status], concurrency_limit=4)
        content.clear(on_content, content, [editor, status], concurrency_limit=4)
        more.click(on_more, n_shown, [n_shown, *style_images, *weights, more], queue=False)
        run.click(run_fn, [*option_inputs, fmt, shown, runs],
                  [status, preview, result_image, provenance, download, last, gallery, shown, runs],
                  concurrency_limit=1, concurrency_id="device", show_progress="minimal")
        fmt.change(on_format, [fmt, last], download, concurrency_limit=4)
        stop.click(on_stop, None, status, queue=False)
        video_plan_fn = _with_request(gr, on_video_plan, len(video_inputs))
        for component in video_inputs:
            component.change(video_plan_fn, video_inputs, v_plan, concurrency_limit=4, show_progress="hidden",
                             trigger_mode="always_last")
        v_run.click(_with_request(gr, on_video_run, len(video_inputs), generator=True), video_inputs,
                    [v_status, v_preview, v_result, v_download], concurrency_limit=1, concurrency_id="device",
                    show_progress="minimal")
        v_stop.click(on_stop, None, v_status, queue=False)
        app.unload(on_unload)
    app.nsf_css = css  # Gradio 6 takes css at launch()
    return app


def _with_request(gr: Any, fn: Any, n: int, *, generator: bool = False) -> Any:
    """``fn(values, request)`` as a Gradio handler of ``n`` inputs that also gets the ``gr.Request`` (Gradio finds
    it by a parameter's annotation, so the handler's signature is spelled out)."""
    import inspect

    if generator:
        def call(*args: Any) -> Any:
            yield from fn(list(args[:-1]), args[-1])
    else:
        def call(*args: Any) -> Any:
            return fn(list(args[:-1]), args[-1])

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(f"value_{i}", kind) for i in range(n)]
    call.__signature__ = inspect.Signature([*params, inspect.Parameter("request", kind, annotation=gr.Request)])  # type: ignore[attr-defined]
    call.__annotations__ = {"request": gr.Request}
    return call


def _session(request: Any) -> str:
    return str(getattr(request, "session_hash", None) or "local")


def parse_auth(auth: str | None, auth_file: str | os.PathLike[str] | None) -> list[tuple[str, str]] | None:
    """``--auth user:password`` and ``--auth-file`` (one ``user:password`` a line; ``#`` comments) -> Gradio's
    ``auth`` list, or ``None`` for none."""
    pairs: list[tuple[str, str]] = []
    lines = [auth] if auth else []
    if auth_file is not None:
        lines += [t.strip() for t in Path(auth_file).read_text().splitlines()]
    for text in lines:
        if not text or text.startswith("#"):
            continue
        user, sep, password = text.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"auth entry {user + sep + '...' if sep else text[:20] + '...'!r}; allowed: "
                             "user:password (both non-empty)")
        pairs.append((user, password))
    return pairs or None


def launch(model_config: Mapping[str, Any], *, host: str = "127.0.0.1", port: int = 7860, device: str = "cpu",
           weights: str = "caffe", auth: list[tuple[str, str]] | None = None, block: bool = True) -> Any:
    """Start the worker and serve the page on ``host:port`` (Gradio's ``share`` off) until Ctrl-C or SIGTERM.

    All temporary files go under one ``nsf-studio-*`` folder in the system temp dir, removed when the app stops.
    ``block=False`` returns ``(app, studio)`` with the server running in a thread (the caller closes both).
    """
    import signal

    tmp = Path(tempfile.mkdtemp(prefix="nsf-studio-"))
    # Gradio reads its upload folder from the environment when its app is made: set before it is built.
    os.environ["GRADIO_TEMP_DIR"] = str(tmp / "gradio")
    print(f"nsf studio: starting the worker on {device} (weights, warm-up, timing)...", flush=True)
    try:
        studio = Studio.start(model_config, device=device, weights=weights, tmp=tmp)
        app = build_app(studio)
        app.queue(default_concurrency_limit=1)
        app.launch(server_name=host, server_port=port, share=False, auth=auth, inbrowser=False, show_error=True,
                   prevent_thread_lock=True, quiet=True, max_file_size=studio.limits.max_request_bytes,
                   css=getattr(app, "nsf_css", None), footer_links=[])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    where = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    loopback = host in ("127.0.0.1", "localhost", "::1")
    guard = "" if auth else ", WITHOUT a login: pass --auth USER:PASSWORD"
    print(f"nsf studio: serving on {where}" + (" (loopback only: no other machine can reach it)" if loopback
          else f" (bound to {host}: other machines can reach it{guard})"), flush=True)
    print(f"nsf studio: temporary files in {tmp} (removed when the app stops); Ctrl-C stops it", flush=True)
    if not block:
        return app, studio
    stopped = threading.Event()
    old = {s: signal.signal(s, lambda *_: stopped.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopped.wait(0.5):
            pass
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        print("nsf studio: stopping", flush=True)
        app.close()
        studio.close()
    return None


__all__ = ["DOWNLOADS", "Studio", "Update", "build_app", "launch", "masks_from_layers", "parse_auth",
           "read_model_config", "refusal"]
