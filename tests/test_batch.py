"""``nsf batch`` on one machine (nsf.batch): grouping, files, manifest, resume, bad inputs and faults.

Real runs on the session model at 32-48 px with 2 steps; the disk-full test fills a real tmpfs where this user may
mount one (root), else makes the write itself fail with ENOSPC.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from PIL import Image

from nsf import batch
from nsf.errors import ConfigError
from nsf.image import read_metadata

OPTS = {**FAST, "size": 32, "seed": 0}
ASSETS = Path(batch.__file__).parent / "assets"
STYLE = ASSETS / "starry_night.jpg"


def photos(folder: Path, n: int = 3, size: tuple[int, int] = (48, 48), start: int = 0) -> list[Path]:
    """``n`` distinct crops of the bundled astronaut, ``size`` (w, h) each, as JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    src = Image.open(ASSETS / "astronaut.jpg")
    out = []
    for i in range(start, start + n):
        p = folder / f"img{i:02d}.jpg"
        src.crop((20 * i, 10 * i, 20 * i + 300, 10 * i + 300)).resize(size).save(p)
        out.append(p)
    return out


def bomb_png(path: Path, side: int = 100_000) -> None:
    """A tiny PNG whose header declares ``side x side`` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def manifest(out: Path) -> list[dict]:
    """The manifest's rows (a line cut short by a crash, as a test leaves one, is not a row)."""
    rows = []
    for line in (out / batch.MANIFEST).read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".nsf-probe")]


def by_status(rows: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r["status"], []).append(Path(r["input"]).name)
    return {k: sorted(v) for k, v in out.items()}


def test_folder_groups_equal_sizes_and_records_bad_files(tmp_path, model):
    src = tmp_path / "in"
    photos(src, 3)
    photos(src / "wide", 1, size=(64, 40), start=5)
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    bomb_png(src / "bomb.png")
    (src / "notes.md").write_text("not an image: a folder's other files are left alone")
    out = tmp_path / "out"
    rows = batch.run(src, STYLE, out, model=model, batch_size=4, **OPTS)
    assert by_status(rows) == {"ok": ["img00.jpg", "img01.jpg", "img02.jpg", "img05.jpg"],
                               "error": ["bomb.png", "corrupt.jpg"]}
    errors = {Path(r["input"]).name: r["error"] for r in rows if r["status"] == "error"}
    assert errors["bomb.png"]["type"] == "ImageTooLargeError" and errors["bomb.png"]["field"] == "content"
    assert errors["corrupt.jpg"]["type"] == "ImageError"
    ok = {Path(r["input"]).name: r for r in rows if r["status"] == "ok"}
    assert [ok[f"img0{i}.jpg"]["group"] for i in range(3)] == [3, 3, 3]  # one batched optimization of three
    assert ok["img05.jpg"]["group"] == 1 and ok["img05.jpg"]["size"] == [32, 20]
    assert ok["img05.jpg"]["output"] == "wide/img05.png"  # a folder's layout is kept
    assert manifest(out) == json.loads(json.dumps(rows))  # every row written, fsynced, in order
    for r in ok.values():
        data = (out / r["output"]).read_bytes()
        assert batch.sha256_bytes(data) == r["output_sha256"]
        assert batch.sha256_bytes(Path(r["input"]).read_bytes()) == r["input_sha256"]
        meta = read_metadata(out / r["output"])
        assert meta["batch"] == {"input": Path(r["input"]).name, "input_sha256": r["input_sha256"],
                                 "options_sha256": r["options_sha256"], "group": r["group"]}
        assert meta["params"]["steps"] == 2 and r["options"]["params"]["size"] == 32
    assert leftovers(out) == []


def test_a_batched_image_is_the_image_run_alone(tmp_path, model):
    src = tmp_path / "in"
    paths = photos(src, 2, size=(32, 32))
    out = tmp_path / "out"
    rows = batch.run(src, STYLE, out, model=model, batch_size=2, **OPTS)
    assert [r["group"] for r in rows] == [2, 2]
    alone = model.run(str(paths[1]), str(STYLE), **OPTS).image
    got = np.asarray(Image.open(out / "img01.png"), dtype=np.int16)
    want = np.asarray(alone[0].mul(255).round().byte().permute(1, 2, 0).numpy(), dtype=np.int16)
    assert np.abs(got - want).max() <= 2  # each image of the batch is its own problem


