"""Robot connection: keep a session with the robot, its image services and their sources.

Login, directory, time sync and listing sources block, so they run in daemon threads
(``threads.py``) and the HTTP server and open streams stay responsive while the robot is away.
A lost robot or an expired login ends the session; a new one is made with capped exponential
backoff, and refused logins are kept below the robot's lockout (``AuthLimiter``).

Image services are discovered and kept one by one. A service that is registered but faulted,
slow, or not reachable yet (a payload camera, Spot CAM) is marked failing with the reason and
retried with backoff while the others are served; in ``auto`` mode the directory is listed again
periodically, so a payload that registers late appears without a restart.

What an error means (count it, log in again, wait) is decided in ``errors.py`` only. The SDK
session, the clock and the sleep are given to the constructor, so the whole state machine runs in
tests against a fake robot in fake time.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from bosdyn.api import image_pb2

from spotrelay.frames import SourceInfo
from spotrelay.robot.errors import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    PayloadNotAuthorised,
    classify,
    describe_error,
)
from spotrelay.robot.session import IMAGE_TIMEOUT, Session, Target
from spotrelay.robot.threads import in_daemon_thread

log = logging.getLogger("spotrelay.robot")

# Consecutive failed GetImage calls (with no success between) that mean a service is gone.
FAILURES_BEFORE_RECONNECT = 5
# Spot rate-limits logins (5 a second, HTTP 429) and locks logins out for a minute after six
# failures in a row (spot-sdk docs/concepts/base_services.md, release notes 3.0.0). The relay never
# has more than this many refused logins within a window, whatever the backoff says.
AUTH_BURST, AUTH_WINDOW = 5, 60.0
CHECK_EVERY = 1.0  # seconds between looks at time sync and services due for a retry
SAY_AGAIN_AFTER = 60.0  # the same login failure is logged once a minute, not at every retry


class RobotSession(Protocol):
    """What the connection uses of a session (``session.Session``; a fake one in tests)."""

    robot: Any  # the SDK Robot, handed to whoever needs the login (the Autowalk registration)

    @property
    def user_token(self) -> str | None: ...
    def image_services(self) -> list[str]: ...
    def discover(self, service: str) -> list[SourceInfo]: ...
    def get_images(self, service: str, requests: list[image_pb2.ImageRequest]) -> Any | None: ...
    def skew_seconds(self) -> float | None: ...
    def close(self) -> None: ...


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


SourcesChanged = Callable[[dict[str, SourceInfo], dict[str, bool]], None]
SessionChanged = Callable[[Any], None]


class RobotConnection:
    """Keeps a session with the robot alive and tells the relay what it offers.

    ``on_change(sources, services)`` is called whenever the sources or the services change:
    every source known, and every image service with whether it answers now (none when the
    robot is lost).
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
        rediscover: float = 10.0,
        connect: Callable[[Target], RobotSession] = Session,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.target = target
        self.services = tuple(services)
        self.auto = self.services == ("auto",)
        self.wanted = tuple(wanted)
        self.on_change = on_change
        self.on_token = on_token  # the robot-issued user token, so that logs can mask it
        self.on_session = on_session
        self.rediscover = rediscover  # auto mode: list the directory again this often
        self.connect, self.clock, self.sleep = connect, clock, sleep
        self.limiter = AuthLimiter(clock=clock)
        self.sources: dict[str, SourceInfo] = {}
        self.state: dict[str, ServiceState] = {}
        self.skew = 0.0
        self.connected = asyncio.Event()
        self.last_error: str | None = None
        # what kind of trouble, for the open /readyz: "login" or "unreachable" (no detail there)
        self.problem: str | None = None
        self._session: RobotSession | None = None
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
        sdk_future = session.get_images(service, requests) if session else None
        if sdk_future is None:
            fut.set_exception(ConnectionError("not connected to the robot"))
            return fut

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
        now = self.clock()
        if exc is None:
            st.failures, self._last_ok = 0, now
            return
        failure = classify(exc)
        st.failures += 1
        if failure.relogin:
            self._lose(describe_error(exc), failure.problem)
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
        st.failed(error, self.clock())
        self._notify()

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, watch, reconnect: forever, with capped exponential backoff between tries."""
        delay = BACKOFF_FIRST
        said, said_at = "", -SAY_AGAIN_AFTER
        while True:
            try:
                session = await in_daemon_thread(lambda: self.connect(self.target))
            except Exception as exc:  # whatever it is, the relay must go on trying
                failure = classify(exc)
                if not failure.expected:
                    log.exception("unexpected error logging in to the robot")
                self.problem = failure.problem
                self.last_error = (
                    str(exc) if isinstance(exc, PayloadNotAuthorised) else describe_error(exc)
                )
                if failure.refused:
                    self.limiter.note()
                delay = max(delay, failure.wait)
                wait = max(delay * random.uniform(0.8, 1.2), self.limiter.wait_time())
                if self.last_error != said or self.clock() - said_at > SAY_AGAIN_AFTER:
                    said, said_at = self.last_error, self.clock()
                    log.error(
                        "cannot connect to robot %s: %s; retrying (next in %.1f s)",
                        self.target.where,
                        self.last_error,
                        wait,
                    )
                await self.sleep(wait)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay, said = BACKOFF_FIRST, ""
            await self._serve(session)

    async def _serve(self, session: RobotSession) -> None:
        token = session.user_token
        if token:
            self.on_token(token)
        self._session = session
        self.skew = session.skew_seconds() or 0.0
        self._lost.clear()
        self.last_error = self.problem = None
        self._last_ok = self.clock()
        self.state = {}
        self.connected.set()
        self.on_session(session.robot)
        try:
            await self._discover(session, initial=True)
            log.info(
                "connected to robot %s as %s: services %s, %d sources, clock skew %+.3f s",
                self.target.where,
                self.target.login,
                ",".join(self.healthy()) or "-",
                len(self.sources),
                self.skew,
            )
            next_listing = self.clock() + self.rediscover
            while not self._lost.is_set():
                skew = session.skew_seconds()
                if skew is not None:
                    self.skew = skew
                now = self.clock()
                if now >= next_listing or any(
                    not st.ok and now >= st.retry_at for st in self.state.values()
                ):
                    relist = self.auto and now >= next_listing
                    if relist:
                        next_listing = now + self.rediscover
                    await self._discover(session, initial=False, relist=relist)
                await self._pause(CHECK_EVERY)
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

    async def _pause(self, seconds: float) -> None:
        """``seconds`` of the connection's own sleep, cut short when the session is lost."""
        lost = asyncio.ensure_future(self._lost.wait())
        nap = asyncio.ensure_future(self.sleep(seconds))
        try:
            await asyncio.wait((lost, nap), return_when=asyncio.FIRST_COMPLETED)
        finally:  # nothing awaited here: a cancellation arriving now must not be swallowed
            lost.cancel()
            nap.cancel()

    async def _discover(self, session: RobotSession, *, initial: bool, relist: bool = True) -> None:
        """List the services (auto mode) and the sources of every service due for a try."""
        if self.auto and (initial or relist):
            try:
                names = await in_daemon_thread(session.image_services)
            except Exception as exc:
                failure = classify(exc)
                if failure.relogin:
                    self._lose(describe_error(exc), failure.problem)
                    return
                if not failure.expected:
                    raise
                log.warning("cannot list the robot's services: %s", describe_error(exc))
                names = list(self.state)
            for gone in set(self.state) - set(names):
                log.warning("image service %s left the robot's directory", gone)
                del self.state[gone]
                self.sources = {n: s for n, s in self.sources.items() if s.service != gone}
        else:
            names = list(self.services)
        now = self.clock()
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
                failure = classify(result)
                if failure.relogin:
                    self._lose(describe_error(result), failure.problem)
                    return
                if not failure.expected:
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
        self.on_change(dict(self.sources), {name: st.ok for name, st in self.state.items()})

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            self.connected.clear()
            await asyncio.to_thread(session.close)
