"""``nsf batch``: many images in one style, on one machine -- batched, atomic, resumable, with a manifest.

``run(inputs, style, out_dir, **options)`` stylizes every image of ``inputs`` (files, folders, globs, or text
files listing paths) with ``style`` and writes ``OUT_DIR/<name>.png`` for each, with its provenance, and a
manifest ``OUT_DIR/manifest.jsonl`` (one JSON object a line: input, output, sha256 of both, options,
seconds, status or error).

- Images whose sizes agree after resizing (the longer side ``size``, the aspect ratio kept) run as one batched
  optimization of up to ``batch_size`` (each image its own problem: :meth:`nsf.StyleFusion.transfer`). A group
  that fails is retried image by image; an image that still fails is an ``error`` row, never the end of the batch.
- Every output is written to a temporary name in its folder, fsynced and renamed: a file with the final name is
  complete. Its manifest row is appended and fsynced after the rename.
- Resumable: a rerun skips an image when its output exists, its provenance names the input's sha256 and the run's
  options (``options_sha256``), and its sha256 is the one the manifest recorded; anything else is redone. An
  output renamed into place just before a crash, whose manifest row never got written, is recognised by its
  provenance and its row written then (``recovered``).
- Ctrl-C (SIGINT) stops after the current group (a second Ctrl-C stops at once; that group is not written); a
  full disk (ENOSPC) or an output folder that stops taking files stops the batch with the temporary file removed
  and the failing image's row saying why. A rerun completes exactly the rest.

The Ray Data engine (:mod:`nsf.batch_ray`) shares :class:`Stylizer`: the same grouping, files and rows.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import errno
import glob
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .config import StyleConfig
from .errors import ConfigError

MANIFEST = "manifest.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
LIST_SUFFIXES = (".txt", ".lst")
# builder arguments of nsf.style_fusion that a batch passes through (every other option is a StyleConfig field)
BUILDER_KEYS = ("weights", "device", "compile", "precision", "channels_last", "cuda_graphs", "max_memory")
STATUSES = ("ok", "error", "skipped", "stopped")
Row = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One input and the output name it gets (a path relative to the output folder, ``/``-separated)."""

    input: str
    output: str


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def expand_inputs(inputs: Sequence[str | os.PathLike[str]], *, exclude: str | os.PathLike[str] | None = None,
                  ) -> list[Item]:
    """Files, folders (recursively, image files only), globs and text files of paths (``.txt``/``.lst``: one path a
    line, relative to the list's folder; ``#`` comments) -> one :class:`Item` per distinct input, in order.

    A folder's images keep their relative paths under the output folder (``a/b.jpg`` -> ``a/b.png``); any other
    input is named by its file name. Two inputs that would get one name both get ``<stem>-<8 hex>.png`` (a hash of
    their path, so the names stay the same from run to run). Files under ``exclude`` (the output folder) are left
    out. A path listed in a text file may be missing (its row says so); a path or glob given directly may not.

    Raises:
        nsf.errors.ConfigError: an input that does not exist, a glob that matches nothing, or no image at all
            (``field`` ``inputs``).
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, str]] = []  # (absolute input, output name before de-duplication)

    def add(path: Path, name: str) -> None:
        if not _inside(path, skip):
            found.append((path, name))

    allowed = "existing image files, folders, globs, or .txt/.lst files listing paths"
    for raw in inputs:
        text = os.fspath(raw)
        p = Path(text).expanduser()
        if p.is_dir():
            root = p.resolve()
            for f in sorted(root.rglob("*")):
                if f.is_file() and _is_image(f):
                    add(f, f.relative_to(root).with_suffix(".png").as_posix())
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            for line in p.read_text().splitlines():
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    q = Path(entry).expanduser()
                    q = (q if q.is_absolute() else p.parent / q).resolve()
                    add(q, Path(q.name).with_suffix(".png").as_posix())
        elif p.is_file():
            f = p.resolve()
            add(f, Path(f.name).with_suffix(".png").as_posix())
        elif glob.has_magic(text):
            matches = sorted(Path(m).resolve() for m in glob.glob(os.path.expanduser(text), recursive=True))
            matches = [m for m in matches if m.is_file() and _is_image(m)]
            if not matches:
                raise ConfigError(f"input {text!r} matches no image file; allowed: {allowed}", field="inputs",
                                  value=text, allowed=allowed)
            for m in matches:
                add(m, Path(m.name).with_suffix(".png").as_posix())
        else:
            raise ConfigError(f"input {text!r} does not exist; allowed: {allowed}", field="inputs", value=text,
                              allowed=allowed)
    unique: dict[Path, str] = {}
    for p, n in found:
        unique.setdefault(p, n)
    if not unique:
        raise ConfigError(f"no image among the inputs {[os.fspath(i) for i in inputs]}; allowed: {allowed}",
                          field="inputs", value=[os.fspath(i) for i in inputs], allowed=allowed)
    names: dict[str, int] = {}
    for n in unique.values():
        names[n] = names.get(n, 0) + 1
    items = []
    for p, n in unique.items():
        if names[n] > 1:
            stem = Path(n)
            n = (stem.parent / f"{stem.stem}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}.png").as_posix()
        items.append(Item(str(p), n))
    return items


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_manifest(text: str) -> dict[str, Row]:
    """The last row per output of a manifest's text (a line cut short by a crash is ignored)."""
    rows: dict[str, Row] = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("output"), str):
            rows[row["output"]] = row
    return rows


