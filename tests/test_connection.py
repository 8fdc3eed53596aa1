"""The robot connection's state machine, in-process, against a fake robot in fake time: what it
does when a login is refused or locked out, a token expires, the robot goes away, one service
fails alone, or a payload's service registers late. (The same cases against the simulated robot
over real gRPC are in test_faults.py and test_robot.py; these run in milliseconds.)"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field

import grpc
import pytest
from bosdyn.api import image_pb2
from bosdyn.client.auth import InvalidLoginError, TemporarilyLockedOutError
from bosdyn.client.exceptions import (
    TimedOutError,
    TooManyRequestsError,
    UnableToConnectToRobotError,
    UnauthenticatedError,
)

from spotrelay.frames import SourceInfo
from spotrelay.robot.connection import (
    AUTH_BURST,
    AUTH_WINDOW,
    FAILING_FOR,
    FAILURES_BEFORE_RECONNECT,
    LOST_AFTER,
    PROBE_EVERY,
    PROBE_FAST,
    RobotConnection,
    ServiceState,
    Target,
)
from spotrelay.robot.errors import BACKOFF_MAX, PAYLOAD_WAIT, PayloadNotAuthorised, describe_error
from tests.wait import async_wait_until


def source(name: str, service: str = "image") -> SourceInfo:
    return SourceInfo(name, service, 480, 640, "visual", ("GREYSCALE_U8",), ("JPEG",))


class FakeTime:
    """A clock the connection's sleeps move forward; real time barely passes. Sleepers wake in
    the order of their wake times and the clock moves to each in turn (two tasks sleeping a
    second side by side take one second, not two). ``frozen`` holds every sleep that has not
    ended (``parked`` counts them), until unfrozen."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.frozen = False
        self.sleepers: list[float] = []  # when each sleeping task wakes

    def __call__(self) -> float:
        return self.now

    @property
    def parked(self) -> int:
        return len(self.sleepers) if self.frozen else 0

    async def sleep(self, seconds: float) -> None:
        wake = self.now + max(seconds, 0.0)
        self.sleepers.append(wake)
        try:
            while True:
                await asyncio.sleep(0.001)  # let the test and the connection's other tasks run
                if wake <= self.now:
                    return
                if not self.frozen and wake <= min(self.sleepers):  # the next to wake
                    self.now = wake
                    return
        finally:
            self.sleepers.remove(wake)


@dataclass
class FakeRobot:
    """The robot as the connection sees it through its sessions."""

    time: FakeTime
    services: dict[str, list[SourceInfo]] = field(
        default_factory=lambda: {"image": [source("front"), source("back")]}
    )
    listed: list[str] = field(default_factory=lambda: ["image"])  # in the directory
    login_error: BaseException | None = None
    failing: dict[str, BaseException] = field(default_factory=dict)  # ListImageSources raises
    revoked: set[str] = field(default_factory=set)  # tokens it no longer honours
    freeze_when_refused: bool = False  # freeze the clock when it refuses a revoked token
    logins: list[float] = field(default_factory=list)  # fake times of every login attempt
    asked: list[tuple[str, float]] = field(default_factory=list)  # ListImageSources calls
    sessions: list[FakeSession] = field(default_factory=list)

    def connect(self, target: Target) -> FakeSession:
        self.logins.append(self.time())
        if self.login_error is not None:
            raise self.login_error
        session = FakeSession(self, f"token-{len(self.logins)}")
        self.sessions.append(session)
        return session


class FakeSession:
    def __init__(self, robot: FakeRobot, token: str):
        self.fake, self.user_token, self.closed = robot, token, False
        self.robot = object()  # what on_session hands on (the SDK Robot)
        self.on_ready = lambda service: None

    def image_services(self) -> list[str]:
        return list(self.fake.listed)

    async def discover(self, service: str, timeout: float) -> list[SourceInfo]:
        self.fake.asked.append((service, self.fake.time()))
        if self.user_token in self.fake.revoked:
            self.fake.time.frozen |= self.fake.freeze_when_refused
            raise UnauthenticatedError(None, "token unknown")
        if service in self.fake.failing:
            raise self.fake.failing[service]
        return list(self.fake.services[service])

    def get_images(self, service, requests):
        raise AssertionError("the connection makes no GetImage of its own")

    def skew_seconds(self) -> float:
        return 2.5

    async def close(self) -> None:
        self.closed = True


