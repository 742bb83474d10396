"""MLflow registry: export time, the registered version's size, and serving overhead of `mlflow models serve`.

    OMP_NUM_THREADS=1 taskset -c 1 python bench/registry.py --record

In a temporary folder:
- export: `nsf export mlflow` (a fresh process, the default SQLite store in its cwd), then again with
  `--with-mar` into another store: wall time of the command, and the version's size on disk (its
  model folder in the store's artifacts) and the whole store's (SQLite file + artifacts);
- serving: `mlflow models serve -m models:/style_fusion/1 --env-manager local` on 127.0.0.1, one
  request at --size px with the default preset (the bundled astronaut + Starry Night, seed 0, JSON
  `dataframe_split`), client to client; then the same call through the library in this process
  (`torch.hub.load(..., source="local")`, `model.stylize` + PNG encoding), with the output bytes compared.
One run each, one after the other, with the threads this process has (`OMP_NUM_THREADS`).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

from load import cpu_name  # noqa: E402
from results import record  # noqa: E402

BIN = Path(sys.executable).parent


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def export(folder: Path, *flags: str) -> tuple[float, int, int]:
    """`nsf export mlflow` in ``folder``: (seconds, version size, store size)."""
    import mlflow

    folder.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nsf", "export", "mlflow", *flags], cwd=folder, env=env, check=True,
                   capture_output=True)
    seconds = time.perf_counter() - start
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    model = Path(mlflow.MlflowClient(uri, uri).get_model_version_download_uri("style_fusion", "1")
                 .removeprefix("file://"))
    return seconds, du(model), du(folder / "mlflow.db") + du(folder / "mlartifacts")


def serve_once(folder: Path, body: dict) -> tuple[float, float, bytes]:
    """Start `mlflow models serve`, send one request: (seconds to ready, request seconds, image bytes)."""
    from nsf.runtimes.common import stop_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
           "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "900",
           "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/style_fusion/1", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - start > 300:
                    raise RuntimeError("mlflow models serve did not start") from None
                time.sleep(0.2)
        ready = time.perf_counter() - start
        req = urllib.request.Request(url + "/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=1800) as r:
            answer = json.loads(r.read())
        seconds = time.perf_counter() - t0
    finally:
        stop_group(proc, grace=30)
    return ready, seconds, base64.b64decode(answer["predictions"][0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--record", action="store_true", help="write the table into bench/RESULTS.md")
    args = parser.parse_args()

    import torch

    from nsf.image import encode
    from nsf.runtimes.common import load_model_config

    threads = torch.get_num_threads()
    content_path, style_path = REPO / "nsf/assets/astronaut.jpg", REPO / "nsf/assets/starry_night.jpg"
    with tempfile.TemporaryDirectory(prefix="nsf-bench-registry-") as tmp:
        plain = export(Path(tmp) / "plain")
        with_mar = export(Path(tmp) / "with_mar", "--with-mar")
        print(f"export: {plain[0]:.1f} s, version {mb(plain[1])} MB, store {mb(plain[2])} MB; with --with-mar "
              f"{with_mar[0]:.1f} s, {mb(with_mar[1])} MB, {mb(with_mar[2])} MB", flush=True)
        b64 = [base64.b64encode(p.read_bytes()).decode("ascii") for p in (content_path, style_path)]
        body = {"dataframe_split": {"columns": ["content", "style"], "data": [b64]},
                "params": {"size": args.size, "seed": 0}}
        ready, served_s, served = serve_once(Path(tmp) / "plain", body)
        print(f"served: ready in {ready:.1f} s, request {served_s:.2f} s", flush=True)

    max_pixels = load_model_config(REPO / "deploy/model-config.yaml")["nsf"]["max_pixels"]
    model = torch.hub.load(str(REPO), "style_fusion", source="local", device="cpu")
    t0 = time.perf_counter()
    result = model.run(content_path, style_path, size=args.size, seed=0, max_pixels=max_pixels)
    library = encode(result.pil(), "png", result.metadata)
    library_s = time.perf_counter() - t0
    same = "identical" if library == served else "DIFFERENT"
    print(f"library: {library_s:.2f} s; output bytes {same}", flush=True)

    cpu = cpu_name()
    lines = [
        f"### MLflow registry: export and serving overhead, {cpu}",
        "",
        f"`OMP_NUM_THREADS={threads} taskset -c 1 python bench/registry.py --size {args.size} --record` on {cpu} "
        f"(2 cores, no GPU; {threads} thread(s), another developer's CPU benchmarks running on the machine), torch "
        f"{torch.__version__}, mlflow {__import__('mlflow').__version__}, {time.strftime('%Y-%m-%d')}; one run "
        "each, one after the other.",
        "",
        "| export | seconds (`nsf export mlflow`, fresh process) | version size MB "
        "| store size MB (SQLite + artifacts) |",
        "|---|---|---|---|",
        f"| default | {plain[0]:.1f} | {mb(plain[1])} | {mb(plain[2])} |",
        f"| `--with-mar` | {with_mar[0]:.1f} | {mb(with_mar[1])} | {mb(with_mar[2])} |",
        "",
        f"| one {args.size} px request, default preset, astronaut + starry_night, seed 0 | seconds |",
        "|---|---|",
        f"| `mlflow models serve` (`--env-manager local`, loopback, JSON `dataframe_split`), client to client "
        f"| {served_s:.2f} |",
        f"| library (`model.stylize` + PNG encoding, in process) | {library_s:.2f} |",
        f"| ratio served / library | {served_s / library_s:.3f} |",
        "",
        f"Output bytes through the server and the library: {same}. The server was ready (model loaded, "
        f"`/ping` 200) {ready:.1f} s after `mlflow models serve` started.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.record:
        record(f"registry {args.size}", text)
    return 0 if same == "identical" else 1


if __name__ == "__main__":
    sys.exit(main())
