"""An image grid for the README: one row per pair, the content, the style, then one column per output.

Usage: python bench/grid.py -o docs/style_losses.jpg --columns gram mean_cov sliced
           --pattern "bench/out/default_{column}_256_{content}_{style}.png"
           --pairs astronaut:starry_night coffee:shipwreck ... [--images DIR] [--cell 200]

``--pattern`` names each output file; ``{column}``, ``{content}`` and ``{style}`` are filled in. Each image is
fitted into a ``cell`` x ``cell`` box (aspect kept) on white, with its column's label above the first row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
LABEL = 22  # px of the label band


def fitted(path: Path, cell: int) -> Image.Image:
    img = Image.open(path).convert("RGB")
    img.thumbnail((cell, cell), Image.Resampling.LANCZOS)
    box = Image.new("RGB", (cell, cell), "white")
    box.paste(img, ((cell - img.width) // 2, (cell - img.height) // 2))
    return box


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--columns", nargs="+", required=True)
    ap.add_argument("--labels", nargs="*", default=None, help="column labels (default: the column names)")
    ap.add_argument("--pattern", required=True)
    ap.add_argument("--pairs", nargs="+", required=True)
    ap.add_argument("--images", default=str(REPO.parent / "shared" / "images"))
    ap.add_argument("--cell", type=int, default=200)
    args = ap.parse_args()
    labels = ["content", "style", *(args.labels or args.columns)]
    cell, gap = args.cell, 4
    width = len(labels) * (cell + gap) - gap
    grid = Image.new("RGB", (width, LABEL + len(args.pairs) * (cell + gap) - gap), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(labels):
        draw.text((j * (cell + gap) + 4, 4), label, fill="black")
    for i, pair in enumerate(args.pairs):
        content, style = pair.split(":")
        paths = [Path(args.images) / f"{content}.jpg", Path(args.images) / f"{style}.jpg"]
        paths += [REPO / args.pattern.format(column=c, content=content, style=style) for c in args.columns]
        for j, path in enumerate(paths):
            grid.paste(fitted(path, cell), (j * (cell + gap), LABEL + i * (cell + gap)))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, quality=88)
    print(f"wrote {out} ({grid.width}x{grid.height})")


if __name__ == "__main__":
    main()
