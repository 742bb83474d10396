"""nsf.video: flow, warping, the consistency mask and the temporal loss against known motion; the PyAV edge (audio
copied bit for bit, provenance, every bad input refused with nothing half-written); the driver (streaming, resume,
stop) and ``nsf video``."""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np
import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("cv2")

import av  # noqa: E402
from conftest import FAST, assert_tiled_step_equal, random_image, smooth_image  # noqa: E402
from torch.testing import assert_close  # noqa: E402

import nsf  # noqa: E402
from nsf import cli  # noqa: E402
from nsf import optimize as O  # noqa: E402
from nsf.config import make_config  # noqa: E402
from nsf.errors import ConfigError, ImageError, VideoError  # noqa: E402
from nsf.image import load_image, pil_to_tensor, read_metadata  # noqa: E402
from nsf.vgg import FeatureExtractor  # noqa: E402
from nsf.video import flow as fl  # noqa: E402
from nsf.video import io as vio  # noqa: E402
from nsf.video import synthetic as syn  # noqa: E402

ASSETS = nsf.__path__[0] + "/assets"
STYLE = f"{ASSETS}/starry_night.jpg"
VIDEO_FAST = {**FAST, "size": 48}


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    return pil_to_tensor(load_image(f"{ASSETS}/astronaut.jpg"))


def make_clip(path, n=6, size=(48, 64), fps=10, audio: str | None = None, pts=None):
    """A pan clip with ``n`` frames (H.264) and optionally an audio stream (``"aac"`` or ``"pcm_s16le"``); ``pts``:
    the frames' timestamps in 1/fps (a variable rate if uneven)."""
    src = pil_to_tensor(load_image(f"{ASSETS}/astronaut.jpg"))
    frames = syn.pan(src, n, size, start=(40.0, 80.0), velocity=(5.0, 2.0), scale=3.0) if n else []
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = size[1], size[0], "yuv420p"
        if not n:
            c.start_encoding()  # the header of a video stream with no frames
        a = None
        if audio:
            a = c.add_stream(audio, rate=16000)
            a.layout = "mono"
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f.image[0].mul(255).round().byte().permute(1, 2, 0).numpy().copy(),
                                            format="rgb24")
            vf.pts = pts[i] if pts is not None else i
            for p in v.encode(vf):
                c.mux(p)
        if a is not None:
            samples = int(16000 * max(n, 1) / fps)
            fmt = "fltp" if audio == "aac" else "s16"
            tone = np.sin(np.arange(samples) * 0.07) * 0.2
            data = tone.astype(np.float32) if fmt == "fltp" else (tone * 32767).astype(np.int16)
            for k in range(0, samples, 1024):
                af = av.AudioFrame.from_ndarray(data[None, k:k + 1024], format=fmt, layout="mono")
                af.sample_rate, af.pts, af.time_base = 16000, k, Fraction(1, 16000)
                for p in a.encode(af):
                    c.mux(p)
            for p in a.encode(None):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
    return path


def audio_packets(path):
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.audio[0]) if p.size]


# --- flow, warping, consistency ---------------------------------------------------------------------------------

def test_warp_known_shift():
    """Warping by a constant flow (3, -2) moves the image by exactly that many pixels where the source is inside."""
    img = random_image(20, 24, seed=1)
    flow = np.zeros((20, 24, 2), np.float32)
    flow[..., 0], flow[..., 1] = 3, -2
    out = fl.warp(img, flow)
    assert_close(out[..., 2:, :-3], img[..., :-2, 3:], rtol=0, atol=1e-5)  # float32 grid arithmetic
    # a sub-pixel shift of a linear ramp is exact too (bilinear sampling)
    ramp = torch.linspace(0, 1, 24).view(1, 1, 1, 24).expand(1, 3, 20, 24).contiguous()
    flow[..., 0], flow[..., 1] = 0.25, 0
    assert_close(fl.warp(ramp, flow)[..., :-1], ramp[..., :-1] + 0.25 / 23, rtol=0, atol=1e-6)


