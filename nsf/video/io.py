"""Video files at the edge, with PyAV (FFmpeg in its wheels): probe, decode frame by frame, encode H.264 with the
audio streams copied packet for packet.

Nothing here holds more than one frame: decoding yields frames as it reads them and the writer encodes each as it
comes, so memory does not grow with a clip's length.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from ..errors import VideoError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")  # containers the writer makes (H.264 video)
READABLE = "a video file (MP4, MOV, MKV, WebM, AVI...) with a video stream"
CODEC = "libx264"  # H.264, in the av wheels' FFmpeg build
DEFAULT_MAX_FRAMES = 18_000  # 10 minutes at 30 frames per second
# a frame interval may differ from the median by this share before the clip counts as variable-rate
RATE_TOLERANCE = 0.02
METADATA_KEY = "comment"  # the container tag holding the provenance JSON (the MP4 muxer writes only known keys)


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` reads from a file's headers and packets (no frame is decoded)."""

    path: str
    width: int
    height: int
    frames: int  # video packets with data: the frame count of the video stream
    fps: Fraction  # the constant frame rate (frames per second)
    codec: str
    audio: int  # audio streams (copied into the output untouched)
    duration: float  # seconds, frames / fps


def _video_error(message: str, *, field: str = "video", value: Any = None, allowed: Any = READABLE) -> VideoError:
    return VideoError(f"{message}; allowed: {allowed}", field=field, value=value, allowed=allowed)


