"""A neutral quality scorer, independent of the optimizer's loss code.

It uses the Caffe VGG-19 network (the network only: its own Gram and MSE below), and reports

* style_ratio: mean over relu1_1..relu5_1 of MSE(G(output), G(style)) / MSE(G(content), G(style)),
  with G = F F^T / (C*H*W) computed at each image's own size (0 = the style's statistics, 1 = no
  better than the content image);
* content_ratio: MSE(relu4_2(output), relu4_2(content)) / MSE(relu4_2(style resized to the content's
  shape), relu4_2(content)) (0 = the content's features, about 1 = no closer than the style image);
* sw_ratio, a second style yardstick that does not look at Gram matrices: mean over relu1_1..relu5_1 of
  SW(output, style) / SW(content, style), SW the sliced Wasserstein-2 distance between the layer's feature
  distributions over positions, on FIXED random directions (as many as channels, seeded per layer; the same for
  every image and run) with each projection's distribution compared at 1000 quantiles (so maps of different
  sizes compare). It matches the whole distribution of features, not only their second moments; the sliced
  style loss optimizes a similar quantity (on fresh directions each step), as the gram loss optimizes the
  first yardstick's, so neither yardstick alone can judge the losses.

The output is compared with the content resized to the output's size; the style is scored at its
file's size capped to the same longer side as the output, so runs at different sizes compare fairly.

A print (an output larger than 512 px) is judged by three figures (:meth:`Scorer.print_score`, ``--print``):

* thumbnail: the print downsampled (antialiased bilinear) to 512 px long side and scored exactly as a 512 px run
  is (:meth:`Scorer.score`: content at that size, style capped at 512 px): the print as a whole, at a viewing
  size. Bars: style_ratio <= 0.15, content_ratio <= 0.50 and, given the 512 px run of the same pair
  (``--preview``), the thumbnail's style_ratio within 0.05 of the preview's own (the print looks like its preview);
* close: the full-size print's shallow layers (relu1_1, relu2_1, relu3_1: receptive fields of 3-24 px) against
  the style at its own resolution (never upscaled; a style larger than the print is capped at the print's long
  side), their mean style_ratio: the texture up close. Bar <= 0.15;
* full: the old figure (all five layers and the content layer at the output's size, :meth:`Scorer.ratios`), for
  continuity only: relu4_1 and relu5_1 see 68 and 156 px of the print, so at 2048 px they compare the style's strokes
  with a composition laid out at 512 px, which no print should match (their picture-scale role is the thumbnail's).

Usage: python bench/score.py OUTPUT CONTENT STYLE
       python bench/score.py --print OUTPUT CONTENT STYLE [--preview PREVIEW.png] [--json] [--no-full]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
import torch.nn.functional as F

from nsf.image import load_image, pil_to_tensor, target_size
from nsf.vgg import FeatureExtractor, freeze
from nsf.weights import Normalize, load_weights

STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
CLOSE_LAYERS = STYLE_LAYERS[:3]  # the print up close: receptive fields of 3-24 px, the style's strokes
CONTENT_LAYER = "relu4_2"
SW_QUANTILES = 1000
SW_SEED = 20261127
THUMBNAIL = 512  # the long side a print is viewed at as a whole (the preview's size)
STYLE_BAR, CONTENT_BAR, PREVIEW_TOLERANCE = 0.15, 0.50, 0.05
GRAM_BAND = 1 << 24  # float64 elements of one band of a Gram's sum (128 MB); a 512x512 relu1_1 map is one band


class Scorer:
    def __init__(self, device: str = "cpu"):
        w = load_weights("caffe")
        self.net = FeatureExtractor(Normalize(w.preprocessing), freeze(w.features), (*STYLE_LAYERS, CONTENT_LAYER))
        self.net.to(device)
        self.device = device

    @staticmethod
    def _gram(f: torch.Tensor) -> torch.Tensor:
        """F F^T / (C*H*W) in float64, summed over bands of rows (exact: a Gram is a sum over positions), so a
        4096 px relu1_1 map is never copied whole to float64 (5.8 GB)."""
        _, c, h, w = f.shape
        rows = max(1, GRAM_BAND // (c * w))
        g = torch.zeros(c, c, dtype=torch.float64, device=f.device)
        for y in range(0, h, rows):
            m = f[0, :, y:y + rows].reshape(c, -1).double()
            g += m @ m.T
        return g / (c * h * w)

    def _load(self, src, hw=None, long_side=None) -> torch.Tensor:
        t = pil_to_tensor(load_image(src)) if not isinstance(src, torch.Tensor) else src
        if long_side is not None and max(t.shape[-2:]) > long_side:
            hw = target_size(t.shape[-2], t.shape[-1], long_side)
        if hw is not None and tuple(t.shape[-2:]) != tuple(hw):
            t = F.interpolate(t, size=hw, mode="bilinear", antialias=True, align_corners=False)
        return t.to(self.device)

    @staticmethod
    def _quantiles(f: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        """``(1, C, h, w)`` features -> each direction's sorted projections at SW_QUANTILES ranks ``(K, Q)``."""
        _, c, h, w = f.shape
        proj = dirs.T @ f[0].reshape(c, h * w).double()  # (K, N)
        values = proj.sort(dim=1).values
        return F.interpolate(values.unsqueeze(0), size=SW_QUANTILES, mode="linear", align_corners=True)[0]

    def _directions(self, layer: str, c: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(SW_SEED + STYLE_LAYERS.index(layer))
        d = torch.randn(c, c, generator=g, dtype=torch.float64)
        return (d / d.norm(dim=0, keepdim=True)).to(self.device)

    def _sw(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).pow(2).mean())

    def _inputs(self, output, content, style) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The output, the content at the output's size and the style capped to its longer side."""
        out = self._load(output)
        hw = tuple(out.shape[-2:])
        return out, self._load(content, hw), self._load(style, long_side=max(hw))

    @staticmethod
    def _gram_ratio(go: torch.Tensor, gc: torch.Tensor, gs: torch.Tensor) -> float:
        """MSE(G(output), G(style)) / MSE(G(content), G(style)) of one layer's Grams."""
        return float(F.mse_loss(go, gs) / F.mse_loss(gc, gs))

    @classmethod
    def _style_ratio(cls, fo: torch.Tensor, fc: torch.Tensor, fs: torch.Tensor) -> float:
        """One layer's MSE(G(output), G(style)) / MSE(G(content), G(style))."""
        return cls._gram_ratio(cls._gram(fo), cls._gram(fc), cls._gram(fs))

    @staticmethod
    def _content_ratio(fo: torch.Tensor, fc: torch.Tensor, fsc: torch.Tensor) -> float:
        """MSE(output, content) / MSE(style as content, content) of the content layer's features, in float64."""
        fo, fc, fsc = fo.double(), fc.double(), fsc.double()
        return float(F.mse_loss(fo, fc) / F.mse_loss(fsc, fc))

    @torch.no_grad()
    def score(self, output, content, style) -> dict[str, float]:
        out, con, sty = self._inputs(output, content, style)
        sty_as_content = self._load(style, tuple(out.shape[-2:]))
        fo, fc, fs, fsc = (self.net(t) for t in (out, con, sty, sty_as_content))
        ratios, sw = [], []
        for n in STYLE_LAYERS:
            ratios.append(self._style_ratio(fo[n], fc[n], fs[n]))
            dirs = self._directions(n, fo[n].shape[1])
            qo, qc, qs = (self._quantiles(f[n], dirs) for f in (fo, fc, fs))
            sw.append(self._sw(qo, qs) / self._sw(qc, qs))
        return {"style_ratio": sum(ratios) / len(ratios),
                "content_ratio": self._content_ratio(fo[CONTENT_LAYER], fc[CONTENT_LAYER], fsc[CONTENT_LAYER]),
                "sw_ratio": sum(sw) / len(sw),
                **{f"style_{n}": r for n, r in zip(STYLE_LAYERS, ratios)},
                **{f"sw_{n}": r for n, r in zip(STYLE_LAYERS, sw)}}

    def _reduced(self, t: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """One forward of ``t`` through VGG only as deep as ``layers`` need, each layer reduced as soon as it is
        computed: a style layer to its Gram, the content layer kept as features. So only one or two feature maps
        of one image are alive at a time (the largest: relu1_1's and conv1_2's, 64 channels at full size)."""
        net = FeatureExtractor(self.net.normalize, self.net.body, layers)
        x = net.normalize(t)
        out: dict[str, torch.Tensor] = {}
        for name, module in zip(net.module_names, net.body):
            x = module(x)
            if name in layers:
                out[name] = x if name == CONTENT_LAYER else self._gram(x)
        return out

    @torch.no_grad()
    def ratios(self, output, content, style, layers: tuple[str, ...] = STYLE_LAYERS,
               content_ratio: bool = True) -> dict[str, float]:
        """:meth:`score`'s style ratio (each layer's and their mean) and content ratio, without the sliced one, one
        image at a time with each layer reduced to its Gram as the forward passes it: the same numbers as
        :meth:`score`, for a 2048 px output in under 2 GB instead of 11. ``layers`` (a subset of STYLE_LAYERS)
        runs VGG only as deep as they need; ``content_ratio=False`` leaves relu4_2 (and its key) out."""
        out, con, sty = self._inputs(output, content, style)
        wanted = (*layers, CONTENT_LAYER) if content_ratio else tuple(layers)
        ro, rc = self._reduced(out, wanted), self._reduced(con, wanted)
        rs = self._reduced(sty, tuple(layers))
        ratios = {n: self._gram_ratio(ro[n], rc[n], rs[n]) for n in layers}
        result = {"style_ratio": sum(ratios.values()) / len(ratios)}
        if content_ratio:
            sty_as_content = self._load(style, tuple(out.shape[-2:]))
            fsc = self._reduced(sty_as_content, (CONTENT_LAYER,))[CONTENT_LAYER]
            result["content_ratio"] = self._content_ratio(ro[CONTENT_LAYER], rc[CONTENT_LAYER], fsc)
        return {**result, **{f"style_{n}": r for n, r in ratios.items()}}

    def print_inputs(self, output, content, style, *, thumbnail: int = THUMBNAIL) -> dict[str, torch.Tensor]:
        """What :meth:`print_score` scores: ``thumbnail`` (the output downsampled to ``thumbnail`` px long side, the
        output itself when it is no larger), ``output`` (full size), ``content`` (at the output's size) and ``style``
        (up close: at its own resolution, never upscaled, capped at the output's long side)."""
        out, con, sty = self._inputs(output, content, style)
        return {"thumbnail": self._load(out, long_side=thumbnail), "output": out, "content": con, "style": sty}

    def print_score(self, output, content, style, *, preview=None, full: bool = True,
                    thumbnail: int = THUMBNAIL) -> dict[str, Any]:
        """A print's three yardsticks (module docstring) and each bar's pass/fail, as a JSON-ready dict:

        * ``thumbnail``: :meth:`score` of the thumbnail (``thumbnail`` px long side: the preview's size, 512 px
          for a default print; ``style_ratio``, ``content_ratio``, ``sw_ratio``,
          ``style_relu1_1``..., ``sw_relu1_1``...) plus its ``size`` [h, w];
        * ``preview``: :meth:`score` of ``preview`` (the 512 px run of the same pair, at its own size) with its
          ``size``, or None; ``preview_difference``: the thumbnail's style_ratio minus the preview's, or None;
        * ``close``: ``style_ratio`` (the mean over CLOSE_LAYERS), ``style_relu1_1``, ``style_relu2_1``,
          ``style_relu3_1``, the ``size`` scored and the ``style_size`` used;
        * ``full``: :meth:`ratios` at the output's size (``style_ratio``, ``content_ratio``, ``style_<layer>``),
          or None with ``full=False`` (which runs VGG only to relu3_1 at full size: faster);
        * ``passed``: ``thumbnail_style``, ``thumbnail_content``, ``preview`` (None without a preview), ``close``,
          and ``all`` (every bar that applies). The full-size figure has no bar.

        Memory: full size is scored one image at a time, each layer reduced to its Gram as the forward passes it
        and each Gram summed over row bands (never a float64 copy of a whole map), so the peak is the forward's
        at full resolution: conv1_2's 64-channel input and output (2.9 GB each at 4096x2760) and the convolution
        library's working copies. A 4096x2760 random output (the 512 px astronaut and Starry Night) peaked at
        10.5 GB RSS in 391 s with ``full=True`` and 9.7 GB in 170 s with ``full=False`` (one thread, a shared
        2-core CPU, 2026-12-07); a 1024 px output at 1.9 GB in 82 s.
        """
        inputs = self.print_inputs(output, content, style, thumbnail=thumbnail)
        out = inputs["output"]
        thumb = self.score(inputs["thumbnail"], content, style)
        prev = None
        if preview is not None:
            p = self._load(preview)
            prev = {**self.score(p, content, style), "size": list(p.shape[-2:])}
        if full:
            full_fig: dict[str, float] | None = self.ratios(out, inputs["content"], style)
            close_layers = {n: full_fig[f"style_{n}"] for n in CLOSE_LAYERS}
        else:
            full_fig = None
            shallow = self.ratios(out, inputs["content"], style, layers=CLOSE_LAYERS, content_ratio=False)
            close_layers = {n: shallow[f"style_{n}"] for n in CLOSE_LAYERS}
        close = {"style_ratio": sum(close_layers.values()) / len(close_layers),
                 **{f"style_{n}": r for n, r in close_layers.items()},
                 "size": list(out.shape[-2:]), "style_size": list(inputs["style"].shape[-2:])}
        difference = None if prev is None else thumb["style_ratio"] - prev["style_ratio"]
        passed: dict[str, bool | None] = {
            "thumbnail_style": thumb["style_ratio"] <= STYLE_BAR,
            "thumbnail_content": thumb["content_ratio"] <= CONTENT_BAR,
            "preview": None if difference is None else abs(difference) <= PREVIEW_TOLERANCE,
            "close": close["style_ratio"] <= STYLE_BAR}
        passed["all"] = all(v for v in passed.values() if v is not None)
        return {"thumbnail": {**thumb, "size": list(inputs["thumbnail"].shape[-2:])}, "preview": prev,
                "preview_difference": difference, "close": close, "full": full_fig, "passed": passed}


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "FAIL")


