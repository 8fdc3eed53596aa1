"""Robot connection: SDK, login, time sync, image services; reconnect and rediscover with backoff.

Everything the SDK does that blocks (login, directory, time sync, listing sources) runs in a daemon
thread, so the HTTP server and open streams stay responsive while the robot is away, and a robot
that never answers cannot hold up shutdown. Each (re)connection builds a fresh SDK ``Robot``:
after a robot reboot its tokens, channels and time-sync thread are all stale, and a clean object is
simpler to reason about than repairing one.

Image services are discovered and kept one by one. A service that is registered but faulted,
slow, or not reachable yet (a payload camera, Spot CAM) is marked failing with the reason and
retried with backoff while the others are served; in ``auto`` mode the directory is listed again
periodically, so a payload that registers late appears without a restart.

``classify`` is the one table of what an SDK error means for the relay: the metric it counts as,
and whether the login is gone (log in again now) or the robot may just be busy or away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import bosdyn.client
from bosdyn.api import image_pb2
from bosdyn.client.auth import InvalidLoginError, TemporarilyLockedOutError
from bosdyn.client.directory import DirectoryClient
from bosdyn.client.exceptions import (
    Error as SdkError,
)
from bosdyn.client.exceptions import (
    InvalidRequestError,
    PermissionDeniedError,
    ResponseError,
    RetryableRpcError,
    ServiceUnavailableError,
    TimedOutError,
    TooManyRequestsError,
    UnableToConnectToRobotError,
    UnauthenticatedError,
)
from bosdyn.client.image import ImageClient
from bosdyn.client.payload_registration import (
    InvalidPayloadCredentialsError,
    PayloadNotAuthorizedError,
    PayloadRegistrationClient,
)

from spotrelay.frames import SourceInfo
from spotrelay.logs import SDK_LOGGER

log = logging.getLogger("spotrelay.connection")

IMAGE_SERVICE_TYPE = "bosdyn.api.ImageService"
RPC_TIMEOUT = 10.0
# A frame older than this is of no use to anyone watching, and a short deadline notices a robot
# that vanished without closing the connection (cable pulled, Wi-Fi gone).
IMAGE_TIMEOUT = 2.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 15.0
# Consecutive failed GetImage calls (with no success between) that mean a service is gone.
FAILURES_BEFORE_RECONNECT = 5
# Spot rate-limits logins (5 a second, HTTP 429) and locks logins out for a minute after six
# failures in a row (spot-sdk docs/concepts/base_services.md, release notes 3.0.0). The relay never
# has more than this many refused logins within a window, whatever the backoff says.
AUTH_BURST, AUTH_WINDOW = 5, 60.0
PAYLOAD_WAIT = 3.0  # between asks while an operator has not yet authorised the payload

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Failure:
    """What an SDK error means here. ``kind`` is the metric label."""

    kind: str
    relogin: bool = False  # the login is gone: connect again now
    robot_wide: bool = False  # says nothing about one service: the robot or our login is at fault


# One table, most specific first: what each SDK error means for the relay.
_ERRORS: tuple[tuple[type[BaseException], Failure], ...] = (
    (UnauthenticatedError, Failure("unauthenticated", relogin=True, robot_wide=True)),
    (PermissionDeniedError, Failure("permission_denied")),
    (TooManyRequestsError, Failure("rate_limited")),
    (TimedOutError, Failure("timeout")),
    (ServiceUnavailableError, Failure("unavailable")),
    (UnableToConnectToRobotError, Failure("unavailable", robot_wide=True)),
    (RetryableRpcError, Failure("unavailable")),
    (ConnectionError, Failure("unavailable", robot_wide=True)),
    (ResponseError, Failure("other")),
)


def classify(exc: BaseException) -> Failure:
    for kind, failure in _ERRORS:
        if isinstance(exc, kind):
            return failure
    return Failure("other")


def describe_error(exc: BaseException) -> str:
    """One line for the log: the SDK's exception class says more than its long message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if isinstance(exc, SdkError) and getattr(exc, "error_message", None):
        text = str(exc.error_message).strip().splitlines()[0]
    return f"{name}: {text}" if text else name