@dataclass
class Seen:
    """What the connection told the rest of the relay."""

    changes: list[tuple[set[str], dict[str, bool]]] = field(default_factory=list)
    sessions: list[object | None] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    @property
    def sources(self) -> set[str]:
        return self.changes[-1][0] if self.changes else set()

    @property
    def services(self) -> dict[str, bool]:
        return self.changes[-1][1] if self.changes else {}


@contextlib.asynccontextmanager
async def running(robot: FakeRobot, services=("image",), **kw):
    seen = Seen()
    conn = RobotConnection(
        Target("robot.example"),
        services,
        on_change=lambda src, svc: seen.changes.append((set(src), dict(svc))),
        on_session=seen.sessions.append,
        on_token=seen.tokens.append,
        connect=robot.connect,
        clock=robot.time,
        sleep=robot.time.sleep,
        **kw,
    )
    task = asyncio.create_task(conn.run())
    try:
        yield conn, seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def scenario(fn):
    """Run ``fn(robot)`` (a coroutine function) on a fresh fake robot."""

    def test():
        asyncio.run(fn(FakeRobot(FakeTime())))

    test.__name__ = fn.__name__
    test.__doc__ = fn.__doc__
    return test


@scenario
async def test_connects_lists_sources_and_masks_the_token(robot):
    async with running(robot) as (conn, seen):
        await async_wait_until(lambda: conn.connected.is_set() and seen.sources, what="connected")
        assert seen.sources == {"front", "back"} and seen.services == {"image": True}
        assert seen.tokens == ["token-1"] and seen.sessions == [robot.sessions[0].robot]
        assert conn.skew == 2.5 and conn.robot_to_local(102.5) == 100.0
        assert conn.status()["problem"] is None


@pytest.mark.parametrize(
    "refusal",
    [InvalidLoginError(None, "wrong password"), TemporarilyLockedOutError(None, "locked out")],
)
def test_refused_logins_stay_below_the_robots_lockout(refusal):
    """A wrong password (or a lockout) is retried slowly and never more than five times a
    minute: six refusals in a row would lock the robot's logins for everyone."""

    async def body(robot: FakeRobot) -> None:
        robot.login_error = refusal
        async with running(robot) as (conn, _):
            await async_wait_until(lambda: len(robot.logins) >= 12, what="twelve attempts")
            status = conn.status()
            assert not status["connected"] and status["problem"] == "login"
            assert type(refusal).__name__ in status["last_error"]
        times = robot.logins
        for t in times:
            assert sum(1 for u in times if t <= u < t + AUTH_WINDOW) <= AUTH_BURST, times
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= BACKOFF_MAX * 0.8, gaps

    asyncio.run(body(FakeRobot(FakeTime())))


@scenario
async def test_a_payload_not_yet_authorised_is_asked_again_every_few_seconds(robot):
    robot.login_error = PayloadNotAuthorised("payload not authorised yet: authorise it ...")
    async with running(robot) as (conn, _):
        await async_wait_until(lambda: len(robot.logins) >= 4, what="four asks")
        assert conn.status()["last_error"].startswith("payload not authorised yet")
        assert conn.status()["problem"] == "login"
        robot.login_error = None  # an operator authorises it
        await async_wait_until(lambda: conn.connected.is_set(), what="connected once authorised")
    gaps = [b - a for a, b in zip(robot.logins, robot.logins[1:], strict=False)]
    assert all(PAYLOAD_WAIT * 0.8 <= g <= BACKOFF_MAX * 1.2 for g in gaps), gaps


@scenario
async def test_logins_refused_for_rate_are_retried_within_seconds(robot):
    robot.login_error = TooManyRequestsError(None, "429")
    async with running(robot) as (conn, _):
        await async_wait_until(lambda: len(robot.logins) >= 2, what="a second try")
        robot.login_error = None
        await async_wait_until(lambda: conn.connected.is_set(), what="connected")
    assert robot.logins[1] - robot.logins[0] < 2.0