class Manifest:
    """``manifest.jsonl`` in a local folder: read once, then appended to and fsynced row by row."""

    def __init__(self, folder: Path):
        self.path = folder / MANIFEST
        text = self.path.read_text(errors="replace") if self.path.exists() else ""
        self.rows = parse_manifest(text)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        if text and not text.endswith("\n"):  # a row cut short by a crash: the next starts on its own line
            self._file.write("\n")

    def append(self, row: Row) -> None:
        self._file.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.rows[row["output"]] = row

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------------------------------------
# Where outputs go
# ---------------------------------------------------------------------------------------------


class Sink(Protocol):
    """Where outputs are written (a local folder here; :mod:`nsf.batch_ray` adds pyarrow file systems)."""

    def read(self, name: str) -> bytes | None: ...
    def write(self, name: str, data: bytes) -> None: ...


class DiskFull(OSError):
    """The output folder's file system is full (ENOSPC/EDQUOT); the batch stops, nothing half-written is left."""


class LocalSink:
    """A local folder: each file written to a temporary name beside it, fsynced, then renamed into place."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.folder / name).read_bytes()
        except OSError:
            return None

    def write(self, name: str, data: bytes) -> None:
        write_atomic(self.folder / name, data)


def write_atomic(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` through a temporary file in its folder (fsynced, renamed): a file under the final
    name is always complete. The temporary file is removed on any failure.

    Raises:
        DiskFull: the file system is full (ENOSPC, EDQUOT).
        OSError: any other failure to write.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(e.errno, f"no space left to write {final} ({e.strerror})") from e
        raise
    with contextlib.suppress(OSError):  # the rename itself durable (not every file system can open a folder)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there.

    Raises:
        nsf.errors.ConfigError: it cannot be created or written (``field`` ``out_dir``).
    """
    allowed = "a folder this user can create and write"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".nsf-probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output folder {str(folder)!r} cannot be written ({e.strerror or e}); allowed: {allowed}",
                          field="out_dir", value=str(folder), allowed=allowed) from e


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A built model, the preset its runs start from, and (from the registry) which version it is."""

    model: Any  # nsf.StyleFusion
    preset: str | None
    registered: Mapping[str, str] | None = None  # {uri, name, version}


def load_model(model: str | None = None, *, tracking_uri: str | None = None, preset: str | None = None,
               **builder: Any) -> ModelSource:
    """A :class:`nsf.StyleFusion` and the preset its runs start from.

    ``model``: ``None`` (``nsf.style_fusion(**builder)``) or a registered MLflow version, ``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION``: its weights artifact (sha256 checked against the version's ``nsf.weights.sha256`` tag
    and the Caffe release) with the preset and overrides of its packed model-config.yaml -- the model that serves is
    the model that batches. ``builder``: :func:`nsf.style_fusion`'s keywords (device, precision...).

    Returns:
        :class:`ModelSource`; its ``preset`` is the given one, else the registered version's, else ``None``.
    """
    if model is None or model in ("", "default"):
        from .model import style_fusion

        named: dict[str, Any] = {"preset": preset} if preset else {}
        return ModelSource(style_fusion(**builder, **named), preset)
    if not str(model).startswith("models:/"):
        allowed = "models:/NAME@ALIAS or models:/NAME/VERSION (an MLflow registered version), or none"
        raise ConfigError(f"model={model!r}; allowed: {allowed}", field="model", value=model, allowed=allowed)
    return load_registered(str(model), tracking_uri=tracking_uri, preset=preset, **builder)


def load_registered(uri: str, *, tracking_uri: str | None = None, preset: str | None = None,
                    **builder: Any) -> ModelSource:
    """:func:`load_model` for a ``models:/`` URI, through MLflow's public API (``mlflow`` extra)."""
    import tempfile

    try:
        import mlflow
        import yaml
        from mlflow import MlflowClient
    except ImportError as e:
        raise RuntimeError(f"--model {uri} needs MLflow; allowed: pip install 'nsf[mlflow]' ({e})") from e
    from .model import style_fusion
    from .serving import ServingLimits
    from .weights import load_caffe, sha256_file

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient()
    name, _, ref = uri[len("models:/"):].partition("@")
    if ref:
        version = client.get_model_version_by_alias(name, ref)
    else:
        name, _, number = name.partition("/")
        version = client.get_model_version(name, number)
    expected = version.tags.get("nsf.weights.sha256")
    with tempfile.TemporaryDirectory(prefix="nsf-batch-model-") as dst:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                         dst_path=dst))
        spec = mlflow.models.Model.load(str(local / "MLmodel")).flavors["python_function"].get("artifacts", {})
        paths = {key: local / value["path"] for key, value in spec.items()}
        if "weights" not in paths or "model_config" not in paths:
            raise RuntimeError(f"{uri} (version {version.version}) has no weights/model_config artifacts: "
                               "not a version logged by `nsf export mlflow`")
        digest = sha256_file(paths["weights"])
        if expected and digest != expected:
            from .weights import WeightsError

            raise WeightsError(f"the weights of {uri} have sha256 {digest}; the version's tag says {expected}")
        weights = load_caffe(paths["weights"])  # checked against the Caffe release's sha256 too; nothing unpickled
        with open(paths["model_config"]) as f:
            model_config = yaml.safe_load(f)
    import torch

    device = builder.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    limits = ServingLimits.from_model_config(model_config, torch.device(device).type)
    builder = {"compile": limits.compile, **{k: v for k, v in builder.items() if v is not None}, "device": device}
    built = style_fusion(weights=weights, preset=preset or limits.preset, **limits.overrides,
                         **{k: v for k, v in builder.items() if k != "weights"})
    return ModelSource(built, preset or limits.preset, {"uri": uri, "name": name, "version": str(version.version)})