def test_dis_flow_recovers_a_known_pan(astronaut):
    clip = syn.pan(astronaut, 3, (96, 128), velocity=(4.0, 2.0), scale=2.0)
    fwd, bwd = fl.Flow("medium").pair(fl.grey(clip[1].image), fl.grey(clip[2].image))
    vis = clip[2].visible
    epe = float(((fl.as_tensor(bwd) - clip[2].backward).pow(2).sum(1, keepdim=True).sqrt() * vis).sum() / vis.sum())
    assert epe < 0.2  # the camera moves right: the picture left, its backward flow is (2, 1) px
    assert_close(fl.as_tensor(fwd)[..., 10:-10, 10:-10].mean((-1, -2)), torch.tensor([[-2.0, -1.0]]), atol=0.1, rtol=0)
    # warping the previous frame by it brings the current frame back, where the mask says it can
    mask = fl.consistency(fwd, bwd)
    assert fl.warping_error(clip[2].image, clip[1].image, bwd, mask) < 2e-4
    with pytest.raises(ConfigError) as e:
        fl.Flow("slowest")
    assert e.value.field == "flow_preset"


def test_consistency_mask_finds_the_disoccluded_region(astronaut):
    """A disc moving 5 px right over a still background: with the true flows the check masks exactly the
    background the disc uncovered (and the disc's rim, a motion boundary); elsewhere it keeps everything. With DIS
    flows it still masks most of the uncovered region."""
    v = (5.0, 0.0)
    clip = syn.moving_object(astronaut, torch.rot90(astronaut, 1, (-2, -1)), 3, (64, 96), velocity=v)
    prev_inside = clip[1].backward.abs().sum(1, keepdim=True) > 0  # frame 1's disc (its backward flow is -v)
    forward = torch.zeros(1, 2, 64, 96)
    forward[:, 0:1][prev_inside], forward[:, 1:2][prev_inside] = v[0], v[1]
    mask = fl.consistency(forward, clip[2].backward)
    hidden = clip[2].visible == 0  # uncovered background
    assert int(hidden.sum()) > 100
    assert float(mask[hidden].max()) == 0  # every disoccluded pixel is masked
    inside = clip[2].backward.abs().sum(1, keepdim=True) > 0
    far = ~hidden & ~inside & ~torch.nn.functional.max_pool2d(inside.float(), 5, 1, 2).bool()
    assert float(mask[far].min()) == 1  # the still background away from the disc is kept
    assert float(mask[inside].mean()) > 0.8  # the disc's interior too (its rim is a motion boundary)
    fwd, bwd = fl.Flow("medium").pair(fl.grey(clip[1].image), fl.grey(clip[2].image))
    assert float((fl.consistency(fwd, bwd)[hidden] == 0).float().mean()) > 0.8
    # a pan's pixels that come from outside the previous frame are masked
    pan = syn.pan(astronaut, 2, (40, 48), velocity=(6.0, 0.0), scale=2.0)
    right = fl.consistency(-pan[1].backward, pan[1].backward)[..., -2:]
    assert float(right.max()) == 0


# --- the temporal loss ------------------------------------------------------------------------------------------

def test_temporal_loss_value_and_gradient():
    target = random_image(12, 10, seed=1)
    c = (random_image(12, 10, seed=2)[:, :1] > 0.3).float()
    loss = fl.temporal_loss(target, c, 7.0)
    x = random_image(12, 10, seed=3, batch=2).requires_grad_(True)
    value = loss(x)
    assert value.shape == (2,)
    assert_close(value, 7.0 * (c * (x - target) ** 2).flatten(1).sum(1) / (3 * 12 * 10))
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert_close(grad, 2 * 7.0 * c * (x - target) / (3 * 12 * 10))  # the closed form
    xd = x.detach().double().requires_grad_(True)
    loss64 = fl.temporal_loss(target.double(), c.double(), 7.0)
    assert torch.autograd.gradcheck(lambda t: loss64(t), (xd,), eps=1e-6, atol=1e-7)  # finite differences
    # at a coarser scale the target and weights are resized to x
    assert loss(random_image(6, 5, seed=4)).shape == (1,)


