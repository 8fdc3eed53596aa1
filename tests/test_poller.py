"""The poller in-process, against replies built as the robot builds them and errors raised as the
SDK raises them (its own ``_error_from_response``): what a batch with bad images yields."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from bosdyn.api import header_pb2, image_pb2
from bosdyn.client import image as sdk_image

from spotrelay.frames import Frame, SourceInfo
from spotrelay.metrics import Metrics
from spotrelay.poller import Poller, status_name
from tests.inproc import counted
from tests.wait import async_wait_until

STATUS = image_pb2.ImageResponse
SOURCES = {
    name: SourceInfo(name, "image", 480, 640, "visual", ("GREYSCALE_U8",), ("JPEG",))
    for name in ("good", "bad", "worse")
}


def response(statuses: dict[str, int], header_code: int = header_pb2.CommonError.CODE_OK):
    resp = image_pb2.GetImageResponse()
    resp.header.error.code = header_code
    resp.header.request_received_timestamp.seconds = 1000
    for name, status in statuses.items():
        r = resp.image_responses.add()
        r.source.name, r.status = name, status
        if status == STATUS.STATUS_OK:
            r.shot.acquisition_time.seconds = 999
            r.shot.image.data = b"\xff\xd8 a picture \xff\xd9"
            r.shot.image.format = image_pb2.Image.FORMAT_JPEG
            r.shot.image.rows, r.shot.image.cols = 480, 640
    return resp


async def poll_once(statuses: dict[str, int], header_code=header_pb2.CommonError.CODE_OK):
    """One batch of the three sources; what came out of it."""
    frames: list[Frame] = []
    reports: list[BaseException | None] = []
    batches: list[list[str]] = []

    def fetch(service, requests):
        batches.append([r.image_source_name for r in requests])
        whole = response({r.image_source_name: statuses[r.image_source_name] for r in requests})
        whole.header.error.code = header_code
        fut = asyncio.get_running_loop().create_future()
        error = sdk_image._error_from_response(whole)  # exactly what the SDK would raise
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(whole)
        return fut

    reported = asyncio.Event()

    def report(service, exc):
        reports.append(exc)
        reported.set()

    metrics = Metrics()
    poller = Poller(
        fetch,
        report,
        lambda robot_t: robot_t,
        metrics,
        frames.append,
        clock=lambda: 1000.0,
    )
    poller.set_sources(SOURCES, {"image": True})
    task = asyncio.create_task(poller.run())
    async with asyncio.timeout(5):  # the first batch's reply has been handled
        await reported.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return frames, reports, batches, metrics


@pytest.mark.parametrize(
    "status",
    [STATUS.STATUS_UNKNOWN, STATUS.STATUS_CUSTOM_PARAMS_ERROR, STATUS.STATUS_SOURCE_DATA_ERROR, 42],
)
def test_a_bad_image_does_not_cost_the_good_ones_nor_the_connection(status):
    statuses = {"good": STATUS.STATUS_OK, "bad": status, "worse": 43}
    frames, reports, batches, metrics = asyncio.run(poll_once(statuses))
    assert batches == [["good", "bad", "worse"]]  # one batch: the bad images were in it
    assert [f.source for f in frames] == ["good"]
    assert reports == [None]  # the call worked: no connection failure
    for source, label in (("bad", status_name(status)), ("worse", "unrecognized")):
        count = counted(metrics, "spotrelay_image_errors_total", source=source, status=label)
        assert count == 1, (source, label)


def test_a_failed_call_is_a_connection_failure():
    statuses = dict.fromkeys(SOURCES, STATUS.STATUS_OK)
    frames, reports, _, metrics = asyncio.run(
        poll_once(statuses, header_pb2.CommonError.CODE_INTERNAL_SERVER_ERROR)
    )
    assert frames == []
    assert len(reports) == 1 and reports[0] is not None
    assert counted(metrics, "spotrelay_rpc_errors_total", service="image", kind="other") == 1


def test_status_names_are_bounded():
    assert status_name(STATUS.STATUS_UNKNOWN) == "unknown"
    assert status_name(STATUS.STATUS_CUSTOM_PARAMS_ERROR) == "custom_params_error"
    assert status_name(123456) == "unrecognized"


DEPTH = SourceInfo("depth", "image", 240, 424, "depth", ("DEPTH_U16",), ("RAW",))


def answering_poller(**options) -> tuple[Poller, list[Frame], list[image_pb2.ImageRequest]]:
    """A poller (``options``: its keyword arguments) whose robot answers every request with the
    same capture (999 s): the poller, the frames it hands on, and every request it sends."""
    frames: list[Frame] = []
    asked: list[image_pb2.ImageRequest] = []

    def fetch(service, requests):
        asked.extend(requests)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(response({r.image_source_name: STATUS.STATUS_OK for r in requests}))
        return fut

    poller = Poller(fetch, lambda s, e: None, lambda t: t, Metrics(), frames.append, **options)
    return poller, frames, asked


@contextlib.asynccontextmanager
async def tiles_only(poller: Poller):
    """The poller running, its camera ``good`` watched by small views only; stopped on exit."""
    poller.set_coarse("good", True)
    poller.set_sources({"good": SOURCES["good"]}, {"image": True})
    poller.set_watched("good", True)
    task = asyncio.create_task(poller.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def poll_coarse(coarse: set[str], small_quality: int | None):
    """One batch of a JPEG camera and a depth camera, ``coarse`` told as only small views
    watching: the (source, quality, format) asked, and the frames' ``coarse`` tags."""
    poller, frames, requests = answering_poller(
        quality=75, small_quality=small_quality, clock=lambda: 1000.0
    )
    for source in coarse:  # told before the sources are known: kept for when they are
        poller.set_coarse(source, True)
    poller.set_sources({"good": SOURCES["good"], "depth": DEPTH}, {"image": True})
    task = asyncio.create_task(poller.run())
    await async_wait_until(lambda: len(frames) == 2, what="both frames")
    quality = {s: poller.asked_quality(s) for s in ("good", "depth")}
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    asked = [(r.image_source_name, r.quality_percent, r.image_format) for r in requests]
    return sorted(asked), {f.source: f.coarse for f in frames}, quality


