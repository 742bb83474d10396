"""nsf.studio without a browser: requests from the page's values, the plan line, masks from painted layers, a
job as a stream of updates through the real worker (previews, result, Stop), downloads, session clean-up,
auth parsing and the CLI face. The browser drives the same app in test_studio_browser.py."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from studio_page import MAX_PIXELS, bomb, picture, save, studio_config

from nsf.cli import build_parser
from nsf.image import load_image, read_metadata
from nsf.serving import RequestError, ServingLimits, Worker
from nsf.studio import DOWNLOADS, Studio, masks_from_layers, parse_auth, refusal


@pytest.fixture(scope="module")
def studio(model, tmp_path_factory) -> Studio:
    worker = Worker(ServingLimits.from_model_config(studio_config(), "cpu"), model, response_timeout=900)
    s = Studio(worker, tmp=tmp_path_factory.mktemp("studio-tmp"))
    yield s
    s.close()
    assert not s.tmp.exists()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("studio-files")
    bad = d / "notes.png"
    bad.write_text("not a picture")
    return {"content": save(picture(96, 72, 0), d / "c.png"), "style": save(picture(64, 64, 1, "stripes"), d / "s.png"),
            "style2": save(picture(48, 48, 2), d / "s2.png"), "bad": bad, "bomb": bomb(d / "bomb.png")}


def layer(w: int, h: int, x0: int = 0, x1: int = 0) -> Image.Image:
    """An editor layer painted (opaque) over columns x0..x1."""
    a = np.zeros((h, w, 4), np.uint8)
    a[:, x0:x1] = (224, 64, 42, 255)
    return Image.fromarray(a, "RGBA")


def test_import_nsf_does_not_import_gradio():
    code = "import sys, nsf, nsf.studio, nsf.studio_cli; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_request_fields_are_the_servers(studio, files):
    f = studio.request(str(files["content"]), [str(files["style"]), None, str(files["style2"])], weights=[2, 1, 0.5],
                       preset="fast", size=64.0, steps=5.0, seed=7.0, preserve_color="luminance", style_loss="gram")
    assert f["content"] == files["content"].read_bytes()  # the bytes as given: the worker's checks judge them
    assert f["style_2"] == files["style2"].read_bytes() and "style_3" not in f
    assert f["style_weights"] == "2,0.5"
    assert (f["size"], f["steps"], f["seed"], f["preserve_color"]) == (64, 5, 7, "luminance")
    job = studio.worker.check(f)
    assert job.config.size == 64 and job.config.style_blend_weights == (2.0, 0.5)
    with pytest.raises(RequestError) as e:
        studio.request(None, [str(files["style"])])
    assert e.value.field == "content"
    with pytest.raises(RequestError) as e:
        studio.request(str(files["content"]), [None, None])
    assert e.value.field == "style"


def test_plan_line_before_run(studio, files):
    c, s = str(files["content"]), [str(files["style"])]
    line = studio.plan_line(studio.request(c, s, size=64, steps=8))
    assert line.startswith("**Plan:** 64×48 px, 8 steps over 1 scale") and "predicted peak" in line
    line = studio.plan_line(studio.request(c, s, size=4096))
    assert "Refused (400" in line and "Largest that fits: **size = 128**" in line
    line = studio.plan_line(studio.request(c, s, steps=10_000))
    assert "Refused" in line and "steps = 60" in line
    line = studio.plan_line(studio.request(str(files["bad"]), s))
    assert "Refused (400" in line and "content" in line and "not a readable image" in line
    line = studio.plan_line(studio.request(str(files["bomb"]), s))
    assert "Refused (413" in line and f"at most {MAX_PIXELS} pixels" in line
    assert "Add a content image" not in studio.plan_line(RequestError("x", field="size"))
    with pytest.raises(RequestError) as e:
        studio.request(None, s)
    assert studio.plan_line(e.value) == "*add a content image (upload, drop, paste or webcam).*"


def test_masks_from_layers_soft_and_shared():
    assert masks_from_layers([layer(96, 72), None], 2, (96, 72)) is None
    m1, m2 = masks_from_layers([layer(96, 72), layer(96, 72, 48, 96)], 2, (96, 72))
    a1, a2 = np.asarray(m1) / 255, np.asarray(m2) / 255
    assert a2[:, 60:].min() > 0.95 and a2[:, :36].max() < 0.05  # style 2 where painted
    assert a1[:, :36].min() > 0.95 and a1[:, 60:].max() < 0.05  # style 1 (empty layer): the rest
    edge = a2[36, 40:56]
    assert ((edge > 0.05) & (edge < 0.95)).sum() >= 3  # soft edges
    big = masks_from_layers([None, layer(48, 36, 24, 48)], 2, (960, 720))  # the editor shows a smaller copy
    assert big is not None and big[1].size == (960, 720)
    with pytest.raises(RequestError) as e:
        masks_from_layers([None, None, layer(96, 72, 0, 10)], 2, (96, 72))
    assert e.value.field == "mask_3"


def test_painted_layers_become_the_request_masks(studio, files):
    layers = [None, layer(96, 72, 48, 96)]
    f = studio.request(str(files["content"]), [str(files["style"]), str(files["style2"])], layers=layers, size=64)
    assert {"mask", "mask_2"} <= set(f)
    assert "2 painted regions" in studio.plan_line(f)
    job = studio.worker.check(f)
    assert len(job.masks) == 2 and job.masks[1][..., 60:].min() > 0.95


def test_run_streams_previews_then_the_result(studio, files, tmp_path):
    f = studio.request(str(files["content"]), [str(files["style"])], size=64, steps=6, seed=1, preset="default")
    updates = list(studio.run(f, threading.Event()))
    kinds = [u.kind for u in updates]
    assert kinds[-1] == "result" and "preview" in kinds and "progress" in kinds
    assert kinds.index("preview") < len(kinds) - 1
    assert any("step" in u.text and "loss" in u.text for u in updates if u.kind == "progress")
    done = updates[-1]
    assert not done.partial and "Done" in done.text
    meta = read_metadata(done.png)
    assert meta["seed"] == 1 and meta["params"]["steps"] == 6
    sizes = {}
    for fmt in DOWNLOADS:
        path = studio.save(done, fmt, session="s1")
        data = path.read_bytes()
        sizes[fmt] = load_image(data).size
        if fmt.startswith("PNG"):
            assert read_metadata(data)["seed"] == 1
        if fmt == "PNG 16-bit":
            assert data[24] == 16 and read_metadata(data)["bit_depth"] == 16
        if fmt == "JPEG":
            assert data[:2] == b"\xff\xd8"
    assert set(sizes.values()) == {(64, 48)}
    with pytest.raises(RequestError):
        studio.save(done, "GIF")


def test_stop_returns_the_best_image_so_far(studio, files):
    f = studio.request(str(files["content"]), [str(files["style"])], size=96, steps=40)
    stop = threading.Event()
    updates = []
    for u in studio.run(f, stop):
        updates.append(u)
        if u.kind == "progress" and "step" in u.text:
            stop.set()  # Stop
    done = updates[-1]
    assert done.kind == "result" and done.partial and "Partial result" in done.text
    meta = read_metadata(done.png)
    assert meta["partial"]["step"] < meta["partial"]["total"] == 40


def test_a_refused_run_never_starts(studio, files):
    f = studio.request(str(files["content"]), [str(files["style"])], size=4096)
    *before, u = list(studio.run(f, threading.Event()))
    assert not [b for b in before if b.kind == "preview" or "step" in b.text]
    assert u.kind == "error" and u.status == 400 and u.error["field"] == "size" and "Largest that fits" in u.text


def test_one_job_at_a_time(studio, files):
    f = studio.request(str(files["content"]), [str(files["style"])], size=48, steps=2)
    with studio.lock:  # another job holds the device
        run = studio.run(f, threading.Event())
        first = next(run)
    assert first.kind == "queued" and "Waiting for the device" in first.text
    assert list(run)[-1].kind == "result"


def test_forget_removes_the_sessions_files(studio, files, tmp_path):
    upload = tmp_path / "upload.png"
    upload.write_bytes(files["content"].read_bytes())
    inside = studio.tmp / "gradio" / "u.png"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_bytes(files["content"].read_bytes())
    studio.request(str(inside), [str(files["style"])], session="tab")
    background, why = studio.editor_background(str(inside), "tab")
    assert why is None and background.is_file()
    assert studio.forget("tab") == 2
    assert not inside.exists() and not background.exists()
    assert upload.exists()  # only files in the app's temp folder are removed
    _, why = studio.editor_background(str(files["bomb"]), "tab")
    assert "413" in why


def test_refusal_text():
    e = RequestError("size=900 would not fit", field="size", allowed={"min": 16, "max": 512}, status=422)
    assert refusal(e) == ("**Refused (422 Unprocessable Entity):** size=900 would not fit. Largest that fits: "
                          "**size = 512**.")


def test_parse_auth(tmp_path):
    assert parse_auth(None, None) is None
    assert parse_auth("ann:secret:with:colons", None) == [("ann", "secret:with:colons")]
    f = tmp_path / "users"
    f.write_text("# logins\nann:one\n\nbob:two\n")
    assert parse_auth("carl:three", f) == [("carl", "three"), ("ann", "one"), ("bob", "two")]
    for bad in ("nopassword", "ann:", ":pw"):
        with pytest.raises(ValueError, match="user:password"):
            parse_auth(bad, None)


def test_cli_face():
    args = build_parser().parse_args(["studio", "--model-config", "x.yaml", "--auth", "a:b"])
    assert (args.host, args.port, args.model_config, args.auth) == ("127.0.0.1", 7860, "x.yaml", "a:b")


def test_the_page_builds(studio):
    from nsf.studio import build_app

    app = build_app(studio)
    ids = {b.elem_id for b in app.blocks.values() if getattr(b, "elem_id", None)}
    assert {"content", "style-1", "style-2", "size", "steps", "seed", "preset", "preserve-color", "style-loss",
            "editor", "plan", "run", "stop", "status", "preview", "result", "download", "provenance",
            "gallery", "video-clip", "video-style", "video-size", "video-steps", "video-later-steps",
            "video-temporal-weight", "video-plan", "video-run", "video-stop", "video-status", "video-preview",
            "video-result", "video-download"} <= ids


def test_video_tab_streams_frames_then_the_mp4_and_stop_ends_it(studio, files, tmp_path):
    """The Video tab's job: the same worker path as a server's video request (frames arrive as previews, then the
    MP4 to download); Stop after the first frame ends it between frames with no file."""
    pytest.importorskip("av")
    pytest.importorskip("cv2")
    import av
    from test_video import make_clip

    clip = make_clip(tmp_path / "clip.mp4", n=3, size=(36, 48))
    with pytest.raises(RequestError) as e:
        studio.video_request(None, str(files["style"]))
    assert e.value.field == "video" and "add a" in studio.plan_line(e.value)
    f = studio.video_request(str(clip), str(files["style"]), size=32.0, steps=2.0, later_steps=1.0,
                             temporal_weight=100.0, session="v1")
    assert f["video"] == clip.read_bytes() and (f["size"], f["later_steps"]) == (32, 1)
    assert studio.plan_line(f).startswith("**Plan:** 3 frames of 48×36")
    updates = list(studio.run(f, threading.Event()))
    frames = [u for u in updates if u.kind == "preview"]
    assert [u.text.split()[1] for u in frames] == ["1/3", "2/3", "3/3"] and frames[0].preview.size == (32, 24)
    done = updates[-1]
    assert done.kind == "result" and done.video is not None and "3 frames" in done.text
    path = studio.save_video(done, session="v1")
    with av.open(str(path)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 3

    stop = threading.Event()
    seen = []
    for u in studio.run(f, stop):
        seen.append(u)
        if u.kind == "preview":
            stop.set()  # Stop pressed once the first frame is shown
    assert seen[-1].kind == "error" and seen[-1].status == 499 and "Stopped" in seen[-1].text
    assert sum(u.kind == "preview" for u in seen) == 1
