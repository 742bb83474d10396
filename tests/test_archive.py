"""`nsf archive`: the .mar round trip (manifest, handler, nsf code, weights hash, model card), and the
unpacked archive serving a request on its own (its nsf copy, its weights, no install, no download)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

from nsf.config import PRESETS
from nsf.version import __version__
from nsf.weights import CAFFE_FILENAME, VGG19Weights

pytest.importorskip("model_archiver", reason="torch-model-archiver (the 'serve' extra) is not installed")

REPO = Path(__file__).resolve().parents[1]
NAME = "style_fusion"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """`nsf archive --export-path DIR`, run as a user would (a subprocess of the CLI)."""
    out = tmp_path_factory.mktemp("store")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ.get('PATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "nsf", "archive", "--export-path", str(out)], cwd=out, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "torch-model-archiver" in r.stdout and f"{NAME}.mar" in r.stdout
    return out


@pytest.fixture(scope="module")
def unpacked(built, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(built / f"{NAME}.mar") as z:
        z.extractall(d)
    return d


def test_built_files_and_sha256(built):
    assert sorted(p.name for p in built.iterdir()) == [f"{NAME}.card.json", f"{NAME}.mar", f"{NAME}.mar.sha256"]
    digest, name = (built / f"{NAME}.mar.sha256").read_text().split()
    assert name == f"{NAME}.mar"
    assert digest == sha256((built / f"{NAME}.mar").read_bytes())


def test_manifest(unpacked):
    manifest = json.loads((unpacked / "MAR-INF" / "MANIFEST.json").read_text())
    model = manifest["model"]
    assert model["modelName"] == NAME
    assert model["modelVersion"] == __version__
    assert model["handler"] == "style_fusion_handler.py"
    assert model["configFile"] == "model-config.yaml"
    assert "serializedFile" not in model  # the weights travel as an extra file, loaded by path


def test_contents_are_the_checkout_and_the_verified_weights(unpacked):
    assert (unpacked / "style_fusion_handler.py").read_bytes() == (REPO / "handlers" / "style_fusion_handler.py"
                                                                   ).read_bytes()
    assert (unpacked / "model-config.yaml").read_bytes() == (REPO / "deploy" / "model-config.yaml").read_bytes()
    packed = {p.relative_to(unpacked / "nsf").as_posix() for p in (unpacked / "nsf").rglob("*") if p.is_file()}
    source = {p.relative_to(REPO / "nsf").as_posix() for p in (REPO / "nsf").rglob("*.py")}
    assert packed == source  # all the library code, no __pycache__, no demo assets
    for rel in packed:
        assert (unpacked / "nsf" / rel).read_bytes() == (REPO / "nsf" / rel).read_bytes(), rel
    assert sha256((unpacked / CAFFE_FILENAME).read_bytes()) == VGG19Weights.CAFFE.value.sha256
    top = sorted(p.name for p in unpacked.iterdir())
    assert top == sorted(["MAR-INF", "nsf", CAFFE_FILENAME, "model-config.yaml", "style_fusion_handler.py"])


def test_model_card(built):
    card = json.loads((built / f"{NAME}.card.json").read_text())
    cfg = yaml.safe_load((REPO / "deploy" / "model-config.yaml").read_text())
    assert card["model"] == NAME and card["version"] == __version__
    assert card["archive"]["sha256"] == (built / f"{NAME}.mar.sha256").read_text().split()[0]
    assert card["weights"] == {**card["weights"], "name": "caffe", "file": CAFFE_FILENAME,
                               "sha256": VGG19Weights.CAFFE.value.sha256}
    assert set(card["limits"]) == set(cfg["nsf"]["devices"]) == set(card["request_schema"])
    for dev, lim in card["limits"].items():
        assert lim["max_size"] == cfg["nsf"]["devices"][dev]["max_size"]
        assert card["request_schema"][dev]["properties"]["size"]["maximum"] == lim["max_size"]
    assert card["parameters"]["defaults"]["steps"] == PRESETS[cfg["nsf"]["preset"]].steps
    assert card["torchserve"]["responseTimeout"] == cfg["responseTimeout"]


def test_unpacked_archive_serves_with_its_own_code(unpacked, tmp_path):
    """The unpacked .mar alone (PYTHONPATH = it) loads its nsf copy and weights and answers a request."""
    script = textwrap.dedent("""
        import base64, io, json, sys
        from PIL import Image
        from ts.context import Context, RequestProcessor
        from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext
        import style_fusion_handler as h
        import nsf
        assert nsf.__file__.startswith(sys.argv[1]), nsf.__file__
        ctx = MockContext(model_pt_file=None, model_dir=sys.argv[1], model_file=None,
                          model_yaml_config_file="model-config.yaml")
        ctx.request_processor = [RequestProcessor({})]
        ctx._request_processor = ctx.request_processor
        for name in ("set_response_status", "get_response_status", "set_response_content_type",
                     "set_response_header", "get_response_headers"):
            setattr(type(ctx), name, getattr(Context, name))
        handler = h.StyleFusionHandler()
        handler.initialize(ctx)
        assert handler.worker.model.weights_sha256.startswith("c34748d2")
        import nsf.serving.worker
        assert nsf.serving.worker.__file__.startswith(sys.argv[1]), nsf.serving.worker.__file__
        buf = io.BytesIO(); Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, "PNG")
        out = handler.handle([{"content": buf.getvalue(), "style": buf.getvalue(), "size": b"32",
                               "steps": b"2"}], ctx)
        print(json.dumps({"size": Image.open(io.BytesIO(out[0])).size, "nsf": nsf.__file__}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(unpacked), OMP_NUM_THREADS="1", TORCH_HOME=str(tmp_path / "empty-torch-home"))
    r = subprocess.run([sys.executable, "-c", script, str(unpacked)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["size"] == [32, 24]
    assert result["nsf"].startswith(str(unpacked))


def test_archive_refuses_a_broken_model_config(tmp_path):
    from nsf.runtimes.common import build_archive

    root = tmp_path / "checkout"
    for rel in ("handlers/style_fusion_handler.py", "deploy/model-config.yaml", "deploy/config.properties"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, root / rel)
    cfg = yaml.safe_load((root / "deploy" / "model-config.yaml").read_text())
    cfg["nsf"]["fields"].append("init")
    (root / "deploy" / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="init"):
        build_archive(tmp_path / "store", root=root, quiet=True)
    assert not (tmp_path / "store" / f"{NAME}.mar").exists()


def _properties(path: Path) -> dict[str, str]:
    from nsf.runtimes.torchserve import read_properties

    return {e[0]: e[1] for e in read_properties(path) if isinstance(e, tuple)}


def test_kserve_config_agrees_with_the_archive_and_the_local_config():
    kserve = _properties(REPO / "deploy" / "kserve" / "config.properties")
    local = _properties(REPO / "deploy" / "config.properties")
    cfg = yaml.safe_load((REPO / "deploy" / "model-config.yaml").read_text())
    snapshot = json.loads(kserve["model_snapshot"])
    (model,) = snapshot["models"].items()
    assert model[0] == NAME
    (version, settings), = model[1].items()
    assert version == __version__  # the .mar's modelVersion
    assert settings["marName"] == f"{NAME}.mar" and settings["defaultVersion"] is True
    for key in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout"):
        assert settings[key] == cfg[key], key
    for key in ("max_request_size", "max_response_size", "job_queue_size", "allowed_urls", "enable_model_api"):
        assert kserve[key] == local[key], key
    assert kserve["service_envelope"] == "kservev2"
    assert kserve["inference_address"].startswith("http://127.0.0.1:")  # only the wrapper in the pod reaches it
    assert local["disable_token_authorization"] == "false"
    assert all(local[k].startswith("http://127.0.0.1:") for k in ("inference_address", "management_address",
                                                                   "metrics_address"))
    ks = yaml.safe_load((REPO / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    assert ks["kind"] == "InferenceService"
    assert ks["spec"]["predictor"]["timeout"] == cfg["responseTimeout"]
    assert ks["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"


KSERVE_FIELDS = json.loads((Path(__file__).parent / "data" / "kserve_v1beta1_fields.json").read_text())


def kserve_problems(value, type_name: str = "V1beta1InferenceService", where: str = "") -> list[str]:
    """Field names and value types checked against KServe's generated models (tests/data/, from the SDK)."""
    classes = KSERVE_FIELDS["classes"]
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [p for i, v in enumerate(value) for p in kserve_problems(v, type_name[5:-1], f"{where}[{i}]")]
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping"]
        inner = type_name[5:-1].split(", ", 1)[1]
        return [p for k, v in value.items() for p in kserve_problems(v, inner, f"{where}.{k}")]
    simple = {"str": str, "int": int, "bool": bool, "float": (int, float)}
    if type_name in simple:
        ok = isinstance(value, simple[type_name]) and not (type_name != "bool" and isinstance(value, bool))
        return [] if ok else [f"{where}: expected {type_name}, got {value!r}"]
    if type_name in classes:
        if not isinstance(value, dict):
            return [f"{where}: expected a {type_name} mapping"]
        fields = classes[type_name]
        return [p for k, v in value.items()
                for p in ([f"{where}.{k}: not a field of {type_name}"] if k not in fields
                          else kserve_problems(v, fields[k], f"{where}.{k}"))]
    return [] if isinstance(value, dict) or type_name == "object" else [f"{where}: expected {type_name}"]


def test_kserve_manifest_fields_are_kserve_fields():
    ks = yaml.safe_load((REPO / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    assert kserve_problems(ks) == []
    assert ks["apiVersion"] == "serving.kserve.io/v1beta1"
    model = ks["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch" and model["protocolVersion"] == "v2"
    assert model["runtime"] == "kserve-torchserve" and model["storageUri"].endswith("/style_fusion")


def test_the_kserve_check_catches_typos_and_wrong_types():
    ks = yaml.safe_load((REPO / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    ks["spec"]["predictor"]["model"]["runtimeVersoin"] = "0.12.0"
    ks["spec"]["predictor"]["minReplicas"] = "one"
    problems = kserve_problems(ks)
    assert any("runtimeVersoin: not a field of V1beta1ModelSpec" in p for p in problems)
    assert any("minReplicas: expected int" in p for p in problems)
