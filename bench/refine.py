"""The last refinement scale alone: what a change to its objective does to the score at a large size.

A default run at 2048 px spends about 20 minutes of this CPU in its 2048 px scale and the rest getting
there; the earlier scales do not depend on what the last one does. This runs those once (`start`: the
default run at half the size: the same scales, steps and options as the 2048 px run before its last) and
then only the last scale (`last`): `nsf.optimize.run(..., resume=)` from that start, so the scale runs as in
a whole run (the upsampled start plus the content's detail band, the same targets and L-BFGS), with options
that change that scale only.

Usage:
  python bench/refine.py start --size 2048                           # bench/out/refine_start_PAIR_2048.pt
  python bench/refine.py last NAME --size 2048 [--set key=value ...]  # a JSON line per run, per-layer scores
                                                     # e.g. --set refine_steps=20,40: 40 steps at 2048 px
  python bench/refine.py rescore IMAGE.png                           # the same scores of a saved output
  python bench/refine.py table [--record]                            # rows so far -> RESULTS
  python bench/refine.py start --size 512 --pair chelsea:brick --style-size 256   # a print tuned at half size:
  python bench/refine.py last NAME --size 512 --pair chelsea:brick --style-size 256 --print \
      --set refine_preview_weight=1    # base_size 256, the style at 256 px; thumbnail, up close and full-size scores
  python bench/refine.py start --size 1024 --base-size 128 --style-size 128 --content-size 128
  python bench/refine.py last NAME --size 1024 --base-size 128 --style-size 128 --content-size 128 --print \
      --set refine_steps=20,20,12      # a 4096 px print from 512 px images, at a quarter: 8x its base size

Scores are bench/score.py's (the same network, Gram and ratios), computed one layer at a time so that a
2048 px output scores in about 4 GB instead of 11. Rows go to bench/out/refine.jsonl.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
OUT = REPO / "bench" / "out"
ROWS = OUT / "refine.jsonl"
IMAGES = REPO.parent / "shared" / "images"


def _pair(args: argparse.Namespace) -> tuple[Path, Path]:
    c_name, s_name = args.pair.split(":")
    return IMAGES / f"{c_name}.jpg", IMAGES / f"{s_name}.jpg"


def _start_path(args: argparse.Namespace) -> Path:
    small = f"_s{args.style_size}" if args.style_size else ""
    small += f"_b{args.base_size}" if args.base_size else ""
    small += f"_c{args.content_size}" if args.content_size else ""
    return OUT / f"refine_start_{args.pair.replace(':', '_')}_{args.size}{small}.pt"


def _image(path: Path, side: int) -> torch.Tensor:
    """The image at ``path``, brought down to ``side`` px long side where given and smaller (0: as it is): e.g. a
    1024 px print from a 512 px style, tuned at half size, is a 512 px print from a 256 px style (``--style-size``)."""
    from nsf.geometry import resize, target_size
    from nsf.image import load_image, pil_to_tensor

    image = pil_to_tensor(load_image(path))
    if side and side < max(image.shape[-2:]):
        image = resize(image, target_size(image.shape[-2], image.shape[-1], side))
    return image


def _base(args: argparse.Namespace) -> dict[str, int]:
    """``base_size``: ``--base-size``, else half the size where that is below the default 512 (a print tuned at
    half size), else the default."""
    if args.base_size:
        return {"base_size": args.base_size}
    return {"base_size": args.size // 2} if args.size // 2 < 512 else {}


def start(args: argparse.Namespace) -> None:
    import nsf

    content_path, style_path = _pair(args)
    content, style = _image(content_path, args.content_size), _image(style_path, args.style_size)
    model = nsf.style_fusion(device="cpu")
    t0 = time.perf_counter()
    # the default run at half the size: its own base_size when that is smaller (the base scale of the print)
    x = model.stylize(content, style, size=args.size // 2, seed=0, as_tensor=True, **_base(args))
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(x, _start_path(args))
    print(json.dumps({"start": args.size // 2, "seconds": round(time.perf_counter() - t0, 1)}))


def _options(pairs: list[str]) -> dict[str, object]:
    """``key=value`` options parsed as `nsf` parses its flags (the same types, lists and booleans)."""
    from large import set_flags

    from nsf.cli import build_parser
    from nsf.config import FIELD_NAMES

    args = build_parser().parse_args(["plan", *set_flags(pairs)])
    return {name: getattr(args, name) for name in FIELD_NAMES if getattr(args, name) is not None}


def last(args: argparse.Namespace) -> None:
    import nsf
    from nsf import optimize as O
    from nsf.image import save_png

    content_path, style_path = _pair(args)
    model = nsf.style_fusion(device="cpu")
    cfg = model.resolve_config(size=args.size, seed=0, **{**_base(args), **_options(args.set)})
    content, style = _image(content_path, args.content_size), _image(style_path, args.style_size)
    plan = O.schedule(content.shape[-2], content.shape[-1], cfg)
    n_steps = plan[-1][2]
    x0 = torch.load(_start_path(args), weights_only=True)
    t0 = time.perf_counter()
    # the last entry of the schedule as run() runs it, from the start's image (run's own per-scale setup)
    x = O.run(model.extractor(cfg.layers), content, [style], cfg, generator=torch.Generator().manual_seed(cfg.seed),
              resume=(len(plan) - 1, x0))
    seconds = time.perf_counter() - t0
    print(f"{n_steps} steps in {seconds:.1f} s", file=sys.stderr, flush=True)
    out = (x * 255).round() / 255  # as the 8-bit PNG a run writes is scored
    del x
    path = OUT / f"refine_{args.name}.png"
    save_png(out, path, {"refine": args.set})
    scores = print_scores(out, content, style, x0, min(cfg.size, cfg.base_size)) if args.print else \
        score(out, content, style)
    if args.print:  # the thumbnail as the yardstick scores it, next to the output
        from nsf.geometry import resize, target_size

        thumb = resize(out, target_size(out.shape[-2], out.shape[-1], min(cfg.size, cfg.base_size)))
        save_png(thumb, OUT / f"refine_{args.name}_thumb.png", {"refine": args.set})
    row = {"name": args.name, "pair": args.pair, "size": args.size, "style_size": args.style_size,
           "base_size": cfg.base_size, "content_size": args.content_size, "set": args.set,
           "steps": n_steps, "seconds": round(seconds, 1), **scores,
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
           "image": str(path.relative_to(REPO)), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(row), flush=True)
    with open(ROWS, "a") as f:
        f.write(json.dumps(row) + "\n")


def score(out: torch.Tensor, content: torch.Tensor, style: torch.Tensor) -> dict[str, float]:
    """bench/score.py's ratios (per style layer, their mean, content), rounded for the row."""
    from score import Scorer

    return {k: round(v, 4) for k, v in Scorer().ratios(out, content, style).items()}


