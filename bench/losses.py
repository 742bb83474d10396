"""Time per optimizer step of each style loss (and the mean-covariance loss with a float32 cross term), one
scale at a given size, on the CPU.

Usage: python bench/losses.py --size 256 512 [--steps 5] [--threads 1] [--record]

Each row is one run of ``nsf.optimize.run`` on a single scale (astronaut + Starry Night from ../shared/images,
or the bundled copies), L-BFGS, the default layers and weights: the seconds between consecutive progress
callbacks (each a whole step: the sliced loss's new projections, forward, loss, backward, L-BFGS update); the
median of the steps after the first. ``vs gram`` divides by the gram row of the same size in the same process.
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
            stamps: list[float] = []
            t0 = time.perf_counter()
            def stamp(p: nsf.Progress, stamps: list[float] = stamps) -> None:
                stamps.append(time.perf_counter())
            O.run(model.extractor(cfg.layers), content, [style], cfg, callback=stamp,
                  generator=torch.Generator().manual_seed(0))
            total = time.perf_counter() - t0
            per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
            base = per_step if loss == "gram" else base
            rows.append((size, label, per_step, per_step / base if base else float("nan"), total))
            print(f"{size} px {label}: {per_step:.3f} s/step ({total:.1f} s for {args.steps} steps and setup)",
                  flush=True)
    losses.W2_DTYPE = torch.float64
    from speed import device_name

    cmd = " ".join(["python bench/losses.py"] + [a for a in sys.argv[1:] if a != "--record"])
    lines = [f"`{cmd}` on {device_name('cpu')}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.", "",
             "| size | style loss | s/step | vs gram | run s (steps + setup) |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {label} | {t:.3f} | {r:.2f} | {tot:.1f} |" for s, label, t, r, tot in rows]
    table = "\n".join(lines)
    print("\n" + table)
    if args.record:
        from results import record

        record(f"style losses step time cpu {','.join(map(str, args.size))}", table)


if __name__ == "__main__":
    main()
