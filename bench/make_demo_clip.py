"""Make nsf/assets/demo_clip.mp4, the clip of ``nsf video --demo``, from the bundled astronaut image.

A slow camera pan with a zoom (nsf.video.synthetic.pan), 16 frames at 8 frames per second, 320x240, H.264
(libx264, one thread, CRF 20: the same bytes on every run with the same av wheel), with a 2-second AAC tone
so the demo shows the audio copied through. Usage: python bench/make_demo_clip.py [OUT]
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

import nsf
from nsf.image import load_image, pil_to_tensor
from nsf.video import synthetic

FRAMES, FPS, SIZE = 16, 8, (240, 320)


def main(out: Path) -> None:
    src = pil_to_tensor(load_image(Path(nsf.__file__).parent / "assets" / "astronaut.jpg"))
    clip = synthetic.pan(src, FRAMES, SIZE, start=(30.0, 60.0), velocity=(6.0, 2.0), scale=1.25, zoom=0.985)
    with av.open(str(out), "w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = SIZE[1], SIZE[0], "yuv420p"
        video.options = {"crf": "20", "preset": "slow"}
        video.codec_context.thread_count = 1  # one thread: the same bytes on every run
        audio = container.add_stream("aac", rate=16000)
        audio.layout = "mono"
        audio.bit_rate = 24000
        for i, f in enumerate(clip):
            rgb = f.image[0].mul(255).round().byte().permute(1, 2, 0).numpy()
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                container.mux(packet)
        n = int(16000 * FRAMES / FPS)
        tone = (0.1 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000)).astype(np.float32)
        for k in range(0, n, 1024):
            chunk = av.AudioFrame.from_ndarray(tone[None, k:k + 1024], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = 16000, k, Fraction(1, 16000)
            for packet in audio.encode(chunk):
                container.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode(None):
                container.mux(packet)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB, {FRAMES} frames at {FPS} fps, {SIZE[1]}x{SIZE[0]})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(nsf.__file__).parent / "assets" / "demo_clip.mp4")
