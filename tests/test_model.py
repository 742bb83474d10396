"""nsf.model: StyleFusion.stylize()/forward() end to end, on tiny images and a shallow slice of VGG-19."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAST, pil_rgb, random_image, smooth_image
from PIL import Image
from torch.testing import assert_close

import nsf
from nsf import image as im
from nsf.errors import ConfigError
from nsf.weights import WeightsError


def test_tensor_in_tensor_out_keeps_aspect(model):
    content = smooth_image(30, 45, seed=1)  # H=30, W=45
    out = model.stylize(content, random_image(32, 32, seed=2), **{**FAST, "size": 64})
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 3, 43, 64)  # round(30 * 64 / 45) = 43
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    # Portrait content: the long side is the height.
    out = model.stylize(content.transpose(-1, -2), random_image(32, 32, seed=2), **{**FAST, "size": 64})
    assert out.shape == (1, 3, 64, 43)


def test_three_dim_tensor_content(model):
    out = model.stylize(smooth_image(32, 32)[0], smooth_image(32, 32, seed=3)[0], **FAST)
    assert out.shape == (1, 3, 32, 32)


def test_square_resize(model):
    out = model.stylize(smooth_image(30, 45), smooth_image(32, 32, seed=3), **{**FAST, "resize": "square"})
    assert out.shape == (1, 3, 32, 32)


def test_default_layers_and_schedule_end_to_end(model):
    # The default options (relu1_1..relu5_1, relu4_2, L-BFGS, three scales folded into one at 64 px).
    content, style = smooth_image(48, 64, seed=4), random_image(48, 48, seed=5)
    calls = []
    out = model.stylize(content, style, size=64, steps=3, callback=calls.append)
    assert out.shape == (1, 3, 48, 64)
    assert [p.step for p in calls] == [1, 2, 3]
    assert calls[-1].style < calls[0].style


def test_pil_in_pil_out(model):
    out = model.stylize(pil_rgb(45, 30, seed=6), pil_rgb(32, 32, seed=7), **FAST)
    assert isinstance(out, Image.Image)
    assert out.mode == "RGB"
    assert out.size == (32, 21)  # (W, H): round(30 * 32 / 45) = 21


def test_path_and_bytes_inputs_and_metadata(model, tmp_path):
    content_path, style_path = tmp_path / "content.png", tmp_path / "style.jpg"
    pil_rgb(40, 40, seed=8).save(content_path)
    pil_rgb(32, 32, seed=9).save(style_path)
    out = model.stylize(str(content_path), style_path, **FAST, seed=5)
    assert isinstance(out, Image.Image) and out.size == (32, 32)
    meta = model.run(str(content_path), style_path, **FAST, seed=5).metadata
    assert meta["weights"] == "caffe"
    assert meta["weights_sha256"] == model.weights_sha256
    assert meta["seed"] == 5
    assert meta["params"]["steps"] == FAST["steps"]
    assert meta["nsf_version"] == nsf.__version__
    # Bytes give the same image as the path.
    again = model.stylize(content_path.read_bytes(), style_path.read_bytes(), **FAST, seed=5)
    assert np.array_equal(np.asarray(again), np.asarray(out))


def test_same_seed_same_output(model):
    content, style = smooth_image(32, 32, seed=10), random_image(32, 32, seed=11)
    runs = [model.stylize(content, style, **FAST, seed=3) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    # With noise init the seed picks the start image: same seed, same output, twice.
    noisy = [model(content, style, **FAST, init="noise", seed=3) for _ in range(2)]
    assert torch.equal(noisy[0], noisy[1])


def test_noise_init_differs_by_seed(model):
    content, style = smooth_image(32, 32, seed=12), random_image(32, 32, seed=13)
    a = model(content, style, **FAST, init="noise", seed=0)
    b = model(content, style, **FAST, init="noise", seed=1)
    assert not torch.allclose(a, b, atol=1e-2)
    assert (a - content).abs().mean() > 0.1  # it did start from noise
    c = model(content, style, **FAST, init="content", seed=0)
    d = model(content, style, **FAST, init="content", seed=1)
    assert torch.equal(c, d)  # content init: the seed has nothing to draw


def test_stylize_accepts_the_init_option(model):
    # `init` is the StyleConfig option (content or noise) here as everywhere; a start image is init_image.
    content, style = smooth_image(32, 32, seed=12), random_image(32, 32, seed=13)
    result = model.run(content, style, **FAST, init="noise", seed=0)
    assert torch.equal(result.image, model(content, style, **FAST, init="noise", seed=0))
    assert result.metadata["params"]["init"] == "noise"


def test_init_image_path(model, tmp_path):
    init_path = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(init_path)
    opts = {**FAST, "steps": 1, "optimizer": "adam", "lr": 1e-3}
    content, style = smooth_image(32, 32, seed=14), smooth_image(32, 32, seed=15)
    for start in (init_path, Image.open(init_path), init_path.read_bytes()):
        out = model.stylize(content, style, init_image=start, **opts)
        assert_close(out[0, :, 5, 5], torch.tensor([0.0, 0.0, 1.0]), atol=5e-3, rtol=0)
    # `init` has one meaning, the config option: a path there is refused, pointing at init_image
    with pytest.raises(ConfigError, match=r"init='.*init.png'; allowed: content, noise \(a start image is "
                                          r"stylize\(init_image=") as e:
        model.stylize(content, style, **{**opts, "init": str(init_path)})
    assert (e.value.field, e.value.allowed) == ("init", ["content", "noise"])


def test_forward_batch(model):
    content = smooth_image(24, 40, seed=16, batch=2)
    style = random_image(32, 32, seed=17)
    out = model(content, style, **FAST)
    assert out.shape == (2, 3, 24, 40)  # forward keeps the input size
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.allclose(out[0], out[1])


def test_forward_batch_matches_single_images_with_adam(model):
    # Adam's update is elementwise and the batch loss is a sum of per-image losses, so each
    # image of a batch follows the same path as it would alone.
    opts = {**FAST, "steps": 3, "optimizer": "adam", "lr": 0.01}
    content = smooth_image(32, 32, seed=18, batch=2)
    style = random_image(32, 32, seed=19)
    both = model(content, style, **opts)
    for i in range(2):
        assert_close(both[i : i + 1], model(content[i : i + 1], style, **opts), atol=1e-5, rtol=0)


def test_forward_refuses_mismatched_style_batch(model):
    with pytest.raises(ValueError, match="style batch of 2 for a content batch of 3"):
        model(smooth_image(32, 32, batch=3), smooth_image(32, 32, batch=2), **FAST)


def test_multiple_styles_blend(model):
    content = smooth_image(32, 32, seed=20)
    s1, s2 = random_image(32, 32, seed=21), smooth_image(32, 32, seed=22)
    only_s1 = model.stylize(content, s1, **FAST)
    # A zero blend weight drops a style entirely.
    assert torch.equal(model.stylize(content, [s1, s2], **FAST, style_blend_weights=(1.0, 0.0)), only_s1)
    # Only the ratio of the blend weights matters.
    assert_close(model.stylize(content, [s1, s2], **FAST, style_blend_weights=(1.0, 3.0)),
                 model.stylize(content, [s1, s2], **FAST, style_blend_weights=(0.5, 1.5)), atol=1e-5, rtol=0)
    equal = model.stylize(content, [s1, s2], **FAST)
    assert not torch.allclose(equal, only_s1, atol=1e-4)
    with pytest.raises(ValueError, match="2 style images"):
        model.stylize(content, [s1, s2], **FAST, style_blend_weights=(1.0,))


def test_preserve_color_keeps_content_chroma(model):
    content = smooth_image(32, 32, seed=23, lo=0.3, hi=0.7)
    style = random_image(32, 32, seed=24)
    opts = {**FAST, "steps": 3, "style_weight": 100.0}
    out = model.stylize(content, style, **opts, preserve_color=True)
    yiq_out, yiq_content = im.rgb_to_yiq(out), im.rgb_to_yiq(content)
    assert (yiq_out[:, 1:] - yiq_content[:, 1:]).abs().max() < 0.02
    # Without it the random-coloured style's chroma comes through.
    plain = model.stylize(content, style, **opts)
    assert (im.rgb_to_yiq(plain)[:, 1:] - yiq_content[:, 1:]).abs().mean() > \
        (yiq_out[:, 1:] - yiq_content[:, 1:]).abs().mean()


def test_stop_and_previews_through_stylize(model):
    # a deadline: stop once the first scale is done; previews carry the colours of the result
    opts = {"size": 96, "steps": 6, "seed": 0, "preserve_color": True, "style_weight": 100.0}
    content = smooth_image(96, 96, seed=3, lo=0.3, hi=0.7)
    seen, steps = [], []
    first = model.plan((96, 96), **opts).scales[0].steps
    result = model.run(content, random_image(64, 64, seed=4), on_scale=seen.append, callback=steps.append,
                       stop=lambda: len(steps) >= first, **opts)
    # asked before the second scale's first step: it stops there, with its start as the result
    assert result.image.shape[-2:] == (96, 96) and [d.stopped for d in seen] == [False, True] and seen[0].scales == 2
    assert result.partial == {"scale": 2, "scales": seen[0].scales, "step": first, "total": 6}
    assert result.metadata["partial"] == result.partial
    chroma = im.rgb_to_yiq(im.resize(content, seen[0].size))[:, 1:]
    assert (im.rgb_to_yiq(seen[0].image)[:, 1:] - chroma).abs().max() < 0.02  # the content's colours
    again = model.run(content, random_image(64, 64, seed=4), **opts)
    assert again.partial is None and "partial" not in again.metadata


def test_two_threads_on_one_model_each_get_their_own_result(model):
    """Results are values: two different requests on one model from two threads at once each return what their
    serial run returns (image, partial flag, masks, provenance), whatever order the threads end in."""
    import threading

    content, style = smooth_image(48, 48, seed=40), random_image(40, 40, seed=41)
    FAST_LAYERS = {k: v for k, v in FAST.items() if k not in ("size", "steps")}  # noqa: N806
    requests = [dict(size=48, steps=4, seed=1, style_loss="mean_cov", masks=[torch.ones(1, 1, 48, 48)]),
                dict(size=32, steps=5, seed=2, preserve_color="luminance", stop=lambda: True)]
    serial = [model.run(content, style, **FAST_LAYERS, **r) for r in requests]
    got: list = [None, None]
    barrier = threading.Barrier(2)

    def go(i: int) -> None:
        barrier.wait()
        got[i] = model.run(content, style, **FAST_LAYERS, **requests[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for mine, alone in zip(got, serial):
        assert mine is not None
        assert_close(mine.image, alone.image, rtol=0, atol=1e-6)
        assert (mine.partial, dict(mine.masks), mine.plan.content) == (alone.partial, dict(alone.masks),
                                                                        alone.plan.content)
        assert mine.metadata == alone.metadata
    assert got[0].masks["masks"] == 1 and got[0].partial is None and got[0].metadata["params"]["seed"] == 1
    assert got[1].partial is not None and "masks" not in got[1].metadata and got[1].image.shape[-1] == 32
    assert not any(name.startswith("last_") for name in vars(model))  # nothing is left on the model to read back


def test_histogram_color_gives_the_output_the_contents_colours(model):
    """preserve_color="histogram": the style is recoloured to the content's colour statistics before the
    transfer, so an output that takes the style's colours (from noise, style only) takes the content's."""
    content = smooth_image(32, 32, seed=25, lo=0.3, hi=0.7)
    content[:, 2] *= 0.3  # a yellow-ish content
    style = smooth_image(32, 32, seed=26)
    style[:, 0] *= 0.2  # a blue-green style
    opts = {**FAST, "steps": 15, "init": "noise", "content_weight": 0.0}
    results = {mode: model.run(content, style, **opts, preserve_color=mode) for mode in ("off", "histogram")}
    colour = {mode: r.image.mean((2, 3)) for mode, r in results.items()}
    target = content.mean((2, 3))
    assert float((colour["histogram"] - target).abs().max()) < 0.5 * float((colour["off"] - target).abs().max())
    assert results["histogram"].metadata["params"]["preserve_color"] == "histogram"


def test_preserve_color_bools_are_the_old_modes(model):
    content, style = smooth_image(32, 32, seed=27), random_image(32, 32, seed=28)
    luminance = model.run(content, style, **FAST, preserve_color="luminance")
    assert torch.equal(model.stylize(content, style, **FAST, preserve_color=True), luminance.image)
    assert luminance.metadata["params"]["preserve_color"] == "luminance"
    off = model.stylize(content, style, **FAST, preserve_color=False)
    assert torch.equal(off, model.stylize(content, style, **FAST))


@pytest.mark.parametrize("loss", ["mean_cov", "sliced"])
def test_new_style_losses_and_averaging_through_stylize(model, loss):
    content, style = smooth_image(32, 32, seed=29), random_image(40, 40, seed=30)
    result = model.run(content, style, **FAST, style_loss=loss, iterate_average=0.5)
    assert result.image.shape == (1, 3, 32, 32) and torch.isfinite(result.image).all()
    params = result.metadata["params"]
    assert (params["style_loss"], params["iterate_average"]) == (loss, 0.5)


def test_model_level_options_are_defaults(model):
    m = nsf.style_fusion(device="cpu", preset="fast", steps=7)
    assert m.config == nsf.make_config("fast", steps=7)
    assert m.resolve_config().steps == 7
    assert m.resolve_config(steps=2).steps == 2
    assert m.resolve_config("seed").size == 400
    assert m.device == torch.device("cpu")
    # Weights are not copied between models: same values, frozen.
    assert torch.equal(m.features[0].weight, model.features[0].weight)
    assert not any(p.requires_grad for p in m.parameters())


def test_compile_auto_is_eager_on_cpu():
    from nsf.model import _compile_fn

    assert _compile_fn("auto", torch.device("cpu")) is None
    assert _compile_fn(False, torch.device("cuda")) is None
    assert _compile_fn("auto", torch.device("cuda")) is not None
    assert _compile_fn(True, torch.device("cpu")) is not None


@pytest.mark.slow
def test_compiled_matches_eager(model, monkeypatch):
    # torch.compile through the real objective (Inductor on CPU), at 32 px over conv1_1..relu2_1 so
    # compiling costs seconds, not minutes. Adam keeps the path deterministic.
    compiled_modules = []
    real_compile = torch.compile

    def spy(module, *args, **kwargs):
        compiled_modules.append(type(module).__name__)
        return real_compile(module, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    compiled = nsf.style_fusion(device="cpu", compile=True, precision="fp32", channels_last=False)  # as `model`
    opts = {**FAST, "steps": 3, "optimizer": "adam", "lr": 0.02}
    content, style = smooth_image(32, 32, seed=25), random_image(32, 32, seed=26)
    eager = model.stylize(content, style, **opts)
    assert compiled_modules == []  # compile="auto" stays eager on CPU
    out = compiled.stylize(content, style, **opts)
    assert compiled_modules == ["Objective"]
    assert (eager - content).abs().max() > 0.01  # the run did move the pixels
    assert_close(out, eager, atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"steps": -1}, ValueError, "steps=-1"),
        ({"size": 10**6}, ValueError, "size=1000000"),
        ({"size": 4}, ValueError, "size=4"),
        ({"style_layers": ("relu1_1", "relu6_1")}, ValueError, "'relu6_1'"),
        ({"content_layers": ("conv0_1",)}, ValueError, "'conv0_1'"),
        ({"optimizer": "sgd"}, ValueError, "'sgd'"),
        ({"stepz": 3}, ValueError, "stepz"),
        ({"preset": "ultra"}, ValueError, "'ultra'"),
        ({"style_weight": float("nan")}, ValueError, "style_weight=nan"),
    ],
)
def test_bad_options(model, kwargs, error, needle):
    with pytest.raises(error, match=needle):
        model.stylize(smooth_image(32, 32), smooth_image(32, 32), **kwargs)


def test_bad_images(model, tmp_path):
    good = smooth_image(32, 32)
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        model.stylize(missing, good, **FAST)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        model.stylize(good, missing, **FAST)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        model.stylize(good, good, init_image=missing, **FAST)
    bad_tensors = [
        (torch.zeros(1, 1, 32, 32), "shape"),  # one channel
        (torch.zeros(2, 32, 32), "shape"),
        (torch.zeros(3, 32), "shape"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
        (torch.full((1, 3, 32, 32), 255.0), "values in"),  # 0..255 instead of [0, 1]
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "dtype"),
        (torch.zeros(1, 3, 8, 32), "at least 16"),
    ]
    for bad, needle in bad_tensors:
        with pytest.raises(ValueError, match=needle):
            model.stylize(bad, good, **FAST)
        with pytest.raises(ValueError, match=needle):
            model.stylize(good, bad, **FAST)
    with pytest.raises(ValueError, match="no style image"):
        model.stylize(good, [], **FAST)
    with pytest.raises(ValueError, match="list|int"):
        model.stylize(good, 42, **FAST)
    with pytest.raises(im.ImageTooLargeError):
        model.stylize(pil_rgb(64, 64), good, **FAST, max_pixels=1000)


def test_bad_builder_arguments():
    with pytest.raises(ValueError, match="'vgg16'") as e:
        nsf.style_fusion(weights="vgg16", device="cpu")
    assert "'caffe'" in str(e.value) and "'torchvision'" in str(e.value)
    with pytest.raises(FileNotFoundError):
        nsf.style_fusion(weights="/nonexistent/vgg.pth", device="cpu")
    with pytest.raises(ValueError, match="compile=3"):
        nsf.style_fusion(compile=3, device="cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'nope'"):
        nsf.style_fusion(preset="nope", device="cpu")
    with pytest.raises(ValueError, match="steps=0"):
        nsf.style_fusion(steps=0, device="cpu")
    assert issubclass(WeightsError, RuntimeError)


def test_bf16_precision_runs_and_is_recorded():
    model = nsf.style_fusion(device="cpu", precision="bf16")
    assert model.metadata(model.config)["precision"] == "bf16"
    content, style = smooth_image(32, 32, seed=1), smooth_image(32, 32, seed=2)
    out = model.stylize(content, style, **FAST)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 32, 32)
    fp32 = nsf.style_fusion(device="cpu", precision="fp32")
    assert fp32.metadata(fp32.config)["precision"] == "fp32"
    assert float((out - fp32.stylize(content, style, **FAST)).abs().mean()) < 0.05


def test_auto_precision_and_layout_follow_the_cpu(monkeypatch):
    """"auto" runs the network in bf16 and NHWC on a CPU with AMX (where that is the fast path), else fp32 NCHW."""
    for amx in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        model = nsf.style_fusion(device="cpu")
        ext = model.extractor(model.config.layers)
        assert (ext.autocast, ext.channels_last) == ((torch.bfloat16, True) if amx else (None, False))
        assert model.metadata(model.config)["precision"] == ("bf16" if amx else "fp32")
        pinned = nsf.style_fusion(device="cpu", precision="fp32", channels_last=False).extractor(model.config.layers)
        assert (pinned.autocast, pinned.channels_last) == (None, False)


@pytest.mark.parametrize(("kw", "message"), [({"precision": "fp16"}, "precision='fp16'; allowed: auto, fp32, bf16"),
                                             ({"channels_last": "yes"}, "channels_last='yes'; allowed: 'auto'")])
def test_precision_and_layout_options_are_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        nsf.style_fusion(device="cpu", **kw)
