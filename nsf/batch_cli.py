"""``nsf batch INPUTS... --style STYLE -o OUT_DIR``: a folder (or a list, or globs) of images in one style, on this
machine (:mod:`nsf.batch`) or on a Ray cluster (``--engine ray``, :mod:`nsf.batch_ray`)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

EXIT_ERRORS = 1  # the batch ran to its end; some inputs are error rows
EXIT_STOPPED = 130  # stopped by Ctrl-C: run it again to complete the rest
EXIT_WRITE = 74  # stopped because the output folder stopped taking files (a full disk): free space, run it again


def add_parser(sub: Any) -> None:
    from .cli import add_output_flags, add_run_flags

    p = sub.add_parser("batch", help="stylize many images (files, folders, globs, lists) in one style: batched, "
                                     "resumable, with a manifest; on this machine or a Ray cluster",
                       description="Stylize every input image with --style into OUT_DIR/<name>.png (with provenance) "
                                   "and OUT_DIR/manifest.jsonl. Run it again to finish what is left: done images are "
                                   "skipped, changed ones redone.")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursively), globs ('photos/**/*.jpg'), or "
                                             ".txt/.lst files with one path a line")
    p.add_argument("--style", action="append", required=True, metavar="STYLE",
                   help="style image (repeat to blend several; --style-blend-weights)")
    p.add_argument("-o", "--output-dir", required=True, help="output folder: <name>.png per input, manifest.jsonl")
    p.add_argument("--batch-size", type=int, default=4,
                   help="images of one size after resizing optimized at once (default: 4)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process; ray: Ray Data actors, one model each (the 'ray' extra). Default: local")
    p.add_argument("--address", default=None,
                   help="ray: the cluster to join (auto, ray://HOST:10001...; default: a local Ray started here)")
    p.add_argument("--workers", type=int, default=None,
                   help="ray: actors, each with one model (default: the cluster's GPUs, else 2)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="ray: CPUs each actor holds and its torch threads (default: 1 with GPUs, else the cluster's "
                        "CPUs / workers)")
    p.add_argument("--model", default=None, metavar="models:/NAME@ALIAS",
                   help="a registered MLflow version (models:/style_fusion@champion, models:/style_fusion/3): its "
                        "weights, preset and overrides (the 'mlflow' extra). Default: the library's model")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry store of --model (default: "
                                                        "$MLFLOW_TRACKING_URI)")
    add_output_flags(p)
    add_run_flags(p)
    p.set_defaults(preset=None)  # unset: the model's (a registered version's) preset


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The StyleConfig fields and builder keywords given on the command line."""
    from . import cli

    builder, options = cli.options_from_args(args)
    if args.model is not None and builder.get("weights") == "caffe":
        del builder["weights"]  # the registered version brings its weights
    return {**options, **{name: value for name, value in builder.items() if value is not None}}


def main(args: argparse.Namespace) -> int:
    from . import batch

    options = options_from_args(args)
    common = dict(batch_size=args.batch_size, bit_depth=args.bit_depth, model=args.model,
                  tracking_uri=args.tracking_uri, preset=args.preset, progress=not args.no_progress, **options)
    start = time.perf_counter()
    if args.engine == "ray":
        from .batch_ray import run as run_on_ray

        rows = run_on_ray(args.inputs, args.style, args.output_dir, address=args.address, workers=args.workers,
                             cpus_per_worker=args.cpus_per_worker, **common)
    else:
        if args.address is not None or args.workers is not None or args.cpus_per_worker is not None:
            raise ValueError("--address, --workers and --cpus-per-worker are for --engine ray")
        rows = batch.run(args.inputs, args.style[0] if len(args.style) == 1 else args.style, args.output_dir,
                         **common)
    elapsed = time.perf_counter() - start
    counts = batch.summary(rows)
    made = counts["ok"]
    rate = f", {made / elapsed * 60:.1f} images/min" if made else ""
    print(f"nsf batch: {counts['ok']} written, {counts['skipped']} already done, {counts['error']} failed, "
          f"{counts['stopped']} not reached, in {elapsed:.1f} s{rate}; manifest: "
          f"{args.output_dir.rstrip('/')}/{batch.MANIFEST}")
    for row in rows:
        if row["status"] == "error":
            print(f"  error: {row['input']}: {row['error']['message']}", file=sys.stderr)
    reasons = {row.get("reason") for row in rows if row["status"] == "stopped"}
    if "interrupted" in reasons:
        print("nsf batch: interrupted; run the same command again to complete the rest", file=sys.stderr)
        return EXIT_STOPPED
    if reasons:
        print(f"nsf batch: stopped ({', '.join(sorted(r for r in reasons if r))}); free space and run the same "
              "command again to complete the rest", file=sys.stderr)
        return EXIT_WRITE
    return EXIT_ERRORS if counts["error"] else 0
