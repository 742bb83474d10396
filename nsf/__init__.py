"""nsf: Neural Style Fusion, optimization-based neural style transfer (Gatys et al.) in PyTorch."""

from .config import PRESETS, StyleConfig, make_config, preset
from .model import Result, StyleFusion, style_fusion
from .optimize import Progress
from .version import __version__
from .weights import VGG19Weights, WeightsError

__all__ = ["PRESETS", "Progress", "Result", "StyleConfig", "StyleFusion", "VGG19Weights", "WeightsError", "__version__",
           "make_config", "preset", "style_fusion"]
