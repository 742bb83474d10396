"""Regional styles (masks): what masks cost per step, and a picture with each region's scores.

Usage:
  python bench/masks.py step [--sizes 256 512] [--repeat 5] [--record]   # seconds per step: no mask vs 2 masks
  python bench/masks.py picture [--size 384] [--record]                  # docs/masks.jpg and its region scores

``step`` times one objective forward+backward (the default layers, gram loss) without masks and with two
complementary soft masks, alternating the two so that whatever else runs on the machine weighs on both alike;
the ratio is the claim. ``picture`` stylizes astronaut with Starry Night on the left and the shipwreck on the
right (a soft edge a fifth of the width), then scores each region's statistics against each style (Gram
distance, summed over relu1_1..relu5_1 and relative to the style's Gram size): a region should be closer to its
own style than to the other one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
IMAGES = REPO.parent / "shared" / "images"
PAIR = ("astronaut", "starry_night", "shipwreck")


def soft_halves(h: int, w: int, edge: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right ``(1, 1, h, w)`` masks with a linear ramp over ``edge`` of the width between them."""
    x = torch.arange(w, dtype=torch.float32) / w
    left = ((0.5 + edge / 2 - x) / edge).clamp(0, 1).view(1, 1, 1, w).expand(1, 1, h, w).contiguous()
    return left, 1 - left


def step(args: argparse.Namespace) -> None:
    from speed import device_name

    import nsf
    from nsf import optimize as O

    model = nsf.style_fusion(device="cpu")
    cfg = model.config
    ext = model.extractor(cfg.layers)
    rows = []
    for size in args.sizes:
        g = torch.Generator().manual_seed(0)
        content, x = torch.rand(1, 3, size, size, generator=g), torch.rand(1, 3, size, size, generator=g)
        styles = [torch.rand(1, 3, size, size, generator=g) for _ in range(2)]
        left, right = soft_halves(size, size)
        plain = O.Objective(ext, cfg, content, O.style_targets(ext, styles[:1], (1.0,), cfg))
        masked = O.Objective(ext, cfg, content, [O.Region(O.style_targets(ext, [s], (1.0,), cfg), m)
                                                 for s, m in zip(styles, (left, right))])
        times: dict[str, list[float]] = {"plain": [], "masked": []}
        for i in range(args.repeat + 1):
            for name, objective in (("plain", plain), ("masked", masked)):
                xr = x.clone().requires_grad_(True)
                t0 = time.perf_counter()
                loss, _ = objective(xr)
                loss.sum().backward()
                if i:  # the first of each is a warm-up
                    times[name].append(time.perf_counter() - t0)
        a, b = statistics.median(times["plain"]), statistics.median(times["masked"])
        rows.append(f"| {size} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")
        print(rows[-1], flush=True)
    lines = [f"`python bench/masks.py step --sizes {' '.join(map(str, args.sizes))} --repeat {args.repeat}`, "
             f"{time.strftime('%Y-%m-%d')}, {device_name('cpu')}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}: one forward+backward of the default objective (gram loss, relu1_1..relu5_1), "
             f"median of {args.repeat}, the two alternated.", "",
             "| px | no mask (s) | 2 soft masks (s) | ratio |", "|---|---|---|---|", *rows]
    _out("\n".join(lines), "masks step", args.record)


def picture(args: argparse.Namespace) -> None:
    from PIL import Image

    import nsf
    from nsf import losses
    from nsf.image import load_image, pil_to_tensor, tensor_to_pil

    content_name, left_name, right_name = PAIR
    model = nsf.style_fusion(device="cpu")
    content = pil_to_tensor(load_image(IMAGES / f"{content_name}.jpg"))
    styles = [pil_to_tensor(load_image(IMAGES / f"{n}.jpg")) for n in (left_name, right_name)]
    h, w = content.shape[-2:]
    masks = soft_halves(h, w)
    t0 = time.perf_counter()
    out = model.stylize(content, styles, masks=list(masks), size=args.size, seed=0)
    seconds = time.perf_counter() - t0
    layers = model.config.style_layers
    ext = model.extractor(layers)
    with torch.no_grad():
        feats = ext(out)
        style_feats = [ext(nsf.image.resize(s, nsf.image.target_size(*s.shape[-2:], args.size))) for s in styles]

    def distance(region: torch.Tensor, k: int) -> float:
        total = 0.0
        for n in layers:
            m = torch.nn.functional.adaptive_avg_pool2d(nsf.image.resize(region, out.shape[-2:]), feats[n].shape[-2:])
            g, t = losses.masked_gram(feats[n], m), losses.gram(style_feats[k][n])
            total += float(losses.mse_per_image(g, t) / t.pow(2).mean())
        return total

    cells = [[distance(m, k) for k in (0, 1)] for m in masks]
    side = 256
    tiles = [tensor_to_pil(content), tensor_to_pil(masks[0].expand(1, 3, h, w)), tensor_to_pil(styles[0]),
             tensor_to_pil(styles[1]), tensor_to_pil(out)]
    tiles = [t.resize((side, round(side * t.height / t.width))) for t in tiles]
    grid = Image.new("RGB", (side * len(tiles), max(t.height for t in tiles)), "white")
    for i, t in enumerate(tiles):
        grid.paste(t, (i * side, 0))
    target = REPO / "docs" / "masks.jpg"
    grid.save(target, quality=88)
    (REPO / "bench" / "out").mkdir(exist_ok=True)
    tensor_to_pil(out).save(REPO / "bench" / "out" / f"masks_{args.size}.png")
    lines = [f"`python bench/masks.py picture --size {args.size}`, {time.strftime('%Y-%m-%d')}: {content_name} with "
             f"{left_name} on the left mask and {right_name} on the right (soft edge over a fifth of the width), "
             f"default preset, seed 0, {seconds:.0f} s on this CPU; docs/masks.jpg shows content, left mask, the two "
             "styles and the result. Gram distance of each region's statistics to each style (lower is closer; "
             "relu1_1..relu5_1, relative to the style's Gram size):", "",
             f"| region | to {left_name} | to {right_name} |", "|---|---|---|",
             f"| left | **{cells[0][0]:.3f}** | {cells[0][1]:.3f} |",
             f"| right | {cells[1][0]:.3f} | **{cells[1][1]:.3f}** |"]
    _out("\n".join(lines), "masks picture", args.record)


def _out(table: str, key: str, record: bool) -> None:
    print(table)
    if record:
        from results import record as write

        write(key, table)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step")
    s.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    s.add_argument("--repeat", type=int, default=5)
    s.add_argument("--record", action="store_true")
    p = sub.add_parser("picture")
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--record", action="store_true")
    args = ap.parse_args()
    {"step": step, "picture": picture}[args.cmd](args)


if __name__ == "__main__":
    main()