def _open(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"video file {str(path)!r} does not exist")
    if not p.is_file():
        raise _video_error(f"video {str(path)!r} is not a file", value=str(path))
    try:
        container = av.open(str(p), "r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise _video_error(f"{p.name!r} is not a readable video ({e})", value=str(path)) from e
    fmt = container.format.name
    if fmt.endswith("_pipe") or fmt == "image2":  # a still image (an animated GIF is a video: "gif")
        container.close()
        raise _video_error(f"{p.name!r} is an image ({fmt}), not a video", value=fmt)
    return container


def probe(path: str | os.PathLike[str], *, max_frames: int = DEFAULT_MAX_FRAMES,
          max_pixels: int = 50_000_000) -> VideoInfo:
    """Check a video file before any frame is decoded: a video stream, at least one frame, a constant frame rate,
    at most ``max_frames`` frames of at most ``max_pixels`` pixels.

    Raises:
        FileNotFoundError: no such file.
        nsf.errors.VideoError: each of the above (``field`` ``"video"``), and a file that is not a video or is
            corrupt.
    """
    name = Path(path).name
    with _open(path) as container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise _video_error(f"{name!r} has no video stream (streams: {', '.join(kinds)})", value=kinds)
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > max_pixels:
            raise _video_error(f"{name!r} has {w}x{h} = {w * h} pixels a frame", value=(w, h),
                               allowed=f"at most {max_pixels} pixels a frame (max_pixels)")
        pts: list[int] = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.pts is None:
                    continue  # the demuxer's flush packet
                pts.append(int(packet.pts))
                if len(pts) > max_frames:
                    raise _video_error(f"{name!r} has more than {max_frames} frames", field="frames",
                                       value=f">{max_frames}", allowed=f"at most {max_frames} frames (max_frames), "
                                       "or a range of them (frames=(a, b), --frames a:b)")
        except av.FFmpegError as e:
            raise _video_error(f"{name!r} is truncated or corrupt ({e})", allowed="a complete video file") from e
        if not pts:
            raise _video_error(f"{name!r} has a video stream with no frames", value=0,
                               allowed="a video with at least one frame")
        tb = stream.time_base or Fraction(1, 90000)
        steps = np.diff(np.sort(np.asarray(pts, dtype=np.int64)))
        if len(steps):
            median = float(np.median(steps))
            spread = float(steps.max() - steps.min())
            if median <= 0 or spread > max(RATE_TOLERANCE * median, 1.0):
                lo, hi = float(steps.min() * tb), float(steps.max() * tb)
                raise _video_error(f"{name!r} has a variable frame rate (frame intervals from {lo * 1000:.1f} to "
                                   f"{hi * 1000:.1f} ms)", value="variable",
                                   allowed="a constant frame rate (e.g. re-encode with ffmpeg -i IN -vf fps=30 OUT)")
            fps = Fraction(1) / (Fraction(int(round(median))) * tb)
        else:
            fps = Fraction(stream.average_rate or stream.guessed_rate or 25)
        fps = fps.limit_denominator(1001)
        return VideoInfo(str(path), w, h, len(pts), fps, stream.codec_context.name, len(container.streams.audio),
                         float(len(pts) / fps))


def read_frames(path: str | os.PathLike[str], *, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
    """Frames ``start..stop-1`` of the first video stream as ``(H, W, 3)`` uint8 RGB arrays, in display order,
    one at a time.

    Raises:
        nsf.errors.VideoError: the file is truncated or corrupt where a frame should be (``field`` ``"video"``).
    """
    name = Path(path).name
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        index = 0
        try:
            for frame in container.decode(stream):
                if stop is not None and index >= stop:
                    break
                if index >= start:
                    yield frame.to_ndarray(format="rgb24")
                index += 1
        except av.FFmpegError as e:
            raise _video_error(f"{name!r} is truncated or corrupt at frame {index + 1} ({e})",
                               allowed="a complete video file") from e


def check_output(out: str | os.PathLike[str]) -> Path:
    """``out`` if a video can be written there: a known suffix in an existing, writable folder (checked by
    creating and removing a file there, before any work).

    Raises:
        nsf.errors.VideoError: another suffix, a folder that does not exist or cannot be written (``field``
            ``"out"``).
    """
    p = Path(out)
    if p.suffix.lower() not in VIDEO_SUFFIXES:
        raise _video_error(f"output {p.name!r} has suffix {p.suffix or '(none)'!r}", field="out", value=str(out),
                           allowed=f"a file ending {', '.join(VIDEO_SUFFIXES)} (H.264), or png_dir for 16-bit PNGs")
    writable_dir(p.parent, field="out")
    if p.is_dir():
        raise _video_error(f"output {str(out)!r} is a folder", field="out", value=str(out),
                           allowed="a file path in a writable folder")
    return p


def writable_dir(folder: Path, *, field: str) -> None:
    """Raise a :class:`VideoError` on ``field`` unless files can be created in ``folder`` (made if missing when its
    parent exists)."""
    allowed = "a path in an existing folder this process can write"
    if not folder.exists() and folder.parent.is_dir() and field == "png_dir":
        try:
            folder.mkdir()
        except OSError as e:
            raise _video_error(f"cannot create {str(folder)!r} ({e.strerror})", field=field, value=str(folder),
                               allowed=allowed) from e
    if not folder.is_dir():
        raise _video_error(f"folder {str(folder)!r} does not exist", field=field, value=str(folder), allowed=allowed)
    probe_file = folder / f".nsf-write-test-{os.getpid()}"
    try:
        probe_file.write_bytes(b"")
        probe_file.unlink()
    except OSError as e:
        raise _video_error(f"cannot write in {str(folder)!r} ({e.strerror})", field=field, value=str(folder),
                           allowed=allowed) from e


class VideoWriter:
    """Encode RGB frames to H.264 (``libx264``, yuv420p) in ``path``'s container at ``fps``, with every audio stream
    of ``audio_from`` copied packet for packet (no re-encoding) and interleaved by time as the video is written;
    ``metadata`` (the provenance record) goes in the container's ``comment`` tag as JSON.

    Frames must share one size; odd widths and heights lose their last column/row (yuv420p halves the chroma).
    ``audio_window=(t0, t1)`` seconds copies only the audio in that window, shifted to start at 0 (a frame range).
    """

    def __init__(self, path: str | os.PathLike[str], fps: Fraction, *, audio_from: str | os.PathLike[str] | None = None,
                 metadata: Mapping[str, Any] | None = None, crf: int = 18,
                 audio_window: tuple[float, float | None] = (0.0, None)):
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.container: Any = av.open(str(self.path), "w")
        self.container.metadata[METADATA_KEY] = json.dumps(dict(metadata or {}), sort_keys=True, default=str)
        self.stream: Any = None
        self.crf = crf
        self.frames = 0
        self._source: Any = None
        self._audio: list[tuple[Any, Any]] = []  # (input stream, output stream)
        self._packets: Iterator[Any] | None = None
        self._pending: Any = None
        self._window = audio_window
        if audio_from is not None:
            self._source = av.open(str(audio_from), "r")
            for s in self._source.streams.audio:
                try:
                    self._audio.append((s, self.container.add_stream_from_template(s)))
                except (av.FFmpegError, ValueError) as e:
                    self.close()
                    raise _video_error(f"the audio stream ({s.codec_context.name}) cannot be copied into "
                                       f"{self.path.suffix} ({e})", field="out", value=self.path.suffix,
                                       allowed=".mkv or .mov for this audio codec") from e
            if self._audio:
                self._packets = iter(self._source.demux([a for a, _ in self._audio]))

    def _open_video(self, w: int, h: int) -> None:
        self.stream = self.container.add_stream(CODEC, rate=self.fps)
        self.stream.width, self.stream.height = w - w % 2, h - h % 2
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(self.crf), "preset": "medium"}

    def write(self, rgb: np.ndarray) -> None:
        """Encode one ``(H, W, 3)`` uint8 RGB frame."""
        if self.stream is None:
            self._open_video(rgb.shape[1], rgb.shape[0])
        w, h = self.stream.width, self.stream.height
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:h, :w]), format="rgb24")
        frame.pts = self.frames  # in the encoder's time base, 1 / fps (the muxer rescales)
        self.frames += 1
        self._mux_audio(float(self.frames / self.fps))
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def _mux_audio(self, until: float | None) -> None:
        """Copy the audio packets of the window that start before ``until`` seconds of the output (all that are
        left: ``None``), shifted so the window starts at 0."""
        if self._packets is None:
            return
        t0, t1 = self._window
        out_of = {id(a): o for a, o in self._audio}
        while True:
            packet = self._pending if self._pending is not None else next(self._packets, None)
            self._pending = None
            if packet is None:
                self._packets = None
                return
            if packet.dts is None or packet.pts is None:
                continue  # the demuxer's flush packet
            t = float(packet.pts * packet.time_base)
            if (t0 > 0 and t < t0 - 1e-9) or (t1 is not None and t >= t1 - 1e-9):
                continue  # outside the window (a whole clip keeps its priming packets before 0)
            if until is not None and t - t0 >= until:
                self._pending = packet
                return
            shift = int(round(t0 / packet.time_base))
            packet.pts, packet.dts = packet.pts - shift, packet.dts - shift
            packet.stream = out_of[id(packet.stream)]
            self.container.mux(packet)

    def finish(self) -> None:
        """Flush the encoder and the rest of the audio, and close the file."""
        if self.stream is None:
            raise _video_error("no frame was written", field="frames", value=0, allowed="at least one frame")
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self._mux_audio(None)
        self.close()

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
        if self.container is not None:
            self.container.close()
            self.container = None


def read_video_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The provenance record a :class:`VideoWriter` stored in ``path`` (``{}`` if there is none)."""
    with av.open(str(path), "r") as container:
        tags = {k.lower(): v for k, v in container.metadata.items()}  # Matroska upper-cases its tag names
        text = tags.get(METADATA_KEY)
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}
