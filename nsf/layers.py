"""VGG-19's layer names, computed from its configuration list: a table of ints and strings, no torch.

:mod:`nsf.config` validates layer names with these, so importing the options does not import torch;
:mod:`nsf.vgg` builds the network from the same table.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ConfigError

VGG19_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                    512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
"""torchvision's ``cfgs["E"]`` (VGG-19): a convolution's output channels, or ``"M"`` for a max-pool.
A test checks it against torchvision's own list; it is written here so that the layer names need
neither torchvision nor a network."""


def cfg_layer_names(cfg: Sequence[int | str]) -> list[str]:
    """The Caffe-style names (``conv1_1``, ``relu1_1``, ..., ``pool5``) of the stack built from ``cfg``: each
    number is a convolution followed by a ReLU, each ``"M"`` a pool."""
    names: list[str] = []
    block, conv = 1, 0
    for v in cfg:
        if v == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            conv += 1
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
    return names


VGG19_LAYERS: tuple[str, ...] = tuple(cfg_layer_names(VGG19_CFG))
"""Every layer name of VGG-19's feature stack, in network order."""

CONV_LAYERS: tuple[str, ...] = tuple(n for n in VGG19_LAYERS if n.startswith("conv"))


def validate_layers(names: Sequence[str], what: str = "layer", *, field: str = "layers") -> None:
    """Raise :class:`~nsf.errors.ConfigError` naming any unknown layer and listing the valid ones.

    ``field`` is the option the names came from (``style_layers``...), for the error's ``field``.
    """
    unknown = [n for n in names if n not in VGG19_LAYERS]
    if unknown:
        raise ConfigError(
            f"unknown VGG-19 {what} name(s) {', '.join(map(repr, unknown))}; "
            f"valid names: {', '.join(VGG19_LAYERS)}", field=field, value=tuple(names), allowed=list(VGG19_LAYERS))
    if not names:
        raise ConfigError(f"at least one {what} name is needed; valid names: {', '.join(VGG19_LAYERS)}",
                          field=field, value=tuple(names), allowed=list(VGG19_LAYERS))