@scenario
async def test_an_expired_token_means_a_new_login_at_once(robot):
    async with running(robot) as (conn, seen):
        await async_wait_until(lambda: conn.connected.is_set() and seen.sources, what="up")
        first, expired = robot.sessions[0], robot.time()
        robot.time.frozen = True  # no sleep ends from here: a login after a backoff never comes
        conn.report("image", UnauthenticatedError(None, "token expired"))  # from a GetImage
        await async_wait_until(lambda: len(robot.sessions) == 2, what="a second login at once")
        assert robot.logins[1] == expired
        robot.time.frozen = False
        await async_wait_until(lambda: conn.connected.is_set(), what="connected again")
        assert first.closed and seen.sessions == [first.robot, None, robot.sessions[1].robot]
        assert seen.tokens == ["token-1", "token-2"]


def _lose_robot(robot: FakeRobot, conn: RobotConnection) -> float:
    """Every image service stops answering (a restart, a network that carries nothing): the
    poller's GetImage calls fail. Returns when, in fake time."""
    robot.failing["image"] = UnableToConnectToRobotError(None, "no route to host")
    robot.time.now += LOST_AFTER  # nothing answered for that long
    for _ in range(FAILURES_BEFORE_RECONNECT):
        conn.report("image", UnableToConnectToRobotError(None, "no route to host"))
    return robot.time()


@scenario
async def test_a_burst_of_failures_among_answers_is_no_outage(robot):
    """A busy machine can time out a few requests in a row while others are answered: the
    service is given up only when it has answered nothing for FAILING_FOR seconds."""
    async with running(robot) as (conn, seen):
        await async_wait_until(lambda: conn.connected.is_set() and seen.sources, what="up")
        conn.report("image", None)
        for _ in range(3 * FAILURES_BEFORE_RECONNECT):
            conn.report("image", TimedOutError(None, "too slow"))
        assert seen.services == {"image": True} and conn.connected.is_set()
        robot.time.now += FAILING_FOR
        conn.report("image", TimedOutError(None, "still nothing"))
        assert seen.services == {"image": False}  # given up: probed until it answers
        assert conn.connected.is_set()  # the robot is not lost for a few seconds of silence
        await async_wait_until(lambda: seen.services == {"image": True}, what="probed back")


@scenario
async def test_a_lost_robot_keeps_its_session_and_is_probed_often_then_with_backoff(robot):
    """The robot keeps honouring its tokens through a restart: no new login (nor time sync) to
    wait for when it is back, and none to count against its limits while it is down."""
    async with running(robot) as (conn, seen):
        await async_wait_until(lambda: conn.connected.is_set() and seen.sources, what="up")
        lost = _lose_robot(robot, conn)
        assert not conn.connected.is_set() and conn.status()["problem"] == "unreachable"
        # streams keep their sources (the hub shows them STALE); the service does not answer
        assert seen.sources == {"front", "back"} and seen.services == {"image": False}
        assert seen.sessions == [robot.sessions[0].robot, None]  # the registration waits

        def probes() -> list[float]:
            return [t for service, t in robot.asked if service == "image" and t > lost]

        await async_wait_until(lambda: probes() and probes()[-1] - lost > 60, what="a minute")
        times = [lost, *probes()]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        early = [g for a, g in zip(times, gaps, strict=False) if a - lost < PROBE_FAST - 0.5]
        assert early and all(abs(g - PROBE_EVERY) < 1e-6 for g in early), gaps
        assert gaps[-1] > 4 * PROBE_EVERY and max(gaps) <= BACKOFF_MAX * 1.2, gaps
        assert len(robot.logins) == 1  # no login while it is down
        del robot.failing["image"]  # it answers again
        back, asked = robot.time(), len(robot.asked)
        await async_wait_until(lambda: conn.connected.is_set(), what="back")
        # asked again within one backoff of answering (the fake clock also moves with the
        # connection's other sleeps, so the reconnection's own steps are not timed)
        first = next(t for service, t in robot.asked[asked:] if service == "image")
        assert first - back <= BACKOFF_MAX * 1.2
        assert conn.status()["problem"] is None and seen.services == {"image": True}
        assert len(robot.logins) == 1 and robot.sessions[0].closed is False
        assert seen.sessions[-1] is robot.sessions[0].robot  # registered again


