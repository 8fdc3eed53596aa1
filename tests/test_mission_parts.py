"""Parts of the Autowalk callback in-process: parameter edge cases, what the mission passes as
inputs, bounded sessions, registration that cannot or may not happen, a second relay on a port
already taken, the captures API when the callback is off."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading

import cv2
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from bosdyn.api import service_customization_pb2 as sc
from bosdyn.api.mission import remote_pb2, util_pb2
from bosdyn.client.exceptions import UnableToConnectToRobotError

from spotrelay import config
from spotrelay.autowalk import jobs, registration
from spotrelay.autowalk import routes as captures_out
from spotrelay.autowalk import service as mission
from spotrelay.frames import GREY8, JPEG, RAW, Frame, ImageData
from spotrelay.http.app import build_app
from spotrelay.main import Relay
from spotrelay.metrics import Metrics
from spotrelay.robot import Target
from spotrelay.sim.cameras import Content, spot_cameras
from tests.relay import free_port
from tests.wait import async_wait_until

IDENTITY = (mission.SERVICE_NAME, mission.SERVICE_TYPE, mission.AUTHORITY)


def test_parameters_when_no_camera_is_known_and_odd_values():
    spec = mission.build_spec([])  # robot not connected yet: names are typed in
    element = spec.specs["cameras"].spec.list_spec.element_spec.string_spec
    assert element.editable and not element.options
    p = sc.DictParam()
    p.values["cameras"].list_value.values.add().string_value.value = ""
    error = mission.parse_params(p, ["a"])
    assert isinstance(error, sc.CustomParamError)
    broken = sc.DictParam()
    broken.values["label"].SetInParent()  # a value with nothing set: the SDK raises TypeError
    error = mission.parse_params(broken, ["a"])
    assert isinstance(error, sc.CustomParamError) and "malformed" in error.error_messages[0]
    job = mission.parse_params(sc.DictParam(), ["b", "a"])
    assert job == mission.Job("capture", ("b",), mission.DURATION_DEFAULT, "")


def test_inputs_become_plain_json():
    req = remote_pb2.TickRequest()
    for key, field, value in (("n", "int_value", 3), ("s", "string_value", "x")):
        kv = req.inputs.add(key=key)
        setattr(kv.value.constant, field, value)
    req.inputs.add(key="var").value.runtime_var.name = "loop_counter"
    req.inputs.add(key="empty")
    req.inputs.add(key="unset").value.constant.SetInParent()
    kv = req.inputs.add(key="msg")
    kv.value.constant.msg_value.Pack(util_pb2.VariableDeclaration(name="w"))
    out = mission.inputs_of(req)
    assert out["n"] == 3 and out["s"] == "x" and out["empty"] is None and out["unset"] is None
    assert out["var"] == {"runtime_var": {"name": "loop_counter"}}
    assert out["msg"]["name"] == "w"


class Peer:
    """What a handler reads of gRPC's context: who calls."""

    def __init__(self, peer: str = "ipv4:127.0.0.1:40000"):
        self._peer = peer

    def peer(self) -> str:
        return self._peer

    async def abort(self, code, details):
        raise PermissionError(details)


def test_a_new_session_never_evicts_one_in_use_and_idle_ones_expire(monkeypatch):
    monkeypatch.setattr(mission, "MAX_SESSIONS", 2)
    now = [1000.0]
    metrics = Metrics()
    service = mission.MissionService(None, None, metrics, None, None, clock=lambda: now[0])  # type: ignore[arg-type]
    establish = remote_pb2.EstablishSessionRequest()

    async def scenario():
        first = await service.EstablishSession(establish, Peer())
        now[0] += 10
        second = await service.EstablishSession(establish, Peer())
        third = await service.EstablishSession(establish, Peer())  # both in use: refused
        assert third.header.error.code == third.header.error.CODE_INTERNAL_SERVER_ERROR
        assert "most at once" in third.header.error.message and not third.session_id
        assert set(service.sessions) == {first.session_id, second.session_id}
        now[0] += mission.SESSION_IDLE - 5  # the first idle an hour, the second not quite
        fourth = await service.EstablishSession(establish, Peer())
        assert fourth.status == fourth.STATUS_OK
        assert set(service.sessions) == {second.session_id, fourth.session_id}
        assert len(second.session_id) >= 32  # not guessable
        stop = remote_pb2.StopRequest(session_id=first.session_id)
        assert (
            await service.Stop(stop, Peer())
        ).status == remote_pb2.StopResponse.STATUS_INVALID_SESSION_ID

    asyncio.run(scenario())
    assert sample_of(metrics, "spotrelay_mission_refused_total", reason="sessions") == 1


