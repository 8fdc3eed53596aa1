"""Parts of the Autowalk callback in-process: parameter edge cases, what the mission passes as
inputs, bounded sessions, registration that cannot or may not happen, a second relay on a port
already taken, the captures API when the callback is off."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from aiohttp.test_utils import TestClient, TestServer
from bosdyn.api import service_customization_pb2 as sc
from bosdyn.api.mission import remote_pb2, util_pb2
from bosdyn.client.exceptions import UnableToConnectToRobotError

from spotrelay import config
from spotrelay.autowalk import registration
from spotrelay.autowalk import routes as captures_out
from spotrelay.autowalk import service as mission
from spotrelay.http.app import build_app
from spotrelay.main import Relay
from spotrelay.metrics import Metrics
from spotrelay.robot import Target
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


def test_sessions_are_bounded(monkeypatch):
    monkeypatch.setattr(mission, "MAX_SESSIONS", 2)
    service = mission.MissionService(None, None, Metrics(), None, None)  # type: ignore[arg-type]

    async def scenario():
        ids = []
        for _ in range(3):
            resp = await service.EstablishSession(remote_pb2.EstablishSessionRequest(), None)
            assert resp.header.error.code == 1 and resp.status == resp.STATUS_OK
            ids.append(resp.session_id)
        return ids

    ids = asyncio.run(scenario())
    assert list(service.sessions) == ids[1:]  # the oldest idle one went


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
