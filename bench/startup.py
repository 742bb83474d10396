"""`nsf stylize` start-up: process start to the first optimizer step, against `import torch` alone.

Each child is a fresh `python` process; the parent notes the wall clock just before starting it, the child prints
the wall clock when the event happens:

* ``torch``: ``import torch`` done (the floor: nsf cannot start before torch is imported);
* ``nsf``: ``import nsf`` done;
* ``stylize``: ``nsf.cli.main(["stylize", ...])`` (what the ``nsf`` command runs) until its first step's progress
  callback, and the second's (the step's own time, to subtract).

Each child also reports its CPU time (``time.process_time()``, all threads) at those points: on a shared machine
the wall clock follows the other jobs' load, the CPU time much less.

Rows alternate between the kinds, ``--repeat`` times, and the medians are reported; ``--base DIR`` runs the
stylize child with another checkout's nsf on ``PYTHONPATH`` too (e.g. the code before this change, exported with
``git archive``), in the same run. Prints a Markdown row for bench/RESULTS.md.

    python bench/startup.py --repeat 5 [--base /tmp/nsf-before]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "images"

TORCH = "import time, json; import torch; print(json.dumps({'done': time.time(), 'cpu_done': time.process_time()}))"
NSF = "import time, json; import nsf; print(json.dumps({'done': time.time(), 'cpu_done': time.process_time()}))"
STYLIZE = r"""
import json, os, sys, time
import nsf.cli as cli
seen = []
def bar(enabled):
    def callback(p):
        seen.append((time.time(), time.process_time()))
        if len(seen) == 2:
            print(json.dumps({"first": seen[0][0], "second": seen[1][0], "cpu_first": seen[0][1],
                              "cpu_second": seen[1][1]}), flush=True)
            os._exit(0)
    return callback, None, lambda: None
cli.progress_bar = bar
sys.exit(cli.main(sys.argv[1:]))
"""


def child(code: str, args: list[str], pythonpath: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: v if k.startswith("cpu_") else v - start for k, v in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--base", help="another checkout's root (its nsf/ is imported instead) for a before/after row")
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp()) / "out.png"
    args = ["stylize", str(IMAGES / "astronaut.jpg"), str(IMAGES / "starry_night.jpg"), "-o", str(out),
            "--size", str(a.size), "--steps", "20"]
    kinds = {"torch": (TORCH, [], str(REPO)), "nsf": (NSF, [], str(REPO)), "stylize": (STYLIZE, args, str(REPO))}
    if a.base:
        kinds["stylize before"] = (STYLIZE, args, a.base)
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for _ in range(a.repeat):
        for kind, (code, extra, path) in kinds.items():
            rows[kind].append(child(code, extra, path))

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[kind])

    torch_s = med("torch", "done")
    print(f"import torch {torch_s:.2f} s; import nsf {med('nsf', 'done'):.2f} s (medians of {a.repeat})")
    for kind in [k for k in kinds if k.startswith("stylize")]:
        first = med(kind, "first")
        step = statistics.median(r["second"] - r["first"] for r in rows[kind])
        print(f"{kind}: first step done at {first:.2f} s, a step {step:.2f} s: start-up (first step's start) "
              f"{first - step:.2f} s, {first - step - torch_s:.2f} s after import torch")
        cpu_step = statistics.median(r["cpu_second"] - r["cpu_first"] for r in rows[kind])
        cpu = med(kind, "cpu_first") - cpu_step
        print(f"  CPU time (all threads): start-up {cpu:.2f} s, {cpu - med('torch', 'cpu_done'):.2f} s after import "
              f"torch's {med('torch', 'cpu_done'):.2f} s")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
