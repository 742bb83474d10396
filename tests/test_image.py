"""nsf.image: loading any mode as RGB, refusing bad/huge files early, tensors, sizes, colour, PNG metadata."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import pil_rgb, rgb_array, smooth_image
from PIL import Image, ImageFile
from torch.testing import assert_close

from nsf import image as im


def _png_header_only(width: int, height: int, color_type: int = 2) -> bytes:
    """A PNG that declares ``width x height`` pixels but carries a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


# --- loading: every mode becomes 8-bit RGB ---------------------------------------------------------


def test_grayscale_loads_as_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (20, 18), 77).save(path)
    img = im.load_image(path)
    assert img.mode == "RGB" and img.size == (20, 18)
    assert (np.asarray(img) == 77).all()


def test_rgba_transparent_pixel_becomes_white(tmp_path):
    a = np.zeros((20, 20, 4), np.uint8)
    a[...] = (200, 10, 20, 255)
    a[0, 0] = (10, 20, 30, 0)  # fully transparent
    a[0, 1] = (0, 0, 0, 128)  # half transparent black over white
    path = tmp_path / "rgba.png"
    Image.fromarray(a).save(path)
    out = np.asarray(im.load_image(path))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[5, 5]) == (200, 10, 20)
    assert all(abs(int(v) - 127) <= 1 for v in out[0, 1])


def test_cmyk_loads_as_rgb(tmp_path):
    path = tmp_path / "cmyk.tiff"
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(path)  # no cyan, full magenta+yellow: red
    out = np.asarray(im.load_image(path))
    assert out.shape == (20, 20, 3)
    assert tuple(out[3, 3]) == (255, 0, 0)


@pytest.mark.parametrize(("save_kw", "top"), [({}, (10, 200, 30)), ({"transparency": 1}, (255, 255, 255))])
def test_palette_loads_as_rgb_and_transparency_becomes_white(tmp_path, save_kw, top):
    p = Image.new("P", (20, 20))
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    p.paste(1, (0, 0, 20, 10))
    path = tmp_path / "pal.png"
    p.save(path, **save_kw)
    out = np.asarray(im.load_image(path))
    assert tuple(out[0, 0]) == top
    assert tuple(out[15, 0]) == (0, 0, 0)


def test_16bit_grayscale_is_rescaled_not_clipped(tmp_path):
    a = np.full((20, 20), 65535, np.uint16)
    a[:5] = 32768
    a[5:10] = 0
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(im.load_image(path))
    assert out.dtype == np.uint8
    assert (out[:5] == 128).all()  # 32768 / 65535 * 255 = 127.5
    assert (out[5:10] == 0).all()
    assert (out[10:] == 255).all()


def test_dark_16bit_image_stays_dark(tmp_path):
    # nsf bug: to_rgb guesses the range from the pixel values, so a 16-bit image whose values are
    # all <= 255 (nearly black: 200/65535 is 0.3 %) is read as 8-bit and comes out bright grey (200).
    a = np.full((20, 20), 200, np.uint16)
    path = tmp_path / "dark16.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode == "I;16"
    out = np.asarray(im.load_image(path))
    assert out.max() <= 1  # round(200 / 65535 * 255) = 1


def test_float_image_is_rescaled():
    a = np.linspace(0, 4, 400, dtype=np.float32).reshape(20, 20)
    out = np.asarray(im.load_image(Image.fromarray(a)))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_bytes_and_pil_inputs(tmp_path):
    src = pil_rgb(24, 20, seed=1)
    path = tmp_path / "x.png"
    src.save(path)
    from_bytes = im.load_image(path.read_bytes())
    assert np.array_equal(np.asarray(from_bytes), np.asarray(src))
    assert np.array_equal(np.asarray(im.load_image(src)), np.asarray(src))


def test_unsupported_source_type():
    with pytest.raises(ValueError, match="list"):
        im.load_image([1, 2, 3])  # type: ignore[arg-type]


# --- loading: refusals ----------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "does_not_exist.png"
    with pytest.raises(FileNotFoundError) as e:
        im.load_image(missing)
    assert str(missing) in str(e.value)


def test_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        im.load_image(tmp_path)


def test_text_file_is_refused(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ValueError, match="not a readable image"):
        im.load_image(path)


def test_garbage_bytes_are_refused():
    with pytest.raises(ValueError, match="image bytes"):
        im.load_image(b"\x00\x01 garbage")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_refused(tmp_path, fmt):
    path = tmp_path / f"full.{fmt.lower()}"
    pil_rgb(48, 40, seed=2).save(path, format=fmt)
    data = path.read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt") as e:
        im.load_image(cut)
    assert not isinstance(e.value, im.ImageTooLargeError)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_tiny_image_is_refused(tmp_path):
    path = tmp_path / "one.png"
    Image.new("RGB", (1, 1)).save(path)
    with pytest.raises(ValueError, match="16"):
        im.load_image(path)
    with pytest.raises(ValueError, match="at least 16"):
        im.load_image(Image.new("RGB", (100, 15)))
    im.load_image(Image.new("RGB", (16, 16)))  # the smallest allowed


