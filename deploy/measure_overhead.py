"""The overhead of serving: one request through TorchServe vs the same call through the library.

    python deploy/measure_overhead.py [--size 256] [--steps 100] [--repeat 1] [--port 28080]

Builds the archive into a temporary model store, runs `nsf serve` on loopback ports PORT..PORT+4,
times one multipart request (the bundled astronaut in the style of The Starry Night, seed 0) end
to end from the client, reads the handler's own time for it from the worker log, stops the
server, then times the same call through ``model.stylize`` plus PNG encoding in this process
(CUDA if available, as the server) and checks that both produced the same image. Runs are
sequential. Set OMP_NUM_THREADS the same for both (the server's worker inherits it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nsf.runtimes.torchserve import build_archive, wait_ready  # noqa: E402


def multipart(fields: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = b""
    for name, value in fields.items():
        if isinstance(value, bytes):
            out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n").encode() + value + b"\r\n"
        else:
            out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--port", type=int, default=28080)
    p.add_argument("--repeat", type=int, default=1,
                   help="calls on each side; the last is timed (2 on CUDA: the first compiles new shapes)")
    args = p.parse_args()
    assets = resources.files("nsf") / "assets"
    content = (assets / "astronaut.jpg").read_bytes()
    style = (assets / "starry_night.jpg").read_bytes()
    fields = {"content": content, "style": style, "size": str(args.size), "steps": str(args.steps), "seed": "0"}

    with tempfile.TemporaryDirectory(prefix="nsf-measure-") as tmp:
        store, work = Path(tmp) / "store", Path(tmp) / "run"
        build_archive(store, quiet=True)
        env = {**os.environ, "PYTHONPATH": str(REPO),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        proc = subprocess.Popen([sys.executable, "-m", "nsf", "serve", "--model-store", str(store), "--workdir",
                                 str(work), "--port", str(args.port)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            key_file = work / "key_file.json"
            while not key_file.exists():
                if proc.poll() is not None:
                    raise RuntimeError("nsf serve exited")
                time.sleep(0.2)
            time.sleep(0.2)
            keys = json.loads(key_file.read_text())
            key = keys["inference"]["key"]
            url = f"http://127.0.0.1:{args.port}"
            wait_ready(url, keys, f"http://127.0.0.1:{args.port + 1}", timeout=900, proc=proc)
            body, ctype = multipart(fields)
            req = urllib.request.Request(f"{url}/predictions/style_fusion", data=body,
                                         headers={"Authorization": f"Bearer {key}", "Content-Type": ctype})
            for _ in range(args.repeat):
                start = time.perf_counter()
                with urllib.request.urlopen(req, timeout=3600) as r:
                    served = r.read()
                t_server = time.perf_counter() - start
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        # The handler's own time for the last request (parse, decode, optimize, encode), from its log.
        logged = re.findall(r"style_fusion: request 0: .* ([0-9.]+) s", (work / "logs" / "model_log.log").read_text())
        t_handler = float(logged[-1]) if logged else float("nan")

    import torch

    import nsf
    from nsf.image import encode
    from nsf.runtimes.common import MODEL_CONFIG, load_model_config

    model = nsf.style_fusion(device="cpu" if not torch.cuda.is_available() else "cuda")
    # The server checks images against its own pixel cap and records it in the provenance: the same call.
    max_pixels = load_model_config(REPO / MODEL_CONFIG)["nsf"]["max_pixels"]
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = model.run(content, style, size=args.size, steps=args.steps, seed=0, max_pixels=max_pixels)
        library = encode(result.pil(), "png", result.metadata)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t_library = time.perf_counter() - start
    same = np.array_equal(np.asarray(Image.open(io.BytesIO(served))), np.asarray(result.pil()))
    print(json.dumps({"size": args.size, "steps": args.steps, "device": str(model.device),
                      "threads": torch.get_num_threads(), "server_s": round(t_server, 2),
                      "handler_s": round(t_handler, 2),
                      "library_s": round(t_library, 2), "overhead_s": round(t_server - t_library, 2),
                      "frontend_s": round(t_server - t_handler, 3),
                      "same_pixels": same, "same_bytes": served == library}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
