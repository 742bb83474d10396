"""Command line: ``nsf stylize``, ``nsf demo``, ``nsf archive``, ``nsf serve``, ``nsf export mlflow``
(``python -m nsf`` works the same).

Every option flag is generated from :class:`nsf.StyleConfig`: defaults and help live there.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
import time
import typing
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .config import PRESETS, StyleConfig
from .model import PRECISIONS
from .model import style_fusion as _builder  # its signature holds the builder's defaults (runs look it up anew)
from .runtimes import ARCHIVING, DEFAULT_SERVING, EXPORTING, RUNTIMES, SERVING
from .version import __version__

# Commands that live in modules of their own, by name: each module has ``add_parser(subparsers)`` (imports nothing
# heavy at import time) and ``main(args) -> int``. A new face is one module and one row here.
FACES: dict[str, str] = {
    "studio": "nsf.studio_cli",
    "batch": "nsf.batch_cli",
    "video": "nsf.video_cli",
}

DEMO_CONTENT = "astronaut.jpg"
DEMO_STYLE = "starry_night.jpg"
_DEFAULTS = StyleConfig()


def _parse_list(kind: type) -> Any:
    def parse(text: str) -> tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return tuple(kind(t) for t in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
    return parse


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("options (defaults are the default preset's; --preset changes them)")
    hints = typing.get_type_hints(StyleConfig)
    for f in dataclasses.fields(StyleConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(_DEFAULTS, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f.metadata["help"] if default is None else f"{f.metadata['help']} (default: {shown})"
        help_text = help_text.replace("%", "%%")
        hint = hints[f.name]
        args = typing.get_args(hint)
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif "bool_choices" in f.metadata:  # a choice that was a bool: the bare flag and --no-FLAG still work
            on, off = f.metadata["bool_choices"]
            group.add_argument(flag, nargs="?", const=on, default=None, metavar="|".join(f.metadata["choices"]),
                               help=f"{help_text}; {flag} alone means {on}")
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const=off,
                               help=f"the same as {flag} {off}")
        elif hint in (int, float, str):
            group.add_argument(flag, type=hint, default=None, metavar=f.name.upper(), help=help_text)
        else:  # tuple[str, ...] / tuple[float, ...] | None
            inner = typing.get_args(args[0])[0] if type(None) in args else args[0]
            group.add_argument(flag, type=_parse_list(inner), default=None, metavar="A,B,...", help=help_text)


# Help of the builder's own arguments; their defaults are read from nsf.style_fusion's signature.
_BUILDER_HELP = {
    "weights": "caffe, torchvision, or a state-dict path",
    "device": "cpu, cuda, cuda:1... (default: cuda if available)",
    "compile": "auto (CUDA only), true, false, or a torch.compile mode",
    "precision": "the network's precision: auto (bf16 on CUDA and on CPUs with AMX, else fp32), fp32 or bf16",
    "channels_last": "NHWC convolutions: auto (CUDA and CPUs with AMX), true or false",
    "cuda_graphs": "replay each L-BFGS step as one CUDA graph: auto (CUDA only), true or false",
    "max_memory": "memory a run may use: auto (80%% of the free RAM, 90%% of the free GPU memory), a byte count, "
                  "or e.g. 6GB, 1.5GiB; scales that would not fit run tile by tile, with the same result",
}


def builder_defaults() -> dict[str, Any]:
    """The keyword defaults of :func:`nsf.style_fusion` (written once, there), by parameter name."""
    return {name: p.default for name, p in inspect.signature(_builder).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    defaults = builder_defaults()
    parser.add_argument("--preset", default=defaults["preset"], choices=sorted(PRESETS),
                        help=f"named option set (default: {defaults['preset']})")
    for name, help_text in _BUILDER_HELP.items():
        default = defaults[name]
        shown = "" if default is None else f" (default: {_show_arg(default)})"
        parser.add_argument("--" + name.replace("_", "-"), default=default, help=help_text + shown,
                            choices=PRECISIONS if name == "precision" else None)
    _add_config_flags(parser)


def _show_arg(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bit-depth", type=int, choices=(8, 16), default=8,
                        help="bits per channel of a PNG output: 16 keeps the optimizer's smooth gradients "
                             "for print (default: 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsf", description="Neural Style Fusion: neural style transfer "
                                     "(Gatys et al.) with VGG-19, on CPU or GPU.")
    parser.add_argument("--version", action="version", version=f"nsf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stylize", help="stylize CONTENT with one or more STYLE images")
    p.add_argument("content", help="content image")
    p.add_argument("styles", nargs="+", metavar="style", help="style image(s); blend with --style-blend-weights")
    p.add_argument("-o", "--output", required=True, help="output image (.png carries provenance metadata)")
    p.add_argument("--init-image", default=None, help="start from this image (instead of --init content/noise)")
    p.add_argument("--masks", default=None, metavar="A.png,B.png,...",
                   help="regional styles: one greyscale mask per style, comma-separated, in the styles' order "
                        "(white: that style goes there; grey values blend; where no mask covers, the content "
                        "stays). Each with the content's aspect ratio")
    p.add_argument("--style-masks", default=None, metavar="SA.png,,...",
                   help="optional, one per style, comma-separated: the part of each style image its style is "
                        "taken from (an empty entry or - : the whole style image)")
    add_output_flags(p)
    add_run_flags(p)
    d = sub.add_parser("demo", help="stylize the bundled sample images (no files of your own needed)")
    d.add_argument("-o", "--output", default="nsf-demo.png", help="output image (default: nsf-demo.png)")
    add_output_flags(d)
    add_run_flags(d)
    n = sub.add_parser("plan", help="show how a run fits the memory budget (scales, tiles, peak memory, time) "
                                    "before running it")
    n.add_argument("content", nargs="?", default=None,
                   help="content image, or its WxH (e.g. 4000x3000); default: a square image of --size")
    n.add_argument("--no-timing", action="store_true", help="skip the short timing run (no time prediction)")
    n.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_run_flags(n)
    _add_serving_commands(sub)
    _add_registry_commands(sub)
    for module in FACES.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def _add_serving_commands(sub: Any) -> None:
    """``nsf archive`` and ``nsf serve`` (TorchServe; needs the ``serve`` extra and a checkout)."""
    a = sub.add_parser("archive", help="build model_store/style_fusion.mar for TorchServe (+ sha256, model card)")
    a.add_argument("--export-path", default="model_store", help="where the .mar goes (default: model_store)")
    a.add_argument("--root", default=None, help="checkout holding handlers/ and deploy/ (default: found)")
    a.add_argument("--model-config", default=None,
                   help="the model-config.yaml to pack (default: deploy/model-config.yaml of the checkout)")
    s = sub.add_parser("serve", help="serve style_fusion in the foreground: TorchServe with the archive (default) "
                                      "or KServe's model server (--runtime kserve)")
    s.add_argument("--runtime", choices=SERVING, default=DEFAULT_SERVING,
                   help="; ".join(f"{n}: {RUNTIMES[n].summary} (the '{RUNTIMES[n].extra}' extra)" for n in SERVING)
                        + f". Default: {DEFAULT_SERVING}")
    s.add_argument("--model-store", default="model_store",
                   help="torchserve: folder holding style_fusion.mar (default: model_store)")
    s.add_argument("--port", type=int, default=None,
                   help="torchserve: inference port N; management, metrics and gRPC take N+1..N+4 (default: as in "
                        "deploy/config.properties, 8080-8082, 7070-7071). kserve: the HTTP port (default: 8080)")
    s.add_argument("--workdir", default=None,
                   help="torchserve: where TorchServe runs: key_file.json, logs/ (default: MODEL_STORE/run)")
    s.add_argument("--host", default=None,
                   help="kserve: address to bind (default: 127.0.0.1; the KServe server has no authentication)")
    s.add_argument("--workers", type=int, default=None,
                   help="kserve: worker processes, each with its own model (default: 1)")
    s.add_argument("--model-config", default=None,
                   help="kserve: the model-config.yaml with the serving limits (default: deploy/model-config.yaml)")
    s.add_argument("--device", default=None, help="kserve: cpu, cuda, cuda:N (default: the first GPU, else cpu)")
    s.add_argument("--root", default=None, help="checkout holding handlers/ and deploy/ (default: found)")


def _add_registry_commands(sub: Any) -> None:
    """``nsf export mlflow`` (MLflow's model registry; needs the ``mlflow`` extra and a checkout)."""
    e = sub.add_parser("export", help="log and register style_fusion in a model registry")
    e.add_argument("registry", choices=EXPORTING,
                   help="; ".join(f"{n}: {RUNTIMES[n].summary} (the '{RUNTIMES[n].extra}' extra)" for n in EXPORTING))
    e.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking/registry store (default: sqlite:///mlflow.db in the current directory, "
                        "artifacts in ./mlartifacts; no server needed)")
    e.add_argument("--registered-model-name", default="style_fusion", help="registered model (default: style_fusion)")
    e.add_argument("--alias", default=None, help="set this alias (e.g. champion) on the new version")
    e.add_argument("--with-mar", action="store_true",
                   help="also build the TorchServe .mar (nsf archive) and attach it and its .sha256 to the version")
    e.add_argument("--root", default=None, help="checkout holding deploy/ and bench/ (default: found)")
    e.add_argument("--model-config", default=None,
                   help="the model-config.yaml to pack (default: deploy/model-config.yaml of the checkout)")


_SWITCHES = ("compile", "channels_last", "cuda_graphs")  # builder arguments that take True/False/"auto"/a mode


def _builder_arg(name: str, value: Any) -> Any:
    """A builder flag's text as the builder takes it: true/false as booleans for the switches."""
    if name not in _SWITCHES or not isinstance(value, str):
        return value  # text, or the signature's own default
    return {"true": True, "false": False, "auto": "auto"}.get(value.lower(), value)


def progress_bar(enabled: bool) -> Any:
    """``(callback, on_tile, close)`` of a tqdm bar over the steps that names the scale and its tiles."""
    if not enabled:
        return None, None, lambda: None
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def callback(p: Any) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=p.total, unit="step", dynamic_ncols=True)
        b = state["bar"]
        tiles = f" {p.tiles} tiles" if p.tiles > 1 else ""
        state["scale"] = f"scale {p.scale + 1} {p.size[1]}x{p.size[0]}{tiles}"
        b.set_postfix_str(f"{state['scale']} loss={p.loss:.4g} content={p.content:.3g} style={p.style:.3g}",
                          refresh=False)
        b.update(p.step - b.n)

    def on_tile(done: int, total: int) -> None:
        if "bar" in state:  # a tiled step takes long: show where it is
            state["bar"].set_postfix_str(f"{state['scale']}: tile {done}/{total}")

    def close() -> None:
        if "bar" in state:
            state["bar"].close()

    return callback, on_tile, close