def test_pixel_loss_is_exact_under_tiling(model):
    """The objective with a pixel term: the tiled step's loss and gradient equal the untiled step's (float64)."""
    cfg = make_config(tv_weight=0.0)
    layers = cfg.layers
    ext = FeatureExtractor(copy.deepcopy(model.normalize).double(), copy.deepcopy(model.features).double(), layers)
    content = random_image(112, 144, seed=1).double()
    style = smooth_image(64, 80, seed=2).double()
    target = random_image(112, 144, seed=5).double()
    weights = (random_image(112, 144, seed=6)[:, :1] > 0.2).double()
    pixel = fl.temporal_loss(target, weights, 50.0)
    targets = O.style_targets(ext, [style], (1.0,), cfg)
    whole = O.Objective(ext, cfg, content, targets, pixel_loss=pixel)
    tiled = O.Objective(ext, cfg, content, targets, tile=(48, 64), pixel_loss=pixel)
    plain = O.Objective(ext, cfg, content, targets)
    assert tiled.tiles > 4
    x = random_image(112, 144, seed=3).double()
    loss, _ = assert_tiled_step_equal(whole, tiled, x)
    assert_close(loss.detach() - plain(x)[0].detach(), pixel(x))  # the term is added once


# --- the PyAV edge ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("audio,suffix", [("aac", ".mp4"), ("pcm_s16le", ".mkv")])
def test_audio_copied_bit_for_bit_and_provenance(model, tmp_path, audio, suffix):
    src = make_clip(tmp_path / f"in{suffix}", n=4, audio=audio)
    out = tmp_path / f"out{suffix}"
    result = model.stylize_video(str(src), STYLE, out=out, later_steps=2, **VIDEO_FAST)
    assert result.out == out and result.frames == 4 and not result.stopped
    info = vio.probe(out)
    assert (info.frames, info.fps, info.codec, info.audio) == (4, Fraction(10), "h264", 1)
    assert audio_packets(out) == audio_packets(src)
    meta = vio.read_video_metadata(out)
    assert meta["video"]["frames"] == [0, 4] and meta["params"]["size"] == 48 and meta["weights_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, out.name])  # no temporary left


def test_frame_range_and_png_dir(model, tmp_path):
    src = make_clip(tmp_path / "in.mp4", n=6, audio="aac")
    out, pngs = tmp_path / "out.mp4", tmp_path / "pngs"
    result = nsf.video.render(model, str(src), STYLE, out=out, png_dir=pngs, frames=(2, 5), later_steps=2,
                              **VIDEO_FAST)
    assert result.frames == 3 and vio.probe(out).frames == 3
    files = sorted(pngs.glob("frame_*.png"))
    assert len(files) == 3
    import cv2

    a = cv2.imread(str(files[1]), cv2.IMREAD_UNCHANGED)
    assert a.dtype == np.uint16 and a.shape == (36, 48, 3)
    assert read_metadata(files[1])["frame"] == 3
    with pytest.raises(VideoError) as e:
        nsf.video.render(model, str(src), STYLE, out=tmp_path / "o2.mp4", frames=(4, 9), **VIDEO_FAST)
    assert e.value.field == "frames"


def bad_inputs(tmp_path):
    good = make_clip(tmp_path / "good.mp4", n=5)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 50)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    audio_only = tmp_path / "tone.m4a"
    with av.open(str(audio_only), "w") as c:
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
        af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        af.sample_rate, af.pts = 16000, 0
        for p in [*a.encode(af), *a.encode(None)]:
            c.mux(p)
    empty = make_clip(tmp_path / "empty.mp4", n=0)
    vfr = make_clip(tmp_path / "vfr.mp4", n=6, fps=30, pts=[0, 1, 2, 5, 6, 12])
    still = tmp_path / "still.png"
    load_image(STYLE).save(still)
    return {"not a video": (text, "video"), "truncated": (truncated, "video"), "no video stream": (audio_only, "video"),
            "zero frames": (empty, "video"), "variable frame rate": (vfr, "video"), "an image": (still, "video")}


