"""``nsf batch --engine ray`` (nsf.batch_ray) on a local Ray cluster started by the test: two CPU workers, 32 px,
2 steps, under a time limit. A worker is killed mid-batch: its images are retried, none lost, none written twice.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from PIL import Image

from nsf import batch

ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed")
from nsf import batch_ray  # noqa: E402

pytestmark = pytest.mark.slow
OPTS = {**FAST, "size": 32, "seed": 0, "device": "cpu", "precision": "fp32", "channels_last": False}
STYLE = Path(batch.__file__).parent / "assets" / "starry_night.jpg"
LIMIT_S = 400  # the whole module: Ray's start on 2 busy cores is most of it


class CrashOnce(batch_ray.RayStylizer):
    """Dies (os._exit, as a killed process would) right after writing the marked output, the first time only: a
    hard link keeps the file it wrote, so the test can tell whether the retry wrote it again."""

    def written(self, row: dict) -> None:
        out = Path(self.stylizer.sink.root)  # type: ignore[attr-defined]
        marker = out.parent / "crashed"
        if row["output"] == "img01.png" and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.link(out / row["output"], out.parent / "witness.png")
            os._exit(1)


@pytest.fixture(scope="module")
def cluster():
    def too_long(signum, frame):
        raise TimeoutError(f"the Ray tests ran past {LIMIT_S} s")

    old = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(LIMIT_S)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test file
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def photos(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    src = Image.open(STYLE.with_name("astronaut.jpg"))
    for i in range(n):
        src.crop((30 * i, 0, 30 * i + 300, 300)).resize((32, 32)).save(folder / f"img{i:02d}.jpg")


def test_a_killed_worker_loses_nothing_and_writes_nothing_twice(tmp_path, cluster, model):
    src, out = tmp_path / "in", tmp_path / "out"
    photos(src, 6)
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rows = batch_ray.run(src, STYLE, out, workers=2, cpus_per_worker=1, batch_size=2, worker_class=CrashOnce,
                         **OPTS)
    assert (tmp_path / "crashed").exists()  # a worker did die mid-batch
    st = {r["output"]: r for r in rows}
    assert sorted(st) == ["broken.png"] + [f"img0{i}.png" for i in range(6)]  # none lost
    assert st["broken.png"]["status"] == "error" and st["broken.png"]["error"]["type"] == "ImageError"
    assert all(st[f"img0{i}.png"]["status"] == "ok" for i in range(6))
    assert st["img01.png"].get("recovered") is True  # its retry recognised the file it had written
    assert os.stat(out / "img01.png").st_ino == os.stat(tmp_path / "witness.png").st_ino  # not written twice
    lines = batch_ray.parse_manifest((out / batch.MANIFEST).read_text())
    assert len((out / batch.MANIFEST).read_text().splitlines()) == 7 and len(lines) == 7  # one row each
    assert not [p for p in out.rglob("*.tmp")]

    # the same pixels as the one-machine engine
    local = batch.run(src, STYLE, tmp_path / "local", model=model, batch_size=2,
                      **{k: v for k, v in OPTS.items() if k not in batch.BUILDER_KEYS})
    for r in local:
        if r["status"] == "ok":
            a = np.asarray(Image.open(out / r["output"]), dtype=np.int16)
            b = np.asarray(Image.open(tmp_path / "local" / r["output"]), dtype=np.int16)
            assert np.abs(a - b).max() <= 2

    # a rerun on the cluster: everything done is skipped, the broken file is reported again
    again = batch_ray.run(src, STYLE, out, workers=2, cpus_per_worker=1, batch_size=4, **OPTS)
    assert batch.summary(again) == {"ok": 0, "error": 1, "skipped": 6, "stopped": 0}