def mask_paths(masks: str | None, style_masks: str | None, styles: int) -> dict[str, Any]:
    """``--masks`` and ``--style-masks`` for ``styles`` style images -> ``stylize``'s ``masks`` and
    ``style_masks`` keywords (only those given).

    Raises:
        nsf.errors.ConfigError: an entry count that is not one per style, or an empty ``--masks`` entry
            (``field`` ``masks`` or ``style_masks``).
    """
    from .errors import ConfigError

    out: dict[str, Any] = {}
    for flag, text in (("masks", masks), ("style_masks", style_masks)):
        if text is None:
            continue
        entries = [t.strip() for t in text.split(",")]
        name = "--" + flag.replace("_", "-")
        what = ("paths, one mask per style image" if flag == "masks"
                else "entries, one per style image (a path, or empty or - for the whole style image)")
        allowed = f"{styles} comma-separated {what}"
        if len(entries) != styles:
            raise ConfigError(f"{name}={text!r} has {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} for "
                              f"{styles} style image{'s' if styles > 1 else ''}; allowed: {allowed}",
                              field=flag, value=text, allowed=allowed)
        if flag == "masks":
            missing = [i for i, e in enumerate(entries, start=1) if e in ("", "-")]
            if missing:
                raise ConfigError(f"{name}={text!r} leaves style {missing[0]} without a mask; allowed: {allowed} "
                                  "(every style needs its mask)", field=flag, value=text, allowed=allowed)
            out[flag] = entries
        else:
            paths = [None if e in ("", "-") else e for e in entries]
            if any(p is not None for p in paths):
                out[flag] = paths
    return out


