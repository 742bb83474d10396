"""The real TorchServe on loopback on a bad day: many clients, a killed worker, requests that would
outrun the timeout, hostile bodies, a tampered archive, and what is bound where.

One server (`guarded`) runs the shipped config with two changes that make the bad day cheap to
reach on a small CPU: responseTimeout 30 s in its model-config.yaml (so admission control refuses
512 px / 300 steps) and a job queue of 2 (TS_JOB_QUEUE_SIZE, so a burst fills it).
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import psutil
import pytest
from PIL import Image
from serving import (
    CONTENT,
    NAME,
    REPO,
    STYLE,
    Reply,
    Server,
    multipart_body,
    png,
    running_server,
    shared_store,
)
from serving import RESPONSE_TIMEOUT as SHARED_TIMEOUT

from nsf.weights import CAFFE_FILENAME, sha256_file

pytest.importorskip("ts", reason="TorchServe (the 'serve' extra) is not installed")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("TorchServe needs Java 17 and there is no java here", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.server]

RESPONSE_TIMEOUT = 30
QUEUE = 2
SMALL = {"content": CONTENT, "style": STYLE, "size": "64", "steps": "2"}


@pytest.fixture(scope="session")
def guarded_store(tmp_path_factory) -> Path:
    """The test run's one .mar (responseTimeout 30 s, calibrated at 64 px / 3 steps: tests/serving.py)."""
    assert SHARED_TIMEOUT == RESPONSE_TIMEOUT
    return shared_store(tmp_path_factory)


@pytest.fixture(scope="module")
def guarded(guarded_store, tmp_path_factory):
    with running_server(guarded_store, tmp_path_factory.mktemp("guarded"),
                       env={"TS_JOB_QUEUE_SIZE": str(QUEUE)}) as server:
        yield server


def _worker_pid(server: Server) -> int:
    (worker,) = server.workers()
    return worker.pid


# --- auth and binding ------------------------------------------------------------------------


def test_only_loopback_is_bound(guarded):
    listening = guarded.listening()
    ports = {port for _, port in listening}
    base = int(guarded.url.rsplit(":", 1)[1])
    assert {base, base + 1, base + 2} <= ports  # inference, management, metrics
    assert listening and all(_loopback(ip) for ip, _ in listening), listening


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # Java lists ::ffff:127.0.0.1


# --- admission control -----------------------------------------------------------------------


def test_a_request_that_would_outrun_the_timeout_is_refused_up_front(guarded):
    start = time.monotonic()
    r = guarded.multipart({"content": CONTENT, "style": STYLE, "size": "512", "steps": "300"})
    assert time.monotonic() - start < 10  # refused, not run until the timeout
    assert r.status == 422, r.body[:300]
    err = r.json()
    assert err["field"] in ("steps", "size")
    assert 1 <= err["allowed"]["max"] < (300 if err["field"] == "steps" else 512)
    assert err["allowed"]["seconds_limit"] == round(0.8 * RESPONSE_TIMEOUT)
    assert "limit" in err["error"] and str(err["allowed"]["max"]) in err["error"]
    assert guarded.multipart(SMALL).status == 200


# --- load --------------------------------------------------------------------------------------


def _fire(server: Server, fields: dict, out: list, timeout: float = 120) -> None:
    start = time.monotonic()
    r = server.multipart(fields, timeout=timeout)
    out.append((r, time.monotonic() - start))


