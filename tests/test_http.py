"""HTTP handlers in-process: aiohttp's test client against the real app, outputs and hub, with
synthetic frames and a registry of the test's own. What a client sees for good and bad requests."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import cv2
import numpy as np
import pytest

from tests.inproc import SOURCES, counted, make_frame, relay_app
from tests.wait import async_wait_until

TOKEN = "t0k3n-for-tests"


def run(coro):
    return asyncio.run(coro)


async def first_part(resp) -> tuple[dict[str, str], bytes]:
    """The first MJPEG part: its headers and body, read as a player would."""
    boundary = resp.headers["Content-Type"].split("boundary=")[1].encode()
    assert (await resp.content.readline()).strip() == b"--" + boundary
    headers = {}
    while line := (await resp.content.readline()).strip():
        k, _, v = line.decode().partition(":")
        headers[k.lower()] = v.strip()
    return headers, await resp.content.readexactly(int(headers["content-length"]))


def shape_of(jpeg: bytes) -> tuple[int, int]:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    return img.shape[1], img.shape[0]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("width=abc", "width"),
        ("width=5", "width"),
        ("width=%2B320", "width"),  # +320
        ("width=%20320", "width"),  # leading space
        ("width=3_20", "width"),
        ("width=%D9%A3%D9%A2%D9%A0", "width"),  # Arabic-Indic digits
        ("height=100000", "height"),
        ("quality=0", "quality"),
        ("quality=101", "quality"),
        ("rotate=45", "rotate"),
        ("fps=0", "fps"),
        ("fps=fast", "fps"),
        ("fps=1e1", "fps"),
        ("colormap=rainbowz", "colormap"),
        ("format=png", "format"),  # PNG is for snapshots only
    ],
)
def test_bad_parameter_is_a_json_400_naming_it(query, param):
    async def scenario():
        async with relay_app() as (client, hub, _):
            for path in ("/stream", "/ws"):
                resp = await client.get(f"{path}/back_fisheye_image?{query}")
                assert resp.status == 400
                data = await resp.json()
                assert data["parameter"] == param and data["allowed"] and data["error"]
            assert not hub.viewers()

    run(scenario())


def test_unknown_source_is_404_listing_the_others_and_503_before_the_robot_answered():
    async def scenario():
        async with relay_app() as (client, _, _):
            for path in ("/stream/nope", "/snapshot/nope", "/ws/nope"):
                resp = await client.get(path)
                assert resp.status == 404 and resp.content_type == "application/json"
                data = await resp.json()
                assert data["source"] == "nope" and "back_depth" in data["available"]
        async with relay_app(sources=[]) as (client, _, _):
            resp = await client.get("/stream/back_depth")
            assert resp.status == 503 and resp.headers["Retry-After"]
            assert (await resp.json())["error"] == "robot not connected yet"

    run(scenario())


def test_router_errors_are_json_too():
    async def scenario():
        async with relay_app() as (client, _, _):
            resp = await client.get("/no/such/page")
            assert resp.status == 404 and (await resp.json())["path"] == "/no/such/page"
            resp = await client.post("/api/sources")
            assert resp.status == 405 and resp.content_type == "application/json"
            assert "GET" in (await resp.json())["allowed"] and "GET" in resp.headers["Allow"]

    run(scenario())


def test_stream_serves_the_robots_bytes_then_planned_sizes():
    async def scenario():
        async with relay_app() as (client, hub, metrics):
            resp = await client.get("/stream/back_fisheye_image")
            headers, body = await first_part(resp)
            assert body == hub.frame("back_fisheye_image").image.data  # passthrough
            assert float(headers["x-timestamp"]) == 1001.0
            resp.close()
            # the viewer's "upright" toggle: 300 wide after the quarter-ish turn (was 187x225)
            resp = await client.get("/stream/frontleft_fisheye_image?width=300&rotate=auto")
            _, body = await first_part(resp)
            assert shape_of(body) == (300, 362)
            resp.close()
            served = counted(
                metrics, "spotrelay_frames_served_total", source="frontleft_fisheye_image"
            )
            assert served == 1

    run(scenario())


def test_head_answers_headers_without_becoming_a_viewer():
    async def scenario():
        async with relay_app() as (client, hub, _):
            resp = await asyncio.wait_for(client.head("/stream/back_fisheye_image"), 5)
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("multipart/x-mixed-replace")
            assert await resp.read() == b""
            assert not hub.viewers() and hub.watched("back_fisheye_image") == 0

    run(scenario())


def test_snapshot_jpeg_png_and_depth():
    async def scenario():
        async with relay_app() as (client, _, _):
            resp = await client.get("/snapshot/back_fisheye_image?width=160")
            assert resp.status == 200 and resp.content_type == "image/jpeg"
            assert shape_of(await resp.read()) == (160, 120)
            resp = await client.get("/snapshot/back_depth?format=png")
            depth = cv2.imdecode(np.frombuffer(await resp.read(), np.uint8), cv2.IMREAD_UNCHANGED)
            assert resp.content_type == "image/png" and depth.dtype == np.uint16
            assert (depth == 1500).all()

    run(scenario())


def test_a_snapshot_that_waits_in_vain_gets_the_newest_full_quality_frame_marked_stale():
    """Only the viewer page's tiles watched the camera, so its newest frame came coarse
    (--small-robot-quality); then the robot stopped sending. The snapshot waits for a new
    full-quality frame, gets none, and falls back to the newest full-quality one it has."""

    async def scenario():
        async with relay_app() as (client, hub, _):
            name = "back_fisheye_image"
            hub.publish(dataclasses.replace(make_frame(name, 2), coarse=True))
            await asyncio.sleep(0.25)  # older than a snapshot may reuse
            resp = await client.get(f"/snapshot/{name}")
            assert resp.status == 200
            assert resp.headers["X-Stale"] == "1"
            assert float(resp.headers["X-Timestamp"]) == make_frame(name, 1).acquired
            grey = cv2.imdecode(np.frombuffer(await resp.read(), np.uint8), cv2.IMREAD_GRAYSCALE)
            assert abs(int(grey.mean()) - 20) <= 2  # frame 1's level, not the coarse 2's (40)

    run(scenario())


async def _until_stale(hub, name: str) -> None:
    """A short --stale-after (and idle refresh) and wait for ``name`` to turn stale under it."""
    hub.stale_after, hub.idle_interval = 0.2, 0.05
    await async_wait_until(lambda: hub.is_stale(name), what=f"{name} stale")


async def _snapshot_while_waiting(client, hub, name: str, arrives):
    """A snapshot of ``name``, with ``arrives`` published once the snapshot waits for a new
    frame (it watches the camera); fails if it answered without waiting."""
    asked = asyncio.create_task(client.get(f"/snapshot/{name}"))
    await async_wait_until(lambda: hub.watched(name) or asked.done(), what="the snapshot")
    assert not asked.done(), "answered without waiting"
    hub.publish(arrives)
    return await asyncio.wait_for(asked, 5)


def test_a_snapshot_of_a_camera_already_stale_does_not_wait_2_s():
    """The camera stopped sending a while ago (stale): a snapshot gets its newest frame marked
    stale after a short wait, not after waiting 2 s for a frame that will not come, which a
    program polling snapshots of it paid on every one."""

    async def scenario():
        async with relay_app() as (client, hub, _):
            name = "back_fisheye_image"
            await _until_stale(hub, name)
            async with asyncio.timeout(1.5):  # the old wait for a new frame took 2 s
                resp = await client.get(f"/snapshot/{name}")
            assert resp.status == 200 and resp.headers["X-Stale"] == "1"
            assert float(resp.headers["X-Timestamp"]) == make_frame(name, 1).acquired

    run(scenario())


def test_a_snapshot_of_a_stale_camera_that_comes_back_gets_its_new_frame():
    """Stale, but the camera answers again as the snapshot asks for it (watching a camera polls
    it at once): the snapshot gets the new frame, not marked stale."""

    async def scenario():
        async with relay_app() as (client, hub, _):
            name = "back_fisheye_image"
            await _until_stale(hub, name)
            resp = await _snapshot_while_waiting(client, hub, name, make_frame(name, 3))
            assert resp.status == 200 and "X-Stale" not in resp.headers
            assert float(resp.headers["X-Timestamp"]) == make_frame(name, 3).acquired

    run(scenario())


def test_a_snapshot_of_a_stale_camera_held_coarse_waits_for_its_full_quality_copy():
    """The camera went stale while only tiles watched it, so the newest capture is held coarse:
    the snapshot waits for that capture at full quality (the poller asks for it at once) rather
    than answering with the older full-quality frame, and marks it stale: the same old capture."""

    async def scenario():
        async with relay_app() as (client, hub, _):
            name = "back_fisheye_image"
            hub.publish(dataclasses.replace(make_frame(name, 2), coarse=True))
            await _until_stale(hub, name)
            # the poller's full-quality copy of capture 2 arrives while the snapshot waits
            resp = await _snapshot_while_waiting(client, hub, name, make_frame(name, 2))
            assert resp.status == 200 and resp.headers["X-Stale"] == "1"
            assert float(resp.headers["X-Timestamp"]) == make_frame(name, 2).acquired
            assert hub.is_stale(name)  # the copy is no new frame

    run(scenario())


def test_websocket_sends_metadata_then_the_picture():
    async def scenario():
        async with relay_app() as (client, hub, _):
            # a browser offers permessage-deflate: pictures are sent as they are, not deflated
            # for each viewer
            async with client.ws_connect("/ws/back_fisheye_image?width=320", compress=15) as sock:
                assert sock.compress == 0
                meta = json.loads((await sock.receive(timeout=5)).data)
                pic = (await sock.receive(timeout=5)).data
                assert meta["seq"] == 1 and meta["bytes"] == len(pic) and not meta["stale"]
                assert shape_of(pic) == (320, 240)
                assert len(hub.viewers()) == 1
            await asyncio.sleep(0)  # the server notices the close

    run(scenario())


def test_api_sources_state_health_and_metrics():
    async def scenario():
        async with relay_app() as (client, _, metrics):
            data = await (await client.get("/api/sources")).json()
            assert data["robot"]["connected"] is True
            names = [s["name"] for s in data["sources"]]
            assert names == sorted(s.name for s in SOURCES)
            depth = next(s for s in data["sources"] if s["name"] == "back_depth")
            assert (depth["cols"], depth["rows"], depth["image_type"]) == (424, 240, "depth")
            assert (await client.get("/healthz")).status == 200
            ready = await client.get("/readyz")
            assert ready.status == 200 and (await ready.json())["fresh_sources"] == 3
            state = await (await client.get("/api/state")).json()
            assert state["clients"] == []
            metrics.frames_received.labels(source="back_depth").inc(7)
            text = await (await client.get("/metrics")).text()
            assert 'spotrelay_frames_received_total{source="back_depth"} 7.0' in text
            assert "process_cpu_seconds_total" not in text  # the test's own registry only

    run(scenario())


def test_token_header_or_parameter_and_any_bytes_are_a_401_not_a_500():
    async def scenario():
        async with relay_app(token=TOKEN) as (client, _, _):
            assert (await client.get("/api/sources")).status == 401
            assert (await client.get("/api/sources?token=wrong")).status == 401
            assert (await client.get(f"/api/sources?token={TOKEN}")).status == 200
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            assert (await client.get("/api/sources", headers=bearer)).status == 200
            # a stale header does not lock out a correct parameter
            wrong = {"Authorization": "Bearer stale"}
            assert (await client.get(f"/api/sources?token={TOKEN}", headers=wrong)).status == 200
            for raw in ("Bearer \u00e9\u00e8", "Bearer \udcff\udcfe", "bearer", "Basic x"):
                resp = await client.get("/api/state", headers={"Authorization": raw})
                assert resp.status == 401, raw
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await client.get("/healthz")).status == 200
            assert (await client.get("/readyz")).status == 200
            for path in (
                "/metrics",
                "/stream/back_depth",
                "/snapshot/back_depth",
                "/ws/back_depth",
            ):
                assert (await client.get(path)).status == 401, path
            # the viewer page is open (static, no camera data) and asks for the token
            page = await client.get("/")
            assert page.status == 200 and 'id="loginform"' in await page.text()

    run(scenario())
