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
Usage: python bench/score.py OUTPUT CONTENT STYLE
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from nsf.image import load_image, pil_to_tensor, target_size
from nsf.vgg import FeatureExtractor, freeze
from nsf.weights import Normalize, load_weights

STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
CONTENT_LAYER = "relu4_2"
SW_QUANTILES = 1000
SW_SEED = 20261127


class Scorer:
    def __init__(self, device: str = "cpu"):
        w = load_weights("caffe")
        self.net = FeatureExtractor(Normalize(w.preprocessing), freeze(w.features), (*STYLE_LAYERS, CONTENT_LAYER))
        self.net.to(device)
        self.device = device

    @staticmethod
    def _gram(f: torch.Tensor) -> torch.Tensor:
        _, c, h, w = f.shape
        m = f[0].reshape(c, h * w).double()
        return m @ m.T / (c * h * w)

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

    @classmethod
    def _style_ratio(cls, fo: torch.Tensor, fc: torch.Tensor, fs: torch.Tensor) -> float:
        """One layer's MSE(G(output), G(style)) / MSE(G(content), G(style))."""
        go, gc, gs = cls._gram(fo), cls._gram(fc), cls._gram(fs)
        return float(F.mse_loss(go, gs) / F.mse_loss(gc, gs))

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

    @torch.no_grad()
    def ratios(self, output, content, style) -> dict[str, float]:
        """:meth:`score`'s style ratio (each layer's and their mean) and content ratio, without the sliced one,
        one layer and one image at a time: the same numbers for a 2048 px output in about 4 GB instead of 11,
        for more forward passes."""
        out, con, sty = self._inputs(output, content, style)
        ratios = {}
        for n in STYLE_LAYERS:
            net = FeatureExtractor(self.net.normalize, self.net.body, (n,))
            ratios[n] = self._style_ratio(*(net(t)[n] for t in (out, con, sty)))
        net = FeatureExtractor(self.net.normalize, self.net.body, (CONTENT_LAYER,))
        sty_as_content = self._load(style, tuple(out.shape[-2:]))
        content_ratio = self._content_ratio(*(net(t)[CONTENT_LAYER] for t in (out, con, sty_as_content)))
        return {"style_ratio": sum(ratios.values()) / len(ratios), "content_ratio": content_ratio,
                **{f"style_{n}": r for n, r in ratios.items()}}

if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    s = Scorer().score(*sys.argv[1:4])
    print(" ".join(f"{k}={v:.4f}" for k, v in s.items()))
