"""The per-frame driver: stylize a clip frame by frame, each later frame warm-started from the previous output
warped along the optical flow and held to it by the temporal loss (Ruder et al. 2016).

:func:`frames` is the generator every face calls (a stop hook, per-frame progress, resumable through its frame
folder); :func:`render` runs it to the end. Nothing here keeps more than the previous frame: memory does not grow
with the clip's length.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .. import image as im
from ..errors import VideoError
from ..geometry import resize, target_size
from ..optimize import ProgressCallback
from . import flow as fl
from . import io as vio

if TYPE_CHECKING:
    from ..config import StyleConfig
    from ..model import StyleFusion

# Chosen by bench/video.py (bench/RESULTS.md "video"): the temporal loss's weight against the normalized
# content/style losses, and the steps of a later frame's one full-size scale.
TEMPORAL_WEIGHT = 500.0
LATER_STEPS = 20
MANIFEST = "nsf-video.json"
FRAME_NAME = "frame_{:06d}.png"

FrameSource = str | os.PathLike | Iterable[Any]


@dataclass(frozen=True)
class VideoFrame:
    """One stylized frame, as :func:`frames` yields it."""

    index: int  # 0-based, in the output clip
    total: int  # frames in the output clip (0: unknown, an iterable source)
    image: Tensor  # (1, 3, H, W) in [0, 1]
    seconds: float  # wall time of this frame
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds in decode, flow, warp, stylize, write
    resumed: bool = False  # read back from an earlier, interrupted run's frame folder (not stylized again)

    def pil(self) -> Image.Image:
        """The frame as an 8-bit RGB ``PIL.Image``."""
        return im.tensor_to_pil(self.image)


@dataclass(frozen=True)
class VideoResult:
    """What :func:`render` returns: where the clip went, how many frames, whether ``stop`` ended it early (then
    ``out`` is not written and the frame folder holds the frames so far, for a resumed run), and the provenance
    written in the container."""

    out: Path | None
    png_dir: Path | None
    frames: int
    total: int
    stopped: bool
    metadata: Mapping[str, Any]


def later_config(cfg: StyleConfig, steps: int) -> StyleConfig:
    """A later frame's options: one full-size scale of ``steps`` steps (the warm start is already stylized)."""
    return cfg.replace(scales=(1.0,), scale_steps=(1.0,), steps=steps, base_size=0)


def _as_frame(item: Any, index: int, max_pixels: int) -> Tensor:
    """A frame of an iterable source (a tensor in [0, 1], a PIL image or an ``(H, W, 3)`` uint8 array) ->
    ``(1, 3, H, W)``."""
    if isinstance(item, Tensor):
        t = im.check_tensor(item, f"frame {index + 1}")
    elif isinstance(item, Image.Image):
        t = im.pil_to_tensor(im.load_image(item, max_pixels=max_pixels, what=f"frame {index + 1}"))
    elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 3 and item.shape[2] == 3:
        t = torch.from_numpy(np.ascontiguousarray(item)).permute(2, 0, 1).unsqueeze(0).float().div_(255)
    else:
        allowed = "a (3, H, W) tensor in [0, 1], a PIL image or an (H, W, 3) uint8 RGB array"
        raise VideoError(f"frame {index + 1} is a {type(item).__name__}; allowed: {allowed}", field="video",
                         value=type(item).__name__, allowed=allowed)
    if t.shape[0] != 1:
        raise VideoError(f"frame {index + 1} is a batch of {t.shape[0]}; allowed: one image per frame",
                         field="video", value=t.shape[0], allowed="one image per frame")
    if t.shape[-1] * t.shape[-2] > max_pixels:
        raise VideoError(f"frame {index + 1} has {t.shape[-1]}x{t.shape[-2]} pixels; allowed: at most {max_pixels} "
                         "pixels a frame (max_pixels)", field="video", value=tuple(t.shape[-2:]),
                         allowed=f"at most {max_pixels} pixels a frame")
    return t


def _range(frames: tuple[int, int | None] | None, count: int | None) -> tuple[int, int | None]:
    start, stop = frames if frames is not None else (0, None)
    allowed = f"0 <= a < b{f' <= {count}' if count is not None else ''} (frames a..b-1, 0-based)"
    bad = start < 0 or (stop is not None and stop <= start) or (count is not None and start >= count) or \
        (count is not None and stop is not None and stop > count)
    if bad:
        raise VideoError(f"frames=({start}, {stop}) for a clip of {count if count is not None else 'unknown'} frames; "
                         f"allowed: {allowed}", field="frames", value=(start, stop), allowed=allowed)
    return start, stop


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_png16(path: Path) -> Tensor:
    """A frame the driver wrote (a 16-bit RGB PNG) -> ``(1, 3, H, W)`` in [0, 1]."""
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if a is None or a.ndim != 3:
        raise VideoError(f"frame file {str(path)!r} cannot be read back; allowed: the frames this run wrote "
                         "(start over with resume=False)", field="resume", value=str(path),
                         allowed="the frames this run wrote")
    rgb = cv2.cvtColor(a, cv2.COLOR_BGR2RGB).astype(np.float32) / (65535.0 if a.dtype == np.uint16 else 255.0)
    return torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)


