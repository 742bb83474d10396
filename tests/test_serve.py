"""End to end: `nsf serve` runs a real TorchServe (Java frontend + Python worker) on free loopback
ports with token authorization on; real HTTP requests go through it.

Images are 64-96 px and runs take 2-4 steps, so each request costs about a second on a small CPU.
Every server is stopped in a finalizer (also when a test fails) and no java or worker process of
it may be left behind.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from serving import (
    BIN,
    CONTENT,
    NAME,
    REPO,
    STYLE,
    STYLE2,
    Server,
    free_port_block,
    running_server,
    shared_store,
)

from nsf.image import read_metadata
from nsf.runtimes.torchserve import effective_properties, wait_ready
from nsf.weights import VGG19Weights

pytest.importorskip("ts", reason="TorchServe (the 'serve' extra) is not installed")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("TorchServe needs Java 17 and there is no java here", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    return shared_store(tmp_path_factory)  # built once per test run


@pytest.fixture(scope="module")
def server(store, tmp_path_factory) -> Iterator[Server]:
    with running_server(store, tmp_path_factory.mktemp("serve")) as s:
        yield s


# --- tests ------------------------------------------------------------------------------------


def test_calls_without_the_token_are_refused(server):
    for key in (None, "wrong-key"):
        assert 400 <= server.request("/ping", key=key).status < 500
        r = server.multipart({"content": CONTENT, "style": STYLE, "size": "64", "steps": "2"}, key=key)
        assert 400 <= r.status < 500 and b"InvalidKeyException" in r.body
    assert server.request("/ping").json()["status"] == "Healthy"


def test_nsf_serve_prints_how_to_call_and_when_ready(server):
    key_file = server.workdir / "key_file.json"
    assert key_file.stat().st_mode & 0o077 == 0  # the keys are the caller's alone
    deadline = time.monotonic() + 30
    while f"{NAME} is ready" not in (log := (server.workdir / "nsf-serve.log").read_text()) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert f"{NAME} is ready" in log
    assert str(key_file) in log and "Authorization: Bearer" in log and f"{server.url}/predictions/{NAME}" in log


def test_multipart_request(server):
    r = server.multipart({"content": CONTENT, "style": STYLE, "style_2": STYLE2, "style_weights": "0.6,0.4",
                          "size": "96", "steps": "4", "seed": "5"})
    assert r.status == 200, r.body[:500]
    assert r.content_type == "image/png"
    img = Image.open(io.BytesIO(r.body))
    assert img.format == "PNG" and img.size == (96, 72)
    meta = read_metadata(r.body)
    assert meta["weights_sha256"] == VGG19Weights.CAFFE.value.sha256
    assert meta["seed"] == 5 and meta["params"]["steps"] == 4 and meta["params"]["style_blend_weights"] == [0.6, 0.4]


def test_json_request_jpeg(server):
    body = {"content": base64.b64encode(CONTENT).decode(), "style": base64.b64encode(STYLE).decode(),
            "size": 64, "steps": 2, "preserve_color": True, "format": "jpeg"}
    r = server.json(f"/predictions/{NAME}", body)
    assert r.status == 200, r.body[:500]
    assert r.content_type == "image/jpeg"
    img = Image.open(io.BytesIO(r.body))
    assert img.format == "JPEG" and img.size == (64, 48)


def test_a_masked_multipart_request(server):
    """Regional styles: mask and mask_2 as multipart files, one half each."""
    left, right = Image.new("L", (96, 72), 0), Image.new("L", (96, 72), 255)
    left.paste(255, (0, 0, 48, 72))
    right.paste(0, (0, 0, 48, 72))
    masks = {}
    for name, img in (("mask", left), ("mask_2", right)):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        masks[name] = buf.getvalue()
    r = server.multipart({"content": CONTENT, "style": STYLE, "style_2": STYLE2, **masks, "size": "64", "steps": "2"})
    assert r.status == 200, r.body[:500]
    assert Image.open(io.BytesIO(r.body)).size == (64, 48)


def test_same_request_same_seed_same_image(server):
    fields = {"content": CONTENT, "style": STYLE, "size": "64", "steps": "3", "seed": "9"}
    a, b = server.multipart(fields), server.multipart(fields)
    assert a.status == b.status == 200
    assert a.body == b.body


def test_a_streamed_request_gets_previews_then_the_same_image(server):
    fields = {"content": CONTENT, "style": STYLE, "size": "96", "steps": "6", "seed": "4"}
    status, headers, messages = server.stream({**fields, "stream": "true"})
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    assert headers.get("Transfer-Encoding") == "chunked"  # sent as the run goes, not at its end
    events = [m["event"] for _, m in messages]
    scales = messages[0][1]["scales"]
    assert events == ["preview"] * scales + ["result"] and scales > 1
    # each preview arrived as its scale ended, before the result
    times = [t for t, _ in messages]
    assert times == sorted(times) and times[-1] > times[0]
    final = messages[-1][1]
    assert final["partial"] is False and final["content_type"] == "image/png"
    plain = server.multipart(fields)
    assert plain.status == 200 and base64.b64decode(final["image"]) == plain.body


def test_a_deadline_gives_the_best_image_so_far_marked_partial(server):
    r = server.multipart({"content": CONTENT, "style": STYLE, "size": "96", "steps": "6", "deadline": "0.001"})
    assert r.status == 200 and r.headers["X-NSF-Partial"] == "true"
    assert Image.open(io.BytesIO(r.body)).size == (96, 72) and read_metadata(r.body)["partial"]["step"] < 6


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (6000, 5000)).save(buf, format="PNG")  # 30 MP declared in a ~30 KB file
    return buf.getvalue()


BAD = {
    "missing content": ({"style": STYLE, "size": "64"}, 400, "content"),
    "missing style": ({"content": CONTENT, "size": "64"}, 400, "style"),
    "not an image": ({"content": b"hello, world", "style": STYLE}, 400, "content"),
    "truncated image": ({"content": CONTENT[: len(CONTENT) // 2], "style": STYLE}, 400, "content"),
    "image over the pixel cap": ({"content": _bomb(), "style": STYLE}, 413, "content"),
    "fields over the size limit": ({"content": CONTENT, "style": STYLE, "style_2": b"\0" * (33 * 2**20)}, 413,
                                   "body"),
    "unknown parameter": ({"content": CONTENT, "style": STYLE, "colour": "blue"}, 400, "colour"),
    "size out of range": ({"content": CONTENT, "style": STYLE, "size": "100000"}, 400, "size"),
    "steps out of range": ({"content": CONTENT, "style": STYLE, "steps": "0"}, 400, "steps"),
    "negative weight": ({"content": CONTENT, "style": STYLE, "style_weight": "-3"}, 400, "style_weight"),
    "unknown preset": ({"content": CONTENT, "style": STYLE, "preset": "picasso"}, 400, "preset"),
}


def test_bad_requests_get_4xx_and_the_worker_keeps_serving(server):
    for what, (fields, status, field) in BAD.items():
        r = server.multipart(fields)
        assert r.status == status, (what, r.status, r.body[:300])
        assert r.content_type == "application/json", what
        assert r.json()["field"] == field, (what, r.body[:300])
        assert r.json()["allowed"] is not None, what
    # Over the frontend's max_request_size (40 MiB): TorchServe refuses it from its Content-Length.
    assert server.status_for_length(f"/predictions/{NAME}", 41 * 2**20) == 413
    r = server.json(f"/predictions/{NAME}", {"content": "@@", "style": "@@"})
    assert r.status == 400 and r.json()["field"] in ("content", "style")
    r = server.multipart({"content": CONTENT, "style": STYLE, "size": "64", "steps": "2"})
    assert r.status == 200 and Image.open(io.BytesIO(r.body)).size == (64, 48)


def test_model_management_api_is_off(server):
    mgmt = server.url.rsplit(":", 1)[0] + ":" + str(int(server.url.rsplit(":", 1)[1]) + 1)
    keys = json.loads((server.workdir / "key_file.json").read_text())
    req = urllib.request.Request(f"{mgmt}/models?url=https://example.invalid/evil.mar", data=b"", method="POST",
                                 headers={"Authorization": f"Bearer {keys['management']['key']}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert 400 <= e.value.code < 500


def test_video_request(server, tmp_path):
    """A video request through TorchServe (multipart, the clip as a file field): plain, the MP4 (video/mp4) with
    every frame; streamed, a preview line per frame then the MP4; a clip past the frame limit refused (413)."""
    pytest.importorskip("av")
    import av
    from test_video import make_clip

    clip = make_clip(tmp_path / "clip.mp4", n=3, size=(36, 48)).read_bytes()
    fields = {"video": clip, "style": STYLE, "size": "32", "steps": "2", "later_steps": "1"}
    r = server.multipart(fields)
    assert r.status == 200 and r.content_type == "video/mp4", r.body[:300]
    with av.open(io.BytesIO(r.body)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 3
    status, _, messages = server.stream({**fields, "stream": "true"})
    events = [m for _, m in messages]
    assert status == 200 and [m["event"] for m in events] == ["frame"] * 3 + ["result"], events[-1]
    with av.open(io.BytesIO(base64.b64decode(events[-1]["video"]))) as c:
        assert sum(1 for _ in c.decode(video=0)) == 3
    bad = server.multipart({**fields, "video": b"\x00" * 100})
    assert bad.status == 400 and json.loads(bad.body)["field"] == "video"


def test_stopping_leaves_no_process_behind(server):
    assert server.processes(), "the server's processes should be found while it runs"
    server.stop()
    deadline = time.monotonic() + 30
    while server.processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.processes() == []
    assert not (server.workdir / "key_file.json").exists()


def test_kservev2_envelope(store, tmp_path):
    """TS_SERVICE_ENVELOPE=kservev2 (with enable_envvars_config=true in config.properties)."""
    with running_server(store, tmp_path / "kserve", env={"TS_SERVICE_ENVELOPE": "kservev2"}) as server:
        inputs = [{"name": "content", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(CONTENT).decode()]},
                  {"name": "style", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(STYLE).decode()]},
                  {"name": "size", "datatype": "INT64", "shape": [1], "data": [64]},
                  {"name": "steps", "datatype": "INT64", "shape": [1], "data": [2]}]
        r = server.json(f"/v2/models/{NAME}/infer", {"id": "req-1", "inputs": inputs})
        assert r.status == 200, r.body[:500]
        out = r.json()
        assert out["id"] == "req-1" and out["model_name"] == NAME
        (output,) = out["outputs"]
        assert output["name"] == "image" and output["datatype"] == "BYTES"
        img = Image.open(io.BytesIO(base64.b64decode(output["data"][0])))
        assert img.format == "PNG" and img.size == (64, 48)
        r = server.json(f"/v2/models/{NAME}/infer", {"inputs": inputs[:1]})
        assert r.status == 400 and r.json()["outputs"][0]["data"][0]["field"] == "style"
        r = server.json(f"/v2/models/{NAME}/infer", {"inputs": "not a list"})
        assert r.status == 400
        assert server.json(f"/v2/models/{NAME}/infer", {"inputs": inputs}, key=None).status in (400, 401, 403)
        assert server.json(f"/v2/models/{NAME}/infer", {"inputs": inputs}).status == 200
    assert server.processes() == []


def test_kserve_config_serves_v2_without_a_token(store, tmp_path):
    """deploy/kserve/config.properties as KServe's runtime starts it (model_snapshot, kservev2 envelope,
    token auth off behind the wrapper), on loopback ports, with the test's model store."""
    port = free_port_block()
    text, _ = effective_properties(REPO / "deploy" / "kserve" / "config.properties", port)
    text = text.replace("http://0.0.0.0:", "http://127.0.0.1:").replace("/mnt/models/model-store", str(store))
    work = tmp_path / "kserve-runtime"
    (work / "tmp").mkdir(parents=True)
    (work / "config.properties").write_text(text)
    env = {**os.environ, "TMPDIR": str(work / "tmp"), "TEMP": str(work / "tmp"), "LOG_LOCATION": str(work / "logs"),
           "METRICS_LOCATION": str(work / "logs"), "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("TS_SERVICE_ENVELOPE", None)
    with open(work / "torchserve.log", "wb") as log:
        proc = subprocess.Popen([str(BIN / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config",
                                 str(work / "config.properties"), "--model-store", str(store)], cwd=work, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        server = Server(f"http://127.0.0.1:{port}", "", proc, work)
        try:
            no_keys = {"inference": {"key": ""}, "management": {"key": ""}}
            try:
                wait_ready(server.url, no_keys, f"http://127.0.0.1:{port + 1}", timeout=180, proc=proc)
            except (RuntimeError, TimeoutError) as e:
                raise AssertionError(f"{e}\n{(work / 'torchserve.log').read_text()[-4000:]}") from None
            assert not (work / "key_file.json").exists()
            inputs = [{"name": "content", "datatype": "BYTES", "shape": [1],
                       "data": [base64.b64encode(CONTENT).decode()]},
                      {"name": "style", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(STYLE).decode()]},
                      {"name": "size", "datatype": "INT64", "shape": [1], "data": [64]},
                      {"name": "steps", "datatype": "INT64", "shape": [1], "data": [2]}]
            r = server.json(f"/v2/models/{NAME}/infer", {"inputs": inputs}, key=None)
            assert r.status == 200, r.body[:500]
            (output,) = r.json()["outputs"]
            assert Image.open(io.BytesIO(base64.b64decode(output["data"][0]))).size == (64, 48)
        finally:
            server.stop()
    assert server.processes() == []