# ---------------------------------------------------------------------------------------------
# Stylizing: one group of images at a time
# ---------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A decoded input ready for a group: its tensor ``(1, 3, H, W)`` already at the output size."""

    item: Item
    sha256: str
    tensor: Any
    seconds: float = 0.0  # reading and decoding


@dataclass
class Stylizer:
    """One model, one config and one style, applied to groups of inputs; writes outputs to a :class:`Sink`.

    Shared by both engines: the one-machine loop in :func:`run` and each Ray actor in :mod:`nsf.batch_ray`.
    """

    model: Any
    cfg: StyleConfig
    styles: list[Any]  # (1, 3, h, w) tensors
    style_sha256: list[str]
    sink: Sink
    bit_depth: int = 8
    registered: Mapping[str, str] | None = None  # the registry version the model came from (recorded, not hashed)
    read: Callable[[str], bytes] = field(default=lambda p: Path(p).read_bytes())
    options: dict[str, Any] = field(init=False)
    options_sha256: str = field(init=False)

    def __post_init__(self) -> None:
        # what decides an output's pixels (the device does not: a rerun elsewhere keeps what is done)
        self.options = {"params": self.cfg.to_dict(), "weights_sha256": self.model.weights_sha256,
                        "style_sha256": self.style_sha256, "bit_depth": self.bit_depth}
        self.options_sha256 = sha256_bytes(json.dumps(self.options, sort_keys=True, default=str).encode())
        if self.registered:
            self.options = {**self.options, "model": dict(self.registered)}

    def row(self, item: Item, status: str, **fields: Any) -> Row:
        return {"input": item.input, "output": item.output, "status": status, "options_sha256": self.options_sha256,
                "time": now(), **fields}

    def error_row(self, item: Item, e: BaseException, **fields: Any) -> Row:
        error = {"type": type(e).__name__, "message": str(e)}
        for key in ("field", "allowed"):
            if getattr(e, key, None) is not None:
                error[key] = getattr(e, key)
        return self.row(item, "error", error=error, **fields)

    def done(self, item: Item, digest: str, prev: Row | None) -> Row | None:
        """The row that says ``item`` is done already (``skipped``, or ``ok`` + ``recovered`` for an output whose row
        was never written), or ``None`` when it must run."""
        from .image import read_metadata

        data = self.sink.read(item.output)
        if data is None:
            return None
        try:
            stamp = read_metadata(data).get("batch", {})
        except Exception:  # noqa: BLE001 - a damaged output is simply redone
            return None
        if stamp.get("input_sha256") != digest or stamp.get("options_sha256") != self.options_sha256:
            return None
        out_sha = sha256_bytes(data)
        if prev is not None and prev.get("status") == "ok":
            if prev.get("output_sha256") == out_sha and prev.get("input_sha256") == digest \
                    and prev.get("options_sha256") == self.options_sha256:
                return self.row(item, "skipped", input_sha256=digest, output_sha256=out_sha)
            return None  # the file is not the one the manifest recorded
        return self.row(item, "ok", input_sha256=digest, output_sha256=out_sha, options=self.options,
                        recovered=True, seconds=None)

    def prepare(self, item: Item, prev: Row | None = None) -> Loaded | Row:
        """Read, hash and (unless done) decode one input: a :class:`Loaded`, or its row (skipped, or error)."""
        from .geometry import resize, target_size
        from .image import load_image, pil_to_tensor

        start = time.perf_counter()
        try:
            data = self.read(item.input)
        except (OSError, ValueError) as e:
            return self.error_row(item, e)
        digest = sha256_bytes(data)
        finished = self.done(item, digest, prev)
        if finished is not None:
            return finished
        try:
            img = load_image(data, max_pixels=self.cfg.max_pixels, what="content")
            t = pil_to_tensor(img)
            hw = target_size(t.shape[-2], t.shape[-1], self.cfg.size, self.cfg.resize)
            t = resize(t, hw)
        except Exception as e:  # noqa: BLE001 - one hostile file must not stop the batch
            return self.error_row(item, e, input_sha256=digest)
        return Loaded(item, digest, t, time.perf_counter() - start)

    def run_group(self, group: Sequence[Loaded], on_row: Callable[[Row], None] | None = None) -> list[Row]:
        """One batched optimization of ``group`` (equal sizes) -> one row per image, each also passed to ``on_row``
        as soon as it is made; a group that fails is retried image by image. Each output is written as soon as the
        group ends (:class:`DiskFull` and other write errors propagate: the batch must stop)."""
        import torch

        from .image import encode, encode_png16, tensor_to_pil

        start = time.perf_counter()
        try:
            result = self.model.transfer(torch.cat([g.tensor for g in group]), self.styles, self.cfg)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - one failing image must not stop the batch
            if len(group) == 1:
                row = self.error_row(group[0].item, e, input_sha256=group[0].sha256)
                if on_row is not None:
                    on_row(row)
                return [row]
            failed = True
        else:
            failed = False
        if failed:  # one by one, outside the except block: the failed group's tensors are gone by then
            rows: list[Row] = []
            for g in group:
                rows += self.run_group([g], on_row)
            return rows
        seconds = time.perf_counter() - start
        rows = []
        for i, g in enumerate(group):
            each = round(seconds / len(group) + g.seconds, 3)
            meta = {**result.metadata, "seconds": each, "bit_depth": self.bit_depth, "plan": result.plan.to_dict(),
                    "batch": {"input": Path(g.item.input).name, "input_sha256": g.sha256,
                              "options_sha256": self.options_sha256, "group": len(group)}}
            image = result.image[i : i + 1]
            data = encode_png16(image, meta) if self.bit_depth == 16 else encode(tensor_to_pil(image), "png", meta)
            self.sink.write(g.item.output, data)
            row = self.row(g.item, "ok", input_sha256=g.sha256, output_sha256=sha256_bytes(data),
                           options=self.options, seconds=each, group=len(group),
                           size=[int(image.shape[-1]), int(image.shape[-2])])
            rows.append(row)
            if on_row is not None:
                on_row(row)
        return rows