def test_huge_declared_size_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(100_000, 100_000))
    assert path.stat().st_size < 200
    with pytest.raises(im.ImageTooLargeError) as e:
        im.load_image(path)
    assert isinstance(e.value, ValueError)
    assert "50000000" in str(e.value)


def test_cap_is_checked_on_the_header(tmp_path):
    # 5000x5000 is under PIL's own bomb limit: the refusal comes from nsf's cap, read from the header.
    # Had the pixels been decoded, the 16-byte body would have raised "truncated" instead.
    path = tmp_path / "big.png"
    path.write_bytes(_png_header_only(5000, 5000))
    with pytest.raises(im.ImageTooLargeError, match="25000000 pixels"):
        im.load_image(path, max_pixels=1_000_000)


def test_cap_refuses_without_calling_load(tmp_path, monkeypatch):
    path = tmp_path / "ok.png"
    pil_rgb(64, 64).save(path)

    def no_decode(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(im.ImageTooLargeError, match="4096 pixels"):
        im.load_image(path, max_pixels=4000)


def test_pil_image_over_the_cap():
    with pytest.raises(im.ImageTooLargeError):
        im.load_image(Image.new("RGB", (64, 64)), max_pixels=4000)


def test_cap_above_pils_own_limit_is_honoured(tmp_path, monkeypatch):
    # nsf bug: _open turns PIL's DecompressionBombWarning/Error into ImageTooLargeError, so PIL's
    # global limit (Image.MAX_IMAGE_PIXELS, about 89 M pixels) wins over a larger max_pixels.
    # Scaled down here: PIL's limit 1000 pixels, nsf's cap 5000, an image of 40x40 = 1600 pixels.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "mid.png"
    pil_rgb(40, 40).save(path)
    img = im.load_image(path, max_pixels=5000)
    assert img.size == (40, 40)


def test_image_errors_carry_the_field_and_what_is_allowed(tmp_path):
    """A server maps these to {error, field, allowed} from their attributes, not by parsing the message."""
    png = tmp_path / "ok.png"
    pil_rgb(48, 40).save(png)
    data = png.read_bytes()
    pil_rgb(8, 8).save(png)
    cases = [(b"garbage", 10**6, im.READABLE), (data[: len(data) // 2], 10**6, "a complete image file"),
             (png.read_bytes(), 10**6, "each side at least 16 pixels"),
             (_png_header_only(5000, 5000), 10**6, "at most 1000000 pixels"), (data, 100, "at most 100 pixels")]
    for src, cap, allowed in cases:
        with pytest.raises(im.ImageError) as e:
            im.load_image(src, max_pixels=cap, what="style")
        assert (e.value.field, e.value.allowed) == ("style", allowed), str(e.value)
        assert str(e.value).endswith(f"allowed: {allowed}") or f"allowed: {allowed} (" in str(e.value)
        assert isinstance(e.value, im.ImageTooLargeError) is allowed.startswith("at most")
    with pytest.raises(im.ImageError) as e:
        im.check_tensor(torch.zeros(1, 3, 8, 8), "content")
    assert (e.value.field, e.value.allowed) == ("content", "each side at least 16 pixels")


# --- tensors ----------------------------------------------------------------------------------------


def test_pil_tensor_round_trip_is_exact():
    a = rgb_array(17, 23, seed=3)
    t = im.pil_to_tensor(Image.fromarray(a))
    assert t.shape == (1, 3, 17, 23) and t.dtype == torch.float32
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    assert_close(t[0, :, 4, 5], torch.from_numpy(a[4, 5]).float() / 255)
    assert np.array_equal(np.asarray(im.tensor_to_pil(t)), a)
    assert np.array_equal(np.asarray(im.tensor_to_pil(t[0])), a)


def test_tensor_to_pil_clamps_and_refuses_batches():
    t = torch.tensor([-1.0, 0.5, 2.0]).view(3, 1, 1).expand(3, 2, 2)
    assert tuple(np.asarray(im.tensor_to_pil(t))[0, 0]) == (0, 128, 255)
    with pytest.raises(ValueError, match="batch of 2"):
        im.tensor_to_pil(torch.zeros(2, 3, 4, 4))


def test_check_tensor():
    t = smooth_image(16, 20)
    assert im.check_tensor(t[0]).shape == (1, 3, 16, 20)
    assert im.check_tensor(t) is t
    bad = [
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "dtype"),
        (torch.zeros(1, 1, 16, 16), r"\(1, 1, 16, 16\)"),
        (torch.zeros(16, 16), "shape"),
        (torch.zeros(1, 3, 8, 16), "at least 16"),
        (torch.full((1, 3, 16, 16), float("nan")), "NaN"),
        (torch.full((1, 3, 16, 16), 2.0), "values in"),
        (torch.full((1, 3, 16, 16), -0.5), "values in"),
    ]
    for tensor, needle in bad:
        with pytest.raises(ValueError, match=needle):
            im.check_tensor(tensor)


@pytest.mark.parametrize(
    ("hw", "size", "mode", "expected"),
    [
        ((200, 300), 150, "long_side", (100, 150)),
        ((300, 200), 150, "long_side", (150, 100)),
        ((100, 100), 64, "long_side", (64, 64)),
        ((30, 45), 64, "long_side", (43, 64)),
        ((200, 300), 150, "square", (150, 150)),
        ((10, 1000), 100, "long_side", (1, 100)),
    ],
)
def test_target_size(hw, size, mode, expected):
    assert im.target_size(*hw, size, mode) == expected


def test_resize():
    t = smooth_image(40, 60)
    assert im.resize(t, (40, 60)) is t
    out = im.resize(t, (20, 30))
    assert out.shape == (1, 3, 20, 30)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    # A flat image stays flat.
    flat = torch.full((1, 3, 40, 60), 0.25)
    assert_close(im.resize(flat, (17, 23)), torch.full((1, 3, 17, 23), 0.25))


# --- colour -------------------------------------------------------------------------------------------


def test_yiq_hand_values():
    white = torch.ones(1, 3, 1, 1)
    assert_close(im.rgb_to_yiq(white).flatten(), torch.tensor([1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert_close(im.rgb_to_yiq(red).flatten(), torch.tensor([0.299, 0.596, 0.211]))


def test_yiq_round_trip():
    x = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(7))
    assert_close(im.yiq_to_rgb(im.rgb_to_yiq(x)), x, atol=1e-5, rtol=0)
    assert_close(im.rgb_to_yiq(im.yiq_to_rgb(x)), x, atol=1e-5, rtol=0)


def test_luminance_is_grey_y():
    x = smooth_image(16, 16, seed=8)
    grey = im.luminance(x)
    assert grey.shape == x.shape
    y = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        assert_close(grey[:, c], y)


def test_match_luminance_matches_mean_and_std():
    content = smooth_image(32, 32, seed=9, lo=0.3, hi=0.7)
    style = smooth_image(32, 32, seed=10, lo=0.0, hi=0.4)
    out = im.match_luminance(style, content)
    yc = im.rgb_to_yiq(content)[:, 0]
    assert_close(out[:, 0].mean(), yc.mean(), atol=1e-4, rtol=0)
    assert_close(out[:, 0].std(), yc.std(), atol=1e-3, rtol=0)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])


def test_recolor_keeps_content_chroma_and_output_luminance():
    content = smooth_image(24, 24, seed=11, lo=0.35, hi=0.65)
    output = smooth_image(24, 24, seed=12, lo=0.35, hi=0.65)
    rec = im.recolor(output, content)
    yiq = im.rgb_to_yiq(rec)
    assert_close(yiq[:, 1:], im.rgb_to_yiq(content)[:, 1:], atol=1e-5, rtol=0)
    assert_close(yiq[:, :1], im.rgb_to_yiq(output)[:, :1], atol=1e-5, rtol=0)


def _colour_stats(t):
    flat = t.double().flatten(2)
    mean = flat.mean(-1)
    c = flat - mean.unsqueeze(-1)
    return mean, c @ c.transpose(1, 2) / flat.shape[-1]


def test_match_color_gives_the_style_each_contents_colour_mean_and_covariance():
    content = smooth_image(20, 24, seed=13, batch=2, lo=0.3, hi=0.7)
    style = smooth_image(16, 16, seed=14, lo=0.35, hi=0.65)
    out = im.match_color(style, content)
    assert out.shape == (2, 3, 16, 16) and out.dtype == style.dtype
    assert 0 < float(out.min()) and float(out.max()) < 1  # nothing clipped: the statistics are exact
    mean_o, cov_o = _colour_stats(out)
    mean_c, cov_c = _colour_stats(content)
    assert_close(mean_o, mean_c, atol=1e-6, rtol=0)
    assert_close(cov_o, cov_c, atol=1e-7, rtol=0)
    # the style's structure is kept: a linear map of its colours, the same for every pixel
    flat_s = style.double().flatten(2)[0]
    a = out.double().flatten(2)[0] - mean_c[0].unsqueeze(-1)
    solved = torch.linalg.lstsq((flat_s - flat_s.mean(-1, keepdim=True)).T, a.T).solution
    assert_close((flat_s - flat_s.mean(-1, keepdim=True)).T @ solved, a.T, atol=1e-5, rtol=0)
    # a style whose colours lie on a line (a singular covariance): finite, in range
    line = torch.stack([style[:, 0], 1 - style[:, 0], style[:, 0] * 0 + 0.5], 1)
    out = im.match_color(line, content)
    assert torch.isfinite(out).all() and 0 <= float(out.min()) and float(out.max()) <= 1


# --- PNG metadata --------------------------------------------------------------------------------------


def test_png_metadata_round_trip(tmp_path):
    meta = {"nsf_version": "1.2.3", "weights": "caffe", "weights_sha256": "c347", "seed": 7,
            "params": {"size": 64, "style_layers": ["relu1_1"]}}
    path = tmp_path / "out.png"
    img = pil_rgb(20, 16)
    im.save_png(img, path, meta)
    assert im.read_metadata(path) == meta
    with Image.open(path) as reopened:
        assert reopened.text["seed"] == "7"
        assert reopened.text["weights"] == "caffe"
        assert np.array_equal(np.asarray(reopened.convert("RGB")), np.asarray(img))


def test_encode_png_and_jpeg():
    img = pil_rgb(20, 16, seed=4)
    png = im.encode(img, "png", {"seed": 3, "params": {"steps": 2}})
    assert png.startswith(b"\x89PNG")
    assert im.read_metadata(png) == {"seed": 3, "params": {"steps": 2}}
    assert np.array_equal(np.asarray(im.load_image(png)), np.asarray(img))
    jpg = im.encode(img, "jpeg")
    assert jpg.startswith(b"\xff\xd8")
    assert im.read_metadata(jpg) == {}
    assert im.read_metadata(im.encode(img)) == {}
    with pytest.raises(ValueError, match="'gif'"):
        im.encode(img, "gif")


def test_metadata_with_non_json_values_is_stringified(tmp_path):
    path = tmp_path / "p.png"
    im.save_png(pil_rgb(16, 16), path, {"path": tmp_path, "shape": (1, 2)})
    assert im.read_metadata(path) == {"path": str(tmp_path), "shape": [1, 2]}


# --- 16-bit PNG ---------------------------------------------------------------------------------------


def decode_png16(data: bytes) -> np.ndarray:
    """A reader written here for what encode_png16 writes (16-bit RGB, any of PNG's five row filters)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, color = header[:4]
    assert (depth, color) == (16, 2)
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * 6)
    rows, prev = [], np.zeros(w * 6, np.uint8)
    for line in raw:
        f, cur = line[0], line[1:].astype(np.int32)
        if f == 1:
            out = np.zeros(w * 6, np.int32)
            for i in range(w * 6):
                out[i] = (cur[i] + (out[i - 6] if i >= 6 else 0)) % 256
            cur = out
        elif f == 2:
            cur = (cur + prev) % 256
        else:
            assert f == 0, f"filter {f} not written by encode_png16"
        prev = cur.astype(np.uint8)
        rows.append(prev)
    return np.stack(rows).view(">u2").reshape(h, w, 3).astype(np.int64)


def test_png16_keeps_sixteen_bits_and_the_provenance(tmp_path):
    t = smooth_image(37, 53, seed=3)
    data = im.encode_png16(t, {"seed": 3, "nsf_version": "x", "note": "é"})
    values = decode_png16(data)
    assert (values == (t[0].permute(1, 2, 0) * 65535).round().long().numpy()).all()
    assert len(np.unique(values[..., 0])) > 256  # more levels than 8 bits have
    assert im.read_metadata(data) == {"seed": 3, "nsf_version": "x", "note": "é"}
    path = tmp_path / "o.png"
    im.save_png(t, path, {"seed": 3}, bit_depth=16)
    assert path.read_bytes() == im.encode_png16(t, {"seed": 3})
    img = Image.open(path)  # PIL reads it (as 8-bit RGB)
    assert img.size == (53, 37) and img.text["seed"] == "3"


def test_png_bit_depth_is_checked(tmp_path):
    t = smooth_image(20, 20)
    with pytest.raises(ValueError, match="bit_depth=12; allowed: 8, 16"):
        im.save_png(t, tmp_path / "o.png", {}, bit_depth=12)
    with pytest.raises(ValueError, match="bit_depth=16 needs the float image tensor"):
        im.save_png(im.tensor_to_pil(t), tmp_path / "o.png", {}, bit_depth=16)
    im.save_png(t, tmp_path / "o8.png", {"seed": 1})  # a tensor at 8 bits goes through PIL
    assert Image.open(tmp_path / "o8.png").mode == "RGB"