def print_report(s: dict[str, Any]) -> str:
    """:meth:`Scorer.print_score`'s dict as lines of text: each yardstick, its bar and pass/fail."""
    t, c, p, ok = s["thumbnail"], s["close"], s["preview"], s["passed"]
    size = "x".join(map(str, c["size"]))
    lines = [f"thumbnail ({'x'.join(map(str, t['size']))} of {size}): style_ratio={t['style_ratio']:.4f} "
             f"(<= {STYLE_BAR}: {_verdict(ok['thumbnail_style'])}) content_ratio={t['content_ratio']:.4f} "
             f"(<= {CONTENT_BAR}: {_verdict(ok['thumbnail_content'])}) sw_ratio={t['sw_ratio']:.4f}"]
    if p is None:
        lines.append("preview: none given (--preview PREVIEW.png: the 512 px run of the same pair)")
    else:
        lines.append(f"preview ({'x'.join(map(str, p['size']))}): style_ratio={p['style_ratio']:.4f} "
                     f"content_ratio={p['content_ratio']:.4f}; thumbnail - preview = "
                     f"{s['preview_difference']:+.4f} (within {PREVIEW_TOLERANCE}: {_verdict(ok['preview'])})")
    lines.append(f"close ({size}, style {'x'.join(map(str, c['style_size']))}): style_ratio={c['style_ratio']:.4f} "
                 f"(<= {STYLE_BAR}: {_verdict(ok['close'])}) "
                 + " ".join(f"{n}={c[f'style_{n}']:.4f}" for n in CLOSE_LAYERS))
    f = s["full"]
    lines.append("full: not computed (--no-full)" if f is None else
                 f"full ({size}, no bar): style_ratio={f['style_ratio']:.4f} content_ratio={f['content_ratio']:.4f} "
                 + " ".join(f"{n}={f[f'style_{n}']:.4f}" for n in STYLE_LAYERS))
    lines.append(f"print: {_verdict(ok['all'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/score.py", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status 0 whatever the scores (pass/fail is printed).")
    parser.add_argument("output")
    parser.add_argument("content")
    parser.add_argument("style")
    parser.add_argument("--print", dest="print_", action="store_true",
                        help="score as a print: thumbnail, up close and full size, each against its bar")
    parser.add_argument("--preview", help="the 512 px run of the same pair (with --print)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text (with --print)")
    parser.add_argument("--no-full", action="store_true",
                        help="skip the full-size all-layer figure (with --print): VGG runs to relu3_1 only")
    args = parser.parse_args(argv)
    if not args.print_:
        if args.preview or args.json or args.no_full:
            parser.error("--preview, --json and --no-full go with --print")
        s = Scorer().score(args.output, args.content, args.style)
        print(" ".join(f"{k}={v:.4f}" for k, v in s.items()))
        return 0
    result = Scorer().print_score(args.output, args.content, args.style, preview=args.preview,
                                  full=not args.no_full)
    print(json.dumps(result) if args.json else print_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