@scenario
async def test_a_channel_that_connects_again_is_probed_at_once(robot):
    """Long into an outage the probes are seconds apart; the robot's return is not left to the
    next one: its channel connecting again (gRPC's own retries) triggers a probe now."""
    async with running(robot) as (conn, seen):
        await async_wait_until(lambda: conn.connected.is_set() and seen.sources, what="up")
        lost = _lose_robot(robot, conn)
        await async_wait_until(lambda: robot.time() - lost > 120, what="two minutes down")
        robot.time.frozen = True  # from here on, no probe falls due by the clock
        await async_wait_until(
            lambda: robot.time.parked and conn.state["image"].retry_at > robot.time(),
            what="the connection waiting for its next probe",
        )
        del robot.failing["image"]
        returned = robot.time()
        robot.sessions[0].on_ready("image")
        await async_wait_until(lambda: conn.connected.is_set(), what="back")
        assert robot.time() == returned  # back without waiting for the next probe
        assert len(robot.logins) == 1
        robot.time.frozen = False


@scenario
async def test_a_robot_back_without_our_token_is_logged_in_again_at_once(robot):
    async with running(robot) as (conn, seen):
        await async_wait_until(lambda: conn.connected.is_set() and seen.sources, what="up")
        _lose_robot(robot, conn)
        robot.revoked.add(robot.sessions[0].user_token)  # it comes back, forgetting our token
        robot.freeze_when_refused = True  # no sleep ends once it says so: see below
        del robot.failing["image"]
        await async_wait_until(lambda: len(robot.sessions) == 2, what="a second login at once")
        refused = next(t for service, t in reversed(robot.asked) if service == "image")
        assert robot.logins[1] == refused  # no backoff once the robot answered
        robot.time.frozen = False
        await async_wait_until(lambda: conn.connected.is_set(), what="connected again")
        assert conn.status()["problem"] is None


@scenario
async def test_a_robot_unreachable_at_start_is_logged_in_with_backoff(robot):
    robot.login_error = UnableToConnectToRobotError(None, "no route to host")
    async with running(robot) as (conn, _):
        await async_wait_until(lambda: len(robot.logins) >= 6, what="retries")
        gaps = [b - a for a, b in itertools.pairwise(robot.logins)]
        assert gaps[0] < 1.0 and gaps[-1] > 4 * gaps[0], gaps  # soon at first, then backing off
        assert max(gaps) <= BACKOFF_MAX * 1.2, gaps
        assert conn.status()["problem"] == "unreachable"
        robot.login_error = None  # it comes up
        await async_wait_until(lambda: conn.connected.is_set(), what="up")


@scenario
async def test_one_failing_service_is_retried_alone_while_the_others_serve(robot):
    robot.services["spot-cam-image"] = [source("ptz", "spot-cam-image")]
    async with running(robot, services=("image", "spot-cam-image")) as (conn, seen):
        await async_wait_until(lambda: len(seen.sources) == 3, what="both services")
        robot.time.now += FAILING_FOR
        for _ in range(FAILURES_BEFORE_RECONNECT):
            conn.report("image", None)  # the robot answers ...
            conn.report("spot-cam-image", TimedOutError(None, "too slow"))  # ... one service not
        assert conn.connected.is_set()  # the robot is not lost for one service
        assert seen.services == {"image": True, "spot-cam-image": False}
        assert "TimedOutError" in conn.status()["services"]["spot-cam-image"]["error"]
        await async_wait_until(
            lambda: seen.services.get("spot-cam-image"), what="the service retried and back"
        )
        assert len(robot.logins) == 1


@scenario
async def test_a_service_that_cannot_be_listed_at_first_is_retried_with_backoff(robot):
    robot.services["payload-camera"] = [source("thermal", "payload-camera")]
    robot.failing["payload-camera"] = UnableToConnectToRobotError(None, "502 from the proxy")
    async with running(robot, services=("image", "payload-camera")) as (_, seen):
        await async_wait_until(lambda: seen.services.get("image"), what="image up")
        assert seen.services["payload-camera"] is False and "thermal" not in seen.sources

        def asks() -> list[float]:
            return [t for service, t in robot.asked if service == "payload-camera"]

        await async_wait_until(lambda: len(asks()) >= 6, what="six tries")
        gaps = [b - a for a, b in itertools.pairwise(asks())]
        assert gaps[-1] > gaps[0] and max(gaps) <= BACKOFF_MAX * 1.2 + 1, gaps  # backing off
        assert [s for s, _ in robot.asked].count("image") == 1  # the others are left alone
        del robot.failing["payload-camera"]
        await async_wait_until(lambda: "thermal" in seen.sources, what="the payload's camera")
        assert seen.services == {"image": True, "payload-camera": True}


