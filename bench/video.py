"""Video: temporal consistency, quality and speed of ``nsf.video`` against independent per-frame runs.

Two synthetic clips with known motion (nsf.video.synthetic): a camera pan over the bundled astronaut and a disc
moving over a still background. For each: independent runs (``model.run`` per frame, the default schedule) and
``nsf.video.frames`` (frame 1 the default schedule; later frames warm-started along the flow, one full-size scale
with the temporal loss). Reported per clip and method:

* the warping error of Lai et al. (ECCV 2018): mean over frames t >= 1 of the occlusion-masked MSE between output t
  and output t-1 warped by the flow of the INPUT frames. Measured twice: with the clip's true flow and visibility
  ("true flow"), and as Lai et al. do, with an estimated flow (DIS medium on the input frames) and its
  forward/backward consistency mask ("DIS flow"; the method uses the same flow, so the true-flow number is the fair
  one);
* style_ratio / content_ratio of each frame (bench/score.py), median over frames (bar 0.15 / 0.50);
* seconds per frame, first frame and later frames apart, and the share of flow, warping and decoding.

Also the DIS presets' endpoint error against the true flow and their time. Writes a JSON record (--json), a
side-by-side GIF and a per-frame warping-error plot (--docs).

Usage: python bench/video.py [--size 256] [--frames 10] [--weights 200] [--later-steps 30] [--json out.json]
                             [--docs docs] [--clips pan,object] [--no-independent]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import Scorer  # noqa: E402

import nsf  # noqa: E402
from nsf.image import load_image, pil_to_tensor, tensor_to_pil  # noqa: E402
from nsf.video import flow as fl  # noqa: E402
from nsf.video import frames as video_frames  # noqa: E402
from nsf.video import synthetic as syn  # noqa: E402

ASSETS = Path(nsf.__file__).parent / "assets"
STYLE = ASSETS / "starry_night.jpg"


def clips(size: int, n: int) -> dict[str, list[syn.SyntheticFrame]]:
    src = pil_to_tensor(load_image(ASSETS / "astronaut.jpg"))
    hw = (size * 3 // 4, size)
    # pan: 0.18 frame widths of source per ... the camera moves about 2.5% of the frame width a frame
    scale = 360 / size
    return {"pan": syn.pan(src, n, hw, start=(10.0, 40.0), velocity=(0.025 * size * scale, 0.01 * size * scale),
                           scale=scale),
            "object": syn.moving_object(src, torch.rot90(src, 1, (-2, -1)), n, hw,
                                        velocity=(0.02 * size, 0.008 * size))}


def warping_errors(outs: list[torch.Tensor], clip: list[syn.SyntheticFrame], flow: fl.Flow) -> dict[str, list[float]]:
    true, dis = [], []
    for t in range(1, len(outs)):
        true.append(fl.warping_error(outs[t], outs[t - 1], clip[t].backward, clip[t].visible))
        fwd, bwd = flow.pair(fl.grey(clip[t - 1].image), fl.grey(clip[t].image))
        dis.append(fl.warping_error(outs[t], outs[t - 1], bwd, fl.consistency(fwd, bwd)))
    return {"true": true, "dis": dis}


def presets(clip_set: dict[str, list[syn.SyntheticFrame]]) -> dict[str, dict[str, float]]:
    out = {}
    for name in fl.PRESETS:
        flow = fl.Flow(name)
        flow(fl.grey(clip_set["pan"][0].image), fl.grey(clip_set["pan"][1].image))  # warm-up
        epe, secs = [], []
        for frames in clip_set.values():
            for t in range(1, len(frames)):
                a, b = fl.grey(frames[t - 1].image), fl.grey(frames[t].image)
                start = time.perf_counter()
                _, bwd = flow.pair(a, b)
                secs.append(time.perf_counter() - start)
                vis = frames[t].visible
                err = (fl.as_tensor(bwd) - frames[t].backward).pow(2).sum(1, keepdim=True).sqrt()
                epe.append(float((err * vis).sum() / vis.sum()))
        out[name] = {"epe_px": statistics.mean(epe), "pair_ms": 1000 * statistics.median(secs)}
    return out


def io_timing() -> dict[str, float]:
    """Decode and H.264-encode milliseconds per frame on the bundled demo clip (320x240, 16 frames)."""
    import tempfile

    from nsf.video import io as vio

    clip = ASSETS / "demo_clip.mp4"
    start = time.perf_counter()
    frames = list(vio.read_frames(clip))
    decode = (time.perf_counter() - start) / len(frames)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        writer = vio.VideoWriter(Path(tmp) / "x.mp4", vio.probe(clip).fps, audio_from=clip)
        for f in frames:
            writer.write(f)
        writer.finish()
        encode = (time.perf_counter() - start) / len(frames)
    return {"decode_ms": 1000 * decode, "encode_ms": 1000 * encode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--weights", default="200", help="temporal weights to run, comma-separated")
    ap.add_argument("--later-steps", default="30", help="later-frame steps to run, comma-separated")
    ap.add_argument("--clips", default="pan,object")
    ap.add_argument("--no-independent", action="store_true")
    ap.add_argument("--no-score", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--docs", default=None, help="write the side-by-side GIF and the plot here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # 1: on a shared 2-core CPU two threads wait on each other at every op
    model = nsf.style_fusion(device="cpu")
    scorer = None if args.no_score else Scorer()
    clip_set = clips(args.size, args.frames)
    record: dict = {"size": args.size, "frames": args.frames, "machine": platform.machine(),
                    "threads": torch.get_num_threads(), "presets": presets(clip_set), "runs": {}}
    print("DIS presets:", json.dumps(record["presets"]))
    record["io"] = io_timing()
    print("320x240 demo clip, per frame:", json.dumps(record["io"]))
    measure = fl.Flow(fl.DEFAULT_PRESET)
    style = pil_to_tensor(load_image(STYLE))
    outputs: dict[tuple[str, str], list[torch.Tensor]] = {}
    for clip_name in args.clips.split(","):
        clip = clip_set[clip_name]
        contents = [f.image for f in clip]
        methods: list[tuple[str, dict]] = [] if args.no_independent else [("independent", {})]
        methods += [(f"nsf w={w} steps={s}", {"temporal_weight": float(w), "later_steps": int(s)})
                    for w in args.weights.split(",") for s in args.later_steps.split(",")]
        for method, kw in methods:
            outs, secs, timings = [], [], []
            if method == "independent":
                for c in contents:
                    start = time.perf_counter()
                    outs.append(model.run(c, style, size=args.size, seed=0).image)
                    secs.append(time.perf_counter() - start)
            else:
                for f in video_frames(model, [c[0] for c in contents], style, size=args.size, seed=0, **kw):
                    outs.append(f.image)
                    secs.append(f.seconds)
                    timings.append(dict(f.timings))
            errors = warping_errors(outs, clip, measure)
            row: dict = {"warp_true": statistics.mean(errors["true"]), "warp_dis": statistics.mean(errors["dis"]),
                         "per_frame_true": errors["true"], "first_s": secs[0],
                         "later_s": statistics.mean(secs[1:]) if len(secs) > 1 else None}
            if timings[1:]:
                later = timings[1:]
                total = sum(secs[1:])
                row["share"] = {k: sum(t.get(k, 0.0) for t in later) / total
                                for k in ("decode", "flow", "warp", "stylize", "write")}
            if scorer is not None:
                scores = [scorer.ratios(o, c, STYLE) for o, c in zip(outs, contents)]
                row["style_ratio"] = statistics.median(s["style_ratio"] for s in scores)
                row["content_ratio"] = statistics.median(s["content_ratio"] for s in scores)
            record["runs"][f"{clip_name} / {method}"] = row
            outputs[(clip_name, method)] = outs
            shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items() if k != "per_frame_true"}
            print(f"{clip_name} / {method}: {json.dumps(shown)}", flush=True)
    for clip_name in args.clips.split(","):
        base = record["runs"].get(f"{clip_name} / independent")
        for key, row in record["runs"].items():
            if base and key.startswith(clip_name) and "independent" not in key:
                row["vs_independent_true"] = row["warp_true"] / base["warp_true"]
                row["vs_independent_dis"] = row["warp_dis"] / base["warp_dis"]
                print(f"{key}: warping error / independent = {row['vs_independent_true']:.3f} (true flow), "
                      f"{row['vs_independent_dis']:.3f} (DIS flow)")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    if args.docs and not args.no_independent:
        docs(Path(args.docs), outputs, record, args.clips.split(","))


def docs(folder: Path, outputs: dict, record: dict, clip_names: list[str]) -> None:
    """docs/video_side_by_side.gif (independent left, nsf right, each clip) and docs/video_warping_error.png."""
    from PIL import Image

    nsf_key = next(m for (_, m) in outputs if m != "independent")
    frames_out = []
    n = len(outputs[(clip_names[0], "independent")])
    for t in range(n):
        rows = []
        for c in clip_names:
            a, b = tensor_to_pil(outputs[(c, "independent")][t]), tensor_to_pil(outputs[(c, nsf_key)][t])
            row = Image.new("RGB", (a.width * 2 + 4, a.height), "white")
            row.paste(a, (0, 0))
            row.paste(b, (a.width + 4, 0))
            rows.append(row)
        sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows) + 4 * (len(rows) - 1)), "white")
        y = 0
        for r in rows:
            sheet.paste(r, (0, y))
            y += r.height + 4
        frames_out.append(sheet.resize((sheet.width * 9 // 20, sheet.height * 9 // 20), Image.Resampling.LANCZOS)
                          .convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    frames_out[0].save(folder / "video_side_by_side.gif", save_all=True, append_images=frames_out[1:], duration=250,
                       loop=0, optimize=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for c in clip_names:
        for m, style in (("independent", "--"), (nsf_key, "-")):
            errs = record["runs"][f"{c} / {m}"]["per_frame_true"]
            ax.plot(range(1, len(errs) + 1), errs, style, marker="o", ms=3, label=f"{c}: {m.split(' ')[0]}")
    ax.set_xlabel("frame")
    ax.set_ylabel("warping error (MSE, true flow)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"Warping error per frame at {record['size']} px (lower: less flicker)")
    fig.tight_layout()
    fig.savefig(folder / "video_warping_error.png")


if __name__ == "__main__":
    main()
