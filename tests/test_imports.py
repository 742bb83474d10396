"""Import hygiene, in one fresh interpreter: what importing each part of nsf pulls in.

`import nsf` must stay cheap (no VGG-19 built, no torchvision, no server or UI stack), the serving core must import
no server library, the TorchServe path and the launchers no KServe/FastAPI/uvicorn, and the registry helpers no
MLflow until they are called. These were four subprocess tests in four files; here one subprocess imports the
modules condition by condition, from the lightest up, and reports which import first brought in what, so a failure
names the module to fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SERVERS = ("ts", "kserve", "fastapi", "uvicorn", "starlette", "mlflow", "gradio", "ray")
HEAVY = (*SERVERS, "torchvision", "av", "cv2", "playwright", "pandas")

# Runtime adapters: modules that exist to talk to one server library and may import it at the top. They are
# tested by their runtime's own tests; every other module under nsf.serving must import no server.
ADAPTERS = {"nsf.runtimes.kserve", "nsf.runtimes.mlflow", "nsf.runtimes.mlflow_model"}

# (condition, modules imported for it (those that exist; at least one must), top-level packages none may import)
CONDITIONS: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("import nsf", ["nsf", "nsf.config", "nsf.cli"], HEAVY),
    ("the serving core", ["nsf.serving", "<every nsf.serving module but the adapters>"], SERVERS),
    ("the TorchServe path and the launchers", ["nsf.serving.kserve_protocol", "nsf.runtimes", "nsf.runtimes.common",
                                              "nsf.runtimes.torchserve"],
     ("kserve", "fastapi", "uvicorn", "mlflow")),
]

SCRIPT = textwrap.dedent("""
    import importlib, importlib.util, json, pkgutil, sys
    import torch.nn as nn

    conditions, adapters = json.loads(sys.argv[1]), set(json.loads(sys.argv[2]))
    convs = []
    orig = nn.Conv2d.__init__

    def spy(self, *a, **k):
        convs.append(1)
        orig(self, *a, **k)

    nn.Conv2d.__init__ = spy

    def exists(name):
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            return False

    report = []
    for title, modules, forbidden in conditions:
        names = []
        for m in modules:
            if m.startswith("<every nsf.serving"):
                import nsf.serving
                names += sorted(i.name for i in pkgutil.walk_packages(nsf.serving.__path__, "nsf.serving.")
                                if i.name not in adapters)
            elif exists(m):
                names.append(m)
        brought = {}
        for name in names:
            before = {k.split(".")[0] for k in sys.modules}
            importlib.import_module(name)
            new = sorted({k.split(".")[0] for k in sys.modules} - before)
            bad = [p for p in new if p in forbidden]
            if bad:
                brought[name] = bad
        left = sorted(p for p in forbidden if p in sys.modules)
        report.append({"condition": title, "imported": names, "brought": brought, "present": left,
                       "convs": len(convs)})
    print(json.dumps(report))
""")


def test_imports_stay_light_condition_by_condition():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CONDITIONS), json.dumps(sorted(ADAPTERS))],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert [c["condition"] for c in report] == [c[0] for c in CONDITIONS]
    first = report[0]
    assert first["imported"] == ["nsf", "nsf.config", "nsf.cli"]
    assert first["convs"] == 0, "import nsf built a network (nn.Conv2d) to learn something it could read from a table"
    for c in report:
        assert c["imported"], f"{c['condition']}: none of its modules exists (renamed? update CONDITIONS)"
        assert not c["present"] and not c["brought"], (
            f"{c['condition']}: {c['brought'] or c['present']} imported at import time; import it where it is used")
    serving = report[1]["imported"]
    assert "nsf.serving.worker" in serving and "nsf.serving.request" in serving  # the walk found the core