def print_scores(out: torch.Tensor, content: torch.Tensor, style: torch.Tensor, preview: torch.Tensor,
                 base: int) -> dict[str, float]:
    """bench/score.py's print yardstick (Scorer.print_score) with the thumbnail at ``base`` px (the preview's size:
    512 px for a default print) and ``preview``, the start (the base_size run), as the preview: ``thumb_style``,
    ``thumb_content``, ``preview_style`` (the preview's own), ``close_style`` and its layers, ``full_style``."""
    import score as S

    s = S.Scorer().print_score(out, content, style, preview=preview.clamp(0, 1), full=True, thumbnail=base)
    t, p, c, f = s["thumbnail"], s["preview"], s["close"], s["full"]
    row = {"thumb_style": t["style_ratio"], "thumb_content": t["content_ratio"], "preview_style": p["style_ratio"],
           "preview_content": p["content_ratio"], "close_style": c["style_ratio"],
           **{f"close_{n}": c[f"style_{n}"] for n in S.CLOSE_LAYERS},
           "full_style": f["style_ratio"], "full_content": f["content_ratio"]}
    return {k: round(v, 4) for k, v in row.items()}


def rescore(args: argparse.Namespace) -> None:
    from nsf.image import load_image, pil_to_tensor

    content, style = (pil_to_tensor(load_image(p)) for p in _pair(args))
    print(json.dumps({"image": args.image, **score(pil_to_tensor(load_image(args.image)), content, style)}))


