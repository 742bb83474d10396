"""TorchServe as a runtime of ``style_fusion``: ``nsf archive`` (the ``.mar``) and ``nsf serve`` (``--runtime
torchserve``, the default), and what the handler needs from TorchServe's own modules.

``nsf archive`` packs ``handlers/style_fusion_handler.py`` (TorchServe's entry point: it translates TorchServe's
requests for :class:`nsf.serving.Worker` and nothing else), this ``nsf`` package's code, the VGG-19 weights and
``deploy/model-config.yaml`` into ``style_fusion.mar`` (:func:`nsf.runtimes.common.build_archive`). ``serve``
runs ``torchserve`` in the foreground with ``deploy/config.properties``. :func:`guard_kserve_envelopes` makes
TorchServe's KServe envelopes pass a malformed body on to the handler as a 400. Nothing here imports TorchServe
on import (``ts`` is imported by :func:`guard_kserve_envelopes` and :func:`streamer` when called, inside a worker).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..serving.errors import RequestError
from .common import (
    MODEL_NAME,
    TS_CONFIG,
    build_archive,
    check_free,
    how_to_call,
    poll_ready,
    project_root,
    sha256,
    signal_group,
    start_group,
    stop_group,
)

__all__ = ["EnvelopeError", "build_archive", "effective_properties", "guard_kserve_envelopes", "read_properties",
           "serve", "streamer", "wait_ready"]

KEY_FILE = "key_file.json"
# config.properties keys of the five listeners, in the order `--port N` numbers them N, N+1...
_LISTENERS = ("inference_address", "management_address", "metrics_address", "grpc_inference_port",
              "grpc_management_port")

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
        check_free(host, port, f"{key}={value}")


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
        if sha256(mar) != expected:
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
    proc = start_group(cmd, cwd=work, env=env)
    stopping: dict[str, int | None] = {"signal": None}

    def stop(signum: int, _frame: Any) -> None:
        stopping["signal"] = signum
        signal_group(proc.pid, signal.SIGTERM)

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
        stop_group(proc)
        key_file.unlink(missing_ok=True)  # its keys died with the server
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if stopping["signal"] is not None else code


def _report_ready(url: str, key_file: Path, props: dict[str, str], proc: Any) -> None:
    try:
        time.sleep(0.5)  # the frontend writes the key file as it starts
        seconds = wait_ready(url, json.loads(key_file.read_text()), props["management_address"], timeout=900,
                             proc=proc)
        print(f"nsf serve: {MODEL_NAME} is ready ({seconds:.0f} s after the key file appeared)", flush=True)
    except (RuntimeError, TimeoutError, OSError, ValueError) as e:
        if proc.poll() is None:
            print(f"nsf serve: {e}; see the logs", flush=True)


def _how_to_call(url: str, props: dict[str, str], key_file: Path) -> str:
    key = f"$(python -c \"import json; print(json.load(open('{key_file}'))['inference']['key'])\")"
    example = f"""  KEY={key}
  curl -H "Authorization: Bearer $KEY" {url}/ping
  curl -H "Authorization: Bearer $KEY" {url}/predictions/{MODEL_NAME} \\
       -F content=@content.jpg -F style=@style.jpg -F size=256 -F steps=100 -F seed=0 -o out.png"""
    return how_to_call("TorchServe", {
        "inference API": f"{url}   (management {props.get('management_address')}, metrics "
                         f"{props.get('metrics_address')})",
        "token": f"{key_file}  (\"inference\" key; it expires: see the serving docs)"}, example)

def wait_ready(url: str, keys: dict[str, Any], management_url: str, timeout: float = 180.0,
               proc: Any = None) -> float:
    """Wait until style_fusion has a READY worker; return the seconds waited.

    ``/ping`` answers "Healthy" as soon as the frontend is up, before any worker has loaded the
    model, so readiness is read from the management API's model description (allowed with the
    management key even though registering models is off). ``keys`` is key_file.json's content.
    """
    import urllib.request

    def probe() -> tuple[bool, str]:
        ping = urllib.request.Request(f"{url}/ping", headers={"Authorization": f"Bearer {keys['inference']['key']}"})
        with urllib.request.urlopen(ping, timeout=5) as r:
            r.read()
        describe = urllib.request.Request(f"{management_url}/models/{MODEL_NAME}",
                                          headers={"Authorization": f"Bearer {keys['management']['key']}"})
        with urllib.request.urlopen(describe, timeout=5) as r:
            last = r.read().decode()
        workers = [w for m in json.loads(last) for w in m.get("workers", [])]
        return any(w.get("status") == "READY" for w in workers), last

    return poll_ready(probe, url=url, timeout=timeout, proc=proc)


# ---------------------------------------------------------------------------------------------
# Inside a TorchServe worker: the KServe envelopes and streaming (imported by the handler)
# ---------------------------------------------------------------------------------------------

ENVELOPES = (("kserve", "KServeEnvelope"), ("kservev2", "KServev2Envelope"))


class EnvelopeError(RequestError):
    """A request that TorchServe's KServe envelope could not read: ``envelope`` names it (``"kserve"``,
    ``"kservev2"``, or ``"any"`` for a body without instances/inputs)."""

    def __init__(self, message: str, *, envelope: str, field: str | None = "body", allowed: Any = None):
        super().__init__(message, field=field, allowed=allowed)
        self.envelope = envelope


def guard_kserve_envelopes() -> list[str]:
    """Wrap the ``parse_input`` of TorchServe's KServe envelopes (once); return the envelopes guarded now.

    TorchServe runs an envelope's ``parse_input`` before the handler; left alone, a body without a proper
    ``inputs``/``instances`` list raises there and TorchServe answers 503 "Prediction failed". Guarded, the
    failure reaches the handler as an :class:`EnvelopeError` and gets a 400 with a JSON body.
    """
    guarded = []
    for module_name, class_name in ENVELOPES:
        try:
            cls = getattr(importlib.import_module(f"ts.torch_handler.request_envelope.{module_name}"), class_name)
        except (ImportError, AttributeError):
            continue
        if getattr(cls.parse_input, "nsf_guarded", False):
            continue

        def parse_input(self: Any, data: Any, _parse: Any = cls.parse_input, _name: str = module_name) -> Any:
            try:
                return _parse(self, data)
            except Exception as e:  # noqa: BLE001 - any malformed envelope is the client's error
                return [EnvelopeError(f"malformed {_name} request: {type(e).__name__}: {e}", envelope=_name,
                                      allowed="KServe v1 {instances: [...]} or v2 {inputs: [...]}")]

        parse_input.nsf_guarded = True  # type: ignore[attr-defined]
        cls.parse_input = parse_input
        guarded.append(module_name)
    return guarded


def streamer(context: Any, media_type: str) -> Callable[[int, bytes], None]:
    """``progress(idx, line)`` for :meth:`nsf.serving.Worker.answer`: one TorchServe intermediate response per
    message.

    TorchServe 0.12's frontend writes each one to the client as a chunk and never tells the worker that
    the client has gone, so on this runtime only a request's deadline stops a run early.
    """
    from ts.handler_utils.utils import send_intermediate_predict_response

    def send(idx: int, message: bytes) -> None:
        context.set_response_content_type(idx, media_type)
        send_intermediate_predict_response([message], context.request_ids, "Intermediate Prediction success", 200,
                                           context)

    return send


# ---------------------------------------------------------------------------------------------
# The command line (nsf/runtimes/__init__.py's table points here)
# ---------------------------------------------------------------------------------------------


def archive_main(args: argparse.Namespace) -> int:
    """``nsf archive``."""
    built = build_archive(args.export_path, root=args.root, model_config=args.model_config)
    print(f"wrote {built.mar} (sha256 {built.sha256})\n      {built.sha256_file}\n      {built.card}")
    return 0


def serve_main(args: argparse.Namespace) -> int:
    """``nsf serve --runtime torchserve``."""
    given = [f for f in ("host", "workers", "model_config", "device") if getattr(args, f, None) is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} is for --runtime kserve; TorchServe takes its listeners "
                         "from deploy/config.properties (--port) and its worker settings from the .mar")
    return serve(args.model_store, workdir=args.workdir, port=args.port, root=args.root)
