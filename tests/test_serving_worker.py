"""nsf.serving.worker with a real model (Caffe VGG-19, 32-64 px, 2-3 steps), no server: start-up (warm-up,
calibration, compile stance), answers (images, every bad-input class, batches, retries, 500, 507),
time and memory admission, and hostile input that never gets a 5xx."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serving_requests import (
    BAD,
    LEFT,
    REPO,
    STYLE2,
    json_body,
    mask_png,
    model_config,
    multipart,
    noise_png,
)

from nsf.image import read_metadata
from nsf.plan import memory_now
from nsf.serving import Outcome, RequestError, ServingLimits, Worker, from_kserve_v2, request_fields
from nsf.weights import VGG19Weights

CAFFE_SHA = VGG19Weights.CAFFE.value.sha256


@pytest.fixture(scope="module")
def worker(model) -> Worker:
    """The shipped CPU limits around the session's model; no calibration run (time admission off)."""
    return Worker(ServingLimits.from_model_config(model_config(), "cpu"), model, response_timeout=900)


def request_of(row):
    """What a server adapter hands the worker for one row: its fields, or the error reading them."""
    if isinstance(row, list):
        try:
            return from_kserve_v2(row)
        except RequestError as e:
            return e
    try:
        return request_fields(row)[0]
    except RequestError as e:
        return e


def answer(worker: Worker, row) -> Outcome:
    (outcome,) = worker.answer([request_of(row)])
    return outcome


def image_of(outcome: Outcome) -> Image.Image:
    assert outcome.ok and isinstance(outcome.body, bytes), outcome.body
    return Image.open(io.BytesIO(outcome.body))


# --- start-up ----------------------------------------------------------------------------------


def test_start_warms_up_calibrates_and_refuses_what_would_outrun_the_timeout(caplog):
    cfg = model_config()
    cfg["nsf"]["devices"]["cpu"].update(warmup_sizes=[32, 48], warmup_steps=3, calibrate=[64, 3])
    with caplog.at_level(logging.INFO):
        w = Worker.start(cfg, device="cpu", response_timeout=4)
    assert w.ready and w.limits.device == "cpu" and w.model.weights_sha256 == CAFFE_SHA
    assert w.model.compile is False  # from nsf.devices.cpu.compile
    warm = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert [m.split(" px")[0].rsplit(" ", 1)[1] for m in warm] == ["32", "48"]
    assert w.cost is not None and w.cost.budget == pytest.approx(0.8 * 4)
    assert 1e-9 < w.cost.seconds_per_pixel_step < 1e-2  # a sanity range, not a timing: the machine may be busy
    assert any("calibrated" in r.getMessage() for r in caplog.records)
    (refused,) = w.answer([{"content": noise_png(96, 96), "style": noise_png(64, 64, 1), "size": b"512",
                            "steps": b"300"}])
    assert refused.status == 422 and refused.content_type == "application/json"
    assert refused.body["field"] in ("steps", "size") and refused.body["allowed"]["seconds_limit"] == 3
    (served,) = w.answer([{"content": noise_png(48, 48), "style": noise_png(32, 32, 1), "size": b"32", "steps": b"2"}])
    assert image_of(served).size == (32, 32)


def test_response_timeout_defaults_to_the_configs_and_time_budget_zero_turns_admission_off():
    cfg = model_config(time_budget=0)
    cfg["responseTimeout"] = 77
    w = Worker.start(cfg, device="cpu")
    assert w.response_timeout == 77 and w.cost is None and w.ready
    del cfg["responseTimeout"]
    assert Worker.start(cfg, device="cpu").response_timeout == 120  # TorchServe's default


@pytest.mark.parametrize("compile", [True, False])
def test_a_compiling_worker_compiles_no_new_shape_inside_a_request(monkeypatch, compile):
    cfg = model_config(time_budget=0)  # no calibration run: nothing is compiled here, only the policy is set
    cfg["nsf"]["devices"]["cpu"].update(compile=compile, warmup_sizes=[])
    stances = []
    monkeypatch.setattr(torch.compiler, "set_stance", lambda stance, **kw: stances.append(stance))
    w = Worker.start(cfg, device="cpu")
    assert w.model.compiles is compile
    assert stances == (["eager_on_recompile"] if compile else [])


