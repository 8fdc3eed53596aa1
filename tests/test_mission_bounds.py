"""The Autowalk callback's port on a LAN it does not trust (issue 19), end to end: the real relay
(``main.Relay``, real sockets) against the simulated robot, called as the robot's mission service
does, with the SDK's RemoteClient over plaintext gRPC, and by callers that are not the robot.

* Only the robot's address drives the callback; a caller elsewhere (here 127.0.0.2, through a
  forwarder, as a host on the robot's Wi-Fi arrives through its port forward) is refused before
  anything is done, and cannot tear the robot's session down; session ids are never published.
* Whoever calls, the port is bounded: message size, sessions (a new one never evicts one in use),
  lengths and finite numbers, jobs at once, connections.
* Evidence is never lost to a burst: recordings that would need young captures deleted are
  refused at once, with the reason, and counted.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
from bosdyn.client.exceptions import (
    CustomParamError,
    InternalServerError,
    PermissionDeniedError,
    RpcError,
)
from bosdyn.mission.remote_client import RemoteClient

from spotrelay.autowalk import service as mission
from tests.forward import Forwarder
from tests.relay import Relay as RelayProcess
from tests.relay import free_port
from tests.test_mission import (
    FAILURE,
    RUNNING,
    SUCCESS,
    mission_relay,
    params,
    sidecars,
    tick_until_done,
)
from tests.wait import wait_until

pytestmark = pytest.mark.e2e
LIMIT_MB = 100


@pytest.fixture(scope="module")
def robot(module_robots):
    return module_robots()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("captures")


@pytest.fixture(scope="module")
def relay(robot, folder):
    r = mission_relay(robot, folder, "--captures-max-mb", str(LIMIT_MB))
    try:
        wait_until(lambda: r.get("/readyz")[0] == 200, 20, "the relay ready")
        wait_until(lambda: r.relay.mission.service.callers.networks, 10, "listening")
        yield r
    finally:
        r.stop()


def client_at(address: str) -> RemoteClient:
    c = RemoteClient()
    c.channel = grpc.insecure_channel(address)
    return c


@pytest.fixture
def robot_client(relay):
    """The robot's mission service: it calls from the robot's address (here 127.0.0.1)."""
    c = client_at(f"127.0.0.1:{relay.cfg.mission_port}")
    yield c
    c.channel.close()


@pytest.fixture
def stranger(relay):
    """Someone on the robot's network: same port, another address (127.0.0.2)."""
    with Forwarder(("127.0.0.1", relay.cfg.mission_port), "127.0.0.2") as fwd:
        c = client_at(fwd.address)
        yield c
        c.channel.close()


def test_only_the_robots_address_drives_the_callback(relay, robot_client, stranger, folder):
    before = set(sidecars(folder))
    session = robot_client.establish_session(lease_resources=())
    refused = relay.metric("spotrelay_mission_refused_total", reason="caller")
    for call in (
        lambda: stranger.establish_session(lease_resources=()),
        lambda: stranger.tick(session, lease_resources=(), params=params()),
        lambda: stranger.teardown_session(session),  # the robot's own session, by its id
        lambda: stranger.get_service_info(),
    ):
        with pytest.raises(PermissionDeniedError) as err:
            call()
        assert "only the robot" in str(err.value.error.details()), err.value
    assert relay.metric("spotrelay_mission_refused_total", reason="caller") == refused + 4
    resp, _ = tick_until_done(robot_client, session, params())  # the robot's session works
    assert resp.status == SUCCESS, resp.error_message
    robot_client.teardown_session(session)
    # the session id is nowhere to be read: not in the listing, not in the sidecars
    listing = relay.get("/api/captures")[2].decode()
    new = sidecars(folder, before)
    assert (
        new and session not in listing and not any(session in json.dumps(m) for m in new.values())
    )
    assert all(m["mission"]["session"] == mission.public_id(session) for m in new.values())


def test_what_a_tick_carries_is_bounded(relay, robot_client, folder):
    before = set(sidecars(folder))
    session = robot_client.establish_session(lease_resources=())
    # a message past the size limit: refused by gRPC before it is parsed
    with pytest.raises(RpcError) as err:
        robot_client.tick(session, lease_resources=(), params=params(label="x" * 3_900_000))
    assert err.value.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # under it, a label past 256 characters, a NaN duration: refused, said why
    for p, words in (
        (params(label="x" * 200_000), "at most 256"),
        (params("record", duration=float("nan")), "duration"),
    ):
        with pytest.raises(CustomParamError) as err:
            robot_client.tick(session, lease_resources=(), params=p)
        assert words in " ".join(err.value.custom_param_error.error_messages)
    resp = robot_client.tick(session, lease_resources=(), params=params(), group_name="g" * 5000)
    assert resp.status == FAILURE and "group name" in resp.error_message
    assert relay.metric("spotrelay_mission_refused_total", reason="limits") >= 1
    resp, _ = tick_until_done(robot_client, session, params(label="gauge 3"))
    assert resp.status == SUCCESS, resp.error_message
    robot_client.teardown_session(session)
    assert len(sidecars(folder, before)) == 1
    listing = json.loads(relay.get("/api/captures")[2], parse_constant=pytest.fail)
    assert listing["captures"]


