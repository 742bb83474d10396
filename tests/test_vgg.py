"""nsf.vgg: layer names computed from the modules, truncation, conv outputs kept apart from ReLUs."""

from __future__ import annotations

import pytest
import torch
from conftest import smooth_image
from torch import nn
from torch.testing import assert_close

from nsf import vgg


def test_vgg19_layers_names_and_count():
    names = vgg.VGG19_LAYERS
    assert len(names) == 37
    assert names[:5] == ("conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1")
    assert names[-3:] == ("conv5_4", "relu5_4", "pool5")
    assert len(set(names)) == 37
    # VGG-19: 2, 2, 4, 4, 4 convolutions per block, 16 in all, one ReLU after each, 5 pools.
    for block, n_conv in zip(range(1, 6), (2, 2, 4, 4, 4), strict=True):
        assert [n for n in names if n.startswith(f"conv{block}_")] == [f"conv{block}_{i}" for i in range(1, n_conv + 1)]
    assert vgg.CONV_LAYERS == tuple(n for n in names if n.startswith("conv"))
    assert len(vgg.CONV_LAYERS) == 16
    assert sum(n.startswith("pool") for n in names) == 5


def test_names_are_computed_from_the_modules():
    features = vgg.vgg19_features()
    assert len(features) == len(vgg.VGG19_LAYERS)
    assert vgg.layer_names(features) == list(vgg.VGG19_LAYERS)
    kinds = {"conv": nn.Conv2d, "relu": nn.ReLU, "pool": nn.MaxPool2d}
    for name, module in zip(vgg.VGG19_LAYERS, features, strict=True):
        assert isinstance(module, kinds[name[:4]]), (name, module)
    assert isinstance(features[vgg.VGG19_LAYERS.index("relu4_2")], nn.ReLU)
    assert isinstance(features[vgg.VGG19_LAYERS.index("conv4_2")], nn.Conv2d)
    assert features[vgg.VGG19_LAYERS.index("conv4_2")].out_channels == 512
    assert features[vgg.VGG19_LAYERS.index("conv1_1")].in_channels == 3
    assert features[vgg.VGG19_LAYERS.index("conv3_1")].out_channels == 256


def test_layer_names_need_no_network_and_match_the_real_stack():
    from torchvision.models.vgg import cfgs, make_layers

    assert list(vgg.VGG19_CFG) == list(cfgs["E"])  # nsf's copy of torchvision's VGG-19 list
    assert list(vgg.VGG19_LAYERS) == vgg.layer_names(vgg.vgg19_features())
    for name in ("A", "D"):  # and the names from a list are those of the stack it builds (VGG-11, VGG-16)
        assert vgg.cfg_layer_names(cfgs[name]) == vgg.layer_names(make_layers(cfgs[name]))


def test_the_stack_is_torchvisions_vgg19_features_module_for_module():
    """Built from the layer table without torchvision: the same module types and settings, conv shapes and state
    dict keys as torchvision's vgg19().features, and the same outputs with the same weights (ReLUs out of place)."""
    from torchvision.models import vgg19

    ours, theirs = vgg.vgg19_features(), vgg19(weights=None).features
    assert len(ours) == len(theirs) == 37
    for a, b in zip(ours, theirs, strict=True):
        assert type(a) is type(b)
        if isinstance(a, nn.Conv2d):
            for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                         "padding_mode"):
                assert getattr(a, attr) == getattr(b, attr), attr
            assert a.weight.shape == b.weight.shape and (a.bias is None) == (b.bias is None)
        elif isinstance(a, nn.MaxPool2d):
            for attr in ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"):
                assert getattr(a, attr) == getattr(b, attr), attr
        else:
            assert b.inplace and not a.inplace
    state = theirs.state_dict()
    assert list(ours.state_dict()) == list(state)
    ours.load_state_dict(state)
    x = smooth_image(64, 48, seed=3)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x.clone()))
    meta = vgg.vgg19_features(device="meta")  # for weights loaded next: no memory, no initialization
    assert all(p.is_meta for p in meta.parameters()) and list(meta.state_dict()) == list(state)


