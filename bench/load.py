"""Latency and throughput of the real TorchServe endpoint (`nsf serve`, token auth, loopback).

    python bench/load.py --workers 1 2 --record

For each worker count W (minWorkers = maxWorkers = W in a copy of deploy/model-config.yaml, the
CPU's threads split between them):
- burst: 4 x W clients, 3 requests each, 64 px / 2 steps (the CI load test, measured): answers,
  503s, p50/p95 latency, images per minute;
- steady: 2 x W clients sending --requests requests of --size px with the default preset (the
  bundled astronaut + starry night): requests per minute, p50/p95 latency.
The table goes into bench/RESULTS.md with --record; README's sizing rule is derived from it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO), str(REPO / "tests")]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))]


def drive(server, fields: dict, clients: int, per_client: int) -> dict:
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(per_client):
            t0 = time.monotonic()
            r = server.multipart(fields, timeout=1800)
            with lock:
                results.append((r.status, time.monotonic() - t0))

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    ok = [t for s, t in results if s == 200]
    return {"clients": clients, "requests": len(results), "ok": len(ok),
            "busy_503": sum(s == 503 for s, _ in results), "other": sorted({s for s, _ in results} - {200, 503}),
            "p50": statistics.median(ok) if ok else float("nan"), "p95": percentile(ok, 0.95) if ok else float("nan"),
            "per_min": len(ok) / wall * 60, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--requests", type=int, default=6, help="steady requests per worker count")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()

    from serving import png, running_server

    from nsf.runtimes.common import build_archive

    cores = os.cpu_count() or 1
    content = (REPO / "nsf/assets/astronaut.jpg").read_bytes()
    style = (REPO / "nsf/assets/starry_night.jpg").read_bytes()
    rows = []
    for w in args.workers:
        with tempfile.TemporaryDirectory(prefix="nsf-load-") as tmp:
            tmp = Path(tmp)
            cfg = yaml.safe_load((REPO / "deploy/model-config.yaml").read_text())
            cfg["minWorkers"] = cfg["maxWorkers"] = w
            (tmp / "model-config.yaml").write_text(yaml.safe_dump(cfg))
            build_archive(tmp / "store", model_config=tmp / "model-config.yaml", quiet=True)
            threads = max(1, cores // w)
            with running_server(tmp / "store", tmp / "run", env={"OMP_NUM_THREADS": str(threads)}) as server:
                deadline = time.monotonic() + 300
                while len(server.workers()) < w and time.monotonic() < deadline:
                    time.sleep(1)
                burst = drive(server, {"content": png(96, 72, 0), "style": png(64, 64, 1), "size": "64",
                                       "steps": "2"}, 4 * w, 3)
                per = max(1, args.requests // (2 * w))
                steady = drive(server, {"content": content, "style": style, "size": str(args.size)}, 2 * w, per)
            rows.append((w, threads, burst, steady))
            print(w, burst, steady, flush=True)

    lines = [f"### Serving: latency and throughput, {cpu_name()}, {cores} cores",
             "",
             f"`python bench/load.py --workers {' '.join(map(str, args.workers))} --size {args.size} "
             f"--requests {args.requests}` on {cpu_name()} ({cores} cores), {time.strftime('%Y-%m-%d')}: the real "
             "TorchServe 0.12 (`nsf serve`, token auth, loopback), the shipped config but for the worker count, "
             "the CPU's threads split between the workers.",
             "",
             "| workers | threads each | load | clients | requests | 200 | 503 (queue full) | p50 s | p95 s | "
             "per minute |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for w, threads, burst, steady in rows:
        for name, r in (("burst: 64 px, 2 steps", burst), (f"steady: {args.size} px, default preset", steady)):
            lines.append(f"| {w} | {threads} | {name} | {r['clients']} | {r['requests']} | {r['ok']} | "
                         f"{r['busy_503']} | {r['p50']:.2f} | {r['p95']:.2f} | {r['per_min']:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.record:
        from results import record

        record(f"load {args.size}", table)


if __name__ == "__main__":
    main()
