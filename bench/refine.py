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
    return OUT / f"refine_start_{args.pair.replace(':', '_')}_{args.size}.pt"


def start(args: argparse.Namespace) -> None:
    import nsf

    content, style = _pair(args)
    model = nsf.style_fusion(device="cpu")
    t0 = time.perf_counter()
    x = model.stylize(content, style, size=args.size // 2, seed=0, as_tensor=True)
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
    from nsf.image import load_image, pil_to_tensor, save_png

    content_path, style_path = _pair(args)
    model = nsf.style_fusion(device="cpu")
    cfg = model.resolve_config(size=args.size, seed=0, **_options(args.set))
    content = pil_to_tensor(load_image(content_path))
    style = pil_to_tensor(load_image(style_path))
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
    row = {"name": args.name, "pair": args.pair, "size": args.size, "set": args.set, "steps": n_steps,
           "seconds": round(seconds, 1), **score(out, content, style),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
           "image": str(path.relative_to(REPO)), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(row), flush=True)
    with open(ROWS, "a") as f:
        f.write(json.dumps(row) + "\n")


def score(out: torch.Tensor, content: torch.Tensor, style: torch.Tensor) -> dict[str, float]:
    """bench/score.py's ratios (per style layer, their mean, content), rounded for the row."""
    from score import Scorer

    return {k: round(v, 4) for k, v in Scorer().ratios(out, content, style).items()}


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("table")
    q.add_argument("--record", action="store_true", help="write the table into bench/RESULTS.md")
    q.add_argument("--key", default="refinement weights")
    q.add_argument("--command", default="python bench/refine.py last NAME --set ...")
    q.add_argument("--note", default="", help="the conditions of the runs, below the table")
    for name in ("start", "last", "rescore"):
        q = sub.add_parser(name)
        if name == "rescore":
            q.add_argument("image")
        if name == "last":
            q.add_argument("name")
            q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="a config option (only the last scale runs; its steps: refine_steps)")
        q.add_argument("--size", type=int, default=2048)
        q.add_argument("--pair", default="astronaut:starry_night")
    args = p.parse_args()
    {"start": start, "last": last, "rescore": rescore, "table": table}[args.cmd](args)


if __name__ == "__main__":
    main()