def test_sessions_are_refused_past_the_bound_and_the_robots_own_keep_working(relay, robot_client):
    service = relay.relay.mission.service
    own = robot_client.establish_session(lease_resources=())
    flood = []
    with pytest.raises(InternalServerError) as err:
        for _ in range(mission.MAX_SESSIONS + 10):
            flood.append(robot_client.establish_session(lease_resources=()))
    assert "most at once" in str(err.value.response.header.error.message)
    assert len(service.sessions) == mission.MAX_SESSIONS and own in service.sessions
    resp, _ = tick_until_done(robot_client, own, params())
    assert resp.status == SUCCESS, resp.error_message
    for session in [own, *flood]:
        robot_client.teardown_session(session)
    assert not service.sessions


def test_jobs_at_once_are_bounded_with_a_clear_error(relay, robot_client):
    sessions = [
        robot_client.establish_session(lease_resources=()) for _ in range(mission.MAX_JOBS + 1)
    ]
    p = params("record", ["hand_color_image"], duration=3.0)
    try:
        for session in sessions[:-1]:
            assert robot_client.tick(session, lease_resources=(), params=p).status == RUNNING
        resp = robot_client.tick(sessions[-1], lease_resources=(), params=params())
        assert resp.status == FAILURE and "the most at once" in resp.error_message
        assert relay.metric("spotrelay_mission_refused_total", reason="busy") >= 1
    finally:
        for session in sessions:
            robot_client.teardown_session(session)
    wait_until(lambda: not relay.relay.mission.service.jobs, 10, "the recordings stopped")
    again = robot_client.establish_session(lease_resources=())  # and work starts again
    resp, _ = tick_until_done(robot_client, again, params())
    assert resp.status == SUCCESS, resp.error_message
    robot_client.teardown_session(again)


def test_a_burst_of_recordings_is_refused_instead_of_deleting_young_captures(
    relay, robot_client, folder
):
    """The folder's limit may delete only captures older than --captures-keep-days: recordings
    that would need more are refused before their first frame, each with the reason."""
    evidence = relay.relay.mission.service.evidence
    store = relay.relay.mission.store
    session = robot_client.establish_session(lease_resources=())
    resp, _ = tick_until_done(robot_client, session, params(cameras=["back_fisheye_image"]))
    assert resp.status == SUCCESS
    robot_client.teardown_session(session)
    earlier = {c.stem for c in store.captures()}
    per_second = evidence.clip_reserve("frontleft_fisheye_image", 1.0)
    free = store.max_bytes - store.bytes_on_disk
    duration = min(300.0, 0.6 * free / per_second)  # one fits, a second does not
    p = params("record", ["frontleft_fisheye_image"], duration=round(duration, 1))
    sessions = [robot_client.establish_session(lease_resources=()) for _ in range(6)]
    full = relay.metric("spotrelay_mission_refused_total", reason="captures_full")
    try:
        first = robot_client.tick(sessions[0], lease_resources=(), params=p)
        assert first.status == RUNNING
        for session in sessions[1:]:
            resp, _ = tick_until_done(robot_client, session, p, timeout=5)
            assert resp.status == FAILURE and "captures folder full" in resp.error_message
            assert "--captures-keep-days" in resp.error_message
    finally:
        for session in sessions:
            robot_client.teardown_session(session)
    assert relay.metric("spotrelay_mission_refused_total", reason="captures_full") == full + 5
    assert relay.metric("spotrelay_captures_deleted_total") == 0
    wait_until(lambda: not relay.relay.mission.service.jobs, 10, "the recording stopped")
    assert earlier <= {c.stem for c in store.captures()}  # nothing earlier was lost


def test_idle_connections_are_bounded_and_closed(robots, tmp_path):
    """1,100 connections that never speak: the relay holds at most its bound of them, for a
    few seconds, and stays reachable; then the robot's calls go through again."""
    sim = robots()
    mission_port = free_port()
    r = RelayProcess.for_sim(sim, "--mission", "--mission-port", str(mission_port),
                             "--captures-dir", str(tmp_path / "captures"))  # fmt: skip
    held: list[socket.socket] = []
    try:
        r.wait_ready()
        base = len(os.listdir(f"/proc/{r.proc.pid}/fd"))
        for i in range(1100):
            s = socket.socket()
            s.bind((f"127.0.0.{2 + i % 8}", 0))
            s.connect(("127.0.0.1", mission_port))
            held.append(s)
        fds = len(os.listdir(f"/proc/{r.proc.pid}/fd"))
        assert fds < base + mission.MAX_CONNECTIONS + 20, (base, fds)
        assert r.get("/healthz", timeout=2)[0] == 200
        started = time.monotonic()
        wait_until(lambda: len(os.listdir(f"/proc/{r.proc.pid}/fd")) <= base + 5, 15, "closed")
        print(f"1,100 silent connections: {fds - base} held, all closed after "
              f"{time.monotonic() - started:.1f} s")  # fmt: skip
        c = client_at(f"127.0.0.1:{mission_port}")
        session = c.establish_session(lease_resources=(), timeout=5)
        c.teardown_session(session)
        c.channel.close()
    finally:
        for s in held:
            s.close()
        r.stop()
    assert "Traceback" not in r.log()


def test_a_snapshot_flood_cannot_fail_a_tick(relay, robot_client):
    """Evidence renders on a pool of its own: PNG snapshots queueing to their bound (503 past
    it) leave the mission's depth stills untouched."""
    stop = threading.Event()

    def flood():
        while not stop.is_set():
            relay.get("/snapshot/back_depth?format=png")

    threads = [threading.Thread(target=flood) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        for _ in range(5):
            session = robot_client.establish_session(lease_resources=())
            p = params(cameras=["frontleft_depth", "frontright_depth", "left_depth"])
            resp, _ = tick_until_done(robot_client, session, p)
            assert resp.status == SUCCESS, resp.error_message
            robot_client.teardown_session(session)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
