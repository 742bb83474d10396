"""Regional styles with masks (issue 13): each region takes its own style's statistics, a mask of ones is the
single-style run, soft edges leave no seam, style masks pick where a style's statistics come from, and bad
masks get errors that name the field and what is allowed. Core math equality with tiles: tests/test_tiling.py."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import FAST, smooth_image
from PIL import Image
from torch.testing import assert_close

from nsf import losses
from nsf import optimize as O
from nsf.errors import ConfigError, ImageError
from nsf.image import load_mask

H = W = 64
LAYERS = ("relu1_1", "relu2_1", "relu3_1")
RUN = {"size": 64, "steps": 20, "scales": (1.0,), "scale_steps": (1.0,), "tol": 0.0, "seed": 0,
       "style_layers": LAYERS, "content_layers": ("relu3_1",)}


def stripes(h: int = H, w: int = W) -> torch.Tensor:
    """Red and black vertical stripes, 2 px each: all high frequency and red."""
    s = torch.zeros(1, 3, h, w)
    s[:, 0, :, (torch.arange(w) % 4) < 2] = 1.0
    return s


def calm(h: int = H, w: int = W) -> torch.Tensor:
    """A smooth blue-green field: no high frequency, no red."""
    s = smooth_image(h, w, seed=3) * 0.3
    s[:, 2] += 0.6
    return s.clamp(0, 1)


def halves(soft: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right masks over the content; ``soft``: the width of a linear ramp between them (px)."""
    x = torch.arange(W, dtype=torch.float32)
    left = ((W / 2 + soft / 2 - x) / max(soft, 1)).clamp(0, 1) if soft else (x < W / 2).float()
    left = left.view(1, 1, 1, W).expand(1, 1, H, W).contiguous()
    return left, 1 - left


def region_distance(model, image: torch.Tensor, mask: torch.Tensor, style: torch.Tensor) -> float:
    """Gram distance (summed over LAYERS, each relative to the style's Gram size) between ``image``'s
    statistics inside ``mask`` and the whole ``style``'s."""
    ext = model.extractor(LAYERS)
    with torch.no_grad():
        fi, fs = ext(image), ext(style)
    total = 0.0
    for n in LAYERS:
        m = torch.nn.functional.adaptive_avg_pool2d(mask, fi[n].shape[-2:])
        g, t = losses.masked_gram(fi[n], m), losses.gram(fs[n])
        total += float(losses.mse_per_image(g, t) / t.pow(2).mean())
    return total


def test_each_region_takes_its_own_styles_statistics(model):
    content = smooth_image(H, W, seed=1)
    left, right = halves()
    out = model.stylize(content, [stripes(), calm()], masks=[left, right], **RUN)
    own = [region_distance(model, out, left, stripes()), region_distance(model, out, right, calm())]
    swapped = [region_distance(model, out, left, calm()), region_distance(model, out, right, stripes())]
    assert own[0] < swapped[0] and own[1] < swapped[1], (own, swapped)
    # and by plain pixels: red stripes on the left, none on the right
    red_l, red_r = out[0, 0, :, 4:28].mean(), out[0, 0, :, 36:60].mean()
    assert red_l > red_r + 0.1


def test_a_mask_of_ones_is_the_single_style_run(model):
    content, style = smooth_image(H, W, seed=1), stripes()
    for loss in ("gram", "mean_cov"):
        opts = {**FAST, "size": H, "steps": 3, "seed": 0, "style_loss": loss}
        plain = model.run(content, style, **opts)
        assert "masks" not in plain.metadata
        masked = model.run(content, style, masks=[torch.ones(1, 1, H, W)], **opts)
        assert_close(masked.image, plain.image, rtol=0, atol=1e-6)
        assert masked.metadata["masks"] == {"masks": 1, "style_masks": 0}  # provenance says it was masked


def test_uncovered_area_keeps_the_content(model):
    """Where no mask reaches, nothing but the content loss acts: that area stays near the content."""
    content = smooth_image(H, W, seed=1)
    left, _ = halves()
    out = model.stylize(content, stripes(), masks=[left], **RUN)
    styled, kept = (out - content)[..., :, :24].abs().mean(), (out - content)[..., :, 44:].abs().mean()
    assert kept < 0.5 * styled, (float(kept), float(styled))