# --- good requests ------------------------------------------------------------------------------


def test_multipart_fields_give_a_png_with_provenance(worker):
    out = answer(worker, multipart())
    assert (out.status, out.content_type, out.phrase) == (200, "image/png", "OK")
    img = image_of(out)
    assert img.format == "PNG" and img.size == (48, 36)  # longer side = size, aspect kept
    meta = read_metadata(out.body)
    assert meta["weights_sha256"] == CAFFE_SHA
    assert meta["seed"] == 3 and meta["params"]["size"] == 48 and meta["params"]["steps"] == 2
    assert meta["params"]["max_pixels"] == worker.limits.max_pixels


def test_json_fields_and_jpeg(worker):
    out = answer(worker, json_body(format="jpeg", preserve_color=True))
    assert out.content_type == "image/jpeg" and image_of(out).format == "JPEG" and image_of(out).size == (48, 36)


def test_same_seed_same_bytes_and_several_styles(worker):
    a, b = answer(worker, multipart(seed="11")), answer(worker, multipart(seed="11"))
    assert a.body == b.body
    out = answer(worker, multipart(style_2=STYLE2, style_weights="0.7,0.3"))
    assert read_metadata(out.body)["params"]["style_blend_weights"] == [0.7, 0.3]


# --- bad requests -------------------------------------------------------------------------------


@pytest.mark.parametrize("row, status, field", BAD.values(), ids=BAD.keys())
def test_bad_request_gets_4xx_naming_the_field(worker, row, status, field):
    out = answer(worker, row)
    assert out.status == status and not out.ok
    assert out.content_type == "application/json"
    assert out.body["field"] == field, out.body
    assert out.body["error"] and out.body["allowed"] is not None, out.body
    assert json.loads(out.json()) == json.loads(json.dumps(out.body, default=str))


def test_a_batch_with_bad_requests_answers_each_in_order_and_the_worker_carries_on(worker):
    rows = [multipart(size="5000"), multipart(size="32"), json_body(style=None), *(r for r, _, _ in BAD.values())]
    outs = worker.answer([request_of(r) for r in rows])
    assert [o.status for o in outs[:3]] == [400, 200, 400]
    assert outs[0].body["field"] == "size" and outs[2].body["field"] == "style"
    assert image_of(outs[1]).size == (32, 24)
    assert all(400 <= o.status < 500 for o in outs[3:])
    assert image_of(answer(worker, multipart(size="32"))).size == (32, 24)


# --- batches, retries, failures ---------------------------------------------------------------


def test_requests_of_one_size_and_config_run_as_one_batch(worker, monkeypatch):
    """A server's batch: equal requests share one optimization, each its own image."""
    batches = []
    real = worker.model.transfer

    def spy(content, styles, cfg, **kw):
        batches.append(content.shape[0])
        return real(content, styles, cfg, **kw)

    rows = [multipart(size="32"), multipart(size="32", style=STYLE2), multipart(size="48")]
    alone = [answer(worker, row) for row in rows]
    monkeypatch.setattr(worker.model, "transfer", spy)
    outs = worker.answer([request_of(r) for r in rows])
    assert sorted(batches) == [1, 2]  # the two 32 px requests together, the 48 px one alone
    assert [o.status for o in outs] == [200, 200, 200]
    for got, ref in zip(outs, alone):
        a = np.asarray(image_of(got), dtype=np.float32)
        b = np.asarray(image_of(ref), dtype=np.float32)
        assert a.shape == b.shape and np.abs(a - b).mean() < 1.0  # float32: the same up to rounding


