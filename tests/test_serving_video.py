"""Video requests through the serving worker (nsf.serving with nsf.video), in process with the real model: a good
request -> an MP4 with the source's frame count, streamed per-frame previews then the clip, bad clips refused as the
library refuses them (400/413 with {error, field, allowed}), time admission of frames x size x steps (422 naming the
most frames that fit), and a client that goes away stopping the work."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading

import pytest

pytest.importorskip("av")
pytest.importorskip("cv2")

import av  # noqa: E402
from serving_requests import model_config, png  # noqa: E402
from test_video import make_clip  # noqa: E402

from nsf.serving import CostModel, RequestError, ServingLimits, VideoJob, Worker, request_schema  # noqa: E402
from nsf.serving.stream import MEDIA_TYPE  # noqa: E402

FAST = {"scales": [1.0], "scale_steps": [1.0], "tol": 0.0}
SMALL = {"size": 32, "steps": 2, "later_steps": 1}


@pytest.fixture(scope="module")
def worker(model) -> Worker:
    limits = ServingLimits.from_model_config(model_config(overrides=FAST, video={"max_frames": 5}), "cpu")
    return Worker(limits, model, response_timeout=900)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> bytes:
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", n=3, size=(36, 48)).read_bytes()


def frames_of(data: bytes) -> list:
    with av.open(io.BytesIO(data)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_video_request_answers_an_mp4_with_every_frame(worker, clip):
    (outcome,) = worker.answer([{"video": clip, "style": png(40, 40, 1), **SMALL}])
    assert outcome.status == 200 and outcome.content_type == "video/mp4", outcome.body
    frames = frames_of(outcome.body)
    assert len(frames) == 3 and frames[0].shape == (24, 32, 3)  # size 32 on the longer side


def test_video_request_streams_a_preview_per_frame_then_the_clip(worker, clip):
    lines: list[dict] = []
    (outcome,) = worker.answer([{"video": base64.b64encode(clip).decode(), "style": png(40, 40, 2), **SMALL,
                                 "stream": True, "temporal_weight": 100}],
                               progress=lambda _i, data: lines.append(json.loads(data)))
    assert outcome.content_type == MEDIA_TYPE
    last = json.loads(outcome.body)
    assert [m["event"] for m in lines] == ["frame"] * 3 and [m["index"] for m in lines] == [0, 1, 2]
    assert lines[0]["total"] == 3 and base64.b64decode(lines[0]["image"])[:2] == b"\xff\xd8"  # a JPEG preview
    assert last["event"] == "result" and last["content_type"] == "video/mp4" and last["frames"] == 3
    assert len(frames_of(base64.b64decode(last["video"]))) == 3


@pytest.mark.parametrize("what", ["image", "garbage", "no frames", "too many frames", "too big", "with content",
                                  "size", "later_steps", "temporal_weight on a still"])
def test_bad_video_requests_are_refused_naming_the_field(worker, clip, tmp_path, what):
    fields = {"video": clip, "style": png(40, 40, 3), **SMALL}
    status, field = 400, "video"
    if what == "image":
        fields["video"] = png(48, 36)
    elif what == "garbage":
        fields["video"] = clip[: len(clip) // 3]  # truncated: no readable stream or packets
    elif what == "no frames":
        fields["video"] = make_clip(tmp_path / "empty.mp4", n=0).read_bytes()
    elif what == "too many frames":
        fields["video"] = make_clip(tmp_path / "long.mp4", n=7).read_bytes()
        status = 413
    elif what == "too big":
        limits = dataclasses.replace(worker.limits, max_video_bytes=len(clip) - 1)
        outcome = Worker(limits, worker.model, response_timeout=900).answer([fields])[0]
        assert outcome.status == 413 and outcome.body["field"] == "video", outcome.body
        assert outcome.body["allowed"] == f"at most {len(clip) - 1} bytes"
        return
    elif what == "with content":
        fields["content"] = png(32, 32)
    elif what == "size":
        fields["size"], field = 600, "size"
    elif what == "later_steps":
        fields["later_steps"], field = 0, "later_steps"
    else:
        fields = {"content": png(32, 32), "style": png(32, 32), "temporal_weight": 3}
        field = "temporal_weight"
    (outcome,) = worker.answer([fields])
    assert outcome.status == status and outcome.body["field"] == field, outcome.body
    assert outcome.body["allowed"] and outcome.body["error"]


def test_video_admission_names_the_frames_that_fit(worker, clip):
    job = worker.check({"video": clip, "style": png(40, 40, 4), **SMALL})
    assert isinstance(job, VideoJob) and job.frames == 3
    timed = Worker(worker.limits, worker.model, response_timeout=900)
    timed.cost = CostModel(1e-6, 1.0)
    per = timed.estimate(job)  # first frame + 2 later frames, at 1 us per pixel-step
    first = timed.cost.seconds(job.config, *job.size)
    timed.cost = CostModel(1e-6 * 1.0 / (first + (per - first) / 2 * 1.5), 1.0)  # the first and 1.5 later fit
    with pytest.raises(RequestError) as e:
        timed.check({"video": clip, "style": png(40, 40, 4), **SMALL})
    assert e.value.status == 422 and e.value.field == "video" and e.value.allowed["max_frames"] == 2
    assert "at most 2 frames fit" in e.value.message


def test_a_client_that_goes_away_stops_the_video(worker, clip):
    gone = threading.Event()
    lines: list[dict] = []

    def progress(_i: int, data: bytes) -> None:
        lines.append(json.loads(data))
        gone.set()  # the client disconnects after the first frame

    (outcome,) = worker.answer([{"video": clip, "style": png(40, 40, 5), **SMALL, "stream": True}],
                               progress=progress, gone=[gone])
    assert len(lines) == 1 and json.loads(outcome.body)["event"] == "error"


def test_schema_describes_the_video_fields(worker):
    props = request_schema(worker.limits)["properties"]
    assert {"video", "temporal_weight", "later_steps"} <= set(props)


def test_video_limits_are_read_from_the_model_config():
    shipped = ServingLimits.from_model_config(model_config(), "cpu")
    assert (shipped.max_video_bytes, shipped.max_video_frames, shipped.max_video_size, shipped.video_later_steps) == \
        (16 * 2**20, 300, 512, 20)
    assert shipped.bounds("size", video=True)["max"] == 512 < shipped.bounds("size")["max"]
    with pytest.raises(ValueError, match="nsf.video"):
        ServingLimits.from_model_config(model_config(video={"max_fps": 3}), "cpu")
    with pytest.raises(ValueError, match="max_request_bytes"):
        ServingLimits.from_model_config(model_config(video={"max_bytes": 2**40}), "cpu")