def _to_rgb8(t: Tensor) -> np.ndarray:
    return t[0].detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class _Folder:
    """The frame folder: one 16-bit PNG per finished frame (written under a temporary name, then renamed) and a
    manifest naming the run they belong to, so an interrupted run resumes after its last written frame."""

    def __init__(self, path: Path, key: str, total: int, *, resume: bool, can_resume: bool):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        manifest = path / MANIFEST
        old = None
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text())
            except ValueError:
                old = None
        same = can_resume and old is not None and old.get("key") == key
        if old is not None and not same and resume and can_resume and self.done_count() > 0:
            allowed = "the same clip, styles and options to resume, or resume=False (--restart) to start over"
            raise VideoError(f"{str(path)!r} holds frames of another run (another clip, style or options); "
                             f"allowed: {allowed}", field="resume", value=str(path), allowed=allowed)
        if not (same and resume):
            for f in path.glob("frame_*.png"):
                f.unlink()
        manifest.write_text(json.dumps({"key": key, "total": total}))
        self.done = self.done_count()

    def frame(self, index: int) -> Path:
        return self.path / FRAME_NAME.format(index)

    def done_count(self) -> int:
        n = 0
        while self.frame(n).exists():
            n += 1
        return n

    def write(self, index: int, image: Tensor, metadata: Mapping[str, Any]) -> None:
        final = self.frame(index)
        tmp = final.with_name(f".{final.name}.tmp")
        tmp.write_bytes(im.encode_png16(image, metadata))
        os.replace(tmp, final)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def frames(model: StyleFusion, src: FrameSource, style: im.ImageLike | Sequence[im.ImageLike], *,
           out: str | os.PathLike[str] | None = None, png_dir: str | os.PathLike[str] | None = None,
           frames: tuple[int, int | None] | None = None, temporal_weight: float = TEMPORAL_WEIGHT,
           later_steps: int = LATER_STEPS, flow_preset: str = fl.DEFAULT_PRESET, resume: bool = True,
           fps: float | Fraction | None = None, max_frames: int = vio.DEFAULT_MAX_FRAMES,
           stop: Callable[[], bool] | None = None, callback: ProgressCallback | None = None,
           on_tile: Callable[[int, int], None] | None = None, preset: str | None = None,
           masks: Sequence[im.ImageLike] | None = None, style_masks: Sequence[im.ImageLike | None] | None = None,
           **options: Any) -> Generator[VideoFrame, None, VideoResult]:
    """Stylize a clip frame by frame; yield each :class:`VideoFrame` as it is done (returns a :class:`VideoResult`
    as the generator's value; :func:`render` collects it).

    Frame 1 runs the options' whole coarse-to-fine schedule. Each later frame starts from the previous output
    warped by the backward optical flow of the input frames (DIS, ``flow_preset``), with the content where the
    forward/backward check fails (disocclusions, motion boundaries), and runs one full-size scale of
    ``later_steps`` steps with the temporal loss (``temporal_weight``; 0 turns it off) added to each step.

    Args:
        src: a video file (decoded with PyAV) or an iterable of frames (tensors in [0, 1], PIL images or
            ``(H, W, 3)`` uint8 arrays).
        style: one style image or a list (blended by ``style_blend_weights``), as for ``StyleFusion.run``.
        out: write the clip here (``.mp4``, ``.mov``, ``.mkv``: H.264, the source's frame rate and audio streams,
            copied packet for packet; the provenance in the container's ``comment`` tag). Written under a
            temporary name and renamed at the end; nothing is there if the run stops early.
        png_dir: keep every frame as a 16-bit PNG here (with its provenance chunk), for editors.
        frames: ``(a, b)``: only frames ``a..b-1`` (0-based; ``b`` ``None``: to the end).
        resume: with ``out`` or ``png_dir``, a run interrupted before its end continues after its last written
            frame (the frames are kept in ``png_dir``, or in a hidden folder next to ``out`` removed at the end); a
            folder holding another run's frames is an error unless ``resume=False`` (start over). A source that
            is not a file always starts over.
        fps: the frame rate of the output for an iterable source (default 25; a file keeps its own).
        max_frames: refuse a clip (or a range) of more frames than this.
        stop: polled before each frame and within it (as ``StyleFusion.run`` does); once true the generator ends
            after the last whole frame, and ``VideoResult.stopped`` says so.
        callback, on_tile: each step's :class:`nsf.Progress` and each tile, within the frame being stylized.
        preset, masks, style_masks, **options: as for ``StyleFusion.run`` (every :class:`nsf.StyleConfig` field),
            applied to every frame.

    Raises:
        nsf.errors.VideoError: a source that is not a readable video, has no video stream or no frames, a variable
            frame rate, more than ``max_frames`` frames or frames over ``max_pixels``; a bad ``frames`` range; an
            ``out`` or ``png_dir`` that cannot be written; a frame folder of another run.
        nsf.errors.ImageError: a style (or mask) that is not an image.
        nsf.errors.ConfigError: a bad option.
    """
    cfg = model.resolve_config(preset, **options)
    if isinstance(later_steps, bool) or not isinstance(later_steps, int) or later_steps < 1:
        raise VideoError(f"later_steps={later_steps!r}; allowed: an integer >= 1", field="later_steps",
                         value=later_steps, allowed="an integer >= 1")
    if not 0 <= float(temporal_weight) <= 1e12:
        raise VideoError(f"temporal_weight={temporal_weight!r}; allowed: >= 0 and <= 1e12", field="temporal_weight",
                         value=temporal_weight, allowed=">= 0 and <= 1e12")
    flow = fl.Flow(flow_preset)
    later_cfg = later_config(cfg, later_steps)
    styles = [model._as_tensor(s, f"style {i + 1}", cfg)
              for i, s in enumerate(style if isinstance(style, (list, tuple)) else [style])]
    mask_t = [im.load_mask(m, what=f"mask {i + 1}", max_pixels=cfg.max_pixels)
              for i, m in enumerate(masks)] if masks is not None else None
    style_mask_t = [im.load_mask(m, what=f"style mask {i + 1}", max_pixels=cfg.max_pixels) if m is not None
                    else None for i, m in enumerate(style_masks)] if style_masks is not None else None
    out_path = vio.check_output(out) if out is not None else None
    png_path = Path(png_dir) if png_dir is not None else None
    if png_path is not None:
        vio.writable_dir(png_path, field="png_dir")

    src_path = Path(src) if isinstance(src, (str, os.PathLike)) else None
    is_file = src_path is not None
    info: vio.VideoInfo | None = None
    if src_path is not None:
        info = vio.probe(src_path, max_frames=max_frames if frames is None else vio.DEFAULT_MAX_FRAMES * 100,
                         max_pixels=cfg.max_pixels)
        start, stop_at = _range(frames, info.frames)
        end = stop_at if stop_at is not None else info.frames
        if end - start > max_frames:
            raise VideoError(f"frames {start}..{end - 1} are {end - start} frames; allowed: at most {max_frames} "
                             "frames (max_frames)", field="frames", value=end - start,
                             allowed=f"at most {max_frames} frames (max_frames)")
        total = end - start
        rate = info.fps
        source: Iterator[Any] = vio.read_frames(src_path, start=start, stop=end)
    else:
        assert not isinstance(src, (str, os.PathLike))
        start, stop_at = _range(frames, None)
        total = 0
        rate = Fraction(fps if fps is not None else 25).limit_denominator(1001)
        source = (item for i, item in enumerate(src) if i >= start and (stop_at is None or i < stop_at))
    video_meta = {"source": src_path.name if src_path is not None else "frames",
                  "frames": [start, start + total] if total else [start, stop_at], "fps": str(rate),
                  "temporal_weight": float(temporal_weight),
                  "later_steps": later_steps, "flow": f"DIS {flow.preset}", "later_params": {
                      k: v for k, v in later_cfg.to_dict().items() if v != cfg.to_dict()[k]}}
    metadata = {**model.metadata(cfg), "video": video_meta}
    folder: _Folder | None = None
    work = png_path if png_path is not None else (out_path.with_name(f".{out_path.name}.frames")
                                                  if out_path is not None else None)
    if work is not None:
        key_src = {"video": video_meta, "params": cfg.to_dict(), "weights": model.weights_sha256,
                   "styles": [hashlib.sha256(s.numpy().tobytes()).hexdigest() for s in styles],
                   "source_sha256": _sha256_file(src_path) if src_path is not None else None,
                   "masks": [hashlib.sha256(m.numpy().tobytes()).hexdigest() for m in mask_t or []]}
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()
        folder = _Folder(work, key, total, resume=resume, can_resume=is_file)

    prev_content: Tensor | None = None
    prev_out: Tensor | None = None
    index = 0
    stopped = False
    hw: tuple[int, int] | None = None
    while True:
        t0 = time.perf_counter()
        if stop is not None and index > 0 and stop():
            stopped = True
            break
        try:
            item = next(source)
        except StopIteration:
            break
        if not is_file and index >= max_frames:
            raise VideoError(f"more than {max_frames} frames; allowed: at most {max_frames} frames (max_frames)",
                             field="frames", value=f">{max_frames}", allowed=f"at most {max_frames} frames")
        frame = (torch.from_numpy(item).permute(2, 0, 1).unsqueeze(0).float().div_(255) if is_file
                 else _as_frame(item, start + index, cfg.max_pixels))
        if hw is None:
            hw = target_size(frame.shape[-2], frame.shape[-1], cfg.size, cfg.resize)
        content = resize(frame, hw).to(model.device)
        timings = {"decode": time.perf_counter() - t0}
        if folder is not None and index < folder.done:  # written by an interrupted run: read back, not redone
            prev_content, prev_out = content, _read_png16(folder.frame(index)).to(model.device)
            yield VideoFrame(index, total, prev_out, time.perf_counter() - t0, timings, resumed=True)
            index += 1
            continue
        pixel_loss = None
        init = None
        run_cfg = cfg
        if prev_out is not None and prev_content is not None:
            t1 = time.perf_counter()
            forward, backward = flow.pair(fl.grey(prev_content), fl.grey(content))
            t2 = time.perf_counter()
            warped = fl.warp(prev_out, backward).clamp(0, 1)
            weights = fl.consistency(forward, backward).to(content)
            init = weights * warped + (1 - weights) * content  # disoccluded: the content (Ruder et al.)
            target = warped
            if cfg.preserve_color == "luminance":  # the optimized image is the luminance there
                init, target = im.luminance(init), im.luminance(warped)
            if temporal_weight > 0:
                pixel_loss = fl.temporal_loss(target, weights, float(temporal_weight))
            run_cfg = later_cfg
            timings.update(flow=t2 - t1, warp=time.perf_counter() - t2)
        t3 = time.perf_counter()
        result = model.transfer(content, styles, run_cfg, init_image=init, callback=callback, on_tile=on_tile,
                                stop=stop, masks=mask_t, style_masks=style_mask_t, pixel_loss=pixel_loss)
        timings["stylize"] = time.perf_counter() - t3
        if result.partial is not None:  # stopped within this frame: it is not written
            stopped = True
            break
        t4 = time.perf_counter()
        if folder is not None:
            folder.write(index, result.image, {**metadata, "frame": start + index})
        timings["write"] = time.perf_counter() - t4
        prev_content, prev_out = content, result.image
        yield VideoFrame(index, total, result.image, time.perf_counter() - t0, timings)
        index += 1
    if index == 0 and not stopped:
        raise VideoError("the source gave no frames; allowed: a video with at least one frame", field="video",
                         value=0, allowed="a video with at least one frame")
    metadata = {**metadata, "video": {**video_meta, "frames": [start, start + index]}}
    if out_path is not None and folder is not None and not stopped:
        whole = start == 0 and stop_at is None  # the whole clip keeps all of its audio, tail included
        audio = src_path if info is not None and info.audio else None
        window = (float(start / rate), None if whole else float((start + index) / rate))
        _encode(folder, index, out_path, rate, metadata, audio_from=audio, window=window)
        if png_path is None:
            folder.remove()
    return VideoResult(out_path if not stopped else None, png_path, index, total or index, stopped, metadata)


def _encode(folder: _Folder, count: int, out: Path, rate: Fraction, metadata: Mapping[str, Any], *,
            audio_from: Any, window: tuple[float, float | None]) -> None:
    """The frames of ``folder`` -> ``out`` (H.264, audio copied), under a temporary name renamed at the end."""
    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")
    writer = vio.VideoWriter(tmp, rate, audio_from=audio_from, metadata=metadata, audio_window=window)
    try:
        for i in range(count):
            writer.write(_to_rgb8(_read_png16(folder.frame(i))))
        writer.finish()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)


def render(model: StyleFusion, src: FrameSource, style: im.ImageLike | Sequence[im.ImageLike],
           **kw: Any) -> VideoResult:
    """Run :func:`frames` to its end (``out`` written) and return its :class:`VideoResult`."""
    gen = frames(model, src, style, **kw)
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value
