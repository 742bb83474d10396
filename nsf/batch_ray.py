"""``nsf batch --engine ray``: the same batch as :mod:`nsf.batch`, spread over a Ray cluster with Ray Data.

The driver lists the inputs (and the manifest's rows so far) as a data set; ``map_batches`` hands blocks of
``batch_size`` inputs to :class:`RayStylizer` actors, each holding one model (one GPU each where the cluster has
GPUs, else ``cpus_per_worker`` CPUs and as many torch threads). An actor reads, hashes and decodes its inputs, runs
the equal-size ones as one optimization (:class:`nsf.batch.Stylizer`, the one-machine engine's code), writes each
output atomically itself and returns the rows; the driver appends them to the manifest as they arrive.

Where outputs go: a local folder (a shared file system on a real cluster), or a ``pyarrow`` file system URI
(``s3://bucket/prefix``, ``gs://...``): an object store publishes an object whole when its upload closes, so no
reader sees half an output there either. Inputs are paths the workers can read, or such URIs.

Faults: an actor that dies (a killed process, a lost node) is restarted and its block retried
(``max_retries`` times). Outputs it had written before dying are recognised by their provenance on the retry and
not written again (their rows say ``recovered``); none is lost and none is written twice.

Ray and pyarrow are the optional ``ray`` extra (``pip install "nsf[ray]"``); they are imported only here, inside the
functions.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .batch import (
    BUILDER_KEYS,
    MANIFEST,
    DiskFull,
    Item,
    Loaded,
    Row,
    Stylizer,
    _groups,
    check_writable,
    expand_inputs,
    load_model,
    now,
    parse_manifest,
    sha256_bytes,
    write_atomic,
)
from .errors import ConfigError


def is_uri(path: str | os.PathLike[str]) -> bool:
    return "://" in os.fspath(path)


def filesystem(location: str | os.PathLike[str]) -> tuple[Any, str]:
    """``(pyarrow file system, path in it)`` of a local path or a URI (``s3://``, ``gs://``, ``file://``...)."""
    import pyarrow.fs as pafs

    text = os.fspath(location)
    if is_uri(text):
        fs, path = pafs.FileSystem.from_uri(text)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def read_bytes(location: str) -> bytes:
    """The bytes of a local path or a file system URI."""
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return bytes(f.readall())


class ArrowSink:
    """Outputs in a local folder (temporary file, fsync, rename) or on a pyarrow file system (one whole object)."""

    def __init__(self, location: str):
        import pyarrow.fs as pafs

        self.fs, self.root = filesystem(location)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def read(self, name: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(f"{self.root}/{name}") as f:
                return bytes(f.readall())
        except (OSError, FileNotFoundError):
            return None

    def write(self, name: str, data: bytes) -> None:
        if self.local:
            write_atomic(Path(self.root) / name, data)
            return
        path = f"{self.root}/{name}"
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as f:  # the object appears whole when the stream closes
            f.write(data)


class RayStylizer:
    """The ``map_batches`` callable: one model per actor, built once; a block of inputs in, their rows out."""

    def __init__(self, spec: Mapping[str, Any]):
        import torch

        from .image import load_image, pil_to_tensor

        threads = spec.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        source = load_model(spec["model"], tracking_uri=spec["tracking_uri"], preset=spec["preset"],
                            **spec["builder"])
        cfg = source.model.resolve_config(source.preset, **spec["options"])
        styles = [pil_to_tensor(load_image(b, max_pixels=cfg.max_pixels, what="style")) for b in spec["styles"]]
        self.stylizer = Stylizer(source.model, cfg, styles, [sha256_bytes(b) for b in spec["styles"]],
                                 ArrowSink(spec["out"]), spec["bit_depth"], source.registered, read=read_bytes)

    def __call__(self, block: Any) -> dict[str, list[str]]:  # a pyarrow.Table
        rows: list[Row] = []
        loaded: list[Loaded] = []
        columns = [block.column(name).to_pylist() for name in ("input", "output", "prev")]
        for inp, out, prev in zip(*columns):
            got = self.stylizer.prepare(Item(str(inp), str(out)), json.loads(prev) if prev else None)
            if isinstance(got, Loaded):
                loaded.append(got)
            else:
                rows.append(got)
        pending = {g.item.output: g for g in loaded}

        def recorded(row: Row) -> None:
            pending.pop(row["output"], None)
            rows.append(row)
            self.written(row)

        try:
            for group in _groups(iter(loaded), max(1, len(loaded)), max(1, len(loaded))):
                self.stylizer.run_group(group, on_row=recorded)
        except OSError as e:  # the outputs' file system stopped taking files: say so; the driver stops
            first = next(iter(pending.values()))
            rows.append(self.stylizer.error_row(first.item, e, input_sha256=first.sha256))
            reason = "disk full" if isinstance(e, DiskFull) else "write failed"
            rows += [self.stylizer.row(g.item, "stopped", reason=reason) for g in list(pending.values())[1:]]
        return {"row": [json.dumps(r, sort_keys=True, default=str) for r in rows]}

    def written(self, row: Row) -> None:
        """Called after each output is written and before its row is returned (a hook for subclasses)."""


class _ManifestWriter:
    """The driver's manifest: appended and fsynced row by row in a local folder; on an object store the whole
    object is rewritten (at most every ``every`` seconds, and at the end)."""

    def __init__(self, sink: ArrowSink, previous: str, every: float = 30.0):
        self.sink, self.every = sink, every
        self.lines = previous.splitlines()
        self.last = time.monotonic()
        self.file: Any = None
        if sink.local:
            path = Path(sink.root) / MANIFEST
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
            if previous and not previous.endswith("\n"):
                self.file.write("\n")

    def append(self, row: Row) -> None:
        line = json.dumps(row, sort_keys=True, default=str)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())
            return
        self.lines.append(line)
        if time.monotonic() - self.last > self.every:
            self.flush()

    def flush(self) -> None:
        if self.file is None:
            self.sink.write(MANIFEST, ("\n".join(self.lines) + "\n").encode())
            self.last = time.monotonic()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        else:
            self.flush()


def _expand(inputs: Sequence[str | os.PathLike[str]], out_dir: str) -> list[Item]:
    """Local inputs as :func:`nsf.batch.expand_inputs` lists them; URIs of files, or of folders (recursively)."""
    from pyarrow.fs import FileSelector, FileType

    from .batch import IMAGE_SUFFIXES

    local = [i for i in inputs if not is_uri(i)]
    items = expand_inputs(local, exclude=None if is_uri(out_dir) else out_dir) if local else []
    for uri in (os.fspath(i) for i in inputs if is_uri(i)):
        fs, path = filesystem(uri)
        info = fs.get_file_info(path)
        scheme = uri.split("://", 1)[0]
        if info.type == FileType.Directory:
            for f in sorted(fs.get_file_info(FileSelector(path, recursive=True)), key=lambda f: f.path):
                if f.type == FileType.File and Path(f.path).suffix.lower() in IMAGE_SUFFIXES:
                    rel = Path(f.path).relative_to(path).with_suffix(".png").as_posix()
                    items.append(Item(f"{scheme}://{f.path}", rel))
        elif info.type == FileType.File:
            items.append(Item(uri, Path(path).with_suffix(".png").name))
        else:
            raise ConfigError(f"input {uri!r} does not exist; allowed: files or folders the workers can read",
                              field="inputs", value=uri, allowed="files or folders the workers can read")
    names = [i.output for i in items]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"inputs {dupes[:3]} would be written twice; allowed: inputs with distinct names",
                          field="inputs", value=dupes, allowed="inputs with distinct names")
    return items


