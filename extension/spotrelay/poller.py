"""Poller: fetch every new capture soon after it exists, with pipelined, batched GetImage calls.

Each image service gets one loop. When a source's schedule (``schedule.py``) says a request is
due, the loop sends it without waiting for earlier replies; sources of the same service due within
a few milliseconds of each other share one GetImage. Replies are handled as they arrive.

The SDK raises for a whole batch when one image in it has a bad status (``UnsetStatusError`` for
STATUS_UNKNOWN, ``CustomParamError``, a generic ``ResponseError`` for a status newer than the SDK),
but the exception carries the full response, and the response's common header says whether the
call itself worked. So every good image of a batch is used whatever its neighbours' statuses; each
bad one is counted by source and status and backs off on its own, and only a failed call counts
against the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from bosdyn.api import header_pb2, image_pb2
from bosdyn.client.exceptions import ResponseError
from bosdyn.client.image import build_image_request

from spotrelay.frames import JPEG, Frame, ImageData, SourceInfo
from spotrelay.metrics import Metrics
from spotrelay.robot.errors import classify
from spotrelay.schedule import Ask, Outcome, Schedule

log = logging.getLogger("spotrelay.poller")

BATCH_WINDOW = 0.001  # sources due within this much of each other share a GetImage (sending
# a request earlier than planned risks it reaching the robot before its capture exists)
_Status = image_pb2.ImageResponse


def status_name(status: int) -> str:
    """Bounded label for an ImageResponse status; values newer than this SDK are 'unrecognized'."""
    try:
        return _Status.Status.Name(status).removeprefix("STATUS_").lower()
    except ValueError:
        return "unrecognized"


class _Source:
    def __init__(self, info: SourceInfo, quality: int, small_quality: int | None):
        self.info = info
        self.schedule = Schedule()
        self.coarse = False  # only small views watch it (Poller.set_coarse)
        self.held_coarse = False  # the newest capture handed on came coarse
        self._ask(info.wire_format, quality, small_quality)
        self.seq = 0
        self.size: tuple[int, int] | None = None  # (cols, rows) of the newest frame
        self.series: tuple | None = None  # its metric children (Poller._series)

    def _ask(self, image_format: int | None, quality: int, small_quality: int | None) -> None:
        """The request at full quality, and the one for small views (None: the same)."""
        name = self.info.name
        self.request = build_image_request(name, quality_percent=quality, image_format=image_format)
        self.coarse_request: image_pb2.ImageRequest | None = None
        if image_format == JPEG and small_quality and small_quality < quality:
            self.coarse_request = build_image_request(
                name, quality_percent=small_quality, image_format=image_format
            )

    def next_request(self) -> tuple[image_pb2.ImageRequest, bool]:
        """What to ask the robot for now, and whether that is the coarse JPEG."""
        if self.coarse and self.coarse_request is not None:
            return self.coarse_request, True
        return self.request, False


Fetch = Callable[[str, list[image_pb2.ImageRequest]], Awaitable[image_pb2.GetImageResponse]]
Report = Callable[[str, BaseException | None], None]


class Poller:
    """Turns the robot's image services into a stream of new Frames, one callback per frame."""

    def __init__(
        self,
        fetch: Fetch,
        report: Report,
        robot_to_local: Callable[[float], float],
        metrics: Metrics,
        on_frame: Callable[[Frame], None],
        *,
        quality: int = 75,
        small_quality: int | None = None,
        idle_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ):
        self.fetch = fetch
        self.report = report
        self.robot_to_local = robot_to_local
        self.metrics = metrics
        self.on_frame = on_frame
        self.quality = quality
        self.small_quality = small_quality  # asked for sources only small views watch
        self.idle_interval = idle_interval  # refresh of unwatched sources; the hub's too
        self.clock = clock
        self.sources: dict[str, _Source] = {}
        self._services: tuple[str, ...] = ()
        self._watched: set[str] = set()
        self._coarse: set[str] = set()
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._pending: set[asyncio.Task] = set()
        self._changed = asyncio.Event()
        self._durations: dict[str, Any] = {}  # poll_duration children, per service

    # -- what to poll -------------------------------------------------------------------------

    def set_sources(self, sources: Mapping[str, SourceInfo], services: Mapping[str, bool]) -> None:
        """The sources the robot offers, and every service with whether it answers now: the
        sources of services that do not answer are not polled until they do."""
        old = self.sources
        self.sources = {}
        answering = tuple(name for name, ok in services.items() if ok)
        for name, info in sources.items():
            if info.service not in answering:
                continue
            state = old.get(name)
            if state is None or state.info != info:
                fresh = _Source(info, self.quality, self.small_quality)
                if state is not None:
                    fresh.schedule.keep_learning(state.schedule)
                    fresh.seq = state.seq
                state = fresh
            if name in self._watched and not state.schedule.watched:
                state.schedule.watch(True, self.clock())
            state.coarse = name in self._coarse
            self.sources[name] = state
        self._services = answering
        self._changed.set()
        for service in answering:
            self._wake_service(service)

    def set_watched(self, source: str, watched: bool) -> None:
        """Someone started or stopped watching: poll at capture rate, or fall back to idle."""
        (self._watched.add if watched else self._watched.discard)(source)
        state = self.sources.get(source)
        if state is None or state.schedule.watched == watched:
            return
        state.schedule.watch(watched, self.clock())
        if watched:
            self._wake_service(state.info.service)

    def set_coarse(self, source: str, coarse: bool) -> None:
        """Only small views watch ``source`` now (``Hub.on_coarse``), or not any more: its next
        request asks for ``small_quality``, or for full quality again."""
        (self._coarse.add if coarse else self._coarse.discard)(source)
        if (state := self.sources.get(source)) is not None:
            if state.held_coarse and state.coarse and not coarse:
                # the newest capture came coarse: ask for it again at full quality now, not at
                # the next capture (a period away, or a second for a camera that stalled)
                state.schedule.ask_now(self.clock())
                self._wake_service(state.info.service)
            elif coarse:  # tiles only again before it went (a viewer changed its rendering)
                state.schedule.cancel_ask_now()
            state.coarse = coarse

    def asked_quality(self, source: str) -> int | None:
        """The JPEG quality the robot is asked for now (None: not fetched as JPEG)."""
        state = self.sources.get(source)
        if state is None or state.info.wire_format != JPEG:
            return None
        return self.small_quality if state.next_request()[1] else self.quality

    def timing(self, source: str) -> dict[str, float | None]:
        """What the schedule has learned of a camera (for /api/sources). The phase is where its
        captures fall in each period of the local clock: cameras on one trigger share it, and
        then share GetImage calls, which is what a robot's owner can check here."""
        state = self.sources.get(source)
        sched = state.schedule if state else None
        asked = {"robot_quality": self.asked_quality(source)}
        if sched is None or sched.grid is None:
            return {
                "capture_hz": None,
                "capture_phase_ms": None,
                "available_after_ms": None,
                **asked,
            }
        grid, hi = sched.grid, sched.avail_hi
        return {
            "capture_hz": round(1 / grid.period, 3),
            # at the newest capture: the line's origin may be hundreds of periods back, where
            # a microsecond's error in the period is milliseconds of phase
            "capture_phase_ms": round(grid.time(grid.points[-1][0]) % grid.period * 1e3, 1),
            "available_after_ms": round(hi * 1e3, 1) if hi is not None else None,
            **asked,
        }

    def _wake_service(self, service: str) -> None:
        if service in self._wake:
            self._wake[service].set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        """One loop per answering service, started and stopped as services come and go."""
        try:
            while True:
                self._changed.clear()
                for service in self._services:
                    task = self._tasks.get(service)
                    if task is None or task.done():
                        self._wake[service] = asyncio.Event()
                        self._tasks[service] = asyncio.create_task(
                            self._service_loop(service), name=f"poll-{service}"
                        )
                for service in set(self._tasks) - set(self._services):
                    self._tasks.pop(service).cancel()
                await self._changed.wait()
        finally:
            await self.close()

    async def close(self) -> None:
        tasks = [*self._tasks.values(), *self._pending]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    # -- the loop -----------------------------------------------------------------------------

    async def _service_loop(self, service: str) -> None:
        wake = self._wake[service]
        while True:
            now = self.clock()
            batch: list[_Source] = []
            soonest = now + 1.0
            for s in self.sources.values():
                if s.info.service != service:
                    continue
                sched = s.schedule
                if sched.due <= now + BATCH_WINDOW:
                    if sched.can_send():
                        batch.append(s)
                    else:
                        sched.busy(now)
                soonest = min(soonest, sched.due)
            if batch:
                self._join(service, batch, now)
                self._send(service, batch, now)
                continue
            wake.clear()
            # a timer that sets the event, not asyncio.timeout or wait_for: this wait happens
            # once per frame, and a bare timer is a third of their cost (wait_for can also
            # swallow a cancellation that arrives as the event is set on 3.11)
            loop = asyncio.get_running_loop()
            timer = loop.call_at(loop.time() + max(0.0, soonest - self.clock()), wake.set)
            try:
                await wake.wait()
            finally:
                timer.cancel()

    def _join(self, service: str, batch: list[_Source], now: float) -> None:
        """Add to ``batch`` the cameras of the same capture due a little later
        (``Schedule.joins``): one call for a trigger's cameras, not one each."""
        captures = [t for s in batch if (t := s.schedule.aimed_capture()) is not None]
        if not captures:
            return
        for s in self.sources.values():
            if s.info.service == service and s not in batch and s.schedule.joins(now, captures):
                batch.append(s)

    def _send(self, service: str, batch: list[_Source], now: float) -> None:
        asks = [s.schedule.ask(now, self.idle_interval) for s in batch]
        requests = [s.next_request() for s in batch]
        reply = self.fetch(service, [r for r, _ in requests])  # on its way now
        coarse = [c for _, c in requests]
        task = asyncio.create_task(self._receive(service, batch, asks, coarse, now, reply))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _receive(
        self,
        service: str,
        batch: list[_Source],
        asks: list[Ask],
        coarse: list[bool],
        sent: float,
        reply: Awaitable[image_pb2.GetImageResponse],
    ) -> None:
        """What one GetImage's reply means for each source of its batch."""
        try:
            try:
                whole = await reply
            except ResponseError as exc:  # see the module docstring: the rest is in it
                whole = exc.response
                if not isinstance(whole, image_pb2.GetImageResponse) or (
                    whole.header.error.code != header_pb2.CommonError.CODE_OK
                ):
                    raise
            responses = list(whole.image_responses)
        except Exception as exc:
            kind = classify(exc).kind
            self.metrics.rpc_errors.labels(service=service, kind=kind).inc()
            self.report(service, exc)
            now = self.clock()
            for s, ask in zip(batch, asks, strict=True):
                s.schedule.failed(ask, now)
            log.debug("GetImage on %s failed: %r", service, exc)
            self._wake_service(service)
            return
        self.report(service, None)
        received = self.clock()
        duration = self._durations.get(service)
        if duration is None:
            duration = self._durations[service] = self.metrics.poll_duration.labels(service=service)
        duration.observe(received - sent)
        arrival = self._arrival(whole.header.request_received_timestamp, sent, received)
        by_name = {r.source.name: r for r in responses}
        for s, ask, small in zip(batch, asks, coarse, strict=True):
            resp = by_name.get(s.info.name)
            if resp is None or resp.status != _Status.STATUS_OK:
                self._image_failed(s, ask, resp, received)
            else:
                self._accept(s, ask, resp, arrival, received, small)
        self._wake_service(service)

    def _arrival(self, stamp, sent: float, received: float) -> float:
        """When the robot received the request, in local time. The robot's own services stamp
        it on the robot's clock; a payload's service may stamp its own clock (the SDK's
        ``populate_response_header`` does), so a stamp outside the round trip is not believed
        and the round trip's midpoint stands in."""
        if stamp.seconds:
            local = self.robot_to_local(stamp.seconds + stamp.nanos * 1e-9)
            if sent - 0.002 <= local <= received + 0.002:
                return local
        return (sent + received) / 2

    def _image_failed(
        self, s: _Source, ask: Ask, resp: image_pb2.ImageResponse | None, now: float
    ) -> None:
        name = s.info.name
        status = status_name(resp.status) if resp is not None else "missing"
        self.metrics.image_errors.labels(source=name, status=status).inc()
        self.metrics.rpc_errors.labels(service=s.info.service, kind="image_error").inc()
        self.metrics.frames_dropped.labels(source=name, reason="image_error").inc()
        s.schedule.failed(ask, now)
        refused = _Status.STATUS_UNSUPPORTED_IMAGE_FORMAT_REQUESTED
        if resp is not None and resp.status == refused and s.request.image_format:
            # The service no longer offers the format it listed: take its default instead.
            log.warning("%s refuses the format asked for; asking for its default", name)
            s._ask(None, self.quality, self.small_quality)

    def _accept(
        self,
        s: _Source,
        ask: Ask,
        resp: image_pb2.ImageResponse,
        arrival: float,
        received: float,
        coarse: bool = False,
    ) -> None:
        acq = resp.shot.acquisition_time
        robot_time = acq.seconds + acq.nanos * 1e-9
        local = self.robot_to_local(robot_time)
        name = s.info.name
        outcome = s.schedule.reply(ask, local, arrival, received)
        # the capture already handed on coarse, now at full quality: for the views that wait
        # for one (a stalled camera sends nothing newer), under the same seq
        upgrade = outcome is Outcome.REPEAT and s.held_coarse and not coarse
        if outcome is Outcome.REPEAT:
            self.metrics.frames_duplicate.labels(source=name).inc()
            if not upgrade:
                return
        if outcome is Outcome.OLD:
            self.metrics.frames_dropped.labels(source=name, reason="stale").inc()
            return
        s.held_coarse = coarse
        image = resp.shot.image
        if not upgrade:
            s.seq += 1
            if s.size is not None and s.size != (image.cols, image.rows):
                # a camera mode change (the gripper camera to 1280x720...): its rate may change
                log.info("%s is now %dx%d; learning its timing again", name, image.cols, image.rows)
                s.schedule.reset()
            s.size = (image.cols, image.rows)
            count, latency, newest = s.series or self._series(s)
            count.inc()
            latency.observe(max(0.0, received - local))
            newest.set(local)
        frame = Frame(
            source=name,
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
            coarse=coarse,
        )
        self.on_frame(frame)

    def _series(self, s: _Source) -> tuple:
        """The metric children every new frame of a source updates, looked up once: at 165
        frames a second the label lookups cost more than the updates."""
        m, name = self.metrics, s.info.name
        s.series = (
            m.frames_received.labels(source=name),
            m.frame_latency.labels(source=name, stage="received"),
            m.last_frame_ts.labels(source=name),
        )
        return s.series
