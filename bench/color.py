"""How close each output's colours are to the content's and to the style's: the Wasserstein-2 distance between
Gaussians fitted to the RGB values (mean and 3x3 covariance, values in [0, 1]) of two images.

Usage: python bench/color.py --tags gram luminance histogram [--jsonl bench/out/losses.jsonl] [--record]

Reads the rows bench/quality.py wrote (``--json``) for each tag and prints a table per pair and tag; the VGG
yardsticks of bench/score.py compare with the style's own colours, so they cannot tell whether a colour-preserving
mode kept the content's colours: this does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]

from nsf.image import load_image, pil_to_tensor  # noqa: E402


def _gaussian(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    flat = pil_to_tensor(load_image(path)).double()[0].flatten(1)  # (3, N)
    mean = flat.mean(1)
    c = flat - mean.unsqueeze(1)
    return mean, c @ c.T / flat.shape[1]


def _sqrtm(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T


def color_w2(a: str | Path, b: str | Path) -> float:
    """W2 between the RGB Gaussians of images ``a`` and ``b`` (0: the same colour mean and covariance)."""
    (ma, ca), (mb, cb) = _gaussian(a), _gaussian(b)
    rb = _sqrtm(cb)
    cross = _sqrtm(rb @ ca @ rb)
    return float(((ma - mb).pow(2).sum() + torch.trace(ca + cb - 2 * cross)).clamp_min(0).sqrt())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tags", nargs="+", required=True)
    ap.add_argument("--jsonl", default=str(REPO / "bench" / "out" / "losses.jsonl"))
    ap.add_argument("--images", default=str(REPO.parent / "shared" / "images"))
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.jsonl).read_text().splitlines() if line.strip()]
    cmd = " ".join(["python bench/color.py"] + [a for a in sys.argv[1:] if a != "--record"])
    lines = [f"`{cmd}`, {time.strftime('%Y-%m-%d')}: RGB statistics of the saved images.", "",
             "| pair | " + " | ".join(f"{t}: to content / to style" for t in args.tags) + " |",
             "|---|" + "---|" * len(args.tags)]
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    for pair in pairs:
        c, s = (Path(args.images) / f"{n}.jpg" for n in pair.split(":"))
        cells = []
        for tag in args.tags:
            found = [r for r in rows if r["pair"] == pair and Path(r["image"]).name.startswith(f"default_{tag}_")]
            if not found:
                cells.append("-")
                continue
            image = REPO / "bench" / "out" / Path(found[-1]["image"]).name
            cells.append(f"{color_w2(image, c):.3f} / {color_w2(image, s):.3f}")
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        from results import record

        record(f"colour control 256 {' '.join(args.tags)}", table)


if __name__ == "__main__":
    main()