def table(args: argparse.Namespace) -> None:
    from score import STYLE_LAYERS
    from speed import device_name

    rows = [json.loads(line) for line in ROWS.read_text().splitlines()]
    lines = [f"`{args.command}` (`python bench/refine.py last ...`: the last scale of a {rows[0]['size']} px run from "
             f"the same start, `refine.py start`) on {device_name('cpu')}, torch {torch.__version__}; "
             "scores of bench/score.py at the output's size, per style layer and their mean.", "",
             "| run | options of the last scale | steps | seconds | " + " | ".join(STYLE_LAYERS)
             + " | style_ratio | content_ratio | image | measured |", "|---" * (8 + len(STYLE_LAYERS)) + "|"]
    for r in rows:
        lines.append(f"| {r['name']} | {' '.join(r['set']) or 'default'} | {r['steps']} | {r['seconds']} | "
                     + " | ".join(str(r[f"style_{n}"]) for n in STYLE_LAYERS)
                     + f" | {r['style_ratio']} | {r['content_ratio']} | {r['image']} | {r['date']} |")
    text = "\n".join([*lines, *(["", args.note] if args.note else [])])
    print(text)
    if args.record:
        from results import record

        record(args.key, text)


def sheet(args: argparse.Namespace) -> None:
    """Side by side, one row per run: its thumbnail (``refine_NAME_thumb.png``) and a crop of the full-size output
    at its own resolution (``--crop TOP LEFT SIDE`` in the output's pixels), the start (the preview) first."""
    from PIL import Image

    rows = []
    for name in args.names:
        full = Image.open(OUT / f"refine_{name}.png").convert("RGB")
        thumb = Image.open(OUT / f"refine_{name}_thumb.png").convert("RGB")
        top, left, side = args.crop
        crop = full.crop((left, top, left + side, top + side)).resize((thumb.height, thumb.height), Image.NEAREST)
        rows.append((f"{name}: thumbnail | {side} px crop at full resolution", thumb, crop))
    stack_rows(rows).save(OUT / f"refine_sheet_{args.out}.jpg", quality=90)
    print(OUT / f"refine_sheet_{args.out}.jpg")


def stack_rows(rows: list) -> Any:
    """A contact sheet: one row per ``(label, thumbnail, crop)`` (PIL images), the label above, the crop beside the
    thumbnail, the rows one under another."""
    from PIL import Image, ImageDraw

    images = []
    for label, thumb, crop in rows:
        row = Image.new("RGB", (thumb.width + crop.width + 8, max(thumb.height, crop.height) + 20), "white")
        row.paste(thumb, (0, 20))
        row.paste(crop, (thumb.width + 8, 20))
        ImageDraw.Draw(row).text((4, 4), label, fill="black")
        images.append(row)
    out = Image.new("RGB", (max(r.width for r in images), sum(r.height for r in images)), "white")
    y = 0
    for r in images:
        out.paste(r, (0, y))
        y += r.height
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("table")
    q.add_argument("--record", action="store_true", help="write the table into bench/RESULTS.md")
    q.add_argument("--key", default="refinement weights")
    q.add_argument("--command", default="python bench/refine.py last NAME --set ...")
    q.add_argument("--note", default="", help="the conditions of the runs, below the table")
    q = sub.add_parser("sheet")
    q.add_argument("out", help="bench/out/refine_sheet_OUT.jpg")
    q.add_argument("names", nargs="+", help="runs (refine_NAME.png and refine_NAME_thumb.png)")
    q.add_argument("--crop", type=int, nargs=3, default=(256, 256, 256), metavar=("TOP", "LEFT", "SIDE"))
    for name in ("start", "last", "rescore"):
        q = sub.add_parser(name)
        if name == "rescore":
            q.add_argument("image")
        if name == "last":
            q.add_argument("name")
            q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="a config option (only the last scale runs; its steps: refine_steps)")
            q.add_argument("--print", action="store_true",
                           help="score as a print (bench/score.py print_score: the thumbnail at the base scale's "
                                "size against the start as preview, up close, full size) and save the thumbnail")
        q.add_argument("--size", type=int, default=2048)
        q.add_argument("--pair", default="astronaut:starry_night")
        q.add_argument("--style-size", type=int, default=0,
                       help="bring the style down to this long side first (0: as it is)")
        q.add_argument("--content-size", type=int, default=0,
                       help="bring the content down to this long side first (0: as it is)")
        q.add_argument("--base-size", type=int, default=0,
                       help="base_size (0: half the size where that is below 512, else the default)")
    args = p.parse_args()
    {"start": start, "last": last, "rescore": rescore, "table": table, "sheet": sheet}[args.cmd](args)


if __name__ == "__main__":
    main()
