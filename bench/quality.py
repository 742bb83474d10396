"""Quality and time of a preset on image pairs, scored by the neutral scorer in bench/score.py.

Usage: python bench/quality.py --size 256 [--preset default] [--pairs content:style ...] [--images DIR]
                               [--set key=value ...] [--tag NAME]
Writes the stylized images to bench/out/ (named by preset, tag, size and pair) and prints one line per pair
plus a markdown table (both style yardsticks: style_ratio, the Gram one, and sw_ratio, the sliced one; seconds
of wall clock and of this process's CPU time, which a shared machine disturbs less).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
from score import Scorer  # noqa: E402

import nsf  # noqa: E402

DEFAULT_PAIRS = ["astronaut:starry_night", "coffee:shipwreck", "chelsea:brick", "chelsea:starry_night",
                 "astronaut:shipwreck", "coffee:brick"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs="+", default=[256])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared" / "images"))
    ap.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    ap.add_argument("--json", default=None, help="append results as JSON lines here")
    ap.add_argument("--record", action="store_true", help="write the table into bench/RESULTS.md")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value (python literals)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tag", default="", help="names the outputs and the RESULTS section (e.g. the loss)")
    args = ap.parse_args()
    import ast

    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    model = nsf.style_fusion(device="cpu", preset=args.preset)
    scorer = Scorer()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.size:
        for pair in args.pairs:
            c_name, s_name = pair.split(":")
            c, s = Path(args.images) / f"{c_name}.jpg", Path(args.images) / f"{s_name}.jpg"
            steps_done: list[int] = []

            def count(p: nsf.Progress, steps_done: list[int] = steps_done) -> None:
                steps_done.append(p.step)
            t0, c0 = time.perf_counter(), time.process_time()
            img = model.stylize(c, s, size=size, callback=count, **overrides)
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            tag = f"{args.tag}_" if args.tag else ""
            path = out_dir / f"{args.preset}_{tag}{size}_{c_name}_{s_name}.png"
            img.save(path)
            q = scorer.score(path, c, s)
            row = {"preset": args.preset, "size": size, "pair": pair, "seconds": round(secs, 1), "cpu_s": round(cpu, 1),
                   "steps": len(steps_done), "style_ratio": round(q["style_ratio"], 4),
                   "content_ratio": round(q["content_ratio"], 4), "sw_ratio": round(q["sw_ratio"], 4),
                   "image": str(path), "overrides": args.set}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    from speed import device_name

    cmd = " ".join(["python bench/quality.py"] + [a for a in sys.argv[1:] if a != "--record"])
    lines = [f"`{cmd}` on {device_name('cpu')}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.", "",
             "| preset | size | pair | steps | seconds | cpu s | style_ratio | content_ratio | sw_ratio | image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['size']} | {r['pair']} | {r['steps']} | {r['seconds']} | {r['cpu_s']} | "
                     f"{r['style_ratio']} | {r['content_ratio']} | {r['sw_ratio']} | "
                     f"{os.path.relpath(r['image'], REPO)} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.record:
        from results import record

        sizes = ",".join(map(str, args.size))
        record(f"quality {args.preset} {sizes} {' '.join(args.set)}".strip(), table)


if __name__ == "__main__":
    main()