def test_bad_inputs_are_refused_with_nothing_written(model, tmp_path):
    cases = bad_inputs(tmp_path)
    out = tmp_path / "out" / "clip.mp4"
    out.parent.mkdir()
    for name, (path, field) in cases.items():
        with pytest.raises(VideoError) as e:
            model.stylize_video(str(path), STYLE, out=out, **VIDEO_FAST)
        assert e.value.field == field, name
        assert "allowed:" in str(e.value) and e.value.allowed, name
    good = tmp_path / "good.mp4"
    with pytest.raises(VideoError) as e:  # past the frame limit
        model.stylize_video(str(good), STYLE, out=out, max_frames=3, **VIDEO_FAST)
    assert e.value.field == "frames" and "at most 3 frames" in str(e.value)
    with pytest.raises(VideoError) as e:  # past the size limit (max_pixels, read from the header; the driver
        vio.probe(good, max_pixels=1000)  # passes the run's max_pixels, which the style image must meet too)
    assert "pixels a frame" in str(e.value) and e.value.field == "video"
    with pytest.raises(ImageError) as e:  # a style that is not an image
        model.stylize_video(str(good), str(tmp_path / "notes.mp4"), out=out, **VIDEO_FAST)
    assert e.value.field == "style 1"
    for bad_out in (tmp_path / "missing" / "clip.mp4", good / "clip.mp4", tmp_path / "clip.avi", tmp_path / "out"):
        with pytest.raises(VideoError) as e:  # an output that cannot be written
            model.stylize_video(str(good), STYLE, out=bad_out, **VIDEO_FAST)
        assert e.value.field == "out", bad_out
    assert list(out.parent.iterdir()) == []  # nothing half-written anywhere
    with pytest.raises(FileNotFoundError):
        model.stylize_video(str(tmp_path / "nowhere.mp4"), STYLE, out=out, **VIDEO_FAST)


def test_frames_from_an_iterable_stream(model, astronaut):
    """The driver reads one source frame ahead of what it has yielded at most: frames stream through."""
    clip = [f.image[0] for f in syn.pan(astronaut, 4, (36, 48), velocity=(5.0, 2.0), scale=3.0)]
    taken = []

    def source():
        for i, f in enumerate(clip):
            taken.append(i)
            yield f

    seen = []
    for f in model.stylize_video(source(), STYLE, later_steps=2, **VIDEO_FAST):
        assert len(taken) == f.index + 1
        seen.append(f)
        assert f.image.shape == (1, 3, 36, 48) and f.total == 0
    assert [f.index for f in seen] == [0, 1, 2, 3]
    assert set(seen[1].timings) >= {"flow", "warp", "stylize"} and "flow" not in seen[0].timings
    with pytest.raises(VideoError):
        list(model.stylize_video(iter([]), STYLE, **VIDEO_FAST))
    with pytest.raises(VideoError):
        list(model.stylize_video(["not a frame"], STYLE, **VIDEO_FAST))


def test_temporal_term_reduces_the_warping_error(model, astronaut):
    """On a pan with its true flow: the temporal loss keeps each later frame closer to the warped previous output
    than the same warm start without it (bench/video.py compares with independent frames at full size)."""
    clip = syn.pan(astronaut, 3, (48, 64), velocity=(6.0, 3.0), scale=3.0)
    opts = {**FAST, "size": 64, "steps": 20}
    frames = [f.image[0] for f in clip]

    def error(weight):
        outs = [f.image for f in model.stylize_video(frames, STYLE, later_steps=8, temporal_weight=weight, **opts)]
        return np.mean([fl.warping_error(outs[t], outs[t - 1], clip[t].backward, clip[t].visible)
                        for t in range(1, len(outs))])

    assert error(200.0) < 0.5 * error(0.0)


