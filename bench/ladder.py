"""The memory ladder, rung by rung: seconds and peak memory of one exact step at a print size, for each way the
planner can run it (untiled; tiles with pass 2 recomputing the whole forward; tiles with pass 1's graph kept from a
cut on), against the untiled step measured in the same invocation.

Usage:
  python bench/ladder.py --size 1024 --tile 512 [--cuts pool4 pool3 pool2] [--steps 3]   # rows: bench/out/ladder.jsonl

Each rung runs in a child process (`python bench/ladder.py one ...`), so its peak RSS is its own: the step's peak
above the process's resident set before the first step ("step peak") is what the planner's activation model
predicts (`predicted`: nsf.plan.step_bytes, without the loop's image copies and history). The content,
style and start image are the README pair at the size (the style at 512 px), so the numbers are a run's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
OUT = REPO / "bench" / "out"
ROWS = OUT / "ladder.jsonl"
IMAGES = REPO.parent / "shared" / "images"


def one(args: argparse.Namespace) -> None:
    """One rung: ``args.steps`` steps after a warm-up; prints a JSON line."""
    import nsf
    from nsf import optimize as O
    from nsf import plan as P
    from nsf.image import load_image, pil_to_tensor
    from nsf.memory import memory_now, release_host_memory

    model = nsf.style_fusion(device="cpu")
    cfg = model.config.replace(size=args.size)
    ext = model.extractor(cfg.layers)
    content = pil_to_tensor(load_image(IMAGES / "astronaut.jpg"))
    style = pil_to_tensor(load_image(IMAGES / "starry_night.jpg"))
    hw = O.schedule(content.shape[-2], content.shape[-1], cfg)[-1][1]
    c = nsf.geometry.resize(content, hw)
    s = nsf.geometry.resize(style, nsf.geometry.target_size(style.shape[-2], style.shape[-1], 512))
    cut = None if args.cut == "none" else ext.module_names.index(args.cut) + 1
    tile = None if args.tile == 0 else (args.tile, args.tile)
    targets = O.style_targets(ext, [s], (1.0,), cfg, tile=tile)
    objective = O.Objective(ext, cfg, c, targets, tile=tile, cut=cut)
    x = c.clone()

    def step() -> torch.Tensor:
        if tile is None:
            xr = x.clone().requires_grad_(True)
            return torch.autograd.grad(objective(xr)[0].sum(), xr)[0]
        return objective.value_and_grad(x)[2]

    step()  # warm-up: oneDNN's choices, the allocator
    release_host_memory(x.device)
    before, _ = memory_now(x.device)  # the resident set
    t0, u0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - t0) / args.steps
    u1 = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds stay comparable when other jobs share the machine; wall seconds do not
    cpu = (u1.ru_utime + u1.ru_stime - u0.ru_utime - u0.ru_stime) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    costs = model.costs(cfg)
    ws = [t.window_pixels for t in objective.tiled.tiles]
    predicted = P.step_bytes(costs, hw, tile, cut=cut)
    windows = sum(ws) / (hw[0] * hw[1])
    work = P._step_work(costs, sum(ws), tile is not None, cut) / (hw[0] * hw[1])
    print(json.dumps({"size": list(hw), "tile": args.tile, "cut": args.cut, "tiles": objective.tiles,
                      "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                      "step_peak_gb": round((peak - before) / 1e9, 3),
                      "predicted_gb": round(predicted / 1e9, 3), "rss_before_gb": round(before / 1e9, 3),
                      "windows": round(windows, 3), "model_work": round(work, 3),
                      "threads": torch.get_num_threads()}))


def ladder(args: argparse.Namespace) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rungs = [(0, "none"), (args.tile, "none"), *((args.tile, c) for c in args.cuts)]
    rows = []
    for tile, cut in rungs:
        cmd = [sys.executable, __file__, "one", "--size", str(args.size), "--tile", str(tile), "--cut", cut,
               "--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    base, base_cpu = rows[0]["seconds"], rows[0]["cpu_seconds"]
    date = time.strftime("%Y-%m-%d %H:%M")
    with open(ROWS, "a") as f:
        for r in rows:
            r.update(ratio=round(r["seconds"] / base, 3), cpu_ratio=round(r["cpu_seconds"] / base_cpu, 3), date=date)
            f.write(json.dumps(r) + "\n")
    lines = ["| size | owned tile | tiles | graph kept after | s / step | vs untiled | CPU s / step | vs untiled | "
             "model's cost | windows / image | step peak GB | predicted GB |", "|---" * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['size'][1]}x{r['size'][0]} | {r['tile'] or 'whole'} | {r['tiles']} | "
                     f"{'-' if r['cut'] == 'none' else r['cut']} | {r['seconds']} | {r['ratio']} | "
                     f"{r['cpu_seconds']} | {r['cpu_ratio']} | {r['model_work']} | "
                     f"{r['windows']} | {r['step_peak_gb']} | {r['predicted_gb']} |")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    o = sub.add_parser("one")
    o.add_argument("--size", type=int, required=True)
    o.add_argument("--tile", type=int, default=0)
    o.add_argument("--cut", default="none")
    o.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--cuts", nargs="*", default=["pool4", "pool3", "pool2"])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    one(args) if args.cmd == "one" else ladder(args)


if __name__ == "__main__":
    main()
