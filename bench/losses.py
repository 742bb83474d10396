"""Time per optimizer step of each style loss (and the mean-covariance loss with a float32 cross term), one
scale at a given size, on the CPU.

Usage: python bench/losses.py --size 256 512 [--steps 5] [--threads 1] [--record]

Each row is one run of ``nsf.optimize.run`` on a single scale (astronaut + Starry Night from ../shared/images,
or the bundled copies), L-BFGS, the default layers and weights: the seconds between consecutive progress
callbacks (each a whole step: the sliced loss's new projections, forward, loss, backward, L-BFGS update); the
median of the steps after the first. ``cpu s/step`` counts this process's CPU time (``time.process_time``, torch
on one thread), which other processes on a shared machine disturb far less than the wall clock; ``vs gram``
divides it by the gram row of the same size in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]

import nsf  # noqa: E402
from nsf import losses  # noqa: E402
from nsf import optimize as O  # noqa: E402
from nsf.image import load_image, pil_to_tensor  # noqa: E402

VARIANTS = [("gram", "gram", torch.float64), ("mean_cov", "mean_cov", torch.float64),
            ("mean_cov, float32 cross term", "mean_cov", torch.float32), ("sliced", "sliced", torch.float64)]


def _image(name: str) -> torch.Tensor:
    shared = REPO.parent / "shared" / "images" / f"{name}.jpg"
    path = shared if shared.exists() else REPO / "nsf" / "assets" / f"{name}.jpg"
    return pil_to_tensor(load_image(path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", action="store_true", help="write the table into bench/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = nsf.style_fusion(device="cpu")
    content, style = _image("astronaut"), _image("starry_night")
    rows = []
    for size in args.size:
        base = None
        for label, loss, w2_dtype in VARIANTS:
            losses.W2_DTYPE = w2_dtype
            cfg = model.resolve_config(size=size, steps=args.steps, scales=(1.0,), scale_steps=(1.0,), tol=0.0,
                                       style_loss=loss)
            stamps: list[tuple[float, float]] = []
            t0 = time.perf_counter()

            def stamp(p: nsf.Progress, stamps: list[tuple[float, float]] = stamps) -> None:
                stamps.append((time.perf_counter(), time.process_time()))

            O.run(model.extractor(cfg.layers), content, [style], cfg, callback=stamp,
                  generator=torch.Generator().manual_seed(0))
            total = time.perf_counter() - t0
            wall = statistics.median(b[0] - a[0] for a, b in zip(stamps, stamps[1:]))
            cpu = statistics.median(b[1] - a[1] for a, b in zip(stamps, stamps[1:]))
            base = cpu if loss == "gram" else base
            rows.append((size, label, cpu, cpu / base if base else float("nan"), wall, total))
            print(f"{size} px {label}: {cpu:.3f} cpu s/step, {wall:.3f} wall s/step ({total:.1f} s for {args.steps} "
                  "steps and setup)", flush=True)
    losses.W2_DTYPE = torch.float64
    from speed import device_name

    cmd = " ".join(["python bench/losses.py"] + [a for a in sys.argv[1:] if a != "--record"])
    lines = [f"`{cmd}` on {device_name('cpu')}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.", "",
             "| size | style loss | cpu s/step | vs gram | wall s/step | run wall s (steps + setup) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s} | {label} | {c:.3f} | {r:.2f} | {w:.3f} | {tot:.1f} |" for s, label, c, r, w, tot in rows]
    table = "\n".join(lines)
    print("\n" + table)
    if args.record:
        from results import record

        record(f"style losses step time cpu {','.join(map(str, args.size))}", table)


if __name__ == "__main__":
    main()