def test_a_masked_request_runs_alone_with_its_masks(worker, monkeypatch):
    """Three requests of one size and config: the masked one runs on its own, with its (1, 1, H, W) masks;
    the other two share a batch."""
    calls = []
    real = worker.model.transfer

    def spy(content, styles, cfg, **kw):
        calls.append((content.shape[0], [tuple(m.shape) for m in kw.get("masks") or []],
                      [None if m is None else tuple(m.shape) for m in kw.get("style_masks") or []]))
        return real(content, styles, cfg, **kw)

    monkeypatch.setattr(worker.model, "transfer", spy)
    masked = multipart(size="32", style_2=STYLE2, mask=LEFT, mask_2=mask_png(64, 48, 0, 255),
                       style_mask_2=mask_png(32, 32, 255, 0))
    outs = worker.answer([request_of(r) for r in (multipart(size="32"), masked, multipart(size="32"))])
    assert [o.status for o in outs] == [200, 200, 200], [o.body for o in outs if not o.ok]
    assert sorted(calls) == [(1, [(1, 1, 48, 64), (1, 1, 48, 64)], [None, (1, 1, 32, 32)]), (2, [], [])]
    assert image_of(outs[1]).size == (32, 24)


def test_masks_a_run_refuses_are_a_400_naming_the_field(worker, monkeypatch):
    """Parsing refuses what the run would (test_serving_request); a mask the run refuses all the same -- here
    swapped for one of another aspect ratio on its way in -- is the run's ConfigError answered as a 400."""
    real = worker.model.transfer

    def swap(content, styles, cfg, **kw):
        return real(content, styles, cfg, **{**kw, "masks": [torch.ones(1, 1, 16, 64)]})

    monkeypatch.setattr(worker.model, "transfer", swap)
    out = answer(worker, multipart(size="32", mask=LEFT))
    assert (out.status, out.body["field"]) == (400, "mask"), out.body
    assert "aspect ratio" in out.body["allowed"]


def test_unexpected_failure_is_a_500_for_that_request_only(worker, monkeypatch):
    """Nothing in a real run fails this way on demand: the run is made to raise (the 507 test below makes
    a real allocation fail)."""
    calls = {"n": 0}
    real = worker.model.transfer

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:  # the batch of both, then the first request alone
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(worker.model, "transfer", flaky)
    outs = worker.answer([request_of(multipart(size="32")), request_of(multipart(size="32"))])
    assert [o.status for o in outs] == [500, 200]
    assert outs[0].phrase == "Internal Server Error" and outs[0].content_type == "application/json"
    assert outs[0].body == {"error": "internal error: RuntimeError: boom", "field": None, "allowed": None}
    assert calls["n"] == 3  # a failed batch is retried request by request


@pytest.mark.slow
def test_a_batch_out_of_memory_is_retried_alone_and_a_run_out_of_memory_is_a_507(tmp_path):
    """Real allocation failures, under an address-space limit (RLIMIT_AS) while max_memory claims 100 GB
    (so the planner admits everything): a batch of four 256 px requests cannot be allocated and each
    then runs alone (200); a 512 px request cannot run at all (507 naming size); the worker serves on."""
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs Linux /proc to cap the address space")
    script = textwrap.dedent("""
        import json, resource, sys, torch
        sys.path.insert(0, sys.argv[1])
        from serving_requests import model_config, noise_png
        from nsf.serving import Worker
        torch.set_num_threads(1)
        fast = {"scales": [1.0], "scale_steps": [1.0], "tol": 0.0, "content_layers": ["relu2_1"],
                "style_layers": ["relu1_1", "relu2_1"]}
        cfg = model_config(time_budget=0, overrides=fast)
        cfg["nsf"]["devices"]["cpu"]["max_memory"] = "100GB"
        w = Worker.start(cfg, device="cpu")
        def req(size, seed=0):
            return {"content": noise_png(size, size, seed), "style": noise_png(64, 64, 9), "size": str(size),
                    "steps": 1}
        print("warm", [o.status for o in w.answer([req(256)])])  # the process's memory settles
        job = w.check(req(256))
        from nsf.plan import CPU_RUNTIME_BYTES  # what the process gains beside its tensors: held already, warm
        one, four = (p.peak_bytes - p.in_use - int(CPU_RUNTIME_BYTES)
                     for p in (w.model.plan_config(job.config, (256, 256), batch=b) for b in (1, 4)))
        room = (one + four) // 2  # room for one 256 px run with the allocator's slack, not for four at once
        print(f"planned MB: one {one >> 20}, four {four >> 20}; address space left {room >> 20}", file=sys.stderr)
        vm = int(open("/proc/self/statm").read().split()[0]) * 4096
        resource.setrlimit(resource.RLIMIT_AS, (vm + room, resource.RLIM_INFINITY))
        for reqs in ([req(256, seed) for seed in range(4)], [req(512)], [req(64)]):
            print(json.dumps([[o.status, o.body if isinstance(o.body, dict) else o.content_type]
                              for o in w.answer(reqs)]))
    """)
    r = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                       "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "warm [200]"
    batch, big, small = (json.loads(line) for line in lines[1:])
    assert "batch [0, 1, 2, 3] failed (OutOfMemory" in r.stderr, r.stderr[-3000:]  # the batch did fail...
    assert batch == [[200, "image/png"]] * 4, r.stderr[-3000:]  # ...and its requests ran alone
    ((status, body),) = big
    assert status == 507 and body["field"] == "size" and body["allowed"] is None
    assert body["error"].startswith("out of memory on cpu") and "can't allocate memory" in body["error"]
    assert small == [[200, "image/png"]]


def test_a_request_over_the_workers_memory_is_refused_up_front():
    """A worker whose budget leaves room for small runs only: a large request gets a 422 naming the largest size
    that fits (from the planner), a small one is served, and time admission sees the plan's work."""
    w = Worker.start(model_config(time_budget=0), device="cpu")
    used, _ = memory_now(w.model.device)
    w.model.max_memory = used + 400 * 2**20  # what the worker holds plus 400 MB
    (out,) = w.answer([{"content": noise_png(96, 96), "style": noise_png(64, 64, 1), "size": b"2048", "steps": b"3"}])
    assert out.status == 422
    assert out.body["field"] == "size" and 32 <= out.body["allowed"]["max"] < 2048
    assert "does not fit max_memory" in out.body["error"]
    (out,) = w.answer([{"content": noise_png(48, 48), "style": noise_png(32, 32, 1), "size": b"32", "steps": b"2"}])
    assert image_of(out).size == (32, 32)


# --- hostile input ------------------------------------------------------------------------------
# The 600-example fuzz of hostile requests runs once, through the TorchServe handler (tests/test_handler.py), which
# hands every request to this worker's answer(): a second copy here drew the same rows through less code.


# --- choice options (preserve_color: off | luminance | histogram, and the booleans it used to take) ----


@pytest.mark.parametrize("value,mode", [("histogram", "histogram"), ("luminance", "luminance"), ("off", "off"),
                                        ("true", "luminance"), ("false", "off")])
def test_preserve_color_choice(worker, value, mode):
    out = answer(worker, multipart(preserve_color=value))
    assert out.status == 200 and read_metadata(out.body)["params"]["preserve_color"] == mode


def test_preserve_color_json_bool_and_a_bad_choice(worker):
    out = answer(worker, json_body(preserve_color=False))
    assert out.status == 200 and read_metadata(out.body)["params"]["preserve_color"] == "off"
    out = answer(worker, json_body(preserve_color="sepia"))
    assert out.status == 400 and out.body["field"] == "preserve_color"
    assert out.body["allowed"] == ["off", "luminance", "histogram", "true", "false"]


def test_style_loss_and_iterate_average_are_client_fields(worker):
    """The shipped config lets clients choose the style loss and the iterate average (issue 13's options)."""
    out = answer(worker, multipart(style_loss="mean_cov", iterate_average="0.5"))
    params = read_metadata(out.body)["params"]
    assert out.status == 200 and (params["style_loss"], params["iterate_average"]) == ("mean_cov", 0.5)
    out = answer(worker, json_body(style_loss="w2"))
    assert out.status == 400 and out.body["field"] == "style_loss"
    assert out.body["allowed"] == ["gram", "mean_cov", "sliced"]