def test_import_builds_no_network_and_skips_torchvision():
    # `import nsf` must not build a VGG-19 (nor import torchvision, >1 s) to learn the layer names
    import subprocess
    import sys

    code = ("import sys, torch.nn as nn; calls = []; orig = nn.Conv2d.__init__\n"
            "def spy(self, *a, **k): calls.append(1); orig(self, *a, **k)\n"
            "nn.Conv2d.__init__ = spy\n"
            "import nsf, nsf.config, nsf.cli\n"
            "print(len(calls), 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["0", "False"], out.stdout + out.stderr


def test_relus_are_out_of_place():
    assert all(not m.inplace for m in vgg.vgg19_features() if isinstance(m, nn.ReLU))


def test_layer_names_rejects_unexpected_modules():
    with pytest.raises(ValueError, match="unexpected module"):
        vgg.layer_names(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_unknown_layer_lists_valid_names():
    with pytest.raises(ValueError) as e:
        vgg.validate_layers(["relu4_2", "relu9_9"])
    msg = str(e.value)
    assert "'relu9_9'" in msg
    assert "relu4_2'" not in msg.split("valid names")[0]  # only the bad name is reported as unknown
    for name in ("conv1_1", "relu4_2", "pool5"):
        assert name in msg


def test_empty_layer_list_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        vgg.validate_layers([])


def test_extractor_rejects_unknown_layer(model):
    with pytest.raises(ValueError, match="valid names: conv1_1"):
        vgg.FeatureExtractor(model.normalize, model.features, ["conv6_1"])


@pytest.mark.parametrize("layers", [("relu1_1",), ("conv3_1", "relu2_2"), ("relu4_2", "relu1_1"), ("pool5",)])
def test_extractor_truncates_at_deepest_layer(model, layers):
    ex = vgg.FeatureExtractor(model.normalize, model.features, layers)
    deepest = max(vgg.VGG19_LAYERS.index(n) for n in layers)
    assert ex.depth == deepest + 1
    assert len(ex.body) == deepest + 1
    out = ex(smooth_image(32, 32))
    assert set(out) == set(layers)


def test_extractor_outputs_match_the_full_stack(model):
    x = smooth_image(32, 48, seed=1)
    layers = ("relu1_1", "conv2_1", "relu3_1")
    out = model.extractor(layers)(x)
    h = model.normalize(x)
    expected = {}
    with torch.no_grad():
        for name, module in zip(vgg.VGG19_LAYERS, model.features, strict=True):
            h = module(h)
            if name in layers:
                expected[name] = h.clone()
            if name == "relu3_1":
                break
    for name in layers:
        assert_close(out[name], expected[name])
    assert out["relu3_1"].shape == (1, 256, 8, 12)


def test_conv_outputs_are_not_overwritten_by_relu(model):
    ex = model.extractor(("conv1_1", "relu1_1", "conv4_2", "relu4_2"))
    out = ex(smooth_image(32, 32, seed=2))
    for conv, relu in (("conv1_1", "relu1_1"), ("conv4_2", "relu4_2")):
        assert out[conv].min() < 0, f"{conv} lost its negative values"
        assert out[relu].min() >= 0
        assert_close(out[relu], out[conv].clamp_min(0))
        assert out[conv].data_ptr() != out[relu].data_ptr()


def test_duplicate_layers_are_collapsed(model):
    ex = vgg.FeatureExtractor(model.normalize, model.features, ["relu1_1", "relu1_1", "relu2_1"])
    assert ex.layers == ("relu1_1", "relu2_1")


def test_extractor_shares_parameters_with_full_stack(model):
    ex = model.extractor(("relu4_2",))
    full = dict(model.features.named_parameters())
    for name, p in ex.body.named_parameters():
        assert p.data_ptr() == full[name].data_ptr(), name
    assert ex.normalize is model.normalize
    # Truncation copies no weights: the extractor has a prefix of the full stack's parameters.
    assert sum(p.numel() for p in ex.body.parameters()) < sum(p.numel() for p in model.features.parameters())


def test_model_caches_extractors(model):
    assert model.extractor(("relu1_1", "relu2_1")) is model.extractor(("relu1_1", "relu2_1"))


def test_freeze_turns_off_grads_and_training():
    f = vgg.freeze(vgg.vgg19_features())
    assert not f.training
    assert not any(p.requires_grad for p in f.parameters())


def test_extractor_is_differentiable_wrt_pixels(model):
    x = smooth_image(32, 32).requires_grad_(True)
    model.extractor(("relu2_1",))(x)["relu2_1"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bf16_extractor_returns_bf16_features_close_to_fp32(model):
    x = smooth_image(48, 48, seed=3)
    layers = ("relu1_1", "relu3_1", "relu5_1")
    ref = model.extractor(layers)(x)
    low = vgg.FeatureExtractor(model.normalize, model.features, layers, autocast=torch.bfloat16)(x)
    for n in layers:
        assert low[n].dtype == torch.bfloat16  # summed in float32 by losses.gram / the MSEs
        rel = float((low[n].float() - ref[n]).norm() / ref[n].norm())
        assert 1e-5 < rel < 0.05, (n, rel)  # bf16 really ran, and stays within a few percent


def test_channels_last_extractor_gives_the_same_features(model):
    x = smooth_image(40, 56, seed=4)
    layers = ("relu2_1", "relu4_2")
    ref = model.extractor(layers)(x)
    nhwc = vgg.FeatureExtractor(model.normalize, model.features, layers, channels_last=True)(x)
    for n in layers:
        assert nhwc[n].is_contiguous(memory_format=torch.channels_last)
        assert float((nhwc[n] - ref[n]).norm() / ref[n].norm()) < 1e-5  # the same up to summation order
