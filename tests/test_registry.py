"""MLflow's model registry, end to end with the real MLflow (no mocks): export into a temporary
SQLite-backed registry, load by alias, predict, tamper, serve with `mlflow models serve`.

Images are 64 px and runs take 2-3 steps. The registered version is built once per module
(with the TorchServe .mar attached); the tamper test registers its own.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nsf import serving
from nsf.image import encode
from nsf.runtimes.common import load_model_config, stop_group
from nsf.version import __version__
from nsf.weights import CAFFE_FILENAME, VGG19Weights, sha256_file

mlflow = pytest.importorskip("mlflow", reason="the 'mlflow' extra is not installed")
psutil = pytest.importorskip("psutil")
from serving import net_connections, shared_registry  # noqa: E402

from nsf.runtimes import mlflow as registry  # noqa: E402

pytestmark = pytest.mark.slow  # the registry (its .mar, a logged model) and loaded workers

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NAME = "style_fusion"
CONTENT, STYLE = registry._example_images(64)
SMALL = {"size": 64, "steps": 3, "seed": 0}


def use(uri: str) -> None:
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Iterator[tuple[Path, registry.Registered]]:
    """A registry with style_fusion v1 (@champion, .mar attached), exported from an unrelated cwd (once per run:
    tests/serving.py, shared with the contract test)."""
    folder, done, left_in_caller = shared_registry(tmp_path_factory)
    assert left_in_caller == []  # nothing (no ./mlruns) in the caller's working directory
    assert (folder / registry.STORE_FILE).is_file() and (folder / registry.ARTIFACTS_DIR).is_dir()
    yield folder, done


@pytest.fixture(scope="module")
def loaded(store):
    """The version loaded by alias, once: loading starts its worker (warm-up, calibration)."""
    _, done = store
    use(done.tracking_uri)
    return mlflow.pyfunc.load_model(f"models:/{NAME}@champion")


@pytest.fixture(scope="module")
def limits() -> serving.ServingLimits:
    return serving.ServingLimits.from_model_config(load_model_config(REPO / "deploy" / "model-config.yaml"), "cpu")


def test_load_by_alias_gives_the_library_bytes(loaded, limits):
    m = loaded
    out = m.predict({"content": [CONTENT, CONTENT], "style": [STYLE, STYLE]}, params=SMALL)
    hub = torch.hub.load(str(REPO), "style_fusion", source="local", device="cpu")
    result = hub.run(CONTENT, STYLE, **SMALL, max_pixels=limits.max_pixels)
    img = result.pil()
    expected = encode(img, "png", result.metadata)
    # one image per row; the two rows of one size and config run as one batched optimization in the worker (as on
    # the other servers): the same picture up to float rounding, and a single row the library's exact bytes
    import io

    import numpy as np
    from PIL import Image

    assert len(out) == 2 and all(np.abs(np.asarray(Image.open(io.BytesIO(o)), dtype=float) -
                                        np.asarray(img, dtype=float)).mean() < 1.0 for o in out)
    assert m.predict({"content": [CONTENT], "style": [STYLE]}, params=SMALL) == [expected]
    jpeg = m.predict({"content": [CONTENT], "style": [STYLE]}, params={**SMALL, "format": "jpeg"})
    assert jpeg == [encode(img, "jpeg")]


def test_mask_columns_pass_through_to_the_run(loaded, limits):
    """Optional columns mask (and style_mask): the same bytes as the library's masked run; a mask the run
    would refuse is the server's 400 naming its column."""
    import io

    from PIL import Image

    m = loaded
    def left_half(w: int, h: int) -> bytes:
        img = Image.new("L", (w, h), 0)
        img.paste(255, (0, 0, w // 2, h))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    mask, style_mask = left_half(*Image.open(io.BytesIO(CONTENT)).size), left_half(*Image.open(io.BytesIO(STYLE)).size)
    out = m.predict({"content": [CONTENT], "style": [STYLE], "mask": [mask], "style_mask": [style_mask]},
                    params=SMALL)
    hub = torch.hub.load(str(REPO), "style_fusion", source="local", device="cpu")
    result = hub.run(CONTENT, STYLE, masks=[mask], style_masks=[style_mask], **SMALL, max_pixels=limits.max_pixels)
    assert out == [encode(result.pil(), "png", result.metadata)]
    with pytest.raises(serving.RequestError) as got:
        m.predict({"content": [CONTENT], "style": [STYLE], "mask": [encode(Image.new("L", (64, 16)), "png")]},
                  params=SMALL)
    assert (got.value.status, got.value.field) == (400, "mask")


@pytest.mark.parametrize("fields", [
    {"content": CONTENT, "style": STYLE, "size": 5000},
    {"content": CONTENT, "style": STYLE, "steps": 0},
    {"content": CONTENT, "style": STYLE, "preset": "nope"},
    {"content": CONTENT, "style": STYLE, "format": "gif"},
    {"content": CONTENT, "style": STYLE, "style_weights": [0.5, 0.5]},
    {"content": b"not an image", "style": STYLE},
    {"style": STYLE},
])
def test_bad_input_gets_the_servers_error(loaded, limits, fields):
    m = loaded
    with pytest.raises(serving.RequestError) as server:
        serving.parse_request(fields, limits)
    images = {k: [v] for k, v in fields.items() if k in ("content", "style")}
    params = {k: v for k, v in fields.items() if k not in images}
    with pytest.raises(serving.RequestError) as got:
        m.predict(images, params=params)
    assert same(got.value.to_dict(), server.value.to_dict()) and got.value.status == server.value.status


def same(a: dict, b: dict) -> bool:
    """Equal error bodies, object addresses aside (PIL's message names its BytesIO object)."""
    def norm(d):
        return re.sub(r"0x[0-9a-f]+", "0x?", json.dumps(d, default=str))
    return norm(a) == norm(b)


def stored_model(client, version) -> Path:
    """The registered version's model folder in the store's artifacts (not a downloaded copy)."""
    return Path(client.get_model_version_download_uri(NAME, version.version).removeprefix("file://"))


def test_version_carries_sha256s_version_and_metrics(store):
    folder, done = store
    client = mlflow.MlflowClient(done.tracking_uri, done.tracking_uri)
    version = client.get_model_version_by_alias(NAME, "champion")
    assert str(version.version) == done.version == "1"
    tags = version.tags
    assert tags["nsf.version"] == __version__
    assert tags["nsf.weights.sha256"] == VGG19Weights.CAFFE.value.sha256 == done.weights_sha256
    stored = stored_model(client, version)
    assert stored.is_relative_to(folder / registry.ARTIFACTS_DIR)
    mar = stored / "artifacts" / f"{NAME}.mar"
    assert tags["nsf.mar.sha256"] == sha256_file(mar) == done.mar_sha256
    assert (stored / "artifacts" / f"{NAME}.mar.sha256").read_text().split()[0] == done.mar_sha256
    card = json.loads((stored / "artifacts" / f"{NAME}.card.json").read_text())
    assert card["archive"]["sha256"] == done.mar_sha256 and card["weights"]["sha256"] == done.weights_sha256
    metrics, measured = registry.measured_metrics(REPO / "bench" / "RESULTS.md")
    run = client.get_run(version.run_id)
    assert run.data.metrics == metrics
    assert metrics["default_256px_astronaut_starry_night_style_ratio"] <= 0.15
    assert "AMD EPYC" in tags["nsf.measured.on"] == run.data.tags["nsf.measured.on"]
    assert not list(stored.rglob("*.pkl"))  # a model from code: nothing pickled
    requirements = (stored / "requirements.txt").read_text()
    assert f"mlflow=={registry.MLFLOW_VERSION}" in requirements and "torch<3,>=2.14" in requirements
    assert "torch==" in (stored / "constraints.txt").read_text()


def test_tampered_weights_fail_at_load_before_unpickling(tmp_path, monkeypatch):
    done = registry.log_model(tracking_uri=registry.default_tracking_uri(tmp_path), alias="champion", quiet=True)
    client = mlflow.MlflowClient(done.tracking_uri, done.tracking_uri)
    version = client.get_model_version(NAME, done.version)
    stored = stored_model(client, version)
    weights = stored / "artifacts" / CAFFE_FILENAME
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    use(done.tracking_uri)
    with pytest.raises(Exception) as e:  # noqa: B017 - MLflow may wrap it: the sha256 error is in the chain
        mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    chain, err = [], e.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("sha256 mismatch" in text for text in chain), chain
    assert loads == []  # the weights were refused before torch.load read them


# --- the real `mlflow models serve` -----------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, str | None, bytes]:
    req = urllib.request.Request(url + "/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def request(params: dict, content: bytes = CONTENT) -> dict:
    b64 = [base64.b64encode(x).decode("ascii") for x in (content, STYLE)]
    return {"dataframe_split": {"columns": ["content", "style"], "data": [b64]}, "params": params}


@pytest.mark.slow
@pytest.mark.server
def test_mlflow_models_serve(store, tmp_path, limits):
    _, done = store
    port = free_port()
    # both: mlflow.set_registry_uri (log_model, other tests) exports MLFLOW_REGISTRY_URI to children
    env = {**os.environ, "MLFLOW_TRACKING_URI": done.tracking_uri, "MLFLOW_REGISTRY_URI": done.tracking_uri,
           "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/{done.version}", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 180
        while True:
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                seen.setdefault(p.pid, p)
            try:
                with urllib.request.urlopen(url + "/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        listening = {c.laddr.ip for p in seen.values() if p.is_running()
                     for c in net_connections(p) if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}

        use(done.tracking_uri)
        m = mlflow.pyfunc.load_model(f"models:/{NAME}/{done.version}")
        expected = m.predict({"content": [CONTENT], "style": [STYLE]}, params=SMALL)[0]
        status, ctype, body = post(url, request(SMALL))
        assert status == 200, body
        assert base64.b64decode(json.loads(body)["predictions"][0]) == expected

        bad = {**SMALL, "size": 5000}
        status, ctype, body = post(url, request(bad))
        with pytest.raises(serving.RequestError) as server:
            serving.parse_request({"content": CONTENT, "style": STYLE, **bad}, limits)
        assert status == 400 and ctype == "application/json"
        assert json.loads(body) == json.loads(server.value.to_json())  # TorchServe's body, exactly
        status, _, body = post(url, request(SMALL, content=b"not an image"))
        assert status == 400 and json.loads(body)["field"] == "content"

        status, _, body = post(url, request(SMALL))  # still serving
        assert status == 200 and base64.b64decode(json.loads(body)["predictions"][0]) == expected
    finally:
        stop_group(proc, grace=30)
        log.close()
        _, alive = psutil.wait_procs(list(seen.values()), timeout=30)
        for p in alive:
            p.kill()
    assert alive == [], f"left behind: {alive}"
    assert not any(p.info["cmdline"] and str(port) in " ".join(p.info["cmdline"])
                   for p in psutil.process_iter(["cmdline"]))


@pytest.mark.slow
def test_cli_export_defaults_to_a_sqlite_store_in_the_cwd(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(name, None)
    r = subprocess.run([sys.executable, "-m", "nsf", "export", "mlflow", "--alias", "candidate"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "registered models:/style_fusion/1 (@candidate)" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [registry.ARTIFACTS_DIR, registry.STORE_FILE]
    client = mlflow.MlflowClient(registry.default_tracking_uri(tmp_path), registry.default_tracking_uri(tmp_path))
    assert client.get_model_version_by_alias(NAME, "candidate").tags["nsf.version"] == __version__


def test_a_request_over_the_time_limit_is_a_422_before_any_work(loaded):
    """The pyfunc answers through the serving core's worker: time admission (calibrated at load) refuses what
    would outrun the limit with the servers' 422 naming what fits; deadline and stream are request fields."""
    with pytest.raises(serving.RequestError) as got:
        loaded.predict({"content": [CONTENT], "style": [STYLE]}, params={"size": 2048, "steps": 300})
    err = got.value
    assert err.status == 422 and err.field in ("size", "steps") and err.allowed["max"] >= 1, err.to_dict()
    assert "seconds_limit" in err.allowed
    with pytest.raises(serving.RequestError) as got:  # MLflow's server streams nothing for a pyfunc
        loaded.predict({"content": [CONTENT], "style": [STYLE]}, params={**SMALL, "stream": True})
    assert (got.value.status, got.value.field) == (400, "stream")
    with pytest.raises(serving.RequestError) as got:
        loaded.predict({"content": [CONTENT], "style": [STYLE]}, params={**SMALL, "deadline": -1.0})
    assert (got.value.status, got.value.field) == (400, "deadline")
    (out,) = loaded.predict({"content": [CONTENT], "style": [STYLE]}, params={**SMALL, "deadline": 1e-3})
    from nsf.image import read_metadata

    assert read_metadata(out)["partial"]["step"] < SMALL["steps"]