def run(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        style: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
        address: str | None = None, workers: int | None = None, cpus_per_worker: float | None = None,
        batch_size: int = 4, bit_depth: int = 8, model: str | None = None, tracking_uri: str | None = None,
        preset: str | None = None, progress: bool = False, on_row: Callable[[Row], None] | None = None,
        max_retries: int = 3, worker_class: type[RayStylizer] = RayStylizer, **options: Any) -> list[Row]:
    """:func:`nsf.batch.run` on a Ray cluster (module docstring); the same rows, files and manifest.

    Args:
        address: the cluster (``"auto"``, ``"ray://head:10001"``); default: a Ray started in this process (or the
            one already initialised).
        workers: actors, each with one model (default: the cluster's GPUs, else 2).
        cpus_per_worker: CPUs each actor reserves, and its torch threads (default: 1 with GPUs, else the cluster's
            CPUs over ``workers``).
        max_retries: restarts of a dead actor and retries of its block.
        worker_class: the actor class (a subclass of :class:`RayStylizer`).
        model: ``None`` or a registered version ``models:/NAME@ALIAS``, loaded by each actor (the workers need
            the MLflow store: ``tracking_uri``).
        Other arguments: as :func:`nsf.batch.run`.
    """
    import ray

    from .batch import Recorder, load_styles
    from .config import make_config

    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}; allowed: 1 or more", field="batch_size", value=batch_size,
                          allowed="1 or more")
    out = os.fspath(out_dir)
    if not is_uri(out):
        check_writable(Path(out).expanduser())
        out = str(Path(out).expanduser().resolve())
    items = _expand([inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs), out)
    builder = {k: options.pop(k) for k in BUILDER_KEYS if k in options}
    cfg = make_config(preset or "default", **options)  # bad options fail here, before a cluster is started
    style_list = [style] if isinstance(style, (str, os.PathLike)) else list(style)
    load_styles(style_list, cfg, read=read_bytes)  # a style that cannot be read or decoded: field "style", here
    style_bytes = [read_bytes(os.fspath(s)) for s in style_list]  # the actors get the bytes, not the paths
    sink = ArrowSink(out)
    previous_bytes = sink.read(MANIFEST)
    previous = previous_bytes.decode(errors="replace") if previous_bytes else ""
    before = parse_manifest(previous)

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = float(ray.cluster_resources().get("CPU", 1))
        n = workers or (gpus if gpus else 2)
        per = cpus_per_worker or (1.0 if gpus else max(1.0, cpus // n))
        spec = {"model": model, "tracking_uri": tracking_uri, "preset": preset, "builder": builder,
                "options": options, "styles": style_bytes, "out": out, "bit_depth": bit_depth,
                "threads": max(1, int(per))}
        records = [{"input": i.input, "output": i.output,
                    "prev": json.dumps(before[i.output], default=str) if i.output in before else ""} for i in items]
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds: Any = ray.data.from_items(records, override_num_blocks=max(1, -(-len(records) // batch_size)))
        # max_restarts/max_task_retries as Ray 2.60 takes them (it warns that 2.64 will want them elsewhere; the
        # extra pins 2.60.*); bounded, so an input that kills its actor every time ends the batch, not loops
        ds = ds.map_batches(worker_class, fn_constructor_kwargs={"spec": spec}, batch_size=batch_size,
                            concurrency=n, num_cpus=per, num_gpus=1 if gpus else None, batch_format="pyarrow",
                            max_restarts=max_retries, max_task_retries=max_retries)
        manifest = _ManifestWriter(sink, previous)
        record = Recorder(manifest, len(items), progress, on_row)
        rows = record.rows
        stopped = None
        try:
            block: Any
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for line in block.column("row").to_pylist():
                    row = json.loads(line)
                    record(row)
                    if row["status"] == "error" and row["error"]["type"] in ("DiskFull", "OSError"):
                        stopped = "disk full" if row["error"]["type"] == "DiskFull" else "write failed"
                if stopped:
                    break
        except KeyboardInterrupt:
            stopped = "interrupted"
            print("\nnsf batch: interrupted; outputs written so far are kept (a rerun recognises them)",
                  file=sys.stderr)
        finally:
            manifest.close()
            record.bar.close()
        seen = {r["output"] for r in rows}
        rows += [{"input": i.input, "output": i.output, "status": "stopped", "reason": stopped, "time": now()}
                 for i in items if i.output not in seen]
        return rows
    finally:
        if started:
            ray.shutdown()
