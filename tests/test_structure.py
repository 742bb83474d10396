"""The shape of the serving code, read from its imports with ``ast`` (no server needed):

* one ``nsf/runtimes/`` package holds the runtime adapters, one module each, listed once in ``RUNTIMES``;
* no adapter imports another (what they share is ``nsf/runtimes/common.py``);
* nothing under ``nsf/serving/`` (the server-neutral core) imports a server library;
* and, in one subprocess, that importing the library, the CLI, the core and the TorchServe launcher loads no
  server library at all (the CLI imports an adapter only when a command needs it).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nsf.runtimes import RUNTIMES

REPO = Path(__file__).resolve().parents[1]
NSF = REPO / "nsf"
SERVER_LIBRARIES = {"kserve", "ts", "mlflow", "fastapi", "starlette", "uvicorn", "model_archiver"}
ADAPTERS = {name: NSF / "runtimes" / f"{name}.py" for name in RUNTIMES}


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved against its package), anywhere in
    the file (inside functions too), plus modules named to ``importlib.import_module`` as string constants."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
                found |= {module} | {f"{module}.{a.name}" for a in node.names}
            else:
                found.add(node.module or "")
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) ==
              "import_module" and node.args and isinstance(node.args[0], ast.Constant | ast.JoinedStr)):
            arg = node.args[0]
            found.add(arg.value if isinstance(arg, ast.Constant) else "".join(
                v.value for v in arg.values if isinstance(v, ast.Constant)))
    return found


def test_one_runtimes_package_with_one_module_per_runtime():
    assert not list(NSF.glob("serve*.py")) and not (NSF / "registry.py").exists()
    assert [p for p in NSF.rglob("*.py") if "runtime" in p.stem and p.parent.name != "runtimes"] == []
    for name, runtime in RUNTIMES.items():
        assert runtime.module == f"nsf.runtimes.{name}" and ADAPTERS[name].is_file(), name
    modules = {p.stem for p in (NSF / "runtimes").glob("*.py")}
    assert modules == {"__init__", "common", *RUNTIMES, "mlflow_model"}  # mlflow_model: MLflow's script


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_no_adapter_imports_another(name):
    others = {f"nsf.runtimes.{n}" for n in RUNTIMES if n != name}
    bad = {m for m in imports(ADAPTERS[name]) if any(m == o or m.startswith(o + ".") for o in others)}
    assert bad == set(), f"{name} imports {bad}"


def test_common_and_the_package_import_no_adapter_and_no_server():
    for path in (NSF / "runtimes" / "common.py", NSF / "runtimes" / "__init__.py", NSF / "cli.py"):
        found = imports(path)
        assert not {m for m in found if m.startswith("nsf.runtimes.") and m.split(".")[2] in RUNTIMES}, path
        assert not {m.split(".")[0] for m in found} & SERVER_LIBRARIES, path


def test_the_serving_core_imports_no_server_library():
    for path in sorted((NSF / "serving").glob("*.py")):
        found = {m.split(".")[0] for m in imports(path)}
        assert not found & SERVER_LIBRARIES, f"{path.name} imports {found & SERVER_LIBRARIES}"
        assert not {m for m in imports(path) if m.startswith("nsf.runtimes")}, path.name


def test_the_import_reader_sees_imports_anywhere():
    """The reader must see what it is meant to catch: a lazy import, a relative one, an import_module string."""
    found = imports(NSF / "runtimes" / "torchserve.py")
    assert {"nsf.runtimes.common", "nsf.serving.errors"} <= found
    assert any(m.startswith("ts.") for m in found)  # imported inside streamer() / via import_module
    assert "kserve" in imports(ADAPTERS["kserve"]) and "mlflow" in imports(ADAPTERS["mlflow"])


def test_importing_the_library_the_cli_and_the_core_loads_no_server_library():
    """One subprocess for what used to take three: the library, the CLI, the serving core, the shared runtime
    code and the TorchServe launcher load neither TorchServe, KServe, MLflow nor their web stacks."""
    code = ("import sys, nsf, nsf.cli, nsf.serving, nsf.serving.kserve_protocol, nsf.runtimes, nsf.runtimes.common, "
            "nsf.runtimes.torchserve; print(sorted({m.split('.')[0] for m in sys.modules} & "
            f"set({sorted(SERVER_LIBRARIES)!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
