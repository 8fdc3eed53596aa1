"""Robot connection: SDK, login, directory, time sync, image clients; reconnect with backoff.

Everything the SDK does that blocks (login, directory, time sync, listing sources) runs in a daemon
thread so the HTTP server and open streams stay responsive while the robot is away, and so a
payload that is not yet authorised cannot hold up shutdown. Each (re)connection builds a fresh SDK
``Robot``: after a robot reboot its tokens, channels and time-sync thread are all stale, and a clean
object is simpler to reason about than repairing one.

The poller gets two things from here: ``get_images`` (an asyncio future over the SDK's pipelined
``get_image_async``) and ``robot_to_local`` (robot clock -> local epoch, with the time-sync skew).
It reports RPC failures back so that a lost robot is noticed by whoever talks to it most often.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import bosdyn.client
from bosdyn.api import image_pb2
from bosdyn.client.exceptions import (
    Error as SdkError,
)
from bosdyn.client.exceptions import (
    UnauthenticatedError,
)
from bosdyn.client.image import ImageClient

from spotrelay.config import Config

log = logging.getLogger("spotrelay.connection")

IMAGE_SERVICE_TYPE = "bosdyn.api.ImageService"
RPC_TIMEOUT = 10.0
# A frame older than this is of no use to anyone watching, and a short deadline notices a robot
# that vanished without closing the connection (cable pulled, Wi-Fi gone).
IMAGE_TIMEOUT = 2.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 15.0
# Consecutive failed GetImage calls (with no success between) that mean the robot is gone.
FAILURES_BEFORE_RECONNECT = 5

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What ListImageSources says about one camera, in the terms our HTTP API uses."""

    name: str
    service: str
    rows: int
    cols: int
    image_type: str  # "visual" | "depth" | "unknown"
    pixel_formats: tuple[str, ...]
    image_formats: tuple[str, ...]
    depth_scale: float

    @classmethod
    def from_proto(cls, src: image_pb2.ImageSource, service: str) -> SourceInfo:
        kind = {
            image_pb2.ImageSource.IMAGE_TYPE_VISUAL: "visual",
            image_pb2.ImageSource.IMAGE_TYPE_DEPTH: "depth",
        }.get(src.image_type, "unknown")
        return cls(
            name=src.name,
            service=service,
            rows=src.rows,
            cols=src.cols,
            image_type=kind,
            pixel_formats=tuple(
                image_pb2.Image.PixelFormat.Name(p).removeprefix("PIXEL_FORMAT_")
                for p in src.pixel_formats
            ),
            image_formats=tuple(
                image_pb2.Image.Format.Name(f).removeprefix("FORMAT_") for f in src.image_formats
            ),
            depth_scale=src.depth_scale or 1000.0,
        )


@dataclass(frozen=True, slots=True)
class Target:
    """Where the robot is and how to log in; the sim and a real robot differ only here."""

    host: str
    port: int = 443
    cert: str | None = None
    username: str | None = None
    password: str | None = None
    guid: str | None = None
    secret: str | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> Target:
        assert cfg.robot
        return cls(
            cfg.robot,
            cfg.robot_port,
            cfg.robot_cert,
            cfg.username,
            cfg.password,
            cfg.guid,
            cfg.secret,
        )


