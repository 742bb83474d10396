"""Side-by-side speed and quality: nsf's default preset vs a plain eager L-BFGS reference vs the seed preset.

    python bench/speed.py --size 256 --content bench/images/x.jpg --style bench/images/y.jpg [--record]

Each method runs in its own subprocess (so peak memory is its own), on the same images, machine
and torch threads. Quality comes from bench/score.py (neutral: not the optimizer's loss code).
The threshold is the reference's quality after its last step: style_ratio + content_ratio at or
below it, with style_ratio <= 0.15 and content_ratio <= 0.50. With --record the table replaces
this run's section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

STYLE_BAR, CONTENT_BAR = 0.15, 0.50


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def worker(args: argparse.Namespace) -> dict:
    import torch
    from score import Scorer

    import nsf
    from nsf.image import tensor_to_pil

    if args.threads:
        torch.set_num_threads(args.threads)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{args.method}_{args.size}_{Path(args.content).stem}_{Path(args.style).stem}"
    result: dict = {"method": args.method}
    checkpoints: list[tuple[int, float, object]] = []
    if args.method == "reference":
        from reference import Reference

        ref = Reference(args.device)

        def keep(n: int, t: float, x: torch.Tensor) -> None:
            checkpoints.append((n, t, ref.to_image(x)))
            print(f"reference step {n}: {t:.1f} s", file=sys.stderr, flush=True)

        x, per_step = ref.run(args.content, args.style, size=args.size, steps=args.ref_steps, checkpoint=keep,
                              every=50)
        img = ref.to_image(x)
        result.update(steps=checkpoints[-1][0], seconds=checkpoints[-1][1], s_per_step=per_step)
    elif args.method == "pastiche":  # the peer's own PyPI package, its defaults but for the size
        img = run_pastiche(args, checkpoints)
        result.update(steps=checkpoints[-1][0], seconds=checkpoints[-1][1],
                      s_per_step=checkpoints[-1][1] / checkpoints[-1][0])
    else:
        if args.method == "nsf":
            model, options = nsf.style_fusion(device=args.device), {"size": args.size}
        elif args.method == "nsf_single_scale":  # per-step cost at full size, same loop as the reference
            model = nsf.style_fusion(device=args.device)
            options = {"size": args.size, "steps": args.probe_steps, "scales": (1.0,), "scale_steps": (1.0,),
                       "tol": 0.0}
        elif args.method == "seed":
            model, options = nsf.style_fusion(device=args.device, preset="seed"), {"steps": args.seed_steps}
        else:
            raise SystemExit(f"unknown method {args.method}")
        steps: list[float] = []
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        img = model.stylize(args.content, args.style, callback=lambda p: steps.append(time.perf_counter()),
                            **options)
        sync()
        secs = time.perf_counter() - t0
        result.update(steps=len(steps), seconds=secs, s_per_step=secs / max(len(steps), 1))
        if args.method == "nsf_single_scale" and len(steps) > 2:  # exclude the first step's warm-up
            result["s_per_step"] = (steps[-1] - steps[0]) / (len(steps) - 1)
        checkpoints.append((len(steps), secs, img))
    path = out_dir / f"{tag}.png"
    img = img if not isinstance(img, torch.Tensor) else tensor_to_pil(img)
    img.save(path)
    scorer = Scorer(args.device)
    curve = []
    for n, t, im in checkpoints:
        q = scorer.score(im, args.content, args.style)
        curve.append({"step": n, "seconds": round(t, 2), "style_ratio": round(q["style_ratio"], 4),
                      "content_ratio": round(q["content_ratio"], 4)})
    result.update(curve=curve, final=curve[-1], image=os.path.relpath(path, REPO),
                  peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  device=device_name(args.device))
    if args.device.startswith("cuda"):
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def run_pastiche(args: argparse.Namespace, checkpoints: list) -> object:
    """pastiche 1.6.0 (its bundled Caffe VGG-19, L-BFGS from the content; its default 1000 steps unless
    --peer-steps caps them), timed between checkpoints."""
    import tempfile

    from pastiche.pastiche import PasticheArtist, save_image
    from PIL import Image

    artist = PasticheArtist(args.content, [args.style], size=args.size, device=args.device)
    elapsed, tmp = 0.0, Path(tempfile.mkdtemp())

    def snapshot(n: int) -> Image.Image:
        path = tmp / f"{n}.png"
        save_image(artist.pastiche, str(path))
        return Image.open(path).convert("RGB")

    steps = args.peer_steps or args.ref_steps
    for n in range(1, steps + 1):
        t0 = time.perf_counter()
        artist.draw()
        elapsed += time.perf_counter() - t0
        if n % 50 == 0 or n == steps:
            checkpoints.append((n, elapsed, snapshot(n)))
            print(f"pastiche step {n}: {elapsed:.1f} s", file=sys.stderr, flush=True)
    return checkpoints[-1][2]


def reached(q: dict, threshold: float) -> bool:
    return (q["style_ratio"] + q["content_ratio"] <= threshold + 1e-9 and q["style_ratio"] <= STYLE_BAR
            and q["content_ratio"] <= CONTENT_BAR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--content", required=True)
    ap.add_argument("--style", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="reference,pastiche,nsf,nsf_single_scale,seed")
    ap.add_argument("--ref-steps", type=int, default=1000)
    ap.add_argument("--seed-steps", type=int, default=2000, help="cap the seed preset's steps (CPU: it is slow)")
    ap.add_argument("--probe-steps", type=int, default=12)
    ap.add_argument("--peer-steps", type=int, default=0, help="cap pastiche's steps (default: --ref-steps)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per method (0: torch's default)")
    ap.add_argument("--merge", action="store_true",
                    help="keep earlier rows of this size/pair/device/threads for methods not run now")
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--record", action="store_true", help="write the table into bench/RESULTS.md")
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    raw = Path(args.out) / (f"speed_{args.size}_{Path(args.content).stem}_{Path(args.style).stem}_{args.device}"
                            f"{f'_{args.threads}t' if args.threads else ''}.json")
    raw.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(raw.read_text()) if args.merge and raw.exists() else {}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    for method in filter(None, args.methods.split(",")):  # --methods "" --merge: report the saved rows only
        cmd = [sys.executable, __file__, "--method", method] + [a for a in sys.argv[1:] if a != "--record"]
        t0 = time.time()
        log = raw.with_suffix(f".{method}.log")
        with log.open("w") as err:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{method} failed:\n{log.read_text()[-3000:]}")
        results[method] = {**json.loads(lines[-1][7:]), "measured_at": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t0))}
        print(f"{method}: {time.time() - t0:.0f} s wall, final {results[method]['final']}", flush=True)
        raw.write_text(json.dumps(results, indent=1))
    report(args, results)


def _argv_for(methods: list[str]) -> list[str]:
    """This run's arguments, naming the methods of every row shown (rows kept by --merge included)."""
    argv = [a for a in sys.argv[1:] if a != "--record"]
    if "--methods" in argv:
        i = argv.index("--methods")
        argv[i + 1:i + 2] = [",".join(methods)]
    return argv


