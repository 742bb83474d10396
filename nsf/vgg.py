"""VGG-19 feature extraction by layer name (``conv4_2``, ``relu4_2``, ``pool3``...).

The network is torchvision's ``vgg19().features`` layout; the names are computed
from its configuration list (``cfgs["E"]``, :mod:`nsf.layers`) or from the modules themselves, so no index is
written by hand anywhere. torchvision is never imported here: importing it costs more than a second (it loads
``torch._dynamo``), which neither ``import nsf`` nor building a model should pay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from .layers import CONV_LAYERS, VGG19_CFG, VGG19_LAYERS, cfg_layer_names, validate_layers


def vgg19_features(*, device: torch.device | str | None = None) -> nn.Sequential:
    """An untrained VGG-19 ``features`` stack, module for module torchvision's ``vgg19().features`` (the same
    layer types, shapes and key names: a test compares them), built from :data:`VGG19_CFG` without importing
    torchvision (about 1.5-3 s of a run's start-up).

    ReLUs are out-of-place: with torchvision's in-place ReLU a stored ``convX_Y`` output would be overwritten by
    the following ReLU (the seed notebook's bug). ``device="meta"``: no memory and no random initialization, for
    a stack whose weights are loaded next (``load_state_dict(..., assign=True)``).
    """
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out = int(v)
            layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1, device=device), nn.ReLU(inplace=False)]
            channels = out
    return nn.Sequential(*layers)


def layer_names(features: nn.Sequential) -> list[str]:
    """Caffe-style names (``conv1_1``, ``relu1_1``, ..., ``pool5``) for each module of ``features``."""
    names: list[str] = []
    block, conv = 1, 0
    for module in features:
        if isinstance(module, nn.Conv2d):
            conv += 1
            names.append(f"conv{block}_{conv}")
        elif isinstance(module, nn.ReLU):
            names.append(f"relu{block}_{conv}")
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            raise ValueError(f"unexpected module in VGG features: {module!r}")
    return names


class FeatureExtractor(nn.Module):
    """Runs ``normalize`` then VGG-19 only up to the deepest requested layer.

    ``forward(images)`` takes RGB images in [0, 1], ``(B, 3, H, W)``, and returns a dict
    of the requested layers' activations. The truncated stack shares its parameters
    with the full one: building an extractor copies no weights.
    """

    def __init__(self, normalize: nn.Module, features: nn.Sequential, layers: Sequence[str], *,
                 autocast: torch.dtype | None = None, channels_last: bool = False):
        super().__init__()
        self.autocast = autocast  # run the convolutions in this dtype (e.g. bf16); features come out in it
        self.channels_last = channels_last
        validate_layers(list(layers))
        names = layer_names(features)
        deepest = max(names.index(n) for n in layers)
        self.normalize = normalize
        self.body = features[: deepest + 1]
        self._stack = tuple(self.body)  # the same module objects, sliced without building a Sequential
        self._names = names[: deepest + 1]
        self.layers = tuple(dict.fromkeys(layers))
        self._wanted = frozenset(self.layers)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.stage(images)[1]

    def stage(self, x: Tensor, start: int = 0, stop: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Modules ``start..stop`` of :attr:`body` (``stop=None``: to the end) on ``x``: ``(their output, the
        requested layers' activations among them)``. At ``start=0`` ``x`` is the images in [0, 1] (normalized
        here); else a previous stage's output. ``stage(x, 0, k)`` then ``stage(out, k)`` computes what
        ``forward(x)`` does, op for op (exact tiled steps keep the second stage's graph, :mod:`nsf.tiling`)."""
        if start == 0:
            x = self.normalize(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        out: dict[str, Tensor] = {}
        stop = len(self._names) if stop is None else stop
        # no cast-weight cache: it would hold tensors across steps, which a captured CUDA graph must not
        with torch.autocast(x.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None,
                            cache_enabled=False):
            for name, module in zip(self._names[start:stop], self._stack[start:stop]):
                x = module(x)
                if name in self._wanted:
                    out[name] = x
        # features stay in the autocast dtype: losses.gram and the MSEs sum them in float32
        return x, out

    def for_layers(self, layers: Sequence[str]) -> FeatureExtractor:
        """An extractor of the same network (no weights copied), precision and layout for other ``layers``: it runs
        only as deep as they need (a refinement scale that matches shallower layers stops there)."""
        if tuple(dict.fromkeys(layers)) == self.layers:
            return self
        return FeatureExtractor(self.normalize, self.body, layers, autocast=self.autocast,
                                channels_last=self.channels_last)

    @property
    def module_names(self) -> tuple[str, ...]:
        """The names of the modules of ``body``, in order (``conv1_1``, ``relu1_1``, ...)."""
        return tuple(self._names)

    @property
    def depth(self) -> int:
        """How many modules of the VGG stack this extractor runs."""
        return len(self._names)


M = TypeVar("M", bound=nn.Module)


def freeze(module: M) -> M:
    """Eval mode, no parameter gradients: the network is fixed, only the pixels move."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


__all__ = [
    "CONV_LAYERS",
    "FeatureExtractor",
    "VGG19_CFG",
    "VGG19_LAYERS",
    "cfg_layer_names",
    "freeze",
    "layer_names",
    "validate_layers",
    "vgg19_features",
]
