"""Helpers shared by tests/test_studio*.py and bench/studio.py: a small model config for the studio, test images,
a running ``nsf studio`` on a free loopback port, and a headless Chromium (Playwright's Python client pointed at
Debian's ``chromium``: Playwright's own browser download cannot be fetched here)."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("NSF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_PIXELS = 1_000_000  # the test config's pixel cap (a "bomb" declares more)


def studio_config(*, max_size: int = 128, max_steps: int = 60, steps: int = 8, size: int = 64,
                  calibrate: tuple[int, int] = (64, 3), max_memory: str | None = None) -> dict:
    """The shipped model-config.yaml with limits for quick tests: 32-``max_size`` px, at most ``max_steps``."""
    cfg = yaml.safe_load((REPO / "deploy" / "model-config.yaml").read_text())
    cfg["nsf"].update(preset="fast", overrides={"size": size, "steps": steps}, max_pixels=MAX_PIXELS)
    cpu = cfg["nsf"]["devices"]["cpu"]
    cpu.update(max_size=max_size, max_steps=max_steps, calibrate=list(calibrate))
    if max_memory is not None:
        cpu["max_memory"] = max_memory
    return cfg


def write_config(path: Path, **changes: Any) -> Path:
    path.write_text(yaml.safe_dump(studio_config(**changes)))
    return path


def picture(w: int, h: int, seed: int = 0, kind: str = "smooth") -> Image.Image:
    """A test image: ``smooth`` colour fields, or ``stripes`` (a strong, distinct style)."""
    rng = np.random.default_rng(seed)
    if kind == "stripes":
        x = np.arange(w)[None, :] + np.arange(h)[:, None] * (seed % 3)
        period = 6 + 4 * seed
        band = ((x // period) % 2).astype(np.float32)
        c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        a = band[..., None] * c1 + (1 - band[..., None]) * c2
        return Image.fromarray(a.astype(np.uint8))
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)


def save(img: Image.Image, path: Path) -> Path:
    img.save(path)
    return path


def bomb(path: Path, side: int = 3000) -> Path:
    """A small PNG that declares ``side``² pixels (past MAX_PIXELS): a decompression bomb for the pixel cap."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 0).save(buf, format="PNG", optimize=True)
    path.write_bytes(buf.getvalue())
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_studio(config: Path, *, port: int | None = None, extra: tuple[str, ...] = (),
                   timeout: float = 240.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """``nsf studio --model-config CONFIG`` on a free loopback port until the block ends; yields (url, process)."""
    port = port or free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "nsf", "studio", "--model-config", str(config), "--port", str(port),
           "--device", "cpu", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                lines += proc.stdout.read().splitlines() if proc.stdout else []
                raise RuntimeError("nsf studio exited: " + "\n".join(lines[-30:]))
            try:
                with urllib.request.urlopen(url + "/", timeout=2) as r:
                    if r.status in (200, 401):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nsf studio not up on {url} after {timeout:.0f} s")
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def chromium_missing() -> str | None:
    """Why a headless Chromium cannot be driven here (``None``: it can)."""
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        return f"{CHROMIUM} not found (Debian's chromium package: apt-get install chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright (Python client) is not installed (the test extra installs it)"
    return None


@contextmanager
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
