"""The studio's overhead: time from pressing Run (headless Chromium) to the first preview and to the result, next to
the same job through the library in this process (model.run, first on_scale and return), and the app's memory at
rest (RSS of the `nsf studio` process after start-up, and after a run). Also writes docs/studio.png, a screenshot
of the page with a result in it.

Usage: python bench/studio.py [--size 256] [--steps 60] [--repeats 2] [--screenshot docs/studio.png]
Both sides run one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)), the same images, options and seed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from studio_page import browser, picture, running_studio, save, write_config  # noqa: E402

import nsf  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--screenshot", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-studio-"))
    assets = Path(nsf.__file__).parent / "assets"
    content, style = assets / "astronaut.jpg", assets / "starry_night.jpg"
    if not content.exists():
        content, style = save(picture(384, 288, 0), tmp / "c.png"), save(picture(256, 256, 1, "stripes"), tmp / "s.png")
    options = {"size": args.size, "steps": args.steps, "seed": 0}

    # the library: the same job in this process
    model = nsf.style_fusion(device="cpu", preset="fast")
    lib = []
    for _ in range(args.repeats):
        seen: list[float] = []
        t0 = time.perf_counter()

        def on_scale(_: object, seen: list[float] = seen, t0: float = t0) -> None:
            seen.append(time.perf_counter() - t0)

        model.run(content, [style], on_scale=on_scale, **options)
        lib.append((seen[0], time.perf_counter() - t0))

    config = write_config(tmp / "model-config.yaml", max_size=1024, max_steps=300, size=args.size, steps=args.steps,
                          calibrate=(128, 3))
    app = []
    with running_studio(config) as (url, proc):
        time.sleep(3)
        rest = psutil.Process(proc.pid).memory_info().rss
        with browser() as b:
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.wait_for_selector("#run")
            page.locator("#content input[type=file]").set_input_files(str(content))
            page.locator("#style-1 input[type=file]").set_input_files(str(style))
            for elem, value in (("size", args.size), ("steps", args.steps), ("seed", 0)):
                page.locator(f"#{elem} input").fill(str(value))
                page.locator(f"#{elem} input").press("Enter")
            deadline = time.monotonic() + 60
            while "Plan:" not in page.locator("#plan").inner_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            for n in range(1, args.repeats + 1):
                page.locator("#run").click()
                start = time.perf_counter()
                first = None
                while True:
                    status = page.locator("#status").inner_text()
                    if first is None and f"Run {n}" in status and "Preview" in status:
                        first = time.perf_counter() - start
                    if f"Run {n}" in status and ("Done" in status or "Failed" in status or "Refused" in status):
                        break
                    time.sleep(0.02)
                total = time.perf_counter() - start
                if "Done" not in status:
                    raise RuntimeError(status)
                app.append((first if first is not None else total, total))
            after = psutil.Process(proc.pid).memory_info().rss
            if args.screenshot:
                page.wait_for_timeout(1000)
                page.screenshot(path=args.screenshot, full_page=False)
    print(f"size {args.size}, steps {args.steps}, preset fast, {args.repeats} runs each, one thread")
    for name, rows in (("library", lib), ("studio", app)):
        for i, (f, t) in enumerate(rows, 1):
            print(f"{name} run {i}: first preview {f:.2f} s, result {t:.2f} s")
    lf, lt = min(r[0] for r in lib), min(r[1] for r in lib)
    af, at = min(r[0] for r in app), min(r[1] for r in app)
    print(f"best of each: first preview studio/library {af:.2f}/{lf:.2f} s = {af / lf:.2f}x; "
          f"result {at:.2f}/{lt:.2f} s = {at / lt:.2f}x (overhead {at - lt:+.2f} s)")
    print(f"studio RSS at rest {rest / 2**20:.0f} MiB, after {args.repeats} runs {after / 2**20:.0f} MiB; "
          f"this bench process (library, model loaded) {psutil.Process(os.getpid()).memory_info().rss / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
