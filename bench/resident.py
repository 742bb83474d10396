"""What a CPU run holds besides its tensors: the resident set at a tiled step's start against the tensors alive then.

The planner counts tensors (the image, its copies, the L-BFGS pairs, the targets) and a step's buffers; a whole run
peaked 0.13-0.44 GB over its plan where a step alone did not (bench/RESULTS.md "prints"). This runs `nsf` in this
process up to the second step of its first tiled scale at least ``--size`` px, gives the C heap back
(nsf.memory.release_host_memory), and reports the resident set, the bytes of every tensor alive (one count per
storage) and the run's own start, as one JSON line. Run it once as is and once with
``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0`` (oneDNN's cache of compiled kernels off): the difference is that cache.

Usage:
  python bench/resident.py --size 2048 --max-memory 2GB [--short]   # --short: steps=20, refine_steps=2,4
  ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 python bench/resident.py --size 2048 --max-memory 2GB --short
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
IMAGES = REPO.parent / "shared" / "images"


def resident_gb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024 / 1e9


def tensor_gb() -> float:
    """Bytes of the CPU tensors the garbage collector can see, each storage once."""
    storages: dict[int, int] = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type == "cpu":
            s = o.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values()) / 1e9


class Reached(Exception):
    pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--max-memory", default="2GB")
    p.add_argument("--pair", default="astronaut:starry_night")
    p.add_argument("--short", action="store_true", help="steps=20, refine_steps=2,4: the same scales, sooner")
    args = p.parse_args()

    import nsf
    from nsf.image import load_image, pil_to_tensor
    from nsf.memory import release_host_memory
    from nsf.optimize import objective

    model = nsf.style_fusion(device="cpu", max_memory=args.max_memory)
    content, style = (pil_to_tensor(load_image(IMAGES / f"{n}.jpg")) for n in args.pair.split(":"))
    gc.collect()
    release_host_memory(torch.device("cpu"))
    start = round(resident_gb(), 3), round(tensor_gb(), 3)
    row: dict[str, object] = {"size": args.size, "max_memory": args.max_memory, "short": args.short,
                              "onednn_cache": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default"),
                              "start_gb": start[0], "start_tensors_gb": start[1]}
    steps = [0]
    at_step: list[float] = []  # resident set, tensors alive at the step
    value_and_grad = objective.Objective.value_and_grad

    def counted(self: objective.Objective, x: torch.Tensor, *a: object, **k: object) -> object:
        if max(x.shape[-2:]) >= args.size and self.tiles > 1:
            steps[0] += 1
            if steps[0] == 2:  # the first step has run: its tiles' kernels are compiled, its buffers freed
                gc.collect()
                release_host_memory(x.device)
                at_step[:] = round(resident_gb(), 3), round(tensor_gb(), 3)
                row.update(step_gb=at_step[0], step_tensors_gb=at_step[1], tiles=self.tiles)
                raise Reached
        return value_and_grad(self, x, *a, **k)

    objective.Objective.value_and_grad = counted  # type: ignore[method-assign]
    try:
        model.run(content, style, size=args.size, seed=0,
                  **({"steps": 20, "refine_steps": (2, 4)} if args.short else {}))
        row["error"] = "no tiled scale at this size and budget"
    except Reached:
        row["beside_tensors_gb"] = round(at_step[0] - at_step[1] - (start[0] - start[1]), 3)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