def sample_of(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_only_allowed_addresses_may_call():
    callers = mission.Callers(["192.168.50.3", "10.1.0.0/16"])
    assert callers.allows("ipv4:192.168.50.3:51234")
    assert callers.allows("ipv6:%5B::ffff:192.168.50.3%5D:51234")  # v4-mapped, percent-encoded
    assert callers.allows("ipv4:10.1.7.9:1")
    for peer in ("ipv4:192.168.50.30:1", "ipv4:192.168.80.3:1", "unix:/tmp/x", "ipv6:[::1]:5", ""):
        assert not callers.allows(peer), peer
    assert mission.robot_addresses("127.0.0.1") == ("127.0.0.1", "::1")
    assert mission.robot_addresses("192.168.50.3") == ("192.168.50.3",)
    metrics = Metrics()
    service = mission.MissionService(None, None, metrics, None, None, callers=callers)  # type: ignore[arg-type]
    with pytest.raises(PermissionError, match="only the robot"):
        asyncio.run(service.EstablishSession(remote_pb2.EstablishSessionRequest(), Peer()))
    assert not service.sessions
    assert sample_of(metrics, "spotrelay_mission_refused_total", reason="caller") == 1


def test_a_nan_duration_and_a_label_too_long_are_refused():
    p = mission.job_params(mission.Job("record", ("a",), 5.0, ""))
    p.values["action"].one_of_value.values["record"].values["duration"].double_value.value = float(
        "nan"
    )
    error = mission.parse_params(p, ["a"])
    assert isinstance(error, sc.CustomParamError) and "duration" in error.error_messages[0]
    long = mission.job_params(mission.Job("capture", ("a",), 5.0, "g" * 3_900_000))
    error = mission.parse_params(long, ["a"])
    assert isinstance(error, sc.CustomParamError) and "at most 256" in error.error_messages[0]


def test_a_still_counts_as_waiting_until_its_thread_is_done_even_when_its_caller_left():
    """A mission's Stop cancels a capture, but its rendering goes on in the thread: counted out
    early, a Tick/Stop loop queued renderings without bound."""
    from spotrelay.stills import Busy, Stills

    release = threading.Event()
    stills = Stills("evidence", 2)

    async def scenario():
        first = asyncio.create_task(stills.run(release.wait, 10))
        await async_wait_until(lambda: stills.waiting == 1, 2, "running")
        first.cancel()  # the caller leaves; the thread still works
        with contextlib.suppress(asyncio.CancelledError):
            await first
        second = asyncio.create_task(stills.run(lambda: 1))
        await asyncio.sleep(0)
        with pytest.raises(Busy):  # the pool is full: two waiting, one of them abandoned
            await stills.run(lambda: 2)
        release.set()
        assert await second == 1
        await async_wait_until(lambda: stills.waiting == 0, 2, "every thread done")

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        stills.close()


def test_registration_refuses_an_address_the_robot_cannot_reach():
    async def scenario():
        reg = registration.Registration(*IDENTITY, 21081, "127.0.0.1", "192.0.2.7")
        reg.on_session(object())
        await async_wait_until(lambda: reg.status()["error"], 5, "the refusal")
        return reg.status()

    state = asyncio.run(scenario())
    assert not state["registered"] and "--mission-host" in state["error"]
    assert registration.unreachable_host("0.0.0.0")
    assert not registration.unreachable_host("192.0.2.7")


def test_registration_is_retried_until_the_session_ends():
    class Robot:
        calls = 0

        def ensure_client(self, name):
            Robot.calls += 1
            raise UnableToConnectToRobotError(None, "robot gone")

    async def scenario():
        reg = registration.Registration(*IDENTITY, 21081, None, "127.0.0.1")
        reg.on_session(Robot())
        await async_wait_until(lambda: Robot.calls >= 2, 5, "a retry")
        error = reg.status()["error"]
        reg.on_session(None)  # robot lost: no more tries
        await reg.close()
        return error

    assert "UnableToConnectToRobotError" in asyncio.run(scenario())


def test_a_second_relay_cannot_take_the_callbacks_port(tmp_path, caplog, capfd):
    """It says which option to change, and gRPC's own C-core error line never shows."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    argv = ["--sim", "--bind", "127.0.0.1", "--port", str(free_port()), "--mission"]
    argv += ["--mission-port", str(port), "--captures-dir", str(tmp_path)]
    cfg = config.load(argv)

    async def scenario():
        relay = Relay(cfg, Target("127.0.0.1", 9), Metrics())
        return await relay.serve(cfg.bind, cfg.port, asyncio.Event())

    try:
        with caplog.at_level(logging.ERROR, logger="spotrelay"):
            assert asyncio.run(scenario()) == 1
    finally:
        busy.close()
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"cannot listen on 127.0.0.1:{port}" in said and "--mission-port" in said, said
    assert "add_port" not in capfd.readouterr().err


def test_the_captures_api_says_how_to_turn_it_on():
    async def scenario():
        app = build_app([lambda app: captures_out.add_routes(app, store=None)])
        async with TestClient(TestServer(app)) as client:
            for path in ("/api/captures", "/api/captures.zip?run=x", "/captures/a.jpg"):
                resp = await client.get(path)
                assert resp.status == 404 and "--mission" in (await resp.json())["error"]

    asyncio.run(scenario())


@pytest.mark.parametrize("query", ["kind=video", "limit=0", "limit=x", "until=noon"])
def test_bad_listing_parameters_are_named(query, tmp_path):
    from spotrelay.autowalk.store import Store

    store = Store(tmp_path, 10**6)
    store.open()

    async def scenario():
        app = build_app([lambda app: captures_out.add_routes(app, store=store)])
        async with TestClient(TestServer(app)) as client:
            resp = await client.get("/api/captures?" + query)
            assert resp.status == 400
            assert (await resp.json())["parameter"] == query.split("=")[0]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "job",
    [
        mission.Job("capture", ("a", "b"), mission.DURATION_DEFAULT, "gauge 3"),
        mission.Job("record", ("b",), 42.5, ""),
    ],
)
def test_job_params_are_what_parse_params_reads_back(job):
    assert mission.parse_params(mission.job_params(job), ["a", "b"]) == job


def test_a_camera_fetched_uncompressed_is_kept_lossless_and_its_clips_say_so():
    """--fetch-raw: there are no robot's JPEG bytes to keep, so a still is a lossless PNG of the
    pixels the robot sent, and a clip's sidecar says its frames are the relay's JPEG."""
    cam = next(c for c in spot_cameras() if c.name == "left_fisheye_image")
    pixels = Content().data(cam, RAW, 0, 7)
    image = ImageData(pixels, RAW, GREY8, cam.rows, cam.cols)
    frame = Frame(cam.name, image, acquired=100.0, robot_time=102.5, received=100.05, seq=7)
    still = jobs._still(frame)
    assert still.suffix == ".png" and still.meta["encoding"] == "PNG"
    kept = cv2.imdecode(np.frombuffer(still.data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert kept.tobytes() == pixels
    assert jobs._clip_encoding(image.shape) == (
        "MJPEG in AVI (JPEG of the robot's uncompressed pixels, quality 80)"
    )
    jpeg = ImageData(Content().data(cam, JPEG, 75, 7), JPEG, GREY8, cam.rows, cam.cols)
    assert jobs._clip_encoding(jpeg.shape) == "MJPEG in AVI (the robot's JPEG bytes)"
