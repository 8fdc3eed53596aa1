"""Poller: fetch every new capture soon after it exists, with pipelined, timed GetImage calls.

Spot's cameras capture at about 15 Hz and GetImage answers with the latest capture. Asking one
request at a time (the SDK examples' pattern) loses frames to the round trip; asking as fast as
possible floods the robot with repeats. So each watched source keeps a phase-locked schedule:

* the capture period is learned from successive acquisition times, the phase from the newest one;
* a request is sent ``lead`` seconds after each predicted capture, without waiting for the reply
  to the previous one (requests overlap when the round trip is longer than a period);
* if the reply is the previous capture (asked too early), ``lead`` grows and the request is retried
  a few milliseconds later; every on-time hit shrinks ``lead`` a little, so it settles just after
  the moment captures become available, at the cost of an occasional repeat.

Sources due at nearly the same moment share one batched GetImage. The SDK raises for a whole batch
when one image in it fails, but the exception carries the full response, so good images in a bad
batch are still used. Repeats are dropped by ``acquisition_time``; late replies that are older than
a frame already held (pipelined replies can overtake each other) are dropped as stale.
Sources nobody watches are polled at a low idle rate so ``/api/sources`` stays fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from bosdyn.api import image_pb2
from bosdyn.client.exceptions import (
    Error as SdkError,
)
from bosdyn.client.exceptions import (
    RetryableRpcError,
    TimedOutError,
    UnableToConnectToRobotError,
    UnauthenticatedError,
)
from bosdyn.client.image import ImageResponseError, build_image_request

from spotrelay import metrics
from spotrelay.codec import ImageData
from spotrelay.connection import RobotConnection, SourceInfo

log = logging.getLogger("spotrelay.poller")

NOMINAL_PERIOD = 1 / 15
BATCH_WINDOW = 0.004  # sources due within this much of each other share a GetImage
MAX_INFLIGHT = 3  # per source: enough to cover a round trip of ~3 periods, never a flood
LEAD_START = 0.02
LEAD_UP = 0.004  # after asking too early
LEAD_DOWN = 0.00025  # after each on-time hit: ~1 repeat per 16 frames at equilibrium
RETRY_FIRST = 0.003


@dataclass(frozen=True, slots=True)
class Frame:
    """One capture as the robot sent it, with its capture time in local terms."""

    source: str
    service: str
    image: ImageData
    acquired: float  # capture time, local epoch seconds (robot clock converted with time sync)
    robot_time: float  # capture time, robot clock, epoch seconds
    received: float  # local epoch seconds when the reply arrived
    seq: int  # per source, +1 for every new frame


class _Source:
    """Schedule and dedup state of one source. Times are local epoch seconds."""

    def __init__(self, info: SourceInfo, quality: int):
        self.info = info
        fmt = (
            image_pb2.Image.FORMAT_JPEG
            if info.image_type == "visual" and "JPEG" in info.image_formats
            else None
        )
        self.request = build_image_request(info.name, quality_percent=quality, image_format=fmt)
        self.watched = False
        self.period = NOMINAL_PERIOD
        self.lead = LEAD_START
        self.anchor: float | None = None  # local capture time of the newest frame
        self.last_robot_time: float | None = None
        self.next_due = 0.0
        self.inflight = 0
        self.misses = 0
        self.errors = 0
        self.seq = 0
        self.rate = metrics.RateWindow()

    def plan(self, now: float, idle_fps: float) -> float | None:
        """Decide what the request being sent now aims at, and when the next one is due."""
        if not self.watched:
            self.next_due = now + (1 / idle_fps if idle_fps > 0 else 3600.0)
            return None
        if self.anchor is None:
            self.next_due = now + self.period
            return None
        k = math.floor((now - self.anchor - self.lead) / self.period)
        aimed = self.anchor + max(k, 0) * self.period
        self.next_due = aimed + self.period + self.lead
        return aimed

    def retry_soon(self, now: float) -> None:
        self.misses += 1
        if self.misses <= 4:
            self.next_due = min(self.next_due, now + RETRY_FIRST * 2 ** (self.misses - 1))

    def back_off(self, now: float) -> None:
        self.errors += 1
        self.next_due = now + min(2.0, self.period * 2 ** min(self.errors, 5))


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, UnauthenticatedError):
        return "unauthenticated"
    if isinstance(exc, TimedOutError):
        return "timeout"
    if isinstance(exc, (UnableToConnectToRobotError, RetryableRpcError, ConnectionError)):
        return "unavailable"
    return "other"


class Poller:
    """Turns the robot's image services into a stream of new Frames, one callback per frame."""

    def __init__(
        self,
        conn: RobotConnection,
        on_frame: Callable[[Frame], None],
        *,
        quality: int = 75,
        idle_fps: float = 1.0,
    ):
        self.conn = conn
        self.on_frame = on_frame
        self.quality = quality
        self.idle_fps = idle_fps
        self.sources: dict[str, _Source] = {}
        self._watched: set[str] = set()
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._pending: set[asyncio.Task] = set()
        conn.on_change.append(self._on_connection_change)

    # -- demand -----------------------------------------------------------------------------

    def set_watched(self, source: str, watched: bool) -> None:
        """Someone started or stopped watching: poll at capture rate, or fall back to idle."""
        (self._watched.add if watched else self._watched.discard)(source)
        state = self.sources.get(source)
        if state is None or state.watched == watched:
            return
        state.watched = watched
        if watched:
            state.next_due = time.time()
            self._wake_service(state.info.service)

    def fps(self, source: str) -> float:
        state = self.sources.get(source)
        return state.rate.rate(time.time()) if state else 0.0

    # -- lifecycle --------------------------------------------------------------------------

    def _on_connection_change(self, conn: RobotConnection) -> None:
        if not conn.connected.is_set():
            return
        old = self.sources
        self.sources = {}
        for name, info in conn.sources.items():
            state = _Source(info, self.quality)
            state.watched = name in self._watched
            if name in old:  # keep what we learned about the camera across a reconnect
                state.period, state.lead, state.seq = (
                    old[name].period,
                    old[name].lead,
                    old[name].seq,
                )
                state.rate = old[name].rate
            self.sources[name] = state
        metrics.register_sources((s.name, s.service, s.image_type) for s in conn.sources.values())
        metrics.register_services(conn.image_services)
        for service in conn.image_services:
            if service not in self._tasks or self._tasks[service].done():
                self._wake[service] = asyncio.Event()
                self._tasks[service] = asyncio.create_task(
                    self._service_loop(service), name=f"poll-{service}"
                )
            self._wake_service(service)

    def _wake_service(self, service: str) -> None:
        if service in self._wake:
            self._wake[service].set()

    async def close(self) -> None:
        for task in [*self._tasks.values(), *self._pending]:
            task.cancel()
        await asyncio.gather(*self._tasks.values(), *self._pending, return_exceptions=True)

    # -- the loop ---------------------------------------------------------------------------

    async def _service_loop(self, service: str) -> None:
        wake = self._wake[service]
        while True:
            if not self.conn.connected.is_set():
                await self.conn.connected.wait()
            now = time.time()
            states = [s for s in self.sources.values() if s.info.service == service]
            batch: list[_Source] = []
            soonest = now + 1.0
            for s in states:
                if s.next_due <= now + BATCH_WINDOW:
                    if s.inflight < MAX_INFLIGHT:
                        batch.append(s)
                    else:  # the robot is slower than our schedule: wait for a reply first
                        s.next_due = now + s.period / 2
                soonest = min(soonest, s.next_due)
            if batch:
                self._send(service, batch, now)
                continue
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=max(0.0, soonest - time.time()))

    def _send(self, service: str, batch: list[_Source], now: float) -> None:
        aims = []
        for s in batch:
            s.inflight += 1
            aims.append(s.plan(now, self.idle_fps))
        try:
            fut = self.conn.get_images(service, [s.request for s in batch])
        except SdkError as exc:  # raised synchronously, e.g. a closed channel
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(exc)
        task = asyncio.create_task(self._receive(service, batch, aims, now, fut))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _receive(
        self,
        service: str,
        batch: list[_Source],
        aims: list[float | None],
        sent: float,
        fut: asyncio.Future,
    ) -> None:
        try:
            responses = await fut
        except ImageResponseError as exc:  # one bad image fails the batch; the rest is in it
            responses = list(exc.response.image_responses) if exc.response else []
            self.conn.report_ok()
        except Exception as exc:
            kind = _error_kind(exc)
            metrics.RPC_ERRORS.labels(service=service, kind=kind).inc()
            self.conn.report_failure(exc)
            now = time.time()
            for s in batch:
                s.inflight -= 1
                s.back_off(now)
            log.debug("GetImage on %s failed: %r", service, exc)
            self._wake_service(service)
            return
        else:
            self.conn.report_ok()
        received = time.time()
        metrics.POLL_DURATION.labels(service=service).observe(received - sent)
        by_name = {r.source.name: r for r in responses}
        for s, aimed in zip(batch, aims, strict=True):
            s.inflight -= 1
            resp = by_name.get(s.info.name)
            if resp is None or resp.status != image_pb2.ImageResponse.STATUS_OK:
                metrics.RPC_ERRORS.labels(service=service, kind="image_error").inc()
                metrics.FRAMES_DROPPED.labels(source=s.info.name, reason="image_error").inc()
                s.back_off(received)
                continue
            s.errors = 0
            self._accept(s, resp, aimed, received)
        self._wake_service(service)

    def _accept(
        self, s: _Source, resp: image_pb2.ImageResponse, aimed: float | None, received: float
    ) -> None:
        acq = resp.shot.acquisition_time
        robot_time = acq.seconds + acq.nanos * 1e-9
        local = self.conn.robot_to_local(robot_time)
        name = s.info.name
        if s.last_robot_time is not None and robot_time <= s.last_robot_time:
            if robot_time == s.last_robot_time:
                metrics.FRAMES_DUPLICATE.labels(source=name).inc()
                if aimed is not None and local < aimed - s.period / 2:  # asked too early
                    s.lead = min(s.lead + LEAD_UP, 2 * s.period)
                    s.retry_soon(received)
            else:
                metrics.FRAMES_DROPPED.labels(source=name, reason="stale").inc()
            return
        if s.last_robot_time is not None:
            delta = robot_time - s.last_robot_time
            if 0.5 * s.period < delta < 1.5 * s.period:
                s.period += 0.1 * (delta - s.period)
        if aimed is not None and local >= aimed - s.period / 2:
            s.lead = max(s.lead - LEAD_DOWN, -s.period)
        s.last_robot_time = robot_time
        s.anchor = local
        s.misses = 0
        s.seq += 1
        s.rate.mark(received)
        image = resp.shot.image
        frame = Frame(
            source=name,
            service=s.info.service,
            image=ImageData(
                data=image.data,
                format=image.format,
                pixel_format=image.pixel_format,
                rows=image.rows,
                cols=image.cols,
                depth_scale=s.info.depth_scale,
            ),
            acquired=local,
            robot_time=robot_time,
            received=received,
            seq=s.seq,
        )
        metrics.FRAMES_RECEIVED.labels(source=name).inc()
        metrics.FRAME_LATENCY.labels(source=name, stage="received").observe(
            max(0.0, received - local)
        )
        metrics.LAST_FRAME_TS.labels(source=name).set(local)
        metrics.SOURCE_FPS.labels(source=name).set(s.rate.rate(received))
        self.on_frame(frame)
