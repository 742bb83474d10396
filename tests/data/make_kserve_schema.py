"""Regenerate kserve_v1beta1_fields.json from the KServe Python SDK's generated models.

    pip download --no-deps kserve==0.21.0 -d /tmp/ks
    python tests/data/make_kserve_schema.py /tmp/ks/kserve-0.21.0-py3-none-any.whl

The SDK's models are generated from KServe's OpenAPI spec (the CRD's schema): each class lists its
JSON field names (attribute_map) and their types (openapi_types). This keeps the field names and
types of every kserve class reachable from V1beta1InferenceService; Kubernetes core types
(V1ObjectMeta, V1ResourceRequirements...) are left as opaque objects.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path


def classes(wheel: str) -> dict[str, dict[str, str]]:
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if not (name.startswith("kserve/models/") and name.endswith(".py")):
                continue
            for node in ast.walk(ast.parse(z.read(name))):
                if isinstance(node, ast.ClassDef):
                    wanted = ("openapi_types", "attribute_map")
                    maps = {t.id: ast.literal_eval(a.value) for a in node.body if isinstance(a, ast.Assign)
                            for t in a.targets if isinstance(t, ast.Name) and t.id in wanted}
                    if len(maps) == 2:
                        out[node.name] = {maps["attribute_map"][k]: v for k, v in maps["openapi_types"].items()}
    return out


def main() -> None:
    every = classes(sys.argv[1])
    keep, todo = {}, ["V1beta1InferenceService"]
    while todo:
        cls = todo.pop()
        if cls in keep or cls not in every:
            continue
        keep[cls] = every[cls]
        todo += [t for v in every[cls].values() for t in re.findall(r"V1\w+", v)]
    version = re.search(r"kserve-([\d.]+)-", Path(sys.argv[1]).name).group(1)
    out = Path(__file__).with_name("kserve_v1beta1_fields.json")
    out.write_text(json.dumps({"kserve_sdk": version, "classes": dict(sorted(keep.items()))}, indent=1) + "\n")
    print(f"{out}: {len(keep)} classes from kserve {version}")


if __name__ == "__main__":
    main()
