"""``nsf video``: stylize a clip without flicker (needs the ``video`` extra: ``pip install nsf[video]``).

``nsf video in.mp4 style.jpg -o out.mp4 [--size N] [--temporal-weight W] [--later-steps N] [--frames a:b]
[--png-dir DIR]``; ``nsf video --demo`` stylizes the bundled demo clip.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from typing import Any

DEMO_CLIP = "demo_clip.mp4"
DEMO_STYLE = "starry_night.jpg"
DEMO_SIZE = 256


def _frame_range(text: str) -> tuple[int, int | None]:
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start = int(parts[0]) if parts[0] else 0
        stop = int(parts[1]) if parts[1] else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}; allowed: a:b, frames a..b-1 (0-based; a or b may be left "
                                         "out, e.g. :48 or 10:)") from None
    return start, stop


def add_parser(subparsers: Any) -> None:
    from .cli import add_run_flags

    # defaults written once, in nsf.video.driver; imported lazily there (torch), so repeated here only as help
    p = subparsers.add_parser("video", help="stylize a video clip, frame to frame consistent (no flicker)",
                              description="Stylize a clip: frame 1 as a still, each later frame warm-started from "
                                          "the previous output warped along the optical flow, with a temporal loss "
                                          "(Ruder et al. 2016). Keeps the frame rate and the audio (copied). "
                                          "Resumable: run the same command again after an interruption.")
    p.add_argument("video", nargs="?", default=None, help="input clip (MP4, MOV, MKV, WebM...)")
    p.add_argument("styles", nargs="*", metavar="style", help="style image(s); blend with --style-blend-weights")
    p.add_argument("-o", "--output", default=None,
                   help="output clip: .mp4, .mov or .mkv (H.264); default with --demo: nsf-video-demo.mp4")
    p.add_argument("--demo", action="store_true",
                   help=f"stylize the bundled {DEMO_CLIP} (16 frames) with {DEMO_STYLE} at --size {DEMO_SIZE} unless "
                        "given (no files of your own needed)")
    p.add_argument("--png-dir", default=None,
                   help="also keep every frame as a 16-bit PNG (with provenance) in this folder, for editors; "
                        "with no -o, only the PNGs are written")
    p.add_argument("--frames", type=_frame_range, default=None, metavar="A:B",
                   help="only frames A..B-1 (0-based; the audio is cut to match)")
    p.add_argument("--temporal-weight", type=float, default=None,
                   help="weight of the temporal loss that holds each frame to the warped previous one (0: off; "
                        "default: nsf.video.TEMPORAL_WEIGHT)")
    p.add_argument("--later-steps", type=int, default=None,
                   help="optimizer steps of each frame after the first (one full-size scale; default: "
                        "nsf.video.LATER_STEPS)")
    p.add_argument("--flow-preset", choices=("ultrafast", "fast", "medium"), default=None,
                   help="DIS optical flow preset (default: medium)")
    p.add_argument("--max-frames", type=int, default=None, help="refuse clips (or ranges) of more frames")
    p.add_argument("--restart", action="store_true",
                   help="start over instead of resuming the frames an interrupted run left")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_run_flags(p)


def _progress(enabled: bool) -> tuple[Any, Any, Any]:
    """``(on_frame, callback, close)``: a tqdm bar over frames whose postfix follows the steps within a frame."""
    if not enabled:
        return (lambda f: None), None, (lambda: None)
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def bar() -> Any:
        if "bar" not in state:
            state["bar"] = tqdm(total=None, unit="frame", dynamic_ncols=True)
        return state["bar"]

    def on_frame(f: Any) -> None:
        b = bar()
        if f.total and b.total != f.total:  # known once the clip is probed (an iterable: never)
            b.total = f.total
        b.set_postfix_str(f"frame {f.index + 1}: {'resumed' if f.resumed else f'{f.seconds:.1f} s'}", refresh=False)
        b.update(1)

    def callback(p: Any) -> None:  # steps within the frame being stylized (frame 1 runs the longest)
        bar().set_postfix_str(f"step {p.step}/{p.total} loss={p.loss:.4g}")

    def close() -> None:
        if "bar" in state:
            state["bar"].close()

    return on_frame, callback, close


def main(args: argparse.Namespace) -> int:
    from .cli import model_from_args
    from .errors import VideoError

    with resources.as_file(resources.files("nsf") / "assets" / DEMO_CLIP) as demo_clip, \
            resources.as_file(resources.files("nsf") / "assets" / DEMO_STYLE) as demo_style:
        if args.demo:
            src, styles = str(demo_clip), [str(demo_style)]
            output = args.output or "nsf-video-demo.mp4"
            if args.size is None:
                args.size = DEMO_SIZE  # minutes on a CPU at 256 px; --size 512 for the full size
            print(f"demo: {DEMO_CLIP} in the style of {DEMO_STYLE} (credits: nsf/assets/CREDITS.md)")
        else:
            if args.video is None or not args.styles:
                allowed = "nsf video IN STYLE [STYLE...] -o OUT.mp4, or nsf video --demo"
                raise VideoError(f"a clip and a style are needed; allowed: {allowed}", field="video",
                                 allowed=allowed)
            src, styles, output = args.video, args.styles, args.output
            if output is None and args.png_dir is None:
                raise VideoError("no output; allowed: -o OUT.mp4 (.mov, .mkv) and/or --png-dir DIR", field="out",
                                 allowed="-o OUT.mp4 (.mov, .mkv) and/or --png-dir DIR")
        model, options = model_from_args(args)
        extra = {k: v for k, v in (("temporal_weight", args.temporal_weight), ("later_steps", args.later_steps),
                                   ("flow_preset", args.flow_preset), ("max_frames", args.max_frames),
                                   ("frames", args.frames)) if v is not None}
        on_frame, callback, close = _progress(not args.no_progress)
        start = time.perf_counter()
        resumed = 0
        try:
            from .video import frames

            gen = frames(model, src, styles, out=output, png_dir=args.png_dir, resume=not args.restart,
                         callback=callback, **extra, **options)
            while True:
                try:
                    f = next(gen)
                except StopIteration as done:
                    result = done.value
                    break
                resumed += f.resumed
                on_frame(f)
        finally:
            close()
    elapsed = time.perf_counter() - start
    where = " and ".join(str(p) for p in (result.out, result.png_dir) if p is not None)
    again = f" ({resumed} resumed from an earlier run)" if resumed else ""
    print(f"wrote {where}: {result.frames} frames{again} in {elapsed:.1f} s on {model.device}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .cli import main as cli_main

    sys.exit(cli_main(["video", *sys.argv[1:]]))