def test_concurrent_clients_all_get_an_answer(guarded):
    """N = 4 x workers clients, 3 requests each: every request gets a 200 or a JSON 503, none hangs."""
    n_clients, per_client = 4 * len(guarded.workers()), 3
    results: list[tuple[Reply, float]] = []

    def client() -> None:
        for _ in range(per_client):
            _fire(guarded, SMALL, results)

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wall = time.monotonic() - start
    assert not any(t.is_alive() for t in threads)
    assert len(results) == n_clients * per_client
    statuses = [r.status for r, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1
    for r, _ in results:
        if r.status == 503:
            assert r.json()["message"]  # TorchServe's JSON, not a dropped connection
        else:
            assert Image.open(io.BytesIO(r.body)).size == (64, 48)
    lat = sorted(t for r, t in results if r.status == 200)
    print(f"\n{n_clients} clients x {per_client}: {statuses.count(200)} x 200, {statuses.count(503)} x 503, "
          f"p50 {statistics.median(lat):.2f} s, p95 {lat[int(0.95 * (len(lat) - 1))]:.2f} s, "
          f"{statuses.count(200) / wall * 60:.1f} answered images/min")


def test_a_burst_over_the_queue_gets_503_not_a_hang(guarded):
    results: list[tuple[Reply, float]] = []
    threads = [threading.Thread(target=_fire, args=(guarded, SMALL, results)) for _ in range(4 * (QUEUE + 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    statuses = [r.status for r, _ in results]
    assert len(statuses) == len(threads) and set(statuses) <= {200, 503}
    assert statuses.count(503) >= 1, statuses  # queue of 2 + 1 running, 12 at once
    assert statuses.count(200) >= 1
    busy = next(r for r, _ in results if r.status == 503)
    assert busy.content_type.startswith("application/json") and busy.json()["code"] == 503


# --- faults ------------------------------------------------------------------------------------


def test_a_worker_killed_mid_request_fails_that_request_and_comes_back(guarded):
    pid = _worker_pid(guarded)
    results: list[tuple[Reply, float]] = []
    # The shared archive's responseTimeout is 30 s: ask admission how many steps fit (300 steps at 512 px are far
    # over it on any CPU here, so this is refused at once) and run that many: several seconds, admitted.
    long = {"content": CONTENT, "style": STYLE, "size": "512", "steps": "300"}
    probe = guarded.multipart(long)
    assert probe.status == 422 and probe.json()["field"] == "steps", probe.body
    long["steps"] = str(probe.json()["allowed"]["max"])
    t = threading.Thread(target=_fire, args=(guarded, long, results))
    t.start()
    worker = psutil.Process(pid)
    deadline = time.monotonic() + 30
    while worker.cpu_percent(interval=0.5) < 50 and time.monotonic() < deadline:
        pass  # wait until the worker is optimizing
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=120)
    assert not t.is_alive()
    (reply, _), = results
    assert reply.status >= 500, reply.status  # the in-flight request is answered with an error
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        workers = guarded.workers()
        if workers and workers[0].pid != pid:
            r = guarded.multipart(SMALL)
            if r.status == 200:
                break
        time.sleep(1)
    else:
        pytest.fail(f"no new worker answered within 180 s\n{guarded.log_text()[-3000:]}")
    assert guarded.workers()[0].pid != pid
    assert guarded.multipart(SMALL).status == 200


def test_worker_memory_stays_bounded_over_requests_at_the_largest_size(guarded):
    """A stream at max_size (512 px, one step each): the worker's RSS levels off."""
    pid = _worker_pid(guarded)
    fields = {"content": png(640, 480, 7), "style": png(512, 512, 8), "size": "512", "steps": "1"}
    rss = []
    for _ in range(6):
        r = guarded.multipart(fields)
        assert r.status == 200, r.body[:300]
        rss.append(psutil.Process(pid).memory_info().rss / 2**20)
    print(f"\nworker RSS (MiB) after each 512 px request: {[round(x) for x in rss]}")
    assert _worker_pid(guarded) == pid
    assert max(rss[2:]) - rss[1] < 64, rss  # after the first requests, no growth beyond noise


# --- hostile input through the real server ----------------------------------------------------


def _bomb_png(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _duplicate_fields() -> tuple[bytes, str]:
    body, ctype = multipart_body({"content": CONTENT, "style": STYLE, "size": "64", "steps": "2"})
    boundary = ctype.split("boundary=")[1]
    extra = f'--{boundary}\r\nContent-Disposition: form-data; name="size"\r\n\r\n99999\r\n'.encode()
    return body.replace(f"--{boundary}--".encode(), extra + f"--{boundary}--".encode()), ctype


HOSTILE_JSON = {
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "NaN and inf": b'{"content": "AAAA", "style": "AAAA", "size": NaN, "steps": Infinity}',
    "huge numbers": json.dumps({"content": base64.b64encode(CONTENT).decode(), "size": 10**400,
                                "style": base64.b64encode(STYLE).decode(), "steps": -(10**30)}).encode(),
    "wrong types": json.dumps({"content": [1, 2], "style": {"b64": 5}, "size": "big", "seed": [None]}).encode(),
    "not base64": json.dumps({"content": "%%%not base64%%%", "style": "@@"}).encode(),
    "unknown fields": json.dumps({"content": base64.b64encode(CONTENT).decode(), "style": "AAAA",
                                  "__class__": 1, "init": "/etc/passwd"}).encode(),
    "bomb": json.dumps({"content": base64.b64encode(_bomb_png(100_000, 100_000)).decode(),
                        "style": base64.b64encode(STYLE).decode()}).encode(),
    "a JSON string": b'"hello"',
    "invalid UTF-8": b"\xff\xfe{" * 100,
}


def test_hostile_bodies_get_4xx_and_the_worker_survives(guarded):
    pid = _worker_pid(guarded)
    url = f"/predictions/{NAME}"
    replies = {what: guarded.request(url, body, "application/json") for what, body in HOSTILE_JSON.items()}
    replies["random bytes"] = guarded.request(url, os.urandom(4096), "application/octet-stream")
    replies["missing style"] = guarded.multipart({"content": CONTENT, "size": "64"})
    replies["truncated JPEG"] = guarded.multipart({"content": CONTENT[:100], "style": STYLE})
    body, ctype = _duplicate_fields()
    replies["duplicate fields"] = guarded.request(url, body, ctype)
    for what, r in replies.items():
        assert 400 <= r.status < 500, (what, r.status, r.body[:300])
        if r.status not in (401, 403, 404):
            assert json.loads(r.body)["error"], what
    assert _worker_pid(guarded) == pid  # no request crashed the worker
    assert guarded.multipart(SMALL).status == 200


# --- integrity ---------------------------------------------------------------------------------


def _tamper(src: Path, dst: Path) -> None:
    """Copy the .mar with one byte of the VGG weights flipped (as a corrupted download or an attacker)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith(CAFFE_FILENAME):
                data = bytearray(data)
                data[len(data) // 2] ^= 0x01
                data = bytes(data)
            zout.writestr(item, data)


def test_a_tampered_archive_does_not_serve(guarded_store, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    _tamper(guarded_store / f"{NAME}.mar", store / f"{NAME}.mar")
    # 1. with the archive's .sha256 beside it, `nsf serve` refuses to start
    shutil.copyfile(guarded_store / f"{NAME}.mar.sha256", store / f"{NAME}.mar.sha256")
    r = subprocess.run([sys.executable, "-m", "nsf", "serve", "--model-store", str(store), "--workdir",
                        str(tmp_path / "w1")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode != 0 and "does not match" in r.stderr + r.stdout
    # 2. with a matching .sha256 (both replaced), the worker checks the weights themselves
    (store / f"{NAME}.mar.sha256").write_text(f"{sha256_file(store / f'{NAME}.mar')}  {NAME}.mar\n")
    with running_server(store, tmp_path / "w2", ready=False) as server:
        deadline = time.monotonic() + 120
        while "sha256 mismatch" not in (log := server.log_text()) and time.monotonic() < deadline:
            time.sleep(1)
        assert "sha256 mismatch" in log and CAFFE_FILENAME in log, log[-3000:]
        # no worker ever loaded the model: no image comes back. TorchServe answers with an error, or, while it
        # is between restarts of the failing worker, keeps the request queued past the client's timeout (seen
        # once on a loaded machine, 2026-12-04): either way, never an image.
        try:
            r = server.multipart(SMALL, timeout=60)
        except TimeoutError:
            return
        assert r.status >= 500 or r.status == 404
        assert not r.body.startswith(b"\x89PNG")