def load_styles(style: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], cfg: StyleConfig,
                read: Callable[[str], bytes] | None = None) -> tuple[list[Any], list[str]]:
    """The style image(s) as ``(1, 3, h, w)`` tensors and their sha256s.

    Raises:
        nsf.errors.ConfigError: a style that cannot be read or decoded (``field`` ``style``).
    """
    from .image import load_image, pil_to_tensor

    paths = [style] if isinstance(style, (str, os.PathLike)) else list(style)
    if not paths:
        raise ConfigError("no style image; allowed: one or more style images", field="style", allowed="an image")
    tensors, digests = [], []
    for p in paths:
        try:
            data = read(os.fspath(p)) if read is not None else Path(p).read_bytes()
        except OSError as e:
            raise ConfigError(f"style {os.fspath(p)!r} cannot be read ({e.strerror or e}); allowed: an image file",
                              field="style", value=os.fspath(p), allowed="an image file") from e
        tensors.append(pil_to_tensor(load_image(data, max_pixels=cfg.max_pixels, what="style")))
        digests.append(sha256_bytes(data))
    return tensors, digests


# ---------------------------------------------------------------------------------------------
# The one-machine engine
# ---------------------------------------------------------------------------------------------


class StopFlag:
    """SIGINT -> stop after the current group (a second SIGINT raises KeyboardInterrupt at once). Installed only in
    the main thread (Python delivers signals there); elsewhere it is just a flag."""

    def __init__(self, quiet: bool = False) -> None:
        self.requested = False
        self.reason: str | None = None
        self.quiet = quiet
        self._old: Any = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.reason = True, "interrupted"
        if not self.quiet:
            print("\nnsf batch: stopping after the current group (Ctrl-C again to stop at once)", file=sys.stderr)