JPEG, UNSET = image_pb2.Image.FORMAT_JPEG, image_pb2.Image.FORMAT_UNKNOWN


@pytest.mark.parametrize(
    ("coarse", "small_quality", "asked", "tags"),
    [
        ({"good", "depth"}, 50, [("depth", 75, UNSET), ("good", 50, JPEG)], {"good": True}),
        (set(), 50, [("depth", 75, UNSET), ("good", 75, JPEG)], {"good": False}),
        ({"good"}, 75, [("depth", 75, UNSET), ("good", 75, JPEG)], {"good": False}),  # no lower
        ({"good"}, None, [("depth", 75, UNSET), ("good", 75, JPEG)], {"good": False}),
    ],
)
def test_a_camera_only_small_views_watch_is_asked_for_the_small_quality(
    coarse, small_quality, asked, tags
):
    """Only a JPEG can come coarser (depth comes in the service's lossless default), and a
    frame is tagged coarse exactly when its request asked for less than --robot-quality."""
    got_asked, got_tags, quality = asyncio.run(poll_coarse(coarse, small_quality))
    assert got_asked == asked
    assert got_tags == {**tags, "depth": False}
    assert quality == {"good": 50 if tags["good"] else 75, "depth": None}


def test_a_capture_held_coarse_is_handed_on_again_when_it_comes_at_full_quality():
    """A camera that stopped capturing keeps sending its last capture. Fetched coarse while
    only tiles watched, that capture is handed on once more when a full-quality view asks for
    it (under the same seq): a snapshot need not fall back to an older picture. Repeats of it
    after that are not news."""

    async def scenario() -> list[Frame]:
        poller, frames, asked = answering_poller(small_quality=50)  # one camera: a request a call
        async with tiles_only(poller):
            await async_wait_until(lambda: frames, what="the coarse frame")
            poller.set_coarse("good", False)
            await async_wait_until(lambda: len(frames) == 2, what="the same, at full quality")
            seen = len(asked)
            await async_wait_until(lambda: len(asked) >= seen + 5, what="five more replies")
        return frames

    frames = asyncio.run(scenario())
    assert [(f.coarse, f.seq, f.acquired) for f in frames] == [(True, 1, 999.0), (False, 1, 999.0)]


def test_a_capture_held_coarse_is_asked_again_at_once_when_a_full_quality_view_comes():
    """A snapshot, or a full-size view, on a camera only tiles watched: the capture held came
    coarse, and the next regular request may be a period away (a second, for a camera that
    stalled). The poller asks again at once instead. The clock here moves only when the test
    says: after 8 s of the same capture the next regular request is a second away, and never
    falls due, so only the one asked at once can bring the full-quality copy."""

    async def scenario() -> list[Frame]:
        clock = [1000.0]
        poller, frames, requests = answering_poller(small_quality=50, clock=lambda: clock[0])
        async with tiles_only(poller):
            await async_wait_until(lambda: frames, what="the coarse frame")
            clock[0] = 1008.0  # the camera stalled: the same capture for 8 s
            await async_wait_until(
                lambda: len(requests) == 2, what="the stalled camera asked again"
            )
            assert poller.sources["good"].schedule.next_due >= 1008.5  # nothing due for a while
            poller.set_coarse("good", False)
            await async_wait_until(lambda: len(frames) == 2, what="the same, at full quality")
            assert [r.quality_percent for r in requests] == [50, 50, 75]
        return frames

    frames = asyncio.run(scenario())
    assert [(f.coarse, f.seq) for f in frames] == [(True, 1), (False, 1)]
