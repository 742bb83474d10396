"""Print sizes: wall time, peak RSS and quality of `nsf stylize` runs at large sizes, with and without a
memory budget, and the per-step cost of exact tiled steps against untiled ones.

Usage:
  python bench/large.py run NAME --size 2048 [--max-memory 4GB] [--set key=value ...]   # one run, a JSON line
      [--style bench/inputs/starry_night_1280.jpg]              # a style image of its own (a larger reproduction)
  python bench/large.py compare A.png B.png                                            # largest pixel difference
  python bench/large.py step --size 1024 --tile 512                                    # seconds per step
  python bench/large.py table [--record]                                               # rows so far -> RESULTS
  python bench/large.py scan SMALL_STYLE.png LARGE_STYLE.png [--crop X Y SIDE] [--labels A B] [--out NAME.jpg]
      # two prints side by side: thumbnails and a crop at full resolution (default docs/large_style.jpg)

Each run is a child process (`/usr/bin/time -v nsf stylize ...`): its peak RSS is the whole process's,
the model and torch included. Images go to bench/out/large_NAME.png; rows to bench/out/large.jsonl.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
OUT = REPO / "bench" / "out"
ROWS = OUT / "large.jsonl"
IMAGES = REPO.parent / "shared" / "images"


def run(args: argparse.Namespace) -> None:
    from score import Scorer

    from nsf.image import read_metadata

    OUT.mkdir(parents=True, exist_ok=True)
    c_name, s_name = args.pair.split(":")
    content, style = IMAGES / f"{c_name}.jpg", Path(args.style) if args.style else IMAGES / f"{s_name}.jpg"
    out = OUT / f"large_{args.name}.png"
    cmd = ["nsf", "stylize", str(content), str(style), "-o", str(out), "--size", str(args.size), "--no-progress",
           "--max-memory", args.max_memory, "--seed", "0"]
    cmd += set_flags(args.set)
    # the planner's prediction for this run, timed on this machine just before it (nsf plan's timing run)
    planned = subprocess.run(["nsf", "plan", str(content), "--size", str(args.size), "--max-memory", args.max_memory,
                              "--json", *set_flags(args.set)], capture_output=True, text=True)
    predicted_s = json.loads(planned.stdout).get("seconds") if planned.returncode == 0 else None
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"nsf failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    # CPU seconds (user + system) stay comparable when something else shares the machine; wall time does not
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for k in ("User", "System"))
    meta = read_metadata(out)
    plan = meta.get("plan", {})
    # --no-score: a memory-only row; print_score takes 10.5 GB at 4096 px (bench/score.py), so no other large run
    # should share the machine while it scores
    # a print is scored as the issue asks (bench/score.py --print): its thumbnail against the 512 px run of the pair
    # (bench/out/large_<--preview>.png) and its texture up close; the old full-size figure beside them
    preview = OUT / f"large_{args.preview}.png" if args.preview else None
    q: dict = {"style_ratio": None, "content_ratio": None}
    if args.score:
        p = Scorer().print_score(out, content, style, preview=preview if preview and preview.exists() else None)
        q = {"style_ratio": p["full"]["style_ratio"], "content_ratio": p["full"]["content_ratio"],
             "thumbnail_style": p["thumbnail"]["style_ratio"], "thumbnail_content": p["thumbnail"]["content_ratio"],
             "preview_difference": p["preview_difference"], "close_style": p["close"]["style_ratio"],
             "passed": p["passed"]}
    row = {"name": args.name, "pair": args.pair, "style": args.style or None, "size": args.size,
           "max_memory": args.max_memory, "set": args.set,
           "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "nsf_seconds": meta.get("seconds"),
           "predicted_seconds": round(predicted_s, 1) if predicted_s else None,
           "rungs": [s.get("rung", "") for s in plan.get("scales", [])],
           "peak_rss_gb": round(rss_kb * 1024 / 1e9, 2),
           "predicted_peak_gb": round(plan.get("peak_bytes", 0) / 1e9, 2),
           "budget_gb": round(plan["budget"] / 1e9, 2) if plan.get("budget") else None,
           "tiles": [s["tiles"] for s in plan.get("scales", [])],
           "history": [s["history"] for s in plan.get("scales", [])],
           "steps": [s["steps"] for s in plan.get("scales", [])],
           "style_ratio": _round(q["style_ratio"]), "content_ratio": _round(q["content_ratio"]),
           **{k: (_round(v) if isinstance(v, float) else v) for k, v in q.items()
              if k not in ("style_ratio", "content_ratio")},
           "image": str(out.relative_to(REPO)), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(row), flush=True)
    with open(ROWS, "a") as f:
        f.write(json.dumps(row) + "\n")


def set_flags(pairs: list[str]) -> list[str]:
    """``key=value`` options -> `nsf stylize` flags (``true``/``false``: the flag and its ``--no-`` form)."""
    flags: list[str] = []
    for kv in pairs:
        key, value = kv.split("=", 1)
        flag = key.replace("_", "-")
        flags += [f"--{flag}"] if value == "true" else [f"--no-{flag}"] if value == "false" else [f"--{flag}", value]
    return flags


def _round(v: float | None) -> float | str:
    return "-" if v is None else round(v, 4)


def compare(args: argparse.Namespace) -> None:
    from PIL import Image

    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (args.a, args.b))
    d = np.abs(a - b)
    row = {"compare": [args.a, args.b], "max_diff_8bit": int(d.max()), "mean_diff_8bit": round(float(d.mean()), 4),
           "pixels_over_2": round(float((d.max(axis=2) > 2).mean()), 6)}
    print(json.dumps(row))
    with open(ROWS, "a") as f:
        f.write(json.dumps(row) + "\n")


def step(args: argparse.Namespace) -> None:
    """Seconds of one untiled step (forward+backward) and of one exact tiled step at the same size."""
    import nsf
    from nsf import optimize as O

    model = nsf.style_fusion(device="cpu")
    cfg = model.config
    ext = model.extractor(cfg.layers)
    g = torch.Generator().manual_seed(0)
    c, s, x = (torch.rand(1, 3, args.size, args.size, generator=g) for _ in range(3))
    grams = O.style_grams(ext, [s], (1.0,), cfg.style_layers, cfg.gram_norm)
    whole, tiled = O.Objective(ext, cfg, c, grams), O.Objective(ext, cfg, c, grams, tile=(args.tile, args.tile))

    def untiled_step() -> torch.Tensor:
        xr = x.clone().requires_grad_(True)
        return torch.autograd.grad(whole(xr)[0].sum(), xr)[0]

    times = {}
    for name, fn in (("untiled", untiled_step), ("tiled", lambda: tiled.value_and_grad(x)[2])):
        fn()
        t0 = time.perf_counter()
        for _ in range(args.reps):
            grad = fn()
        times[name] = (time.perf_counter() - t0) / args.reps
        times[name + "_grad"] = grad
    diff = float((times.pop("tiled_grad") - times.pop("untiled_grad")).abs().max())
    windows = sum(t.window_pixels for t in tiled.tiled.tiles)
    row = {"step": args.size, "tile": args.tile, "tiles": tiled.tiles, "threads": torch.get_num_threads(),
           "untiled_s": round(times["untiled"], 2), "tiled_s": round(times["tiled"], 2),
           "slowdown": round(times["tiled"] / times["untiled"], 2), "window_pixels_ratio":
           round(windows / args.size**2, 2), "max_grad_diff": diff, "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(row))
    with open(ROWS, "a") as f:
        f.write(json.dumps(row) + "\n")


def table(args: argparse.Namespace) -> None:
    from speed import device_name

    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines()]
    runs = [r for r in rows if "name" in r]
    lines = [f"`{args.command}` (`python bench/large.py run ...`: one child process per row, `/usr/bin/time -v`) "
             f"on {device_name('cpu')}, torch {torch.__version__}; quality by bench/score.py at the output's size.", "",
             "| run | pair | size | --max-memory | options | seconds | cpu s | peak RSS GB | predicted GB | tiles per "
             "scale | history | style_ratio | content_ratio | image | measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['name']} | {r['pair']} | {r['size']} | {r['max_memory']} | {' '.join(r['set']) or '-'} | "
                     f"{r['seconds']} | {r.get('cpu_seconds', '-')} | {r['peak_rss_gb']} | {r['predicted_peak_gb']} | "
                     f"{r['tiles']} | {r['history']} "
                     f"| {r['style_ratio']} | {r['content_ratio']} | {r['image']} | {r['date']} |")
    steps = [r for r in rows if "step" in r]
    if steps:
        lines += ["", "Per-step cost of exact tiling (`python bench/large.py step`): one forward+backward of the "
                  "default layers on random images, untiled vs tiled (pass 1 + pass 2), mean of the reps.", "",
                  "| size | owned tile | tiles | threads | untiled s | tiled s | slowdown | window px / image px "
                  "| max gradient difference | measured |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in steps:
            lines.append(f"| {r['step']} | {r['tile']} | {r['tiles']} | {r['threads']} | {r['untiled_s']} | "
                         f"{r['tiled_s']} | {r['slowdown']} | {r['window_pixels_ratio']} | {r['max_grad_diff']:.2e} "
                         f"| {r['date']} |")
    comps = [r for r in rows if "compare" in r]
    if comps:
        lines += ["", "| compared | largest 8-bit difference | mean | share of pixels over 2 |", "|---|---|---|---|"]
        for r in comps:
            lines.append(f"| {' vs '.join(Path(p).name for p in r['compare'])} | {r['max_diff_8bit']} | "
                         f"{r['mean_diff_8bit']} | {r['pixels_over_2']} |")
    text = "\n".join(lines)
    print(text)
    if args.record:
        from results import record

        record(args.key, text)


def figures(args: argparse.Namespace) -> None:
    """The README's pictures: the 512 px result beside the same region of the 512 px result upscaled and of
    the print-size result (a 512 x 512 crop of it), and the two stroke scales side by side at 1024 px."""
    from PIL import Image

    docs = REPO / "docs"
    small, big = Image.open(args.small).convert("RGB"), Image.open(args.big).convert("RGB")
    f = big.width / small.width
    x, y, side = args.crop  # the crop's origin and side in the small image's pixels
    region = (x, y, x + side, y + side)
    up = small.crop(region).resize((512, 512), Image.Resampling.BICUBIC)
    crop = big.crop(tuple(round(v * f) for v in region)).resize((512, 512), Image.Resampling.LANCZOS)
    sheet = Image.new("RGB", (512 * 3, 512), "white")
    for i, im in enumerate((small.resize((512, round(512 * small.height / small.width))), up, crop)):
        sheet.paste(im, (512 * i, 0))
    sheet.save(docs / "print_sizes.jpg", quality=88)
    if args.strokes:
        a, b = (Image.open(p).convert("RGB") for p in args.strokes)
        box = (256, 128, 768, 640)
        sheet = Image.new("RGB", (1024, 512))
        sheet.paste(a.crop(box), (0, 0))
        sheet.paste(b.crop(box), (512, 0))
        sheet.save(docs / "stroke_scale.jpg", quality=88)
    print("wrote docs/print_sizes.jpg", "and docs/stroke_scale.jpg" if args.strokes else "")


def scan(args: argparse.Namespace) -> None:
    """docs/large_style.jpg (``--out``): two prints of one size from the same content, by default one from the 512 px
    style file and one from a larger reproduction of the painting (``--style`` runs), as thumbnails and as the same
    crop at full resolution (``--crop X Y SIDE`` in the prints' pixels, shown at 512 px)."""
    from PIL import Image
    from refine import stack_rows

    x, y, side = args.crop
    rows = []
    for label, path in zip(args.labels, args.prints):
        im = Image.open(path).convert("RGB")
        thumb = im.resize((512, round(512 * im.height / im.width)), Image.Resampling.LANCZOS)
        crop = im.crop((x, y, x + side, y + side)).resize((512, 512), Image.Resampling.NEAREST)
        rows.append((f"{label}: the print at 512 px | a {side} px crop at full resolution", thumb, crop))
    stack_rows(rows).save(REPO / "docs" / args.out, quality=88)
    print(f"wrote docs/{args.out}")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("name")
    r.add_argument("--size", type=int, required=True)
    r.add_argument("--pair", default="astronaut:starry_night")
    r.add_argument("--style", default="", help="a style image of its own (a large scan) instead of the pair's")
    r.add_argument("--max-memory", default="auto")
    r.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more nsf stylize options, key=value (--set a=1 b=2 or --set a=1 --set b=2)")
    r.add_argument("--no-score", dest="score", action="store_false", help="no quality scores (memory-only rows)")
    r.add_argument("--preview", default="", help="the NAME of this pair's 512 px run, for the thumbnail's bar")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    s = sub.add_parser("step")
    s.add_argument("--size", type=int, default=1024)
    s.add_argument("--tile", type=int, default=512)
    s.add_argument("--reps", type=int, default=2)
    t = sub.add_parser("table")
    t.add_argument("--record", action="store_true")
    t.add_argument("--rows", default=str(ROWS), help="the JSON lines to tabulate")
    t.add_argument("--key", default="large cpu", help="the RESULTS.md section")
    t.add_argument("--command", default="bash bench/large.sh", help="the command the rows came from, for the table")
    fg = sub.add_parser("figures")
    fg.add_argument("small", help="the 512 px result")
    fg.add_argument("big", help="the print-size result")
    fg.add_argument("--crop", type=int, nargs=3, default=[192, 96, 128], metavar=("X", "Y", "SIDE"))
    fg.add_argument("--strokes", nargs=2, metavar=("PICTURE", "PIXELS"), help="two 1024 px results")
    sc = sub.add_parser("scan")
    sc.add_argument("prints", nargs=2, help="the print from the 512 px style, then the one from the larger style")
    sc.add_argument("--out", default="large_style.jpg", help="the figure's name in docs/")
    sc.add_argument("--labels", nargs=2, default=["style 512 px", "style 1280 px"])
    sc.add_argument("--crop", type=int, nargs=3, default=[1100, 700, 256], metavar=("X", "Y", "SIDE"))
    args = ap.parse_args()
    {"run": run, "compare": compare, "step": step, "table": table, "figures": figures, "scan": scan}[args.cmd](args)


if __name__ == "__main__":
    main()