def test_rerun_skips_what_is_done_and_redoes_what_changed(tmp_path, model):
    src = tmp_path / "in"
    paths = photos(src, 3)
    out = tmp_path / "out"
    first = batch.run(src, STYLE, out, model=model, batch_size=2, **OPTS)
    assert batch.summary(first)["ok"] == 3
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}

    again = batch.run(src, STYLE, out, model=model, batch_size=2, **OPTS)
    assert batch.summary(again)["skipped"] == 3 and len(manifest(out)) == 3  # skips are not appended
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps  # nothing rewritten

    # a changed input, a damaged output, an output whose manifest row never got written (a crash after the rename)
    photos(tmp_path / "other", 1, start=7)[0].replace(paths[0])
    (out / "img01.png").write_bytes((out / "img01.png").read_bytes()[:-20])
    lines = (out / batch.MANIFEST).read_text().splitlines()
    (out / batch.MANIFEST).write_text("\n".join(r for r in lines if '"img02.png"' not in r) + '\n{"input": "cut')
    rows = batch.run(src, STYLE, out, model=model, batch_size=2, **OPTS)
    assert by_status(rows) == {"ok": ["img00.jpg", "img01.jpg", "img02.jpg"]}
    recovered = [r for r in rows if r.get("recovered")]
    assert [r["output"] for r in recovered] == ["img02.png"] and recovered[0]["seconds"] is None
    assert (out / "img02.png").stat().st_mtime_ns == stamps[out / "img02.png"]  # recognised, not redone
    assert (out / "img00.png").stat().st_mtime_ns != stamps[out / "img00.png"]
    assert batch.run(src, STYLE, out, model=model, **OPTS)[0]["status"] == "skipped"  # a cut row is ignored

    # other options (or another style) are another result: everything is redone
    changed = batch.run(src, STYLE, out, model=model, **{**OPTS, "seed": 1})
    assert batch.summary(changed)["ok"] == 3
    assert len({r["options_sha256"] for r in manifest(out)}) == 2


def test_ctrl_c_stops_after_the_group_and_a_rerun_completes_exactly_the_rest(tmp_path, model):
    src = tmp_path / "in"
    photos(src, 5)
    out = tmp_path / "out"

    def interrupt(row: dict) -> None:
        if row["status"] == "ok" and row["output"] == "img00.png":
            os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT, handled after this group

    rows = batch.run(src, STYLE, out, model=model, batch_size=2, on_row=interrupt, **OPTS)
    done = [r["output"] for r in rows if r["status"] == "ok"]
    assert done == ["img00.png", "img01.png"]  # the group of two finished and was written
    assert [r["reason"] for r in rows if r["status"] == "stopped"] == ["interrupted"] * 3
    assert sorted(p.name for p in out.glob("*.png")) == done and leftovers(out) == []
    rest = batch.run(src, STYLE, out, model=model, batch_size=2, **OPTS)
    assert by_status(rest) == {"ok": ["img02.jpg", "img03.jpg", "img04.jpg"], "skipped": ["img00.jpg", "img01.jpg"]}
    assert sorted(r["output"] for r in manifest(out)) == [f"img0{i}.png" for i in range(5)]  # each once