def report(args: argparse.Namespace, results: dict) -> None:
    ref = results.get("reference")
    threshold = ref["final"]["style_ratio"] + ref["final"]["content_ratio"] if ref else None
    pair = f"{Path(args.content).stem} + {Path(args.style).stem}"
    dev = next(iter(results.values()))["device"]
    lines = [f"### {args.size} px, {pair}, {args.device}",
             "",
             f"`{' '.join(['python bench/speed.py'] + _argv_for(list(results)))}` "
             f"on {dev}, {time.strftime('%Y-%m-%d')}; rows measured one after another on this machine "
             f"(start times UTC in the last column).",
             ""]
    if threshold is not None:
        lines += [f"Threshold = reference after {ref['final']['step']} steps: style_ratio + content_ratio "
                  f"<= {threshold:.4f} (each also within {STYLE_BAR}/{CONTENT_BAR}).", ""]
    lines += ["| method | steps | s/step | s/step vs ref | total s | time to threshold | vs ref total | "
              "vs ref time to threshold | style_ratio | content_ratio | peak RSS MB | image | measured at |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ref_tt = None
    if ref is not None:
        ref_tt = next((c["seconds"] for c in ref["curve"] if reached(c, threshold)), ref["seconds"])
    for m, r in results.items():
        tt = next((c["seconds"] for c in r["curve"] if threshold is not None and reached(c, threshold)), None)
        sps = r["s_per_step"] / ref["s_per_step"] if ref else float("nan")
        tts = f"{tt:.1f}" if tt is not None else "not reached"
        vs_total = f"1/{ref['seconds'] / tt:.1f}" if tt and ref and m != "reference" else "-"
        vs_tt = f"1/{ref_tt / tt:.1f}" if tt and ref_tt and m != "reference" else "-"
        lines.append(f"| {m} | {r['steps']} | {r['s_per_step']:.3f} | {sps:.2f} | {r['seconds']:.1f} | {tts} | "
                     f"{vs_total} | {vs_tt} | {r['final']['style_ratio']:.4f} | {r['final']['content_ratio']:.4f} | "
                     f"{r['peak_rss_mb']} | {r['image']} | {r.get('measured_at', '-')} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.record:
        from results import record

        threads = f" {args.threads}t" if args.threads else ""
        record(f"speed {args.size} {Path(args.content).stem} {Path(args.style).stem} {args.device}{threads}", table)


if __name__ == "__main__":
    main()