# --- resume and stop --------------------------------------------------------------------------------------------

def test_interrupted_run_resumes_from_the_last_written_frame(model, tmp_path):
    src = make_clip(tmp_path / "in.mp4", n=5, audio="aac")
    out = tmp_path / "out.mp4"
    done = []

    def stop():
        return len(done) >= 2

    for f in nsf.video.frames(model, str(src), STYLE, out=out, stop=stop, later_steps=2, **VIDEO_FAST):
        done.append(f)
    assert len(done) == 2 and not out.exists()  # stopped: no clip, the frames so far kept
    work = tmp_path / ".out.mp4.frames"
    kept = sorted(work.glob("frame_*.png"))
    assert len(kept) == 2
    first_bytes = kept[0].read_bytes()
    again = list(nsf.video.frames(model, str(src), STYLE, out=out, later_steps=2, **VIDEO_FAST))
    assert [f.resumed for f in again] == [True, True, False, False, False]
    assert_close(again[1].image, done[1].image, rtol=0, atol=1 / 65535)  # read back from its 16-bit PNG
    assert vio.probe(out).frames == 5 and audio_packets(out) == audio_packets(src)
    assert not work.exists()  # the hidden frame folder goes once the clip is written
    # another run's frames are not mixed in: an error, unless told to start over
    one: list = []
    for f in nsf.video.frames(model, str(src), STYLE, out=out, stop=lambda: len(one) >= 1, **VIDEO_FAST):
        one.append(f)
    assert len(list(work.glob("frame_*.png"))) == 1
    with pytest.raises(VideoError) as e:
        list(nsf.video.frames(model, str(src), STYLE, out=out, **{**VIDEO_FAST, "seed": 1}))
    assert e.value.field == "resume"
    fresh = list(nsf.video.frames(model, str(src), STYLE, out=out, resume=False, later_steps=2,
                                  **{**VIDEO_FAST, "seed": 1}))
    assert not any(f.resumed for f in fresh)
    assert first_bytes  # the first run's frame was a real file


# --- the command line -------------------------------------------------------------------------------------------

def test_cli_video(tmp_path, capsys):
    src = make_clip(tmp_path / "in.mp4", n=3, audio="aac")
    out = tmp_path / "out.mp4"
    flags = ["--size", "48", "--steps", "2", "--scales", "1", "--scale-steps", "1", "--tol", "0",
             "--content-layers", "relu2_1", "--style-layers", "relu1_1,relu2_1", "--precision", "fp32",
             "--no-progress"]
    assert cli.main(["video", str(src), STYLE, "-o", str(out), "--later-steps", "2", "--frames", "1:",
                     "--png-dir", str(tmp_path / "pngs"), *flags]) == 0
    assert "2 frames" in capsys.readouterr().out
    assert vio.probe(out).frames == 2 and len(list((tmp_path / "pngs").glob("frame_*.png"))) == 2
    assert cli.main(["video", str(tmp_path / "in.mp4"), str(src), "-o", str(tmp_path / "x.mp4"), *flags]) == 2
    assert "is not a readable image" in capsys.readouterr().err
    assert cli.main(["video", str(src), STYLE, *flags]) == 2  # no output named
    assert "allowed: -o" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_demo(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert cli.main(["video", "--demo", "-o", str(out), "--size", "32", "--steps", "2", "--scales", "1",
                     "--scale-steps", "1", "--later-steps", "1", "--no-progress"]) == 0
    info = vio.probe(out)
    assert info.frames == 16 and info.fps == 8 and info.audio == 1