def _groups(loaded: Iterator[Loaded], batch_size: int, window: int) -> Iterator[list[Loaded]]:
    """Groups of equal-size images, up to ``batch_size`` each, holding at most ``window`` decoded images: a full
    bucket goes at once; when the window is full, the largest bucket goes."""
    buckets: dict[tuple[int, int], list[Loaded]] = {}
    held = 0
    for one in loaded:
        hw = (int(one.tensor.shape[-2]), int(one.tensor.shape[-1]))
        buckets.setdefault(hw, []).append(one)
        held += 1
        if len(buckets[hw]) >= batch_size:
            held -= len(buckets[hw])
            yield buckets.pop(hw)
        elif held >= window:
            key = max(buckets, key=lambda k: len(buckets[k]))
            held -= len(buckets[key])
            yield buckets.pop(key)
    for key in sorted(buckets, key=lambda k: -len(buckets[k])):
        yield buckets[key]


def run(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        style: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
        batch_size: int = 4, bit_depth: int = 8, model: Any = None, tracking_uri: str | None = None,
        preset: str | None = None, progress: bool = False, window: int | None = None,
        on_row: Callable[[Row], None] | None = None, **options: Any) -> list[Row]:
    """Stylize every image of ``inputs`` with ``style`` into ``out_dir`` on this machine (module docstring).

    Args:
        inputs: a path, folder, glob or ``.txt``/``.lst`` list, or a sequence of them (:func:`expand_inputs`).
        style: the style image (or several, blended by ``style_blend_weights``).
        out_dir: the output folder: ``<name>.png`` per input and ``manifest.jsonl``.
        batch_size: images of one size optimized at once (1: one by one).
        bit_depth: 8 or 16 bits per channel.
        model: ``None`` (the library's model, built from ``weights``, ``device``... in ``options``), a built
            :class:`nsf.StyleFusion`, or a registered MLflow version ``models:/NAME@ALIAS`` (``tracking_uri``).
        preset: the preset runs start from (default: the model's).
        progress: a tqdm bar over the files (rate, time left).
        window: decoded images held while groups fill (default ``4 * batch_size``).
        on_row: called with each row as it is recorded.
        **options: :class:`nsf.StyleConfig` fields (``size``, ``steps``, ``seed``...) and :func:`nsf.style_fusion`'s
            builder keywords (``device``, ``precision``, ``max_memory``...).

    Returns:
        One row per input, in the order they finished: ``ok``, ``error`` and ``recovered`` rows as written to the
        manifest, plus ``skipped`` (done before) and ``stopped`` (not reached: Ctrl-C, a full disk) rows, which
        the manifest does not hold.

    Raises:
        nsf.errors.ConfigError: bad options, inputs that do not exist, an output folder that cannot be written, a
            style that cannot be read.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}; allowed: 1 or more", field="batch_size", value=batch_size,
                          allowed="1 or more")
    if bit_depth not in (8, 16):
        raise ConfigError(f"bit_depth={bit_depth}; allowed: 8, 16", field="bit_depth", value=bit_depth,
                          allowed=[8, 16])
    out = Path(out_dir).expanduser()
    items = expand_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs, exclude=out)
    check_writable(out)
    builder = {k: options.pop(k) for k in BUILDER_KEYS if k in options}
    source = load_model(model, tracking_uri=tracking_uri, preset=preset, **builder) \
        if isinstance(model, str) or model is None else ModelSource(model, preset)
    cfg = source.model.resolve_config(source.preset, **options)
    styles, style_sha = load_styles(style, cfg)
    stylizer = Stylizer(source.model, cfg, styles, style_sha, LocalSink(out), bit_depth, source.registered)
    manifest = Manifest(out)
    record = Recorder(manifest, len(items), progress, on_row)
    rows = record.rows

    todo = collections.deque(items)  # not yet recorded; images put back (Ctrl-C, a full disk) go to its front
    stop = StopFlag(quiet=not progress)

    def loaded() -> Iterator[Loaded]:
        while todo and not stop.requested:
            item = todo.popleft()
            got = stylizer.prepare(item, manifest.rows.get(item.output))
            if isinstance(got, Loaded):
                yield got
            else:
                record(got)

    in_flight: dict[str, Loaded] = {}  # by output name: the current group's images without a row yet

    def recorded(row: Row) -> None:
        in_flight.pop(row["output"], None)
        record(row)

    try:
        with stop:
            for group in _groups(loaded(), batch_size, window or 4 * batch_size):
                if stop.requested:  # the window's held images are not run after Ctrl-C
                    todo.extendleft(reversed([g.item for g in group]))
                    continue
                in_flight = {g.item.output: g for g in group}
                try:
                    stylizer.run_group(group, on_row=recorded)
                except OSError as e:  # the output folder stopped taking files: nothing more can be done
                    failed = next(iter(in_flight.values()))  # the image being written
                    del in_flight[failed.item.output]
                    record(stylizer.error_row(failed.item, e, input_sha256=failed.sha256))
                    stop.requested, stop.reason = True, "disk full" if isinstance(e, DiskFull) else "write failed"
                    todo.extendleft(reversed([g.item for g in in_flight.values()]))
                in_flight = {}
    except KeyboardInterrupt:  # the second Ctrl-C: the group being optimized is dropped, nothing of it written
        stop.requested, stop.reason = True, "interrupted"
        todo.extendleft(reversed([g.item for g in in_flight.values()]))
    finally:
        manifest.close()
        record.bar.close()
    for item in todo:
        rows.append(stylizer.row(item, "stopped", reason=stop.reason))
    return rows


def _bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", dynamic_ncols=True, disable=not enabled, desc="nsf batch")


class Recorder:
    """Where each input's row goes as it is done, in both engines: the manifest (``ok``, ``error`` and
    ``recovered`` rows; ``skipped`` and ``stopped`` ones are not written), the rows returned, the progress bar
    (a skipped input leaves its total) and ``on_row``."""

    def __init__(self, manifest: Any, total: int, progress: bool, on_row: Callable[[Row], None] | None) -> None:
        self.manifest, self.on_row = manifest, on_row
        self.rows: list[Row] = []
        self.bar = _bar(total, progress)

    def __call__(self, row: Row) -> None:
        if row["status"] not in ("skipped", "stopped"):
            self.manifest.append(row)
        self.rows.append(row)
        if row["status"] == "skipped":
            self.bar.total -= 1
            self.bar.refresh()
        elif row["status"] != "stopped":
            self.bar.update(1)
        if self.on_row is not None:
            self.on_row(row)


def summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many rows of each status (``ok`` counts recovered ones)."""
    counts = dict.fromkeys(STATUSES, 0)
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts
