"""nsf.serving.stream and the worker's streamed, deadline-bound and cancelled requests, with a real model
(Caffe VGG-19, 96 px, 6 steps over the default coarse-to-fine scales), no server."""

from __future__ import annotations

import base64
import io
import json
import threading

import pytest
from PIL import Image
from serving_requests import model_config, multipart

from nsf.config import make_config
from nsf.image import read_metadata
from nsf.optimize import schedule
from nsf.serving import Outcome, ServingLimits, Worker, request_fields
from nsf.serving.stream import MEDIA_TYPE, PARTIAL_HEADER, PREVIEW_SIDE, StopWhen

STEPS = 6


@pytest.fixture(scope="module")
def worker(model) -> Worker:
    return Worker(ServingLimits.from_model_config(model_config(), "cpu"), model, response_timeout=900)


def fields(**extra) -> dict:
    return request_fields(multipart(size=b"96", steps=str(STEPS).encode(), **extra))[0]


def messages(lines: list[bytes]) -> list[dict]:
    out = []
    for chunk in lines:
        assert chunk.endswith(b"\n") and chunk.count(b"\n") == 1  # one NDJSON line per message
        out.append(json.loads(chunk))
    return out


def streamed(worker: Worker, gone: threading.Event | None = None, **extra) -> tuple[list[dict], Outcome]:
    sent: list[bytes] = []
    (outcome,) = worker.answer([fields(stream="true", **extra)], progress=lambda i, m: sent.append(m),
                               gone=[gone])
    return messages(sent), outcome


def test_a_streamed_request_sends_a_preview_per_scale_then_the_same_image_as_unstreamed(worker):
    previews, outcome = streamed(worker)
    (plain,) = worker.answer([fields()])
    scales = len(schedule(48, 64, make_config(worker.limits.base, size=96, steps=STEPS)))
    assert scales > 1 and len(previews) == scales
    assert [p["scale"] for p in previews] == list(range(1, scales + 1))
    assert all(p["event"] == "preview" and p["scales"] == scales and p["content_type"] == "image/jpeg"
               for p in previews)
    assert previews[-1]["step"] == STEPS and previews[-1]["size"] == [72, 96]
    for p in previews:
        img = Image.open(io.BytesIO(base64.b64decode(p["image"])))
        assert img.format == "JPEG" and img.size == (p["size"][1], p["size"][0])  # under PREVIEW_SIDE: as is
        assert p["loss"] > 0
    assert previews[0]["loss"] != previews[-1]["loss"]
    assert (outcome.status, outcome.content_type, outcome.partial) == (200, MEDIA_TYPE, False)
    (last,) = messages([outcome.body])
    assert (last["event"], last["partial"], last["content_type"]) == ("result", False, "image/png")
    assert base64.b64decode(last["image"]) == plain.body  # the bytes a plain request gets


def test_previews_of_large_scales_are_downsized():
    import torch

    from nsf.optimize import ScaleDone
    from nsf.serving.stream import preview

    done = ScaleDone(2, 3, 3, (600, 800), 10, 20, 1.5, torch.rand(1, 3, 600, 800), False)
    p = preview(done)
    assert Image.open(io.BytesIO(base64.b64decode(p["image"]))).size == (PREVIEW_SIDE, 192)
    assert p["size"] == [600, 800] and (p["scale"], p["scales"], p["step"], p["total"]) == (3, 3, 10, 20)


def test_a_deadline_returns_the_best_image_so_far_marked_partial(worker):
    (out,) = worker.answer([fields(deadline="0.001")])
    assert out.ok and out.partial and out.headers == {PARTIAL_HEADER: "true"}
    img = Image.open(io.BytesIO(out.body))
    assert img.size == (96, 72)  # the size asked for
    partial = read_metadata(out.body)["partial"]
    assert partial["scale"] == 1 and partial["step"] < STEPS and partial["total"] == STEPS
    # a generous deadline changes nothing: same bytes as no deadline
    (plain,) = worker.answer([fields()])
    (late,) = worker.answer([fields(deadline="600")])
    assert not late.partial and late.headers == {} and late.body == plain.body


def test_a_streamed_request_past_its_deadline_ends_with_a_partial_result(worker):
    previews, outcome = streamed(worker, deadline="0.001")
    (last,) = messages([outcome.body])
    assert len(previews) == 1 and last["partial"] is True and outcome.partial


def test_a_client_that_goes_away_stops_the_work(worker, caplog):
    gone = threading.Event()
    sent: list[bytes] = []

    def progress(i: int, message: bytes) -> None:
        sent.append(message)
        gone.set()  # the client disconnects after the first preview

    with caplog.at_level("INFO"):
        (outcome,) = worker.answer([fields(stream="true")], progress=progress, gone=[gone])
    assert len(sent) == 1  # nothing more is sent, and no later scale runs
    assert outcome.partial
    assert "the client went away after 1 preview(s); stopped at step" in caplog.text


def test_stream_where_the_endpoint_cannot_stream_is_a_400_naming_the_field(worker):
    (out,) = worker.answer([fields(stream="true")], streams=False)
    assert (out.status, out.body["field"], out.body["allowed"]) == (400, "stream", [False])
    (out,) = worker.answer([fields(stream="false")], streams=False)
    assert out.ok and out.content_type == "image/png"


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", "1e9", True, [], ""])
def test_bad_deadlines_and_stream_values_are_400s(worker, value):
    row = fields()
    row["deadline"] = value
    (out,) = worker.answer([row])
    assert (out.status, out.body["field"]) == (400, "deadline"), out.body
    row = fields(stream="maybe")
    (out,) = worker.answer([row])
    assert (out.status, out.body["field"]) == (400, "stream")


def test_an_error_after_the_first_preview_is_the_streams_last_message(worker, monkeypatch):
    calls = []
    real = worker.model.transfer

    def failing(*a, **kw):
        on_scale = kw["on_scale"]

        def boom(done):
            on_scale(done)
            calls.append(done)
            raise RuntimeError("injected after a preview")

        return real(*a, **{**kw, "on_scale": boom})

    monkeypatch.setattr(worker.model, "transfer", failing)
    previews, outcome = streamed(worker)
    (last,) = messages([outcome.body])
    assert len(previews) == 1 and outcome.status == 200 and outcome.content_type == MEDIA_TYPE
    assert (last["event"], last["status"], last["field"]) == ("error", 500, None)
    assert "injected after a preview" in last["error"]


def test_stop_when():
    gone = threading.Event()
    stop = StopWhen.after(None, gone)
    assert not stop() and not stop.client_gone
    gone.set()
    assert stop() and stop.client_gone
    assert StopWhen.after(-1)() and not StopWhen.after(60)()

