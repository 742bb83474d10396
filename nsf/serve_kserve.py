"""``nsf serve --runtime kserve``: KServe's model server for ``style_fusion``, in the foreground.

Runs ``python -m nsf.serving.kserve_runtime`` in a session of its own, so that Ctrl-C reaches this process
only, which then stops the server and its worker processes (SIGTERM, kserve's grace period for requests in
flight, then SIGKILL for what is left). It prints how to call the server, says when the model is ready
(after its warm-up and calibration), and starts the server again when it dies after it was ready (with
``--workers`` > 1 kserve's own parent process restarts a worker process that dies; this covers the server
process itself, as the kubelet does in a cluster). Nothing here imports kserve.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .serve import MODEL_CONFIG, MODEL_NAME, _signal_group, project_root
from .serve import _stop_group as stop_group

DEFAULT_PORT = 8080
STOP_GRACE = 45.0  # seconds after SIGTERM before SIGKILL: kserve's own grace (30 s) and its shutdown
RESTART_PAUSE = 1.0


def serve_kserve(*, host: str = "127.0.0.1", port: int = DEFAULT_PORT, workers: int = 1,
                 model_config: str | os.PathLike[str] | None = None, device: str | None = None,
                 root: str | os.PathLike[str] | None = None) -> int:
    """Run the KServe server until Ctrl-C (or SIGTERM); return 0 when stopped that way, else its exit code."""
    if workers < 1:
        raise ValueError(f"--workers {workers}; allowed: 1 or more")
    config = Path(model_config) if model_config is not None else _checkout_config(root)
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: pass --model-config PATH (deploy/model-config.yaml)")
    _check_free(host, port)
    cmd = [sys.executable, "-m", "nsf.serving.kserve_runtime", "--model-config", str(config.resolve()),
           "--host", host, "--port", str(port), "--workers", str(workers)]
    if device is not None:
        cmd += ["--device", device]
    url = f"http://{_client_host(host)}:{port}"
    print(f"nsf serve: {' '.join(cmd)}", flush=True)
    print(how_to_call(url, host), flush=True)
    state: dict[str, Any] = {"signal": None, "proc": None}

    def stop(signum: int, _frame: Any) -> None:
        first = state["signal"] is None
        state["signal"] = signum
        proc = state["proc"]
        if proc is not None:  # a second Ctrl-C does not wait for the grace period
            _signal_group(proc.pid, signal.SIGTERM if first else signal.SIGKILL)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            proc = subprocess.Popen(cmd, start_new_session=True)
            state["proc"] = proc
            ready = threading.Event()
            threading.Thread(target=_report_ready, args=(url, proc, ready), daemon=True).start()
            code = proc.wait()
            _stop_group(proc)
            if state["signal"] is not None:
                return 0
            if not ready.is_set():
                print(f"nsf serve: the KServe server exited with {code} before it was ready", flush=True)
                return code or 1
            print(f"nsf serve: the KServe server exited with {code} after it was ready; starting it again",
                  flush=True)
            time.sleep(RESTART_PAUSE)
            if state["signal"] is not None:
                return 0
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        proc = state["proc"]
        if proc is not None:
            _stop_group(proc)


def _checkout_config(root: str | os.PathLike[str] | None) -> Path:
    return project_root(root) / MODEL_CONFIG


def _client_host(host: str) -> str:
    """The address a local client calls: the bind address, or loopback for a wildcard bind."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise RuntimeError(f"port {port} on {host} is taken or not bindable ({e.strerror}); stop what holds it "
                               "or pass --port") from None


def how_to_call(url: str, host: str) -> str:
    exposed = "" if _is_loopback(host) else (
        f"\n  WARNING: bound to {host}: the KServe server has no authentication of its own; anyone who reaches "
        "this port can use it. Put an authenticating proxy or gateway in front (README, \"Serving with KServe\").\n")
    body = ("python -c \"import base64, json; b = lambda p: base64.b64encode(open(p, 'rb').read()).decode(); "
            "print(json.dumps({'instances': [{'content': b('nsf/assets/astronaut.jpg'), "
            "'style': b('nsf/assets/starry_night.jpg'), 'size': 256, 'steps': 100, 'seed': 0}]}))\" > v1.json")
    return f"""
nsf serve: KServe's model server is starting {MODEL_NAME}; a line below says when it is ready.
  KServe v1   {url}/v1/models/{MODEL_NAME}:predict   (readiness: GET {url}/v1/models/{MODEL_NAME})
  KServe v2   {url}/v2/models/{MODEL_NAME}/infer{exposed}

  {body}
  curl -s -H "Content-Type: application/json" {url}/v1/models/{MODEL_NAME}:predict --data-binary @v1.json \\
    | python -c "import base64, json, sys; open('out.png', 'wb').write(base64.b64decode(json.load(sys.stdin)\
['predictions'][0]))"

Ctrl-C stops the server.
"""


def wait_ready(url: str, *, timeout: float = 900.0, proc: subprocess.Popen[Any] | None = None) -> float:
    """Wait until ``GET /v1/models/style_fusion`` says ready (after the warm-up); return the seconds waited."""
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/v1/models/{MODEL_NAME}", timeout=5) as r:
                last = r.read().decode()
                if json.loads(last).get("ready") is True:
                    return time.monotonic() - start
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, ValueError, AttributeError) as e:
            last = str(e)
        time.sleep(1.0)  # kserve logs each not-ready answer with its traceback
    raise TimeoutError(f"{MODEL_NAME} at {url} not ready after {timeout:.0f} s (last answer: {last[:300]})")


def _report_ready(url: str, proc: subprocess.Popen[Any], ready: threading.Event) -> None:
    try:
        seconds = wait_ready(url, proc=proc)
    except (RuntimeError, TimeoutError) as e:
        if proc.poll() is None:
            print(f"nsf serve: {e}; see the server's log above", flush=True)
        return
    ready.set()
    print(f"nsf serve: {MODEL_NAME} is ready on {url} ({seconds:.0f} s after the server started)", flush=True)


def _stop_group(proc: subprocess.Popen[Any], grace: float = STOP_GRACE) -> None:
    """SIGTERM the server's process group (kserve stops its worker processes), wait, then SIGKILL what is left."""
    stop_group(proc, grace, settle=5.0)