@contextlib.contextmanager
def small_disk(path: Path, kib: int):
    """A real tmpfs of ``kib`` KiB at ``path`` (root only), or ``None`` where it cannot be mounted."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_stops_cleanly_and_a_rerun_completes_the_rest(tmp_path, model, monkeypatch):
    src = tmp_path / "in"
    photos(src, 4, size=(64, 64))
    opts = {**OPTS, "size": 64}
    with small_disk(tmp_path / "disk", 128) as disk:
        out = (disk or tmp_path / "disk") / "out"
        if disk is not None:  # fill the tmpfs so that one 64 px PNG and the manifest fit, not a second PNG
            filler = disk / "filler"
            filler.write_bytes(b"\0" * (128 - 24) * 1024)
        else:  # no tmpfs: the second output's write fails as a full disk's would
            real_open, writes = open, []

            def full_open(file, mode="r", *a, **kw):
                f = real_open(file, mode, *a, **kw)
                if str(file).endswith(".tmp"):
                    writes.append(file)
                    if len(writes) == 2:
                        f.close()
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
                return f
            monkeypatch.setattr(batch, "open", full_open, raising=False)
        rows = batch.run(src, STYLE, out, model=model, batch_size=1, **opts)
        st = by_status(rows)
        assert st["ok"] == ["img00.jpg"] and st["error"] == ["img01.jpg"], st
        err = next(r for r in rows if r["status"] == "error")
        assert err["error"]["type"] == "DiskFull" and "no space left" in err["error"]["message"]
        assert [r["reason"] for r in rows if r["status"] == "stopped"] == ["disk full"] * 2
        assert manifest(out)[-1]["error"]["type"] == "DiskFull"  # the manifest says so
        assert sorted(p.name for p in out.glob("*.png")) == ["img00.png"] and leftovers(out) == []
        Image.open(out / "img00.png").load()  # what is there is whole
        if disk is not None:
            filler.unlink()
        monkeypatch.undo()
        rest = batch.run(src, STYLE, out, model=model, batch_size=1, **opts)
        assert by_status(rest) == {"ok": ["img01.jpg", "img02.jpg", "img03.jpg"], "skipped": ["img00.jpg"]}
        assert leftovers(out) == []


def test_bad_inputs_and_outputs_are_refused_with_their_field(tmp_path, model):
    src = tmp_path / "in"
    photos(src, 2)
    with pytest.raises(ConfigError) as e:
        batch.run([src, tmp_path / "nope.jpg"], STYLE, tmp_path / "out", model=model, **OPTS)
    assert e.value.field == "inputs" and "does not exist" in str(e.value)
    with pytest.raises(ConfigError) as e:
        batch.run(str(tmp_path / "*.webp"), STYLE, tmp_path / "out", model=model, **OPTS)
    assert e.value.field == "inputs" and "matches no image" in str(e.value)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as e:
        batch.run(src, STYLE, blocker / "out", model=model, **OPTS)
    assert e.value.field == "out_dir"
    with pytest.raises(ConfigError) as e:
        batch.run(src, tmp_path / "no-style.jpg", tmp_path / "out", model=model, **OPTS)
    assert e.value.field == "style"
    with pytest.raises(ConfigError) as e:
        batch.run(src, STYLE, tmp_path / "out", model=model, **{**OPTS, "size": -3})
    assert e.value.field == "size"


def test_lists_globs_duplicates_and_an_output_folder_inside_the_inputs(tmp_path, model):
    a, b = photos(tmp_path / "a", 1), photos(tmp_path / "b", 1)  # both named img00.jpg
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a catalogue\n{a[0]}\nb/img00.jpg\nmissing.jpg\n")
    out = tmp_path / "a" / "styled"  # inside an input folder: its outputs never become inputs
    rows = batch.run([listing, str(tmp_path / "a" / "*.jpg")], STYLE, out, model=model, **OPTS)
    st = by_status(rows)
    assert st == {"ok": ["img00.jpg", "img00.jpg"], "error": ["missing.jpg"]}
    names = sorted(r["output"] for r in rows if r["status"] == "ok")
    assert len(set(names)) == 2 and all(n.startswith("img00-") for n in names)  # told apart, stably
    assert batch.expand_inputs([listing, str(tmp_path / "a" / "*.jpg")], exclude=out)[0].output in names
    assert b[0].exists()
    again = batch.run(tmp_path / "a", STYLE, out, model=model, **OPTS)
    assert [r["input"] for r in again] == [str(a[0].resolve())]  # a/styled/*.png are not inputs


def test_cli_batch_exit_codes_and_summary(tmp_path, capsys):
    from nsf.cli import main

    src = tmp_path / "in"
    photos(src, 2)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    flags = ["--size", "32", "--steps", "2", "--scales", "1", "--scale-steps", "1", "--tol", "0",
             "--content-layers", "relu2_1", "--style-layers", "relu1_1,relu2_1", "--device", "cpu",
             "--precision", "fp32", "--no-progress"]
    assert main(["batch", str(src), "--style", str(STYLE), "-o", str(out), "--batch-size", "2", *flags]) == 1
    text = capsys.readouterr()
    assert "2 written, 0 already done, 1 failed" in text.out and "broken.png" in text.err
    assert main(["batch", str(src), "--style", str(STYLE), "-o", str(out), *flags]) == 1
    assert "0 written, 2 already done, 1 failed" in capsys.readouterr().out
    assert main(["batch", str(src / "x*.jpg"), "--style", str(STYLE), "-o", str(out), *flags]) == 2
    assert "matches no image" in capsys.readouterr().err
    assert main(["batch", str(src), "--style", str(STYLE), "-o", str(out), "--workers", "2", *flags]) == 2


@pytest.mark.slow
def test_a_registered_version_batches_as_it_serves(tmp_path, model):
    pytest.importorskip("mlflow", reason="the 'mlflow' extra is not installed")
    from nsf.runtimes import mlflow as registry

    folder = tmp_path / "registry"
    folder.mkdir()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        done = registry.log_model(tracking_uri=registry.default_tracking_uri(folder), alias="champion", quiet=True)
    finally:
        os.chdir(cwd)
    src = tmp_path / "in"
    photos(src, 2, size=(32, 32))
    rows = batch.run(src, STYLE, tmp_path / "out", model="models:/style_fusion@champion",
                     tracking_uri=done.tracking_uri, device="cpu", precision="fp32", channels_last=False,
                     batch_size=2, **OPTS)
    assert batch.summary(rows)["ok"] == 2
    assert rows[0]["options"]["model"] == {"uri": "models:/style_fusion@champion", "name": "style_fusion",
                                           "version": done.version}
    assert rows[0]["options"]["weights_sha256"] == done.weights_sha256
    library = batch.run(src, STYLE, tmp_path / "lib", model=model, batch_size=2, **OPTS)
    assert [r["output_sha256"] for r in library] != []
    same = [np.array_equal(np.asarray(Image.open(tmp_path / "out" / r["output"])),
                           np.asarray(Image.open(tmp_path / "lib" / r["output"]))) for r in rows]
    assert all(same)  # the registered weights and preset are the library's: the same pixels
    with pytest.raises(Exception, match="champ"):
        batch.run(src, STYLE, tmp_path / "out2", model="models:/style_fusion@champ", tracking_uri=done.tracking_uri,
                  **OPTS)