def test_soft_edge_gradient_is_exact_and_leaves_no_seam(model):
    """Across a 16 px soft edge: the analytic gradient matches a float64 central difference along a direction
    that lives on the edge's columns, and the result's column-to-column steps there are no larger than inside
    the regions (no seam)."""
    cfg = O.StyleConfig().replace(**{k: v for k, v in RUN.items() if k != "seed"})
    import copy

    from nsf.vgg import FeatureExtractor
    ext = FeatureExtractor(copy.deepcopy(model.normalize).double(), copy.deepcopy(model.features).double(),
                           tuple(dict.fromkeys((*cfg.content_layers, *cfg.style_layers))))
    left, right = (m.double() for m in halves(soft=16))
    content = smooth_image(H, W, seed=1).double()
    regions = [O.Region(O.style_targets(ext, [stripes().double()], (1.0,), cfg), left),
               O.Region(O.style_targets(ext, [calm().double()], (1.0,), cfg), right)]
    objective = O.Objective(ext, cfg, content, regions)
    x = (content + 0.05 * torch.randn(content.shape, generator=torch.Generator().manual_seed(0),
                                      dtype=torch.float64)).clamp(0, 1).requires_grad_(True)
    loss, _ = objective(x)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    v = torch.zeros_like(x)
    v[..., 24:40] = torch.randn(v[..., 24:40].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 1e-6
    with torch.no_grad():
        fd = (objective(x + eps * v)[0] - objective(x - eps * v)[0]).sum() / (2 * eps)
    assert_close(fd, (grad * v).sum(), rtol=1e-6, atol=0)

    out = model.stylize(content.float(), [stripes(), calm()], masks=[m.float() for m in (left, right)], **RUN)
    steps = (out[..., 1:] - out[..., :-1]).abs().mean(dim=(0, 1, 2))  # (W - 1,) mean step between columns
    edge, inside = steps[26:38].max(), torch.cat([steps[:22], steps[42:]]).max()
    assert edge <= inside, (float(edge), float(inside))


def test_style_masks_pick_where_the_style_comes_from(model):
    """A style image half red, half blue: with a style mask on one half the result takes that half's colour."""
    style = torch.zeros(1, 3, H, W)
    style[0, 0, :, : W // 2] = 0.9
    style[0, 2, :, W // 2:] = 0.9
    left, right = halves()
    content = smooth_image(H, W, seed=1)
    red = model.stylize(content, style, style_masks=[left], **RUN)
    blue = model.stylize(content, style, style_masks=[right], **RUN)
    redness = [float((img[0, 0] - img[0, 2]).mean()) for img in (red, blue)]
    assert redness[0] > redness[1] + 0.2, redness


def test_masks_from_images_and_bad_masks(model, tmp_path):
    content, style = smooth_image(H, W, seed=1), stripes()
    opts = {**FAST, "size": H}
    buf = io.BytesIO()
    Image.new("L", (W, H), 255).save(buf, format="PNG")
    path = tmp_path / "m.png"
    path.write_bytes(buf.getvalue())
    assert torch.equal(load_mask(path), torch.ones(1, 1, H, W))
    assert torch.equal(load_mask(buf.getvalue()), torch.ones(1, 1, H, W))
    model.stylize(content, style, masks=[str(path)], **opts)  # a path, the content's size
    model.stylize(content, style, masks=[torch.ones(H // 2, W // 2)], **opts)  # any size of the same aspect

    def refused(field, match, **kw):
        with pytest.raises(ConfigError, match=match) as e:
            model.stylize(content, kw.pop("styles", style), **opts, **kw)
        assert e.value.field == field and e.value.allowed, e.value
        return e.value

    e = refused("masks", "masks: 2 for 1 style", masks=[torch.ones(H, W)] * 2)
    assert e.allowed == "1, one per style"
    refused("masks", "all zero", masks=[torch.zeros(H, W)])
    refused("masks", "aspect ratio", masks=[torch.ones(H, 2 * W)])
    refused("style_masks", "style_masks: 2 for 1", style_masks=[None, None])
    refused("style_masks", "all zero", style_masks=[torch.zeros(H, W)])
    e = refused("style_loss", "sliced", masks=[torch.ones(H, W)], style_loss="sliced")
    assert e.allowed == ["gram", "mean_cov"]
    with pytest.raises(ImageError) as ie:
        model.stylize(content, style, masks=[torch.full((H, W), 2.0)], **opts)
    assert ie.value.field == "mask 1"
    with pytest.raises(ImageError) as ie:
        model.stylize(content, style, masks=[b"not an image"], **opts)
    assert ie.value.field == "mask 1"


def test_the_plan_counts_the_masks(model):
    from nsf import plan as P

    cfg = model.resolve_config(size=1024)
    a = P.plan(model.costs(cfg), cfg, (1024, 1024), budget=None, in_use=10**9)
    b = P.plan(model.costs(cfg), cfg, (1024, 1024), budget=None, in_use=10**9, masks=2)
    # the last scale's masks at its size, and at the preview term's (the base scale's, 512 px)
    assert b.scales[-1].peak_bytes - a.scales[-1].peak_bytes == 2 * P.MASK_BYTES * (1024 * 1024 + 512 * 512)
    assert b.masks == 2 and model.plan(64, masks=2, timing=False).masks == 2