def describe_error(exc: BaseException) -> str:
    """One line for the log: the SDK's exception class says more than its long message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if isinstance(exc, SdkError) and getattr(exc, "error_message", None):
        text = str(exc.error_message).strip().splitlines()[0]
    return f"{name}: {text}" if text else name


def _in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
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
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=body, name="spotrelay-sdk", daemon=True).start()
    return fut


class _Session:
    """One logged-in SDK Robot plus the image clients made from it."""

    def __init__(self, target: Target, services: tuple[str, ...], wanted: tuple[str, ...]):
        sdk = bosdyn.client.create_standard_sdk("spotrelay")
        if target.cert:
            sdk.load_robot_cert(target.cert)
        robot = sdk.create_robot(target.host)
        robot.update_secure_channel_port(target.port)
        self.robot = robot
        try:
            if target.guid and target.secret:
                robot.authenticate_from_payload_credentials(
                    target.guid, target.secret, timeout=RPC_TIMEOUT
                )
            else:
                robot.authenticate(target.username, target.password, timeout=RPC_TIMEOUT)
            robot.time_sync.wait_for_sync(timeout_sec=RPC_TIMEOUT)
            if services == ("auto",):
                entries = robot.list_services()
                services = tuple(sorted(e.name for e in entries if e.type == IMAGE_SERVICE_TYPE))
            self.clients: dict[str, ImageClient] = {s: robot.ensure_client(s) for s in services}
            self.sources: dict[str, SourceInfo] = {}
            for service, client in self.clients.items():
                for src in client.list_image_sources(timeout=RPC_TIMEOUT):
                    if wanted and src.name not in wanted:
                        continue
                    if src.name in self.sources:
                        log.warning(
                            "source %s offered by %s and %s; using the first",
                            src.name,
                            self.sources[src.name].service,
                            service,
                        )
                        continue
                    self.sources[src.name] = SourceInfo.from_proto(src, service)
        except BaseException:
            self.close()
            raise

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


class RobotConnection:
    """Keeps a session with the robot alive and tells the rest of the relay what it offers."""

    def __init__(self, target: Target, services: Iterable[str], wanted: Iterable[str] = ()):
        self.target = target
        self.services = tuple(services)
        self.wanted = tuple(wanted)
        self.sources: dict[str, SourceInfo] = {}
        self.skew = 0.0
        self.connected = asyncio.Event()
        self.last_error: str | None = None
        self.on_change: list[Callable[[RobotConnection], None]] = []
        self._session: _Session | None = None
        self._lost = asyncio.Event()
        self._failures = 0

    @property
    def image_services(self) -> tuple[str, ...]:
        return tuple(self._session.clients) if self._session else ()

    def robot_to_local(self, robot_seconds: float) -> float:
        return robot_seconds - self.skew

    def get_images(self, service: str, requests: list[image_pb2.ImageRequest]) -> asyncio.Future:
        """Send one GetImage now and return an asyncio future of the SDK's result.

        The SDK call returns at once; the reply arrives on a gRPC thread and is handed to the loop,
        so any number of requests can be in flight (the poller decides how many).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        session = self._session
        if session is None or service not in session.clients:
            fut.set_exception(ConnectionError("not connected to the robot"))
            return fut
        sdk_future = session.clients[service].get_image_async(requests, timeout=IMAGE_TIMEOUT)

        def settle(done: Any) -> None:
            if fut.cancelled():
                return
            try:
                fut.set_result(done.result())
            except Exception as exc:
                fut.set_exception(exc)

        sdk_future.add_done_callback(lambda done: loop.call_soon_threadsafe(settle, done))
        return fut

    def report_ok(self) -> None:
        self._failures = 0

    def report_failure(self, exc: BaseException) -> None:
        """Called by the poller on RPC errors; decides when the robot counts as lost."""
        if not self.connected.is_set():
            return
        self._failures += 1
        if isinstance(exc, UnauthenticatedError) or self._failures >= FAILURES_BEFORE_RECONNECT:
            self.last_error = describe_error(exc)
            self._lost.set()

    async def run(self) -> None:
        """Connect, watch, reconnect: forever, with capped exponential backoff between tries."""
        delay = BACKOFF_FIRST
        where = f"{self.target.host}:{self.target.port}"
        while True:
            try:
                session = await _in_daemon_thread(
                    lambda: _Session(self.target, self.services, self.wanted)
                )
            except (SdkError, OSError, ValueError) as exc:
                self.last_error = describe_error(exc)
                log.error(
                    "cannot connect to robot %s: %s; retrying in %.1f s",
                    where,
                    self.last_error,
                    delay,
                )
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            self._session = session
            self.sources = session.sources
            self.skew = session.skew_seconds() or 0.0
            self._failures = 0
            self._lost.clear()
            self.last_error = None
            self.connected.set()
            delay = BACKOFF_FIRST
            log.info(
                "connected to robot %s as %s: services %s, %d sources, clock skew %+.3f s",
                where,
                "payload" if self.target.guid else "user",
                ",".join(session.clients) or "-",
                len(session.sources),
                self.skew,
            )
            self._notify()
            await self._watch(session)
            self.connected.clear()
            log.warning("lost robot %s: %s; reconnecting", where, self.last_error)
            self._session = None
            self._notify()
            await asyncio.to_thread(session.close)

    async def _watch(self, session: _Session) -> None:
        """Refresh the skew once a second; return when the poller says the robot is gone."""
        while not self._lost.is_set():
            skew = session.skew_seconds()
            if skew is not None:
                self.skew = skew
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), timeout=1.0)

    def _notify(self) -> None:
        for callback in self.on_change:
            callback(self)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            self.connected.clear()
            await asyncio.to_thread(session.close)
