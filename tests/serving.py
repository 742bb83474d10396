"""Helpers to run a real TorchServe (`nsf serve`) or KServe model server (`nsf serve --runtime kserve`) on
free loopback ports and talk to it over HTTP.

Shared by the end-to-end tests and bench/load.py. Every server is stopped by ``running_server``'s
exit (also when a test fails); ``Server.processes()`` finds what it started by its work folder.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

from nsf.runtimes.common import stop_group
from nsf.runtimes.torchserve import wait_ready

REPO = Path(__file__).resolve().parents[1]
NAME = "style_fusion"
BIN = Path(sys.executable).parent


def net_connections(p: psutil.Process) -> list:
    """A process's inet sockets: ``net_connections`` (psutil 6+) or ``connections`` (5.x, which kserve 0.21 pins)."""
    method = getattr(p, "net_connections", None) or p.connections
    return method(kind="inet")


def free_port_block(n: int = 5) -> int:
    """A port P with P..P+n-1 all free on 127.0.0.1 (the five listeners `nsf serve --port P` opens)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 45000)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports")


def png(w: int, h: int, seed: int = 0) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


CONTENT, STYLE, STYLE2 = png(96, 72, 0), png(64, 64, 1), png(48, 48, 2)


def multipart_body(fields: dict[str, bytes | str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        if isinstance(value, bytes):
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n")
            parts.append(f"--{boundary}\r\n{head}".encode() + value + b"\r\n")
        else:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def stream_lines(url: str, path: str, body: bytes, headers: dict[str, str], timeout: float = 300,
                 hang_up_after: int | None = None) -> tuple[int, Any, list[tuple[float, dict]]]:
    """POST and read the NDJSON answer as it comes: ``(status, headers, [(seconds after sending, message)])``;
    ``hang_up_after=n`` closes the connection after n messages (a client that goes away)."""
    import http.client

    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    start = time.monotonic()
    conn.request("POST", path, body, headers)
    r = conn.getresponse()
    messages: list[tuple[float, dict]] = []
    try:
        while r.status == 200 and (hang_up_after is None or len(messages) < hang_up_after):
            line = r.readline()
            if not line:
                break
            if line.strip():
                messages.append((time.monotonic() - start, json.loads(line)))
        if r.status != 200:
            messages.append((time.monotonic() - start, json.loads(r.read())))
    finally:
        conn.close()
    return r.status, r.headers, messages


@dataclass
class Reply:
    status: int
    content_type: str | None
    body: bytes
    headers: Any = None  # the response's headers (case-insensitive lookup)

    def json(self):
        return json.loads(self.body)


@dataclass
class Server:
    url: str
    key: str
    proc: subprocess.Popen
    workdir: Path

    def request(self, path: str, data: bytes | None = None, content_type: str | None = None,
                key: str | None = "default", timeout: float = 300) -> Reply:
        headers = {}
        if key is not None:
            headers["Authorization"] = f"Bearer {self.key if key == 'default' else key}"
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return Reply(r.status, r.headers.get("Content-Type"), r.read(), r.headers)
        except urllib.error.HTTPError as e:
            return Reply(e.code, e.headers.get("Content-Type"), e.read(), e.headers)

    def status_for_length(self, path: str, length: int) -> int:
        """The status TorchServe answers to the headers of a POST of ``length`` bytes (Expect: 100-continue)."""
        host, port = self.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {self.key}\r\n"
                      f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n"
                      "Expect: 100-continue\r\n\r\n".encode())
            return int(s.recv(4096).split(b" ", 2)[1])

    def stream(self, fields: dict, *, timeout: float = 300, hang_up_after: int | None = None
               ) -> tuple[int, Any, list[tuple[float, dict]]]:
        """A streamed multipart request (see :func:`stream_lines`)."""
        body, ctype = multipart_body(fields)
        return stream_lines(self.url, f"/predictions/{NAME}", body,
                            {"Content-Type": ctype, "Authorization": f"Bearer {self.key}"}, timeout, hang_up_after)

    def multipart(self, fields: dict, **kw) -> Reply:
        body, ctype = multipart_body(fields)
        return self.request(f"/predictions/{NAME}", body, ctype, **kw)

    def json(self, path: str, obj, **kw) -> Reply:
        return self.request(path, json.dumps(obj).encode(), "application/json", **kw)

    def workers(self) -> list[psutil.Process]:
        """The Python model workers (ts/model_service_worker.py) of this server."""
        out = []
        for p in self.processes():
            try:
                if any("model_service_worker" in part for part in p.cmdline()):
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def listening(self) -> list[tuple[str, int]]:
        """(address, port) of every TCP socket this server's processes listen on."""
        found = []
        for p in self.processes():
            try:
                conns = net_connections(p)
            except psutil.Error:
                continue
            found += [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
        return found

    def log_text(self) -> str:
        """nsf serve's output and TorchServe's logs, for assertions and failure messages."""
        parts = [self.workdir / "nsf-serve.log", *sorted((self.workdir / "logs").glob("*.log"))]
        return "\n".join(p.read_text(errors="replace") for p in parts if p.is_file())

    def processes(self) -> list[psutil.Process]:
        """This server's processes: nsf serve, torchserve, java and the workers (found by the workdir)."""
        found = []
        for p in psutil.process_iter(["cmdline", "environ"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                env = p.info["environ"] or {}
            except (psutil.Error, TypeError):
                continue
            if str(self.workdir) in cmd or str(self.workdir) in env.get("TMPDIR", ""):
                found.append(p)
        return found

    def stop(self) -> None:
        """Ctrl-C's path (SIGTERM to `nsf serve`), then kill anything of this server still alive."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: `nsf serve`, or torchserve's group
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        _, alive = psutil.wait_procs(self.processes(), timeout=30)  # java and workers finish shutting down
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=30)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextmanager
def running_server(store: Path, workdir: Path, env: dict[str, str] | None = None,
                   ready: bool = True) -> Iterator[Server]:
    """`nsf serve` on a free block of loopback ports; with ``ready`` wait until the model answers."""
    port = free_port_block()
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "nsf-serve.log", "wb")
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "nsf", "serve", "--model-store", str(store), "--workdir",
                             str(workdir), "--port", str(port)], cwd=workdir, env=full_env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", "", proc, workdir)
    try:
        key_file = workdir / "key_file.json"
        deadline = time.monotonic() + 120
        while not key_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert key_file.exists(), (workdir / "nsf-serve.log").read_text()[-4000:]
        time.sleep(0.2)  # let the frontend finish writing it
        keys = json.loads(key_file.read_text())
        server.key = keys["inference"]["key"]
        if ready:
            try:
                wait_ready(server.url, keys, f"http://127.0.0.1:{port + 1}", timeout=180, proc=proc)
            except (RuntimeError, TimeoutError) as e:
                raise AssertionError(f"{e}\n{server.log_text()[-4000:]}") from None
        yield server
    finally:
        server.stop()
        log.close()




# --- KServe's model server (`nsf serve --runtime kserve`) ----------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def v2_inputs(fields: dict) -> list[dict]:
    """A fields mapping (images as bytes, options as JSON values) as KServe v2 inputs."""
    kinds = {bool: "BOOL", int: "INT64", float: "FP32", str: "BYTES"}
    out = []
    for name, value in fields.items():
        if isinstance(value, bytes):
            out.append({"name": name, "datatype": "BYTES", "shape": [1], "data": [b64(value)]})
        elif isinstance(value, list):
            out.append({"name": name, "datatype": "FP32", "shape": [len(value)], "data": value})
        else:
            out.append({"name": name, "datatype": kinds[type(value)], "shape": [1], "data": [value]})
    return out


@dataclass
class KServer:
    """A running `nsf serve --runtime kserve`: the launcher process, its server process and its URL."""

    url: str
    proc: subprocess.Popen
    workdir: Path

    def request(self, path: str, data: bytes | None = None, content_type: str | None = "application/json",
                timeout: float = 300) -> Reply:
        headers = {"Content-Type": content_type} if content_type and data is not None else {}
        req = urllib.request.Request(self.url + path, data=data, headers=headers,
                                     method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return Reply(r.status, r.headers.get("Content-Type"), r.read(), r.headers)
        except urllib.error.HTTPError as e:
            return Reply(e.code, e.headers.get("Content-Type"), e.read(), e.headers)

    def v1_stream(self, fields: dict, *, timeout: float = 300, hang_up_after: int | None = None
                  ) -> tuple[int, Any, list[tuple[float, dict]]]:
        """A streamed v1 request of one instance (see :func:`stream_lines`)."""
        body = {"instances": [{k: b64(v) if isinstance(v, bytes) else v for k, v in fields.items()}]}
        return stream_lines(self.url, f"/v1/models/{NAME}:predict", json.dumps(body).encode(),
                            {"Content-Type": "application/json"}, timeout, hang_up_after)

    def v1(self, *instances: dict, timeout: float = 300) -> Reply:
        """POST /v1/models/style_fusion:predict with instances whose images are bytes (sent as base64)."""
        body = {"instances": [{k: b64(v) if isinstance(v, bytes) else v for k, v in i.items()} for i in instances]}
        return self.request(f"/v1/models/{NAME}:predict", json.dumps(body).encode(), timeout=timeout)

    def v2(self, fields: dict, request_id: str | None = None, timeout: float = 300) -> Reply:
        body: dict = {"inputs": v2_inputs(fields)}
        if request_id is not None:
            body["id"] = request_id
        return self.request(f"/v2/models/{NAME}/infer", json.dumps(body).encode(), timeout=timeout)

    def processes(self) -> list[psutil.Process]:
        """The launcher and everything it started (the server, kserve's worker processes)."""
        try:
            launcher = psutil.Process(self.proc.pid)
            return [launcher, *launcher.children(recursive=True)]
        except psutil.Error:
            return []

    def server(self) -> psutil.Process:
        """The KServe server process (python -m nsf.runtimes.kserve)."""
        (server,) = [p for p in psutil.Process(self.proc.pid).children()
                     if "nsf.runtimes.kserve" in " ".join(p.cmdline())]
        return server

    def workers(self) -> list[psutil.Process]:
        """The processes that run the model: the server itself, or kserve's spawned worker processes."""
        server = self.server()
        spawned = [p for p in server.children() if "spawn_main" in " ".join(p.cmdline())]
        return spawned or [server]

    def listening(self) -> list[tuple[str, int]]:
        found = []
        for p in self.processes():
            try:
                found += [(c.laddr.ip, c.laddr.port) for c in net_connections(p) if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                continue
        return found

    def log_text(self) -> str:
        path = self.workdir / "nsf-serve.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def wait_ready(self, timeout: float = 240) -> None:
        from nsf.runtimes.kserve import wait_ready

        try:
            wait_ready(self.url, timeout=timeout, proc=self.proc)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}\n{self.log_text()[-4000:]}") from None

    def stop(self, sig: int = signal.SIGINT) -> float:
        """Ctrl-C's path (SIGINT to the launcher); kill whatever is left. Returns the seconds it took."""
        start = time.monotonic()
        procs = self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        seconds = time.monotonic() - start
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return seconds


@contextmanager
def running_kserve(workdir: Path, model_config: Path, *, workers: int = 1, env: dict[str, str] | None = None,
                   ready: bool = True, port: int | None = None) -> Iterator[KServer]:
    """`nsf serve --runtime kserve` on a free loopback port; with ``ready`` wait until the model answers."""
    port = port or free_port_block(1)
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "nsf-serve.log", "ab")
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "nsf", "serve", "--runtime", "kserve", "--port", str(port),
                             "--workers", str(workers), "--model-config", str(model_config), "--device", "cpu"],
                            cwd=workdir, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = KServer(f"http://127.0.0.1:{port}", proc, workdir)
    try:
        if ready:
            server.wait_ready()
        yield server
    finally:
        server.stop()
        log.close()


# --- built once per test run: the test model config and its .mar --------------------------------

RESPONSE_TIMEOUT = 30  # s: admission refuses what would run over 0.8 x 30 s (the shipped config says 900)
_ONCE: dict[str, Any] = {}


def server_model_config(folder: Path) -> Path:
    """deploy/model-config.yaml with the servers' test limits: responseTimeout 30 s, calibrated at 64 px / 3 steps
    (a second at start-up)."""
    import yaml

    cfg = yaml.safe_load((REPO / "deploy" / "model-config.yaml").read_text())
    cfg["responseTimeout"] = RESPONSE_TIMEOUT
    cfg["nsf"]["devices"]["cpu"]["calibrate"] = [64, 3]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model-config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def shared_store(tmp_path_factory: Any) -> Path:
    """A model store with style_fusion.mar built from :func:`test_model_config`, ONCE per test process (building
    packs 550 MB of weights: about half a minute), whichever test module asks first. Session-scoped fixtures in
    several modules call this; the folder lives under pytest's base temp and goes with it."""
    if "store" not in _ONCE:
        from nsf.runtimes.common import build_archive

        store = Path(tmp_path_factory.getbasetemp()) / "shared_model_store"
        config = server_model_config(store)
        _ONCE["archive"] = build_archive(store, model_config=config, quiet=True)
        _ONCE["store"] = store
    return _ONCE["store"]


def shared_archive(tmp_path_factory: Any) -> Any:
    """The :class:`nsf.runtimes.common.Archive` of :func:`shared_store`."""
    shared_store(tmp_path_factory)
    return _ONCE["archive"]


# --- `mlflow models serve` ------------------------------------------------------------------------


@dataclass
class MLflowServer:
    url: str
    proc: subprocess.Popen
    workdir: Path

    def invocations(self, body: dict, timeout: float = 300) -> Reply:
        req = urllib.request.Request(self.url + "/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return Reply(r.status, r.headers.get("Content-Type"), r.read(), r.headers)
        except urllib.error.HTTPError as e:
            return Reply(e.code, e.headers.get("Content-Type"), e.read(), e.headers)

    def log_text(self) -> str:
        path = self.workdir / "serve.log"
        return path.read_text(errors="replace") if path.is_file() else ""


@contextmanager
def running_mlflow(model_uri: str, tracking_uri: str, workdir: Path, *, timeout: int = RESPONSE_TIMEOUT
                   ) -> Iterator[MLflowServer]:
    """`mlflow models serve -m MODEL_URI --timeout TIMEOUT` on a free loopback port, ready (``/ping`` answers)."""
    port = free_port_block(1)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri,
           "OMP_NUM_THREADS": "1", "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    log = open(workdir / "serve.log", "wb")
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-t", str(timeout)], cwd=workdir, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = MLflowServer(f"http://127.0.0.1:{port}", proc, workdir)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(server.url + "/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert proc.poll() is None and time.monotonic() < deadline, server.log_text()[-4000:]
            time.sleep(0.5)
        yield server
    finally:
        stop_group(proc, grace=30)
        log.close()


def shared_registry(tmp_path_factory: Any) -> tuple[Path, Any, list[Path]]:
    """An MLflow registry with style_fusion v1 (@champion) exported from an unrelated working directory, with the
    shared .mar attached and its model config packed, ONCE per test process: ``(folder, Registered, what the
    export left in that working directory)``."""
    if "registry" not in _ONCE:
        from nsf.runtimes import mlflow as registry

        archive = shared_archive(tmp_path_factory)
        base = Path(tmp_path_factory.getbasetemp())
        folder, caller = base / "shared_registry", base / "shared_registry_caller"
        folder.mkdir()
        caller.mkdir()
        cwd = os.getcwd()
        os.chdir(caller)
        try:
            done = registry.log_model(tracking_uri=registry.default_tracking_uri(folder), alias="champion",
                                      archive=archive, model_config=_ONCE["store"] / "model-config.yaml", quiet=True)
        finally:
            os.chdir(cwd)
        _ONCE["registry"] = (folder, done, list(caller.iterdir()))
    return _ONCE["registry"]