@dataclass(frozen=True, slots=True)
class Target:
    """Where the robot is and how to log in; the sim and a real robot differ only here."""

    host: str
    port: int = 443
    cert: str | None = None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    guid: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class ServiceState:
    """One image service as /api/sources reports it."""

    name: str
    ok: bool = False
    error: str | None = None
    sources: tuple[str, ...] = ()
    failures: int = 0
    delay: float = BACKOFF_FIRST
    retry_at: float = 0.0

    def failed(self, error: str, now: float) -> None:
        self.ok, self.error, self.failures = False, error, 0
        self.retry_at = now + self.delay * random.uniform(0.8, 1.2)
        self.delay = min(self.delay * 2, BACKOFF_MAX)


# Refusals by the robot's login services (as opposed to not reaching them): each counts towards the
# robot's lockout, so they are rate-limited by AuthLimiter and retried slowly.
_LOGIN_REFUSED = (
    InvalidLoginError,
    TemporarilyLockedOutError,
    InvalidPayloadCredentialsError,
    InvalidRequestError,
)


class PayloadNotAuthorised(Exception):
    """The robot knows the payload, but nobody has authorised it in the admin console yet."""


def in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run blocking SDK work where a robot that never answers cannot hold up shutdown."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if fut.cancelled():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            result, exc = fn(), None
        except BaseException as error:
            result, exc = None, error
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=body, name="spotrelay-sdk", daemon=True).start()
    return fut


class AuthLimiter:
    """At most ``burst`` refused logins per ``window`` seconds."""

    def __init__(self, burst: int = AUTH_BURST, window: float = AUTH_WINDOW, clock=time.monotonic):
        self.burst, self.window, self.clock = burst, window, clock
        self._times: list[float] = []

    def wait_time(self) -> float:
        now = self.clock()
        self._times = [t for t in self._times if now - t < self.window]
        if len(self._times) < self.burst:
            return 0.0
        return self._times[0] + self.window - now

    def note(self) -> None:
        self._times.append(self.clock())


class _Session:
    """One logged-in SDK Robot; blocking calls, made from daemon threads."""

    def __init__(self, target: Target):
        sdk = bosdyn.client.create_standard_sdk("spotrelay")
        # The SDK's loggers hang under its object's logger, named after the client ("spotrelay")
        # and so inheriting the relay's level: at DEBUG they would write whole login requests.
        sdk.logger = logging.getLogger(SDK_LOGGER)
        if target.cert:
            sdk.load_robot_cert(target.cert)
        robot = sdk.create_robot(target.host)
        robot.update_secure_channel_port(target.port)
        self.robot = robot
        self.clients: dict[str, ImageClient] = {}
        try:
            if target.guid and target.secret:
                # Not robot.authenticate_from_payload_credentials: it blocks until an operator
                # authorises the payload; we want to say so and retry on our own schedule.
                payload = robot.ensure_client(PayloadRegistrationClient.default_service_name)
                try:
                    token = payload.get_payload_auth_token(
                        target.guid, target.secret, timeout=RPC_TIMEOUT
                    )
                except PayloadNotAuthorizedError:
                    raise PayloadNotAuthorised(
                        "payload not authorised yet: authorise it in the robot's admin console "
                        "(Payloads page)"
                    ) from None
                robot.update_user_token(token)
            else:
                robot.authenticate(target.username, target.password, timeout=RPC_TIMEOUT)
            robot.time_sync.wait_for_sync(timeout_sec=RPC_TIMEOUT)
        except BaseException:
            self.close()
            raise

    def image_services(self) -> list[str]:
        """Every image service in the directory (and teach the SDK where each one lives)."""
        directory = self.robot.ensure_client(DirectoryClient.default_service_name)
        entries = directory.list(timeout=RPC_TIMEOUT)
        self.robot.sync_with_services_list(entries)
        return sorted(e.name for e in entries if e.type == IMAGE_SERVICE_TYPE)

    def discover(self, service: str) -> list[SourceInfo]:
        client = self.clients.get(service)
        if client is None:
            if service not in self.robot.service_type_by_name:
                # ensure_client only knows the SDK's default names until the directory is read
                # (it raises UnregisteredServiceNameError for e.g. spot-cam-image otherwise).
                self.image_services()
            client = self.clients[service] = self.robot.ensure_client(service)
        return [
            SourceInfo.from_proto(src, service)
            for src in client.list_image_sources(timeout=RPC_TIMEOUT)
        ]

    def skew_seconds(self) -> float | None:
        """Robot clock minus local clock, or None before time sync is established.

        ``robot.time_sync`` restarts the SDK's time-sync thread if an RPC error ended it, which is
        what we want: a lost robot is noticed by the poller, not here.
        """
        ts = self.robot.time_sync
        if not ts.has_established_time_sync:
            return None
        skew = ts.endpoint.clock_skew
        return skew.seconds + skew.nanos * 1e-9

    def close(self) -> None:
        try:
            self.robot._shutdown()  # stops the time-sync and token threads (no public call)
            self.robot.shutdown()  # closes channels
        except Exception:
            log.debug("error closing SDK robot", exc_info=True)


