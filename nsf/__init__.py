"""nsf: Neural Style Fusion, optimization-based neural style transfer (Gatys et al.) in PyTorch.

The options (:class:`StyleConfig`, presets) load with the package; the model and its types on first use, so that
``import nsf.config`` (a server's request schema, a CLI's help) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import PRESETS, StyleConfig, make_config, preset
from .version import __version__

if TYPE_CHECKING:
    from .model import Result, StyleFusion, style_fusion
    from .optimize import Progress
    from .weights import VGG19Weights, WeightsError

_LAZY = {"Result": "model", "StyleFusion": "model", "style_fusion": "model", "Progress": "optimize",
         "VGG19Weights": "weights", "WeightsError": "weights"}

__all__ = ["PRESETS", "Progress", "Result", "StyleConfig", "StyleFusion", "VGG19Weights", "WeightsError", "__version__",
           "make_config", "preset", "style_fusion"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nsf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
