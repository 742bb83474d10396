"""Images per minute of a batch of 16 images at 256 px: a shell loop of `nsf stylize`, `nsf batch` (one process,
batched groups; and --batch-size 1) and `nsf batch --engine ray` with 2 workers, all with the same options.

    python bench/batch.py [--steps 20] [--size 256] [--out /tmp/nsf-bench-batch]

The 16 images are made here from the bundled assets (crops and flips of astronaut.jpg and starry_night.jpg, all
square, so they batch fully); the style is starry_night.jpg. Prints one Markdown table row per engine with the wall
time of the whole command (process start, model load, Ray start included) and images/minute.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageOps

ASSETS = Path(__file__).resolve().parents[1] / "nsf" / "assets"


def make_images(folder: Path, n: int = 16, side: int = 256) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sources = [Image.open(ASSETS / name).convert("RGB") for name in ("astronaut.jpg", "starry_night.jpg")]
    out = []
    for i in range(n):
        src = sources[i % 2]
        w, h = src.size
        crop = min(w, h) * (0.6 + 0.05 * (i // 4)) // 1
        x, y = int((w - crop) * ((i * 37) % 11) / 10), int((h - crop) * ((i * 53) % 7) / 6)
        img = src.crop((x, y, x + int(crop), y + int(crop))).resize((side, side), Image.LANCZOS)
        if i % 4 >= 2:
            img = ImageOps.mirror(img)
        p = folder / f"photo{i:02d}.jpg"
        img.save(p, quality=92)
        out.append(p)
    return out


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="/tmp/nsf-bench-batch")
    a = ap.parse_args()
    root = Path(a.out)
    shutil.rmtree(root, ignore_errors=True)
    images = make_images(root / "in", side=a.size)
    style = str(ASSETS / "starry_night.jpg")
    nsf = [sys.executable, "-m", "nsf"]
    common = ["--size", str(a.size), "--steps", str(a.steps), "--seed", "0", "--no-progress"]
    rows = []

    def loop() -> None:
        for p in images:
            subprocess.run([*nsf, "stylize", str(p), style, "-o", str(root / "loop" / f"{p.stem}.png"), *common],
                           check=True, stdout=subprocess.DEVNULL)

    start = time.perf_counter()
    loop()
    rows.append(("shell loop of `nsf stylize` (16 processes)", time.perf_counter() - start))
    rows.append((f"`nsf batch --batch-size {a.batch_size}` (one process)",
                 timed([*nsf, "batch", str(root / "in"), "--style", style, "-o", str(root / "batch"),
                        "--batch-size", str(a.batch_size), *common])))
    rows.append(("`nsf batch --batch-size 1` (one process, no batching)",
                 timed([*nsf, "batch", str(root / "in"), "--style", style, "-o", str(root / "batch1"),
                        "--batch-size", "1", *common])))
    rows.append((f"`nsf batch --engine ray --workers 2 --batch-size {a.batch_size // 2}` (2 CPU actors, 1 thread "
                 "each)", timed([*nsf, "batch", str(root / "in"), "--style", style, "-o", str(root / "ray"),
                                 "--engine", "ray", "--workers", "2", "--cpus-per-worker", "1",
                                 "--batch-size", str(a.batch_size // 2), *common])))
    base = rows[0][1]
    print(f"| engine | wall s | images/min | vs the shell loop |  ({len(images)} images, {a.size} px, "
          f"{a.steps} steps, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')})")
    print("|---|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {len(images) / seconds * 60:.2f} | {base / seconds:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
