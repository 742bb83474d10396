"""The memory ladder, rung by rung: seconds and peak memory of one exact step at a print size, for each way the
planner can run it (untiled; tiles with pass 2 recomputing the whole forward; tiles with pass 1's graph kept from a
cut on), against the untiled step measured in the same invocation.

Usage:
  python bench/ladder.py --size 1024 --tile 512 [384 ...] [--cuts pool4 pool3 pool2] [--steps 3] [--refined]
                         [--wide-pass-one] [--no-mmap]      # rows: bench/out/ladder.jsonl
  python bench/ladder.py shares [--size 512] [--repeat 5]   # a forward's time to each layer, as shares of relu5_1's

``--refined``: a refinement scale's full-size objective (``nsf.optimize.refined``: the detail layers relu1_1-relu3_1
and relu4_2's content; its pass 1 runs only to relu3_1) instead of the base scale's (every layer).
``--wide-pass-one``: one more rung, the tiles again with pass 1 running the whole network over the content layer's
windows (as before pass 1 read only the style layers): the same step, the earlier cost.

Each rung runs in a child process (`python bench/ladder.py one ...`), so its peak RSS is its own: the step's peak
above the process's resident set before the first step ("step peak") is what the planner's activation model
predicts (`predicted`: nsf.plan.step_bytes, without the loop's image copies and history). The content,
style and start image are the README pair at the size (the style at 512 px), so the numbers are a run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
# glibc serving every buffer from its heap (no mmap, nothing trimmed back): a step without page faults
NO_MMAP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"


def one(args: argparse.Namespace) -> None:
    """One rung: ``args.steps`` steps after a warm-up; prints a JSON line."""
    import nsf
    from nsf import optimize as O
    from nsf import plan as P
    from nsf.image import load_image, pil_to_tensor
    from nsf.memory import memory_now, release_host_memory

    if args.wide_pass_one:  # the earlier pass 1: the whole network over the content layer's windows
        from nsf.tiling import TiledFeatures

        TiledFeatures.reading = lambda self, layers: (self.extractor, self.tiles)  # type: ignore[method-assign]
    model = nsf.style_fusion(device="cpu")
    cfg = model.config.replace(size=args.size)
    if args.refined:
        cfg = O.refined(cfg)
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
    # the whole stack's measured costs, narrowed as the planner narrows a scale's (nsf.plan.plan)
    scale = model.costs(model.config).for_layers(cfg.layers, pass_one=cfg.style_layers)
    ws = [t.window_pixels for t in objective.tiled.tiles]
    predicted = P.step_bytes(scale, hw, tile, cut=cut)
    windows = sum(ws) / (hw[0] * hw[1])
    # the earlier pass 1 reads every layer: the model's cost without pass_one
    work = P._step_work(dataclasses.replace(scale, pass_one=()) if args.wide_pass_one else scale, hw, tile, cut) \
        / (hw[0] * hw[1])
    print(json.dumps({"size": list(hw), "tile": args.tile, "cut": args.cut, "tiles": objective.tiles,
                      "refined": args.refined, "pass_one": "wide" if args.wide_pass_one else "narrow",
                      "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                      "step_peak_gb": round((peak - before) / 1e9, 3),
                      "predicted_gb": round(predicted / 1e9, 3), "rss_before_gb": round(before / 1e9, 3),
                      "windows": round(windows, 3), "model_work": round(work, 3),
                      "threads": torch.get_num_threads()}))


def ladder(args: argparse.Namespace) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    first = args.tile[0]
    rungs = [(0, "none", False, False), *((t, "none", False, False) for t in args.tile),
             *((first, c, False, False) for c in args.cuts),
             *([(first, "none", True, False)] if args.wide_pass_one else []),
             *([(0, "none", False, True)] if args.no_mmap else [])]
    rows = []
    for tile, cut, wide, no_mmap in rungs:
        cmd = [sys.executable, __file__, "one", "--size", str(args.size), "--tile", str(tile), "--cut", cut,
               "--steps", str(args.steps), *(["--refined"] if args.refined else []),
               *(["--wide-pass-one"] if wide else [])]
        env = {**os.environ, **({"GLIBC_TUNABLES": NO_MMAP} if no_mmap else {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["malloc"] = "mmap off" if no_mmap else "glibc default"
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
        kept = ("-" if r["cut"] == "none" else r["cut"]) + (" (wide pass 1)" if r.get("pass_one") == "wide" else "") \
            + (" (glibc mmap off)" if r.get("malloc") == "mmap off" else "")
        lines.append(f"| {r['size'][1]}x{r['size'][0]} | {r['tile'] or 'whole'} | {r['tiles']} | "
                     f"{kept} | {r['seconds']} | {r['ratio']} | "
                     f"{r['cpu_seconds']} | {r['cpu_ratio']} | {r['model_work']} | "
                     f"{r['windows']} | {r['step_peak_gb']} | {r['predicted_gb']} |")
    print("\n".join(lines))


def shares(args: argparse.Namespace) -> None:
    """A forward without gradient (the extractor's precision and layout) to each pooling layer and each layer an
    objective reads, as a share of the forward to relu5_1, at ``--size`` px: the mean of ``--repeat`` after a
    warm-up, every depth timed in each round (so a busy spell falls on all alike)."""
    import nsf

    model = nsf.style_fusion(device="cpu")
    ext = model.extractor(model.config.layers)
    x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    from nsf.plan import FORWARD_SHARE

    names = list(FORWARD_SHARE)  # the table these timings fill
    stops = {n: ext.module_names.index(n) + 1 for n in names}
    seconds = {n: 0.0 for n in names}
    with torch.no_grad():
        for r in range(args.repeat + 1):
            for n, stop in stops.items():
                t0 = time.perf_counter()
                ext.stage(x, 0, stop)
                if r:
                    seconds[n] += time.perf_counter() - t0
    whole = seconds["relu5_1"]
    row = {"size": args.size, "repeat": args.repeat, "threads": torch.get_num_threads(),
           "relu5_1_seconds": round(whole / args.repeat, 4),
           "shares": {n: round(v / whole, 3) for n, v in seconds.items()},
           "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(row))
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "forward_shares.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    o = sub.add_parser("one")
    o.add_argument("--size", type=int, required=True)
    o.add_argument("--tile", type=int, default=0)
    o.add_argument("--cut", default="none")
    o.add_argument("--steps", type=int, default=3)
    o.add_argument("--refined", action="store_true")
    o.add_argument("--wide-pass-one", action="store_true")
    sh = sub.add_parser("shares")
    sh.add_argument("--size", type=int, default=512)
    sh.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tile", type=int, nargs="+", default=[512], help="owned tile sides, a rung each")
    ap.add_argument("--cuts", nargs="*", default=["pool4", "pool3", "pool2"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--refined", action="store_true")
    ap.add_argument("--no-mmap", action="store_true",
                    help="one more rung: untiled with glibc's mmap off (GLIBC_TUNABLES, nsf.plan.PAGE_FAULTS)")
    ap.add_argument("--wide-pass-one", action="store_true",
                    help="one more rung: tiles whose pass 1 runs the whole network (the earlier pass 1)")
    args = ap.parse_args()
    {"one": one, "shares": shares}.get(args.cmd, ladder)(args)


if __name__ == "__main__":
    main()
