"""The plain eager reference loop, written here on purpose without nsf's loss or optimizer code.

It does what neural-style-pt does by default: Caffe VGG-19, pixels in Caffe space (BGR, 0..255,
mean subtracted) initialised with randn * 0.001, content relu4_2 (weight 5), style relu1_1..relu5_1
(weight 100, Gram = F F^T / (C*H*W), MSE), TV weight 1e-3 (sum of absolute differences), one
torch.optim.LBFGS run (lr 1, history 100, no line search), the style image at the content's size.
Only the network (nsf.weights.load_weights, nsf.vgg.layer_names) comes from nsf: the file under test.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nsf.image import load_image, pil_to_tensor, target_size, tensor_to_pil
from nsf.vgg import layer_names
from nsf.weights import load_weights

CONTENT = ("relu4_2",)
STYLE = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
MEAN_BGR = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)


def _named_net() -> tuple[nn.Sequential, list[str]]:
    feats = load_weights("caffe").features.eval()
    names = layer_names(feats)
    last = names.index("relu5_1")
    for p in feats.parameters():
        p.requires_grad_(False)
    return feats[: last + 1], names[: last + 1]


class Reference:
    def __init__(self, device: str = "cpu"):
        self.net, self.names = _named_net()
        self.net.to(device)
        self.device = device

    def _features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in zip(self.names, self.net):
            x = m(x)
            if name in CONTENT or name in STYLE:
                out[name] = x
        return out

    @staticmethod
    def _gram(f: torch.Tensor) -> torch.Tensor:
        _, c, h, w = f.shape
        m = f.view(c, h * w)
        return (m @ m.t()).div(c * h * w)

    def _caffe(self, path, hw) -> torch.Tensor:
        t = pil_to_tensor(load_image(path)).to(self.device)
        t = F.interpolate(t, size=hw, mode="bilinear", antialias=True, align_corners=False)
        return t.flip(1) * 255 - MEAN_BGR.to(self.device)

    def to_image(self, x: torch.Tensor):
        return tensor_to_pil(((x.detach() + MEAN_BGR.to(x.device)) / 255).flip(1).clamp(0, 1))

    def run(self, content_path, style_path, size: int = 256, steps: int = 1000, seed: int = 0,
            checkpoint: Callable[[int, float, torch.Tensor], None] | None = None, every: int = 50):
        """Returns (final image tensor in Caffe space, seconds per step)."""
        torch.manual_seed(seed)
        c0 = pil_to_tensor(load_image(content_path))
        hw = target_size(c0.shape[-2], c0.shape[-1], size)
        content, style = self._caffe(content_path, hw), self._caffe(style_path, hw)
        with torch.no_grad():
            fc, fs = self._features(content), self._features(style)
            c_t = {n: fc[n] for n in CONTENT}
            s_t = {n: self._gram(fs[n]) for n in STYLE}
        x = (torch.randn(content.shape) * 0.001).to(self.device).requires_grad_(True)
        opt = torch.optim.LBFGS([x], lr=1, max_iter=steps, tolerance_grad=-1, tolerance_change=-1,
                                history_size=100)
        state = {"n": 0, "t0": time.perf_counter(), "elapsed": 0.0}

        def closure():
            opt.zero_grad()
            f = self._features(x)
            loss = sum(5 * F.mse_loss(f[n], c_t[n]) for n in CONTENT)
            loss = loss + sum(100 * F.mse_loss(self._gram(f[n]), s_t[n]) for n in STYLE)
            tv = (x[..., 1:, :] - x[..., :-1, :]).abs().sum() + (x[..., :, 1:] - x[..., :, :-1]).abs().sum()
            loss = loss + 1e-3 * tv
            loss.backward()
            state["n"] += 1
            if checkpoint is not None and (state["n"] % every == 0 or state["n"] == steps):
                paused = time.perf_counter()
                state["elapsed"] += paused - state["t0"]
                checkpoint(state["n"], state["elapsed"], x.detach().clone())
                state["t0"] = time.perf_counter()
            return loss

        opt.step(closure)
        state["elapsed"] += time.perf_counter() - state["t0"]
        return x.detach(), state["elapsed"] / max(state["n"], 1)
