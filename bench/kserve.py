"""The KServe runtime measured: its serving overhead against the library, and its requests per minute
with 1 and 2 worker processes next to TorchServe's, on this machine.

    python bench/kserve.py --record                       # 256 px, default preset, both runtimes
    python bench/kserve.py --size 64 --steps 2 --requests 2 --no-torchserve     # a quick check

1. overhead: one request (the bundled astronaut in the style of The Starry Night, seed 0, --size,
   --steps) through `nsf serve --runtime kserve` (KServe v1, client to client, one worker process,
   OMP_NUM_THREADS=1), then the same call through the library in this process (`model.stylize` + PNG
   encoding, one thread); the bytes must be equal. Sequential, the server stopped before the library runs.
2. throughput: for each worker count W (--workers), the CPU's threads split between the worker
   processes, 2 x W clients each sending --requests / (2 x W) requests of --size px; the same load
   through TorchServe (`nsf serve`, a .mar with minWorkers = maxWorkers = W) unless --no-torchserve.
   Requests per minute answered, p50/p95 latency, 503s; W small requests first pay each worker's
   first-request costs.
The tables go into bench/RESULTS.md with --record ("kserve overhead", "kserve load").
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO), str(REPO / "tests")]


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))] if v else float("nan")


def drive(send: Callable[[], int], clients: int, per_client: int) -> dict:
    """``clients`` threads each calling ``send()`` (-> HTTP status) ``per_client`` times."""
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(per_client):
            t0 = time.monotonic()
            status = send()
            with lock:
                results.append((status, time.monotonic() - t0))

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    ok = [t for s, t in results if s == 200]
    return {"clients": clients, "requests": len(results), "ok": len(ok), "busy_503": sum(s == 503 for s, _ in results),
            "other": sorted({s for s, _ in results} - {200, 503}), "p50": statistics.median(ok) if ok else float("nan"),
            "p95": percentile(ok, 0.95), "per_min": len(ok) / wall * 60, "wall": wall}


def overhead(args: argparse.Namespace, config: Path, content: bytes, style: bytes, tmp: Path) -> dict:
    from serving import running_kserve

    fields = {"content": content, "style": style, "size": args.size, "seed": 0}
    if args.steps:
        fields["steps"] = args.steps
    with running_kserve(tmp / "overhead", config, env={"OMP_NUM_THREADS": "1"}) as server:
        server.v1({**fields, "size": 64, "steps": 1})  # a first request's one-off costs, as a warm server has paid
        start = time.perf_counter()
        r = server.v1(fields, timeout=3600)
        t_server = time.perf_counter() - start
        assert r.status == 200, r.body[:500]
        served = base64.b64decode(r.json()["predictions"][0])
        # the same request streamed: when its first preview (the coarsest scale's) and its result arrive
        status, _, messages = server.v1_stream({**fields, "stream": True}, timeout=3600)
        assert status == 200 and messages[-1][1]["event"] == "result", messages[-1:]
        first_preview, streamed = messages[0][0], messages[-1][0]
        same_streamed = base64.b64decode(messages[-1][1]["image"]) == served

    import torch

    import nsf
    from nsf.image import encode

    torch.set_num_threads(1)
    model = nsf.style_fusion(device="cpu")
    max_pixels = yaml.safe_load(config.read_text())["nsf"]["max_pixels"]
    options = {k: v for k, v in fields.items() if k not in ("content", "style")}
    model.stylize(content, style, size=64, steps=1, max_pixels=max_pixels)  # the same one-off costs
    start = time.perf_counter()
    result = model.run(content, style, **options, max_pixels=max_pixels)
    library = encode(result.pil(), "png", result.metadata)
    t_library = time.perf_counter() - start
    return {"server_s": t_server, "library_s": t_library, "overhead_s": t_server - t_library,
            "same_bytes": served == library, "first_preview_s": first_preview, "streamed_s": streamed,
            "previews": len(messages) - 1, "same_streamed": same_streamed}


def throughput(args: argparse.Namespace, config: Path, content: bytes, style: bytes, tmp: Path) -> list[tuple]:
    from serving import running_kserve, running_server

    from nsf.runtimes.common import build_archive

    cores = os.cpu_count() or 1
    fields = {"content": content, "style": style, "size": args.size}
    if args.steps:
        fields["steps"] = args.steps
    rows = []
    for w in args.workers:
        threads = max(1, cores // w)
        per = max(1, args.requests // (2 * w))
        with running_kserve(tmp / f"kserve{w}", config, workers=w, env={"OMP_NUM_THREADS": str(threads)}) as server:
            deadline = time.monotonic() + 600  # each worker process loads in the background: wait for all
            while server.log_text().count("calibrated") < w and time.monotonic() < deadline:
                time.sleep(1)
            drive(lambda s=server: s.v1({**fields, "size": 64, "steps": 1}).status, w, 1)  # first-request costs
            r = drive(lambda s=server: s.v1(fields, timeout=3600).status, 2 * w, per)
        rows.append(("KServe", w, threads, r))
        print("kserve", w, r, flush=True)
        if not args.torchserve:
            continue
        cfg = yaml.safe_load(config.read_text())
        cfg["minWorkers"] = cfg["maxWorkers"] = w
        (tmp / f"mc{w}.yaml").write_text(yaml.safe_dump(cfg))
        build_archive(tmp / f"store{w}", model_config=tmp / f"mc{w}.yaml", quiet=True)
        multipart = {k: v if isinstance(v, bytes) else str(v) for k, v in fields.items()}
        with running_server(tmp / f"store{w}", tmp / f"ts{w}", env={"OMP_NUM_THREADS": str(threads)}) as server:
            deadline = time.monotonic() + 600
            while len(server.workers()) < w and time.monotonic() < deadline:
                time.sleep(1)
            small = {**multipart, "size": "64", "steps": "1"}
            drive(lambda s=server, m=small: s.multipart(m).status, w, 1)  # first-request costs
            r = drive(lambda s=server, m=multipart: s.multipart(m, timeout=3600).status, 2 * w, per)
        rows.append(("TorchServe", w, threads, r))
        print("torchserve", w, r, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None, help="steps per request (default: the preset's, 150)")
    ap.add_argument("--requests", type=int, default=8, help="requests per worker count and runtime")
    ap.add_argument("--no-torchserve", dest="torchserve", action="store_false",
                    help="skip the TorchServe rows (they need Java 17)")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()

    from load import cpu_name

    cores = os.cpu_count() or 1
    content = (REPO / "nsf/assets/astronaut.jpg").read_bytes()
    style = (REPO / "nsf/assets/starry_night.jpg").read_bytes()
    steps = args.steps or "default (150)"
    with tempfile.TemporaryDirectory(prefix="nsf-kserve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        config = REPO / "deploy" / "model-config.yaml"
        over = None if args.skip_overhead else overhead(args, config, content, style, tmp)
        rows = throughput(args, config, content, style, tmp)

    date = time.strftime("%Y-%m-%d")
    command = " ".join(["python bench/kserve.py", *sys.argv[1:]])
    if over is not None:
        table = "\n".join([
            f"### Serving overhead of the KServe runtime, {cpu_name()}",
            "",
            f"`{command}` on {cpu_name()} ({cores} cores), {date}: one request, {args.size} px, steps {steps}, "
            "astronaut + Starry Night, seed 0, one thread; KServe v1 client to client (kserve 0.21.0, one worker "
            "process) vs `model.stylize` + PNG encoding in the bench process, one after the other.",
            "",
            "| through | seconds | overhead s | same bytes |",
            "|---|---|---|---|",
            f"| KServe server | {over['server_s']:.2f} | {over['overhead_s']:+.2f} | {over['same_bytes']} |",
            f"| library | {over['library_s']:.2f} | - | - |",
            "",
            f"Streamed (`stream: true`, the same request): first preview after {over['first_preview_s']:.2f} s "
            f"({over['first_preview_s'] / over['streamed_s']:.2f} of the {over['streamed_s']:.2f} s to the result, "
            f"{over['previews']} previews); result bytes equal to the plain answer's: {over['same_streamed']}."]) + "\n"
        print(table)
        if args.record:
            from results import record

            record("kserve overhead", table)
    lines = [f"### Serving throughput: KServe runtime and TorchServe, {cpu_name()}, {cores} cores",
             "",
             f"`{command}` on {cpu_name()} ({cores} cores), {date}: {args.size} px, steps {steps}, astronaut + "
             "Starry Night; 2 x W clients; the shipped model-config.yaml; the CPU's threads split between the "
             "worker processes. KServe: `nsf serve --runtime kserve --workers W` (v1); TorchServe: `nsf serve` "
             "with minWorkers = maxWorkers = W (multipart).",
             "",
             "| runtime | workers | threads each | clients | requests | 200 | 503 | p50 s | p95 s | per minute |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for runtime, w, threads, r in rows:
        lines.append(f"| {runtime} | {w} | {threads} | {r['clients']} | {r['requests']} | {r['ok']} | "
                     f"{r['busy_503']} | {r['p50']:.2f} | {r['p95']:.2f} | {r['per_min']:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.record:
        from results import record

        record(f"kserve load {args.size}", table)


if __name__ == "__main__":
    main()