SourcesChanged = Callable[[dict[str, SourceInfo], tuple[str, ...]], None]
SessionChanged = Callable[[bosdyn.client.Robot | None], None]


class RobotConnection:
    """Keeps a session with the robot alive and tells the relay what it offers.

    ``on_change(sources, healthy_services)`` is called whenever the sources or the set of
    services that answer change (and with nothing healthy when the robot is lost).
    ``on_session(robot)`` is given each new logged-in SDK Robot, and None when it is lost, so
    that other parts can use the session (the robot allows only 5 logins a second).
    """

    def __init__(
        self,
        target: Target,
        services: Iterable[str],
        wanted: Iterable[str] = (),
        *,
        on_change: SourcesChanged = lambda sources, services: None,
        on_token: Callable[[str], None] = lambda token: None,
        on_session: SessionChanged = lambda robot: None,
        limiter: AuthLimiter | None = None,
        rediscover: float = 10.0,
    ):
        self.target = target
        self.services = tuple(services)
        self.auto = self.services == ("auto",)
        self.wanted = tuple(wanted)
        self.on_change = on_change
        self.on_token = on_token  # the robot-issued user token, so that logs can mask it
        self.on_session = on_session
        self.limiter = limiter or AuthLimiter()
        self.rediscover = rediscover  # auto mode: list the directory again this often
        self.sources: dict[str, SourceInfo] = {}
        self.state: dict[str, ServiceState] = {}
        self.skew = 0.0
        self.connected = asyncio.Event()
        self.last_error: str | None = None
        # what kind of trouble, for the open /readyz: "login" or "unreachable" (no detail there)
        self.problem: str | None = None
        self._session: _Session | None = None
        self._lost = asyncio.Event()
        self._last_ok = 0.0

    # -- what the rest of the relay reads ------------------------------------------------------

    def robot_to_local(self, robot_seconds: float) -> float:
        return robot_seconds - self.skew

    def healthy(self) -> tuple[str, ...]:
        return tuple(name for name, st in self.state.items() if st.ok)

    def status(self) -> dict[str, Any]:
        """For /api/sources and /api/state: the login state and every service's."""
        return {
            "connected": self.connected.is_set(),
            "address": self.target.where,
            "image_services": list(self.healthy()),
            "services": {
                name: {"ok": st.ok, "error": st.error, "sources": len(st.sources)}
                for name, st in sorted(self.state.items())
            },
            "clock_skew": round(self.skew, 6),
            "last_error": self.last_error,
            "problem": self.problem,
        }

    def get_images(self, service: str, requests: list[image_pb2.ImageRequest]) -> asyncio.Future:
        """Send one GetImage now; an asyncio future of the whole GetImageResponse.

        The SDK call returns at once; the reply arrives on a gRPC thread and is handed to the loop,
        so any number of requests can be in flight (the poller decides how many). The whole
        response (``FutureWrapper.original_future``) rather than the SDK's list of images,
        because its header says when the robot received the request, which the schedule uses.
        Errors are the SDK's own (its status-to-exception mapping applies).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        session = self._session
        client = session.clients.get(service) if session else None
        if client is None:
            fut.set_exception(ConnectionError("not connected to the robot"))
            return fut
        sdk_future = client.get_image_async(requests, timeout=IMAGE_TIMEOUT)

        def settle(done: Any) -> None:
            if fut.cancelled():
                return
            try:
                done.result()  # raises as the SDK maps the statuses
                fut.set_result(done.original_future.result())
            except Exception as exc:
                fut.set_exception(exc)

        sdk_future.add_done_callback(lambda done: loop.call_soon_threadsafe(settle, done))
        return fut

    def report(self, service: str, exc: BaseException | None) -> None:
        """The poller's word on each GetImage: decides when a service, or the robot, is lost."""
        st = self.state.get(service)
        if st is None or not self.connected.is_set():
            return
        now = time.monotonic()
        if exc is None:
            st.failures, self._last_ok = 0, now
            return
        failure = classify(exc)
        st.failures += 1
        if failure.relogin:
            self._lose(describe_error(exc), "login")
        elif st.failures >= FAILURES_BEFORE_RECONNECT:
            if failure.robot_wide or now - self._last_ok > IMAGE_TIMEOUT * 2:
                self._lose(describe_error(exc))  # nothing answers: the robot is away
            else:
                self._service_failed(st, describe_error(exc))

    def _lose(self, error: str, problem: str = "unreachable") -> None:
        """End the session; ``problem`` is the kind /readyz shows: a robot that rejects our
        token is there, so that is a login problem, not a network one."""
        self.last_error, self.problem = error, problem
        self._lost.set()

    def _service_failed(self, st: ServiceState, error: str) -> None:
        log.warning("image service %s failing: %s; retrying in %.1f s", st.name, error, st.delay)
        st.failed(error, time.monotonic())
        self._notify()

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, watch, reconnect: forever, with capped exponential backoff between tries."""
        delay = BACKOFF_FIRST
        said, said_at = "", 0.0  # the same failure is logged once a minute, not every retry
        while True:
            try:
                session = await in_daemon_thread(lambda: _Session(self.target))
            except Exception as exc:  # whatever it is, the relay must go on trying
                if not isinstance(exc, SdkError | OSError | ValueError | PayloadNotAuthorised):
                    log.exception("unexpected error logging in to the robot")
                self.last_error = describe_error(exc)
                self.problem = "login"  # the robot answered and said no, unless it did not
                if isinstance(exc, PayloadNotAuthorised):
                    self.last_error = str(exc)
                    delay = max(delay, PAYLOAD_WAIT)
                elif isinstance(exc, TooManyRequestsError):  # 5 logins a second: try soon
                    self.limiter.note()
                    delay = max(delay, 1.0)
                elif isinstance(exc, _LOGIN_REFUSED):
                    self.limiter.note()
                    delay = max(delay, BACKOFF_MAX)
                else:
                    self.problem = "unreachable"
                wait = max(delay * random.uniform(0.8, 1.2), self.limiter.wait_time())
                if self.last_error != said or time.monotonic() - said_at > 60:
                    said, said_at = self.last_error, time.monotonic()
                    log.error(
                        "cannot connect to robot %s: %s; retrying (next in %.1f s)",
                        self.target.where,
                        self.last_error,
                        wait,
                    )
                await asyncio.sleep(wait)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay, said = BACKOFF_FIRST, ""
            await self._serve(session)

    async def _serve(self, session: _Session) -> None:
        self.on_token(session.robot.user_token)
        self._session = session
        self.skew = session.skew_seconds() or 0.0
        self._lost.clear()
        self.last_error = self.problem = None
        self._last_ok = time.monotonic()
        self.state = {}
        self.connected.set()
        self.on_session(session.robot)
        try:
            await self._discover(session, initial=True)
            log.info(
                "connected to robot %s as %s: services %s, %d sources, clock skew %+.3f s",
                self.target.where,
                "payload" if self.target.guid else "user",
                ",".join(self.healthy()) or "-",
                len(self.sources),
                self.skew,
            )
            next_listing = time.monotonic() + self.rediscover
            while not self._lost.is_set():
                skew = session.skew_seconds()
                if skew is not None:
                    self.skew = skew
                now = time.monotonic()
                if now >= next_listing or any(
                    not st.ok and now >= st.retry_at for st in self.state.values()
                ):
                    relist = self.auto and now >= next_listing
                    if relist:
                        next_listing = now + self.rediscover
                    await self._discover(session, initial=False, relist=relist)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._lost.wait()
        except Exception as exc:  # the supervisor restarts us; meanwhile say why we are down
            if not self._lost.is_set():
                self.last_error, self.problem = describe_error(exc), "unreachable"
            raise
        finally:
            self.connected.clear()
            self._session = None
            self.state = {}
            self.on_session(None)
            self._notify()
            if self._lost.is_set():
                log.warning("lost robot %s: %s; reconnecting", self.target.where, self.last_error)
            await asyncio.to_thread(session.close)

    async def _discover(self, session: _Session, *, initial: bool, relist: bool = True) -> None:
        """List the services (auto mode) and the sources of every service due for a try."""
        if self.auto and (initial or relist):
            try:
                names = await in_daemon_thread(session.image_services)
            except SdkError as exc:
                if classify(exc).relogin:
                    self._lose(describe_error(exc), "login")
                    return
                log.warning("cannot list the robot's services: %s", describe_error(exc))
                names = list(self.state)
            for gone in set(self.state) - set(names):
                log.warning("image service %s left the robot's directory", gone)
                del self.state[gone]
                self.sources = {n: s for n, s in self.sources.items() if s.service != gone}
        else:
            names = list(self.services)
        now = time.monotonic()
        due = []
        for name in names:
            st = self.state.setdefault(name, ServiceState(name))
            if not st.ok and now >= st.retry_at:
                due.append(st)
        results = await asyncio.gather(
            *(in_daemon_thread(lambda s=st.name: session.discover(s)) for st in due),
            return_exceptions=True,
        )
        for st, result in zip(due, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, SdkError) and classify(result).relogin:
                    self._lose(describe_error(result), "login")
                    return
                if not isinstance(result, SdkError | OSError | ValueError):
                    raise result
                error = describe_error(result)
                if st.error != error:
                    log.warning(
                        "image service %s: %s; retrying in %.1f s", st.name, error, st.delay
                    )
                st.failed(error, now)
                continue
            st.ok, st.error, st.failures, st.delay = True, None, 0, BACKOFF_FIRST
            st.sources = tuple(s.name for s in result)
            if not initial:
                log.info("image service %s: %d sources", st.name, len(result))
            self._merge(st.name, result)
        self._notify()

    def _merge(self, service: str, found: list[SourceInfo]) -> None:
        for info in found:
            if self.wanted and info.name not in self.wanted:
                continue
            held = self.sources.get(info.name)
            if held is not None and held.service != service and held.service in self.state:
                log.warning(
                    "source %s offered by %s and %s; using %s",
                    info.name,
                    held.service,
                    service,
                    held.service,
                )
                continue
            self.sources[info.name] = info

    def _notify(self) -> None:
        self.on_change(dict(self.sources), self.healthy())

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            self.connected.clear()
            await asyncio.to_thread(session.close)
