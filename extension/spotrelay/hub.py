"""Hub: the newest frame of every stream variant, encoded once and shared by all its clients.

A variant is a source plus a RenderSpec (size, quality, rotation, colour map). However many clients
watch a variant, each new frame is rendered for it once, in a worker thread, and every client then
takes the newest rendering when it is ready for one. Nothing queues per client: a client that is
still writing the previous frame simply skips to the newest, so a slow viewer costs the others
nothing and memory stays bounded by one frame per variant. If rendering falls behind the robot
for a source, only the newest waiting frame is kept.

When a source stalls (robot lost, camera stopped), streams stay open: once a second each variant
gets its last image again, marked STALE with its age, so a person sees that the picture is old and
a program sees the repeated ``X-Timestamp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import cv2
import numpy as np

from spotrelay import codec, metrics
from spotrelay.codec import RenderSpec
from spotrelay.poller import Frame

log = logging.getLogger("spotrelay.hub")

STALE_REPEAT = 1.0  # seconds between repeats of a stale frame
FRESH_ENOUGH = 0.2  # a snapshot may reuse a frame this young instead of waiting for the next


@dataclass(frozen=True, slots=True)
class Encoded:
    """One rendering of one frame, ready to write to any number of clients."""

    data: bytes
    acquired: float  # capture time, local epoch seconds (X-Timestamp); 0 for a placeholder
    seq: int  # source frame number; repeated for stale repeats
    stale: bool = False


class Variant:
    """The newest rendering of one (source, spec), and a way to wait for the next."""

    def __init__(self, source: str, spec: RenderSpec):
        self.source = source
        self.spec = spec
        self.latest: Encoded | None = None
        self.last_fresh: Encoded | None = None  # what stale repeats are drawn from
        self.version = 0
        self.published_at = 0.0  # monotonic, any publication (stale repeats too)
        self.fresh_at = time.monotonic()  # monotonic, last publication of a new frame
        self.subscribers = 0
        self._changed = asyncio.Event()

    def publish(self, enc: Encoded) -> None:
        """Make ``enc`` the newest rendering. A fresh frame that is not newer than the last one
        published is ignored, so however renders overlap, a client never sees a capture twice
        or out of order."""
        fresh = self.last_fresh
        if not enc.stale and fresh is not None and enc.acquired <= fresh.acquired:
            return
        self.latest = enc
        self.version += 1
        self.published_at = time.monotonic()
        if not enc.stale:
            self.fresh_at = self.published_at
            self.last_fresh = enc
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def changed(self) -> None:
        await self._changed.wait()

    def wake(self) -> None:
        self._changed.set()


@dataclass
class Client:
    """What /api/state shows about one viewer; metrics must not carry per-client labels."""

    id: int
    kind: str  # "mjpeg" | "ws"
    source: str
    spec: RenderSpec
    peer: str
    max_fps: float | None
    started: float = field(default_factory=time.time)
    frames_sent: int = 0
    bytes_sent: int = 0
    frames_dropped: int = 0
    rate: metrics.RateWindow = field(default_factory=metrics.RateWindow)
    variant: Variant | None = None
    writing: int = 0  # version being written, 0 when waiting for the next

    @property
    def dropped(self) -> int:
        """Skipped so far, including those skipped while a write is still blocked right now."""
        pending = 0
        if self.variant is not None and self.writing and self.max_fps is None:
            pending = max(0, self.variant.version - self.writing - 1)
        return self.frames_dropped + pending


class Hub:
    def __init__(self, executor: Executor, *, stale_after: float = 2.0):
        self.executor = executor
        self.stale_after = stale_after
        self.on_watch: Callable[[str, bool], None] = lambda source, watched: None
        self.latest: dict[str, Frame] = {}
        self.clients: dict[int, Client] = {}
        self._variants: dict[tuple[str, RenderSpec], Variant] = {}
        self._watchers: dict[str, int] = {}
        self._new_frame: dict[str, asyncio.Event] = {}
        self._rendering: set[str] = set()
        self._waiting: dict[str, Frame] = {}
        self._ids = itertools.count(1)
        self._closed = False

    # -- frames in ----------------------------------------------------------------------------

    def publish(self, frame: Frame) -> None:
        """A new frame from the poller: render it for every watched variant of its source."""
        if frame.image.format == codec.JPEG and not codec.looks_like_jpeg(frame.image.data):
            metrics.FRAMES_DROPPED.labels(source=frame.source, reason="decode_error").inc()
            return  # truncated in transit or by the camera: not worth a decode to find out
        self.latest[frame.source] = frame
        if (event := self._new_frame.pop(frame.source, None)) is not None:
            event.set()
        if variants := self._watched_variants(frame.source):
            self._publish_to(frame, variants)

    def _watched_variants(self, source: str) -> list[Variant]:
        return [v for (s, _), v in self._variants.items() if s == source and v.subscribers]

    def _publish_to(self, frame: Frame, variants: list[Variant]) -> None:
        to_render = []
        for v in variants:
            if codec.is_passthrough(frame.image, v.spec, frame.source):
                v.publish(Encoded(frame.image.data, frame.acquired, frame.seq))
            else:
                to_render.append(v)
        if not to_render:
            return
        if frame.source in self._rendering:
            if frame.source in self._waiting:  # the one it replaces will never be shown
                metrics.FRAMES_DROPPED.labels(source=frame.source, reason="encoder_busy").inc()
            self._waiting[frame.source] = frame
            return
        self._render(frame, to_render)

    def _render(self, frame: Frame, variants: list[Variant]) -> None:
        self._rendering.add(frame.source)
        specs = [v.spec for v in variants]
        fut = asyncio.get_running_loop().run_in_executor(
            self.executor, codec.render_many, frame.image, specs, frame.source, _observe
        )
        fut.add_done_callback(lambda f: self._rendered(frame, variants, f))

    def _rendered(self, frame: Frame, variants: list[Variant], fut: asyncio.Future) -> None:
        self._rendering.discard(frame.source)
        if fut.cancelled():
            return
        exc = fut.exception()
        results = {} if exc else fut.result()
        failed = exc is not None
        for v in variants:
            out = results.get(v.spec, exc)
            if isinstance(out, bytes):
                v.publish(Encoded(out, frame.acquired, frame.seq))
            else:
                failed = True
        if failed:
            metrics.FRAMES_DROPPED.labels(source=frame.source, reason="decode_error").inc()
            log.debug("cannot render %s #%d: %s", frame.source, frame.seq, exc or results)
        waiting = self._waiting.pop(frame.source, None)
        if waiting is not None:  # variants that already have it ignore it (Variant.publish)
            self._publish_to(waiting, self._watched_variants(frame.source))

    # -- clients ------------------------------------------------------------------------------

    def _watch(self, source: str, delta: int) -> None:
        before = self._watchers.get(source, 0)
        after = before + delta
        self._watchers[source] = after
        if (before == 0) != (after == 0):
            self.on_watch(source, after > 0)

    def watched(self, source: str) -> int:
        return self._watchers.get(source, 0)

    async def frames(self, source: str, spec: RenderSpec, client: Client) -> AsyncIterator[Encoded]:
        """Yield the newest rendering whenever there is a newer one, at most ``client.max_fps``.

        Renderings published while the caller was still writing the previous one are skipped and
        counted as dropped for a slow client; those skipped to honour max_fps are the client's
        choice, not a drop.
        """
        key = (source, spec)
        variant = self._variants.get(key) or self._variants.setdefault(key, Variant(source, spec))
        variant.subscribers += 1
        client.id = next(self._ids)
        client.variant = variant
        self.clients[client.id] = client
        self._watch(source, +1)
        metrics.CLIENTS.labels(source=source).inc()
        if variant.latest is None and (frame := self.latest.get(source)) is not None:
            self._publish_to(frame, [variant])  # a first picture now, not at the next capture
        min_gap = 1.0 / client.max_fps if client.max_fps else 0.0
        seen = 0
        next_at = 0.0
        try:
            while True:
                while variant.version == seen or variant.latest is None:
                    if self._closed:
                        return
                    await variant.changed()
                if self._closed:
                    return
                if min_gap:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    next_at = max(next_at + min_gap, time.monotonic())
                enc, taken = variant.latest, variant.version
                client.writing = taken
                yield enc
                client.writing = 0
                if not min_gap and variant.version > taken + 1:
                    skipped = variant.version - taken - 1
                    client.frames_dropped += skipped
                    metrics.FRAMES_DROPPED.labels(source=source, reason="slow_client").inc(skipped)
                seen = taken
        finally:
            variant.subscribers -= 1
            self.clients.pop(client.id, None)
            self._watch(source, -1)
            metrics.CLIENTS.labels(source=source).dec()
            if variant.subscribers == 0:
                self._variants.pop(key, None)

    async def snapshot(
        self, source: str, spec: RenderSpec, timeout: float = 2.0
    ) -> tuple[bytes, Frame]:
        """Render one fresh frame: reuse a very recent one, else poll now and wait for the next."""
        frame = self.latest.get(source)
        if frame is None or time.time() - frame.received > FRESH_ENOUGH:
            self._watch(source, +1)
            try:
                event = self._new_frame.setdefault(source, asyncio.Event())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout)
            finally:
                self._watch(source, -1)
            frame = self.latest.get(source)
        if frame is None:
            raise LookupError(source)
        if codec.is_passthrough(frame.image, spec, source):
            return frame.image.data, frame
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(
            self.executor, codec.render, frame.image, spec, source, _observe
        )
        return data, frame

    # -- staleness ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Once a second, repeat each stalled variant's last picture marked STALE.

        Staleness is judged per variant, on what its clients actually got: a source whose frames
        arrive but cannot be decoded is as stale to a viewer as one that stopped.
        """
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(STALE_REPEAT / 2)
            mono = time.monotonic()
            for variant in list(self._variants.values()):
                if not variant.subscribers or mono - variant.fresh_at < self.stale_after:
                    continue
                if mono - variant.published_at < STALE_REPEAT:
                    continue
                enc = variant.last_fresh
                if enc is not None and enc.acquired:
                    text = f"STALE {time.time() - enc.acquired:.0f} s"
                else:
                    text = "WAITING FOR ROBOT"
                data = await loop.run_in_executor(
                    self.executor, _stale_image, enc.data if enc else None, variant.spec, text
                )
                if variant.subscribers:
                    variant.publish(
                        Encoded(data, enc.acquired if enc else 0.0, enc.seq if enc else 0, True)
                    )

    def close(self) -> None:
        """End every stream: wake all waiting clients, who then see the hub closed."""
        self._closed = True
        for variant in list(self._variants.values()):
            variant.wake()


def _observe(stage: str, kind: str, seconds: float) -> None:
    """Codec timings into the histograms (prometheus-client is thread-safe)."""
    (metrics.DECODE_SECONDS if stage == "decode" else metrics.ENCODE_SECONDS).labels(
        kind=kind
    ).observe(seconds)


def _stale_image(jpeg: bytes | None, spec: RenderSpec, text: str) -> bytes:
    """The last picture darkened with a banner, or a grey placeholder if there never was one."""
    img = None
    if jpeg is not None:
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        w, h = spec.width or 640, spec.height or (spec.width or 640) * 3 // 4
        img = np.full((h, w, 3), 48, np.uint8)
    else:
        img = (img * 0.5).astype(np.uint8)
    h, w = img.shape[:2]
    scale = max(0.4, w / 640)
    thick = max(1, round(2 * scale))
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x, y = max(0, (w - tw) // 2), (h + th) // 2
    cv2.rectangle(img, (x - 8, y - th - 8), (x + tw + 8, y + 8), (0, 0, 160), -1)
    cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick)
    return codec.encode_jpeg(img, spec.quality or codec.DEFAULT_QUALITY)