def _run(args: argparse.Namespace, content: Any, styles: Sequence[Any], init_image: Any = None) -> int:
    import torch

    from .image import save_png, tensor_to_pil

    masks = mask_paths(getattr(args, "masks", None), getattr(args, "style_masks", None), len(styles))
    model, options = model_from_args(args)
    out = Path(args.output)
    if args.bit_depth == 16 and out.suffix.lower() != ".png":
        raise ValueError(f"--bit-depth 16 with output {out.name!r}; allowed: a .png output")
    callback, on_tile, close = progress_bar(not args.no_progress)
    start = time.perf_counter()
    try:
        result = model.run(content, list(styles), init_image=init_image, callback=callback, on_tile=on_tile,
                           **masks, **options)
    finally:
        close()
    elapsed = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    t, plan = result.image, result.plan
    meta = {**result.metadata, "seconds": round(elapsed, 2), "bit_depth": args.bit_depth, "plan": plan.to_dict()}
    if out.suffix.lower() == ".png":
        save_png(t, out, meta, bit_depth=args.bit_depth)
    else:
        tensor_to_pil(t).save(out)
    device = model.device if model.device.type != "cuda" else torch.cuda.get_device_name(model.device)
    tiled = f", tiled at {sum(1 for s in plan.scales if s.tile)} scale(s)" if plan.tiled else ""
    print(f"wrote {out} ({t.shape[-1]}x{t.shape[-2]}, {args.bit_depth}-bit) in {elapsed:.1f} s on {device}{tiled}")
    return 0


