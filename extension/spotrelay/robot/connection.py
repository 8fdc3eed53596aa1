"""Robot connection: keep a session with the robot, its image services and their sources.

Login, directory and time sync block, so they run in daemon threads (``threads.py``) and the
HTTP server and open streams stay responsive while the robot is away; image services are called
on the event loop (``images.py``). A login the robot no longer accepts ends the session and a new
one is made at once; failed logins are retried with capped exponential backoff, and refused ones
are kept below the robot's lockout (``AuthLimiter``).

Image services are discovered and kept one by one. A service that is registered but faulted,
slow, or not reachable yet (a payload camera, Spot CAM) is marked failing with the reason and
retried with backoff while the others are served; in ``auto`` mode the directory is listed again
periodically, so a payload that registers late appears without a restart.

An outage (the robot restarting, a network that stops carrying anything) does not end the
session: the robot keeps honouring its tokens, and a new login plus time sync would only delay
the return. A service that stops answering is probed every quarter second for its first ten
seconds, then with backoff, and at once when its channel connects again; when no service has
answered for a few seconds, the robot is reported lost (``/readyz``,
``spotrelay_robot_connected``) until one does. So frames are back within about half a second of
the robot's return, and a robot that is down costs a TCP handshake every half second and no
login.

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
from dataclasses import dataclass, replace
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
from spotrelay.robot.session import IMAGE_TIMEOUT, RPC_TIMEOUT, Session, Target
from spotrelay.robot.threads import failed, in_daemon_thread

log = logging.getLogger("spotrelay.robot")

# A service is gone after this many failed GetImage calls in a row, over at least FAILING_FOR
# seconds without an answer (a request's own deadline): a burst of timeouts on a busy machine,
# with answers around it, is not an outage (giving the service up would cost every camera its
# learnt timing). The robot is lost when no service has answered for LOST_AFTER seconds.
FAILURES_BEFORE_RECONNECT = 5
FAILING_FOR = IMAGE_TIMEOUT
LOST_AFTER = 2 * IMAGE_TIMEOUT
# A service that answered and stopped is probed (ListImageSources) this often for the first
# PROBE_FAST seconds of its outage, then with the usual backoff (BACKOFF_FIRST doubling to
# BACKOFF_MAX): a short outage (a restart, a network hiccup) ends within a probe of its end.
PROBE_EVERY = 0.25
PROBE_FAST = 10.0
# Spot rate-limits logins (5 a second, HTTP 429) and locks logins out for a minute after six
# failures in a row (spot-sdk docs/concepts/base_services.md, release notes 3.0.0). The relay never
# has more than this many refused logins within a window, whatever the backoff says.
AUTH_BURST, AUTH_WINDOW = 5, 60.0
CHECK_EVERY = 1.0  # seconds between looks at time sync and services due for a retry
SAY_AGAIN_AFTER = 60.0  # the same login failure is logged once a minute, not at every retry


class RobotSession(Protocol):
    """What the connection uses of a session (``session.Session``; a fake one in tests)."""

    robot: Any  # the SDK Robot, handed to whoever needs the login (the Autowalk registration)
    on_ready: Callable[[str], None]  # set by the connection: a service's channel is back

    @property
    def user_token(self) -> str | None: ...
    def image_services(self) -> list[str]: ...
    async def discover(self, service: str, timeout: float) -> list[SourceInfo]: ...
    def get_images(
        self, service: str, requests: list[image_pb2.ImageRequest]
    ) -> Awaitable[image_pb2.GetImageResponse]: ...
    def skew_seconds(self) -> float | None: ...
    async def close(self) -> None: ...


@dataclass
class ServiceState:
    """One image service as /api/sources reports it."""

    name: str
    ok: bool = False
    error: str | None = None
    sources: tuple[str, ...] = ()
    failures: int = 0
    answered_at: float = 0.0  # the last GetImage it answered (or when it was found)
    delay: float = BACKOFF_FIRST
    retry_at: float = 0.0
    down_since: float | None = None  # when it stopped answering, if it ever answered

    def failed(self, error: str, now: float) -> None:
        """Not answering: when to try it next. Soon and often just after it stopped (it was
        there a moment ago), with backoff for one that never answered or is long gone."""
        if self.ok:
            self.down_since = now
        self.ok, self.error, self.failures = False, error, 0
        if self.down_since is not None and now - self.down_since < PROBE_FAST:
            self.retry_at = now + PROBE_EVERY
            return
        self.retry_at = now + self.delay * random.uniform(0.8, 1.2)
        self.delay = min(self.delay * 2, BACKOFF_MAX)

    def answered(self) -> None:
        self.ok, self.error, self.failures, self.delay = True, None, 0, BACKOFF_FIRST
        self.down_since = None


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
        raw: Iterable[str] = (),
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
        self.raw = frozenset(raw)  # sources to fetch uncompressed (SourceInfo.fetch_raw)
        self._raw_told: set[str] = set()  # --fetch-raw names the owner was told do nothing
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
        self._wake = asyncio.Event()  # a service failed, or its channel is back: look now
        self._away_since: float | None = None  # no service answers (the robot is lost)
        self._answered_at = 0.0  # the last answer of any image service

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

    def get_images(
        self, service: str, requests: list[image_pb2.ImageRequest]
    ) -> Awaitable[image_pb2.GetImageResponse]:
        """Send one GetImage now; await it for the whole GetImageResponse (its header says when
        the robot received the request, which the schedule uses), or the SDK's exception for it
        (its status-to-exception mapping applies). Any number may be in flight: the poller
        decides."""
        session = self._session
        if session is None:
            return failed(ConnectionError("not connected to the robot"))
        return session.get_images(service, requests)

    def report(self, service: str, exc: BaseException | None) -> None:
        """The poller's word on each GetImage: decides when a service, or the robot, is lost,
        and notices the first answer after an outage."""
        st = self.state.get(service)
        if st is None:  # no session (the state goes with it), or a service given up since
            return
        now = self.clock()
        if exc is None:
            st.failures, st.answered_at = 0, now
            self._answered_at = now
            if not st.ok:  # a reply that was in flight when the service was given up
                st.answered()
                self._answering()
                self._notify()
            return
        failure = classify(exc)
        st.failures += 1
        if failure.relogin:
            self._lose(describe_error(exc), failure.problem)
        elif (
            st.ok
            and st.failures >= FAILURES_BEFORE_RECONNECT
            and now - st.answered_at >= FAILING_FOR
        ):
            self._service_failed(st, describe_error(exc))

    def _lose(self, error: str, problem: str = "unreachable") -> None:
        """End the session (the robot rejects our token: log in again); ``problem`` is the kind
        /readyz shows: a robot that rejects our token is there, so that is a login problem."""
        self.last_error, self.problem = error, problem
        self._lost.set()

    def _service_failed(self, st: ServiceState, error: str) -> None:
        now = self.clock()
        st.failed(error, now)
        log.warning(
            "image service %s failing: %s; retrying in %.2f s", st.name, error, st.retry_at - now
        )
        self._away(error)
        self._notify()
        self._wake.set()

    def _away(self, error: str) -> None:
        """If no image service has answered for LOST_AFTER seconds, the robot is lost, until one
        answers again (the session is kept)."""
        if self._away_since is not None or any(s.ok for s in self.state.values()):
            return
        if self.clock() - self._answered_at < LOST_AFTER:
            return
        self._away_since = self.clock()
        self.last_error, self.problem = error, "unreachable"
        self.connected.clear()
        self.on_session(None)  # the Autowalk registration waits for the robot's return
        log.warning("lost robot %s: %s; watching for its return", self.target.where, error)

    def _answering(self) -> None:
        """A service answers: if the robot was lost, it is back."""
        if self._away_since is None:
            return
        away = self.clock() - self._away_since
        log.info("robot %s answers again after %.1f s", self.target.where, away)
        self._away_since = None
        self.last_error = self.problem = None
        self.connected.set()
        if self._session is not None:  # a robot that restarted forgot our registration
            self.on_session(self._session.robot)

    def _channel_ready(self, service: str) -> None:
        """A failing service's channel connected again: probe it now, not at its next turn."""
        st = self.state.get(service)
        log.debug("image service %s: its channel is connected", service)
        if st is not None and not st.ok:
            st.retry_at = self.clock()
            self._wake.set()

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
        session.on_ready = self._channel_ready
        self.skew = session.skew_seconds() or 0.0
        self._lost.clear()
        self.last_error = self.problem = None
        self._away_since = None
        self._answered_at = self.clock()
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
            next_skew = self.clock()
            while not self._lost.is_set():
                now = self.clock()
                if now >= next_skew:
                    next_skew = now + CHECK_EVERY
                    skew = session.skew_seconds()
                    if skew is not None:
                        self.skew = skew
                if now >= next_listing or any(
                    not st.ok and now >= st.retry_at for st in self.state.values()
                ):
                    relist = now >= next_listing
                    if relist:
                        next_listing = now + self.rediscover
                    await self._discover(session, initial=False, relist=relist and self.auto)
                    continue
                due = [st.retry_at for st in self.state.values() if not st.ok]
                await self._pause(min([next_skew, next_listing, *due]) - now)
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
            await session.close()

    async def _pause(self, seconds: float) -> None:
        """Up to ``seconds`` of the connection's own sleep, cut short when the session is lost
        or something needs a look (a service failed, a channel is back)."""
        self._wake.clear()
        if seconds <= 0:
            return
        lost = asyncio.ensure_future(self._lost.wait())
        wake = asyncio.ensure_future(self._wake.wait())
        nap = asyncio.ensure_future(self.sleep(seconds))
        try:
            await asyncio.wait((lost, wake, nap), return_when=asyncio.FIRST_COMPLETED)
        finally:  # nothing awaited here: a cancellation arriving now must not be swallowed
            lost.cancel()
            wake.cancel()
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
            *(
                # a service that answered a moment ago is probed with a short deadline, so
                # that a hung robot is probed again every few seconds, not every ten
                session.discover(st.name, IMAGE_TIMEOUT if st.down_since else RPC_TIMEOUT)
                for st in due
            ),
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
                said = st.error
                st.failed(error, self.clock())
                if st.down_since is not None:
                    self._away(error)
                if said != error:
                    log.warning(
                        "image service %s: %s; retrying in %.2f s",
                        st.name,
                        error,
                        st.retry_at - self.clock(),
                    )
                continue
            back = st.down_since is not None
            st.answered()
            st.answered_at = self._answered_at = self.clock()
            st.sources = tuple(s.name for s in result)
            if not initial:
                log.info(
                    "image service %s%s: %d sources", st.name, " back" if back else "", len(result)
                )
            self._merge(st.name, result)
            self._answering()
        if any(not isinstance(r, BaseException) for r in results):  # after all, not each
            for name in sorted(self.raw - self.sources.keys()):
                self._tell_raw(name, "no such camera among those listed so far (see --sources)")
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
            if info.name in self.raw:
                info = self._fetch_raw(info)
            self.sources[info.name] = info

    def _fetch_raw(self, info: SourceInfo) -> SourceInfo:
        """``info`` marked to be fetched RAW. Depth comes in the service's default already
        (RAW or RLE, both lossless); a camera the robot does not send as an uncompressed
        picture stays as it is, which is said once."""
        raw = replace(info, fetch_raw=True)
        if raw.wire_format == image_pb2.Image.FORMAT_RAW or info.image_type == "depth":
            return raw
        self._tell_raw(
            info.name,
            "%s lists it as type %s in %s: not a picture it sends uncompressed",
            info.service,
            info.image_type,
            ",".join(info.image_formats) or "no format",
        )
        return info

    def _tell_raw(self, name: str, why: str, *args: object) -> None:
        """A --fetch-raw name that does nothing: the owner is told once."""
        if name not in self._raw_told:
            self._raw_told.add(name)
            log.warning("--fetch-raw %s: " + why + "; fetched as is", name, *args)

    def _notify(self) -> None:
        self.on_change(dict(self.sources), {name: st.ok for name, st in self.state.items()})

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            self.connected.clear()
            await session.close()