@scenario
async def test_auto_finds_a_service_that_registers_late_and_forgets_one_that_left(robot):
    robot.services["payload-camera"] = [source("thermal", "payload-camera")]
    async with running(robot, services=("auto",), rediscover=10.0) as (_, seen):
        await async_wait_until(lambda: seen.sources == {"front", "back"}, what="image only")
        robot.listed.append("payload-camera")  # the payload registers
        start = robot.time()
        await async_wait_until(lambda: "thermal" in seen.sources, what="found by rediscovery")
        found = min(t for service, t in robot.asked if service == "payload-camera")
        assert found - start <= 10.0 + 1.0  # at the next listing
        robot.listed.remove("payload-camera")  # and leaves
        await async_wait_until(lambda: "thermal" not in seen.sources, what="forgotten")
        assert "payload-camera" not in seen.services


def test_cameras_named_to_fetch_raw_are_fetched_raw_where_the_robot_offers_it(caplog):
    """--fetch-raw: a picture the robot offers uncompressed is asked for RAW; one it sends only
    as JPEG stays JPEG, and its owner is told once, not at every listing; depth comes in the
    service's default (uncompressed) as before."""
    asyncio.run(_fetch_raw(FakeRobot(FakeTime()), caplog))


async def _fetch_raw(robot: FakeRobot, caplog) -> None:
    both = SourceInfo("front", "image", 480, 640, "visual", ("GREYSCALE_U8",), ("JPEG", "RAW"))
    depth = SourceInfo("depth", "image", 240, 424, "depth", ("DEPTH_U16",), ("RAW", "RLE"))
    odd = SourceInfo("thermal", "image", 240, 320, "unknown", ("GREYSCALE_U16",), ("RAW",))
    robot.services["image"] = [both, source("back"), depth, source("left"), odd]
    raw = ["front", "back", "depth", "thermal", "frontt"]
    async with running(robot, raw=raw) as (conn, seen):
        await async_wait_until(lambda: seen.sources, what="sources listed")
        assert conn.sources["front"].wire_format == image_pb2.Image.FORMAT_RAW
        assert conn.sources["back"].wire_format == image_pb2.Image.FORMAT_JPEG
        assert conn.sources["left"].wire_format == image_pb2.Image.FORMAT_JPEG  # not named
        assert conn.sources["depth"].wire_format is None
        assert conn.sources["thermal"].wire_format is None
        conn._merge("image", robot.services["image"])  # listed again: told once only
    assert sorted(r.getMessage() for r in caplog.records if "--fetch-raw" in r.getMessage()) == [
        "--fetch-raw back: image lists it as type visual in JPEG: not a picture it sends "
        "uncompressed; fetched as is",
        "--fetch-raw frontt: no such camera among those listed so far (see --sources); fetched "
        "as is",
        "--fetch-raw thermal: image lists it as type unknown in RAW: not a picture it sends "
        "uncompressed; fetched as is",
    ]


def test_a_rejected_token_is_a_login_problem_not_a_network_one():
    conn = RobotConnection(Target("robot.example"), ["image"])
    conn.state = {"image": ServiceState("image", ok=True)}
    conn.connected.set()
    conn.report("image", UnauthenticatedError(None, "token expired"))
    status = conn.status()
    assert status["problem"] == "login" and "UnauthenticatedError" in status["last_error"]


class _TlsError(grpc.RpcError):
    def details(self) -> str:
        return (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.3:443: Tls "
            "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED"
        )


def test_a_certificate_we_do_not_trust_is_reported_as_tls_not_as_a_robot_offline():
    said = describe_error(UnableToConnectToRobotError(_TlsError(), "robot may be offline"))
    assert "TLS" in said and "--robot-cert" in said and "offline" not in said