def options_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(builder keywords, StyleConfig options)`` from a command line made with :func:`add_run_flags`: every
    builder argument (its signature's default where not given) and the config fields that were given."""
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(StyleConfig)
               if getattr(args, f.name) is not None}
    builder = {name: _builder_arg(name, getattr(args, name)) for name in _BUILDER_HELP}
    return builder, options


def model_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from .model import style_fusion

    builder, options = options_from_args(args)
    model = style_fusion(**builder, preset=args.preset)
    return model, options


def _plan(args: argparse.Namespace) -> int:
    import json
    import re

    from .image import load_image

    model, options = model_from_args(args)
    size: Any = None
    if args.content is not None:
        m = re.fullmatch(r"(\d+)x(\d+)", args.content)
        if m:
            size = (int(m.group(2)), int(m.group(1)))
        else:
            w, h = load_image(args.content, max_pixels=model.config.max_pixels).size
            size = (h, w)
    plan = model.plan(size, timing=not args.no_timing, **options)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.table())
    return 0


def _runtime(name: str) -> Any:
    """The adapter module of runtime ``name`` (nsf.runtimes.RUNTIMES), or a ValueError naming the extra it needs."""
    runtime = RUNTIMES[name]
    try:
        return importlib.import_module(runtime.module)
    except ImportError as e:
        raise ValueError(f"the {name} runtime needs the '{runtime.extra}' extra ({e}); allowed: pip install -e "
                         f"'.[{runtime.extra}]'") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in FACES:
            return int(importlib.import_module(FACES[args.command]).main(args))
        if args.command == "archive":
            return int(_runtime(ARCHIVING[0]).archive_main(args))
        if args.command == "serve":
            return int(_runtime(args.runtime).serve_main(args))
        if args.command == "plan":
            return _plan(args)
        if args.command == "export":
            return int(_runtime(args.registry).export_main(args))
        if args.command == "stylize":
            return _run(args, args.content, args.styles, init_image=args.init_image)
        assets = resources.files("nsf") / "assets"
        with resources.as_file(assets / DEMO_CONTENT) as c, resources.as_file(assets / DEMO_STYLE) as s:
            print(f"demo: {DEMO_CONTENT} in the style of {DEMO_STYLE} (credits: nsf/assets/CREDITS.md)")
            return _run(args, c, [s])
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"nsf: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
