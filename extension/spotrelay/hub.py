"""Hub: the newest frame of every stream variant, rendered once and shared by all its clients.

A variant is a source plus a ``Plan`` (see ``plan.py``): requests that render to the same bytes
share one. However many clients watch a variant, each new frame is rendered for it once (on the
event loop when that is cheaper, see ``inline.py``, else in a codec thread), and every client
then takes the newest rendering when it is ready for one. Nothing queues per client: a client
that is still writing the previous frame simply skips to the newest, so a slow viewer costs the
others nothing and memory stays bounded by one frame per variant. If rendering falls behind the
robot for a source, only the newest waiting frame is kept.

When a source stalls (robot lost, camera stopped), streams stay open: once a second each variant
gets its last image again, marked STALE with its age, so a person sees that the picture is old and
a program sees the repeated ``X-Timestamp``. When a camera changes resolution, its variants are
retired and their clients move to variants planned for the new shape.

The hub also keeps the client records behind ``/api/state``, and tells whoever polls the robot
which sources somebody is watching (``on_watch``) and which ones only small views watch
(``on_coarse``: every rendering watched is ``Plan.small``, like the viewer page's tiles, and
nobody waits for a full-quality frame). The robot's JPEG of those may be coarser
(``--small-robot-quality``): 0.62-0.74x the decode and 0.55x the bytes (the simulated robot's
fisheye and hand camera), for renderings that cannot show the difference. A frame fetched so
(``Frame.coarse``) is given to small renderings only; the others, and snapshots and Autowalk,
wait for the next full-quality one, which the poller asks for as soon as they arrive. The hub
only fans out: what a picture looks like is ``codec``'s business, one-off renderings
(snapshots) are the outputs' own, and what it shows the API is read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from spotrelay import codec
from spotrelay.frames import JPEG, Frame, RenderSpec, Shape, SourceInfo
from spotrelay.inline import InlineBudget, Place
from spotrelay.metrics import Metrics, RateWindow
from spotrelay.plan import DEFAULT_QUALITY, Plan, plan
from spotrelay.process import call_soon_from_thread

log = logging.getLogger("spotrelay.hub")

STALE_REPEAT = 1.0  # seconds between repeats of a stale frame


class TooManyVariants(Exception):
    """A new rendering of a camera would pass ``max_variants``; ``existing`` are those served."""

    def __init__(self, source: str, existing: list[Plan]):
        super().__init__(source)
        self.existing = existing


@dataclass(frozen=True, slots=True)
class Encoded:
    """One rendering of one frame, ready to write to any number of clients."""

    data: bytes
    acquired: float  # capture time, local epoch seconds (X-Timestamp); 0 for a placeholder
    seq: int  # source frame number; repeated for stale repeats
    stale: bool = False
    # what an output makes of this rendering (an MJPEG part...), made once for all its clients
    memo: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)

    def framed(self, output: str, frame: Callable[[Encoded], bytes]) -> bytes:
        """``frame(self)``, computed by the first client of an output and shared by the rest."""
        made = self.memo.get(output)
        if made is None:
            made = self.memo[output] = frame(self)
        return made


class Variant:
    """The newest rendering of one (source, plan), and a way to wait for the next."""

    def __init__(self, plan: Plan, now: float):
        self.plan = plan
        self.latest: Encoded | None = None
        self.last_fresh: Encoded | None = None  # what stale repeats are drawn from
        self.version = 0
        self.published_at = 0.0  # hub clock, any publication (stale repeats too)
        self.fresh_at = now  # hub clock, last publication of a new frame
        self.subscribers = 0
        self.retired = False  # the camera's shape changed: clients must re-plan
        self._waiters: list[asyncio.Future[None]] = []

    def publish(self, enc: Encoded, now: float) -> None:
        """Make ``enc`` the newest rendering. A fresh frame that is not newer than the last one
        published is ignored, so however renders overlap, a client never sees a capture twice
        or out of order."""
        if not enc.stale and self.holds(enc.acquired):
            return
        self.latest = enc
        self.version += 1
        self.published_at = now
        if not enc.stale:
            self.fresh_at = now
            self.last_fresh = enc
        self.wake()

    def holds(self, acquired: float) -> bool:
        """A capture from ``acquired`` or earlier would be no news to this variant's clients."""
        return self.last_fresh is not None and acquired <= self.last_fresh.acquired

    async def changed(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter.cancelled():  # a client that left before the next frame
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def wake(self) -> None:
        """Wake every waiting client, starting one place further on each time.

        The clients of a variant are written one after another in the event loop (on loopback,
        ~70 us each, mostly the kernel's send), so with fifty viewers the last one gets a frame
        a few milliseconds after the first. Waiters queue in the order they last ran; starting
        the next round one place on moves every client one place earlier each frame, so each
        takes its turn at the front and none is always served last.
        """
        waiters, self._waiters = self._waiters, []
        turn = 1 if len(waiters) > 1 else 0
        for waiter in itertools.chain(waiters[turn:], waiters[:turn]):
            if not waiter.done():
                waiter.set_result(None)


@dataclass
class Client:
    """What /api/state shows about one viewer; metrics must not carry per-client labels.

    Only the hub writes these fields: outputs report what they wrote through ``Hub.sent``.
    """

    kind: str  # "mjpeg" | "ws" | whatever output registers
    source: str
    spec: RenderSpec
    peer: str
    max_fps: float | None
    id: int = 0
    started: float = field(default_factory=time.time)
    frames_sent: int = 0
    bytes_sent: int = 0
    frames_dropped: int = 0
    rate: RateWindow = field(default_factory=RateWindow)
    variant: Variant | None = None
    writing: int = 0  # version being written, 0 when waiting for the next
    # given how long the newest rendering has waited (s), how long to wait for a newer one
    hold: Callable[[float], float] | None = None
    # adaptive viewers (adapt=1): every rendering it may be moved to (``spec`` is one of them)
    ladder: tuple[RenderSpec, ...] = ()
    step: int = 0  # where ``spec`` is on the ladder; 0: what the viewer asked for
    link_rate: float | None = None  # bytes/s its link delivered while carrying frames

    @property
    def dropped(self) -> int:
        """Skipped so far, including those skipped while a write is still blocked right now."""
        pending = 0
        if self.variant is not None and self.writing and self.max_fps is None:
            pending = max(0, self.variant.version - self.writing - 1)
        return self.frames_dropped + pending


class Hub:
    def __init__(
        self,
        executor: Executor,
        metrics: Metrics,
        *,
        stale_after: float = 2.0,
        idle_interval: float = 1.0,
        on_watch: Callable[[str, bool], None] = lambda source, watched: None,
        on_coarse: Callable[[str, bool], None] = lambda source, coarse: None,
        clock: Callable[[], float] = time.monotonic,
        max_variants: int = 16,
        inline: InlineBudget | None = None,
    ):
        self.executor = executor
        self.inline = inline  # None: every render in a codec thread
        self._turn_marked = False  # a call to _turn_over is scheduled
        self.max_variants = max_variants
        self.metrics = metrics
        self.stale_after = stale_after
        self.idle_interval = idle_interval  # how often sources nobody watches are refreshed
        self.on_watch = on_watch
        self.on_coarse = on_coarse
        self.clock = clock
        self._sources: dict[str, SourceInfo] = {}
        self._latest: dict[str, Frame] = {}
        self._latest_fine: dict[str, Frame] = {}  # the newest at --robot-quality
        self._fine_at: dict[str, float] = {}  # hub clock, when it arrived
        self._fine_waiters: dict[str, int] = {}  # next_frame calls waiting, per source
        self._coarse: set[str] = set()  # sources on_coarse was last told only small views watch
        self._clients: dict[int, Client] = {}
        self._received_at: dict[str, float] = {}  # hub clock, newest frame per source
        self._rates: dict[str, RateWindow] = {}
        self._fps_gauges: dict[str, Any] = {}  # spotrelay_source_fps children, per source
        self._variants: dict[tuple[str, Plan], Variant] = {}
        self._watchers: dict[str, int] = {}
        self._new_frame: dict[str, asyncio.Event] = {}
        self._rendering: set[str] = set()
        self._waiting: dict[str, Frame] = {}
        self._ids = itertools.count(1)
        self._per_source: dict[str, tuple] = {}
        self._closed = False

    # -- sources ------------------------------------------------------------------------------

    def set_sources(self, sources: Iterable[SourceInfo]) -> None:
        """What the robot offers now; frames already held are kept across a reconnect."""
        self._sources = {s.name: s for s in sources}

    @property
    def sources(self) -> Mapping[str, SourceInfo]:
        """The sources the robot offers now (read-only)."""
        return MappingProxyType(self._sources)

    def frame(self, source: str, *, fine: bool = False) -> Frame | None:
        """The newest frame of ``source``, None before the first; ``fine``: the newest the robot
        sent at full quality (not ``Frame.coarse``)."""
        return (self._latest_fine if fine else self._latest).get(source)

    def viewers(self) -> list[Client]:
        """Every connected stream client (records the hub keeps; read them, do not change them)."""
        return list(self._clients.values())

    def shape(self, source: str) -> Shape:
        """The shape this source's frames have now (or are expected to have before the first)."""
        frame = self._latest.get(source)
        return frame.image.shape if frame is not None else self._sources[source].shape

    def plan(self, source: str, spec: RenderSpec) -> Plan:
        """Plan ``spec`` for the shape this source's frames have now."""
        return plan(source, self.shape(source), spec)

    def fps(self, source: str) -> float:
        rate = self._rates.get(source)
        return rate.rate(self.clock()) if rate else 0.0

    def age(self, source: str) -> float | None:
        """Seconds since the newest frame of this source arrived; None before the first."""
        at = self._received_at.get(source)
        return None if at is None else self.clock() - at

    def is_stale(self, source: str) -> bool:
        """A source's newest frame is older than the staleness rule allows (``_stale``)."""
        at = self._received_at.get(source)
        return at is None or self._stale(at, bool(self.watched(source)))

    def _stale(self, fresh_at: float, watched: bool) -> bool:
        """The one definition of stale: no new frame for ``stale_after`` seconds, or for three
        refresh intervals when nobody watches (then it is only polled every idle interval).
        Judged per source for the API and snapshots, and per variant for streams (on what its
        clients actually got: frames that arrive but cannot be rendered are as stale to them)."""
        horizon = self.stale_after
        if not watched:
            horizon = max(horizon, 3 * self.idle_interval)
        return self.clock() - fresh_at >= horizon

    # -- frames in ----------------------------------------------------------------------------

    def publish(self, frame: Frame) -> None:
        """A new frame from the poller: render it for every watched variant of its source."""
        if frame.image.format == JPEG and not codec.looks_like_jpeg(frame.image.data):
            self.metrics.frames_dropped.labels(source=frame.source, reason="decode_error").inc()
            return  # truncated in transit or by the camera: not worth a decode to find out
        previous = self._latest.get(frame.source)
        self._latest[frame.source] = frame
        now = self.clock()
        # a capture held coarse, again at full quality (the poller's upgrade, same seq): for the
        # views that wait for full quality, but not a new frame, so the camera stays as stale
        # (and its rate as low) as it was
        upgrade = (
            previous is not None
            and previous.coarse
            and not frame.coarse
            and (frame.seq, frame.acquired) == (previous.seq, previous.acquired)
        )
        if not upgrade:
            self._received_at[frame.source] = now
        if not frame.coarse:
            self._latest_fine[frame.source] = frame
            self._fine_at[frame.source] = now
        rate = self._rates.get(frame.source)
        if rate is None:
            rate = self._rates[frame.source] = RateWindow()
            self._fps_gauges[frame.source] = self.metrics.source_fps.labels(source=frame.source)
        if not upgrade:
            rate.mark(now)
        self._fps_gauges[frame.source].set(rate.rate(now))
        if previous is not None and previous.image.shape != frame.image.shape:
            self._retire(frame.source)
        if (event := self._new_frame.pop(frame.source, None)) is not None:
            event.set()
        if variants := self._watched_variants(frame.source):
            self._publish_to(frame, variants)

    def _retire(self, source: str) -> None:
        """The camera changed shape: every variant of it was planned for the old one."""
        for key, variant in list(self._variants.items()):
            if key[0] == source:
                variant.retired = True
                del self._variants[key]
                variant.wake()
        self._waiting.pop(source, None)
        self._update_coarse(source)

    def _watched_variants(self, source: str) -> list[Variant]:
        return [v for (s, _), v in self._variants.items() if s == source and v.subscribers]

    def _publish_to(self, frame: Frame, variants: list[Variant]) -> None:
        to_render = []
        now = self.clock()
        for v in variants:
            if v.holds(frame.acquired) or not v.plan.fits(frame.image.shape):
                continue
            if frame.coarse and not v.plan.small:
                continue  # it waits for the next full-quality frame, already asked for
            if v.plan.passthrough:
                v.publish(Encoded(frame.image.data, frame.acquired, frame.seq), now)
            else:
                to_render.append(v)
        if not to_render:
            return
        if frame.source in self._rendering:
            if frame.source in self._waiting:  # the one it replaces will never be shown
                self.metrics.frames_dropped.labels(source=frame.source, reason="encoder_busy").inc()
            self._waiting[frame.source] = frame
            return
        self._render(frame, to_render)

    def _render(self, frame: Frame, variants: list[Variant]) -> None:
        """Render on the loop when ``inline`` says it is short and the loop has room (no hand-off
        to a thread and back, see ``inline.py``): now, or at a later turn once this one has
        rendered its share; else in a codec thread. Then publish on the loop. A thread's result
        comes back with one call into the loop, not an asyncio future wrapped around the job's:
        that wrapping costs one more turn of the loop a frame."""
        plans = [v.plan for v in variants]
        kind = (frame.source, frozenset(plans))
        loop = asyncio.get_running_loop()
        place = self.inline.place(kind) if self.inline is not None else Place.THREAD
        if place is Place.LOOP:
            self._render_here(loop, frame, variants, plans, kind)
            return
        if place is Place.LATER:  # like a thread's job: newer frames of it wait (_waiting)
            self._rendering.add(frame.source)
            loop.call_soon(self._render_later, frame, variants)
            return
        observe = self.metrics.observe_codec
        job = self.executor.submit(_render_measured, frame.image, plans, observe)
        self._rendering.add(frame.source)  # after submit: a refused job leaves nothing stuck
        job.add_done_callback(
            lambda job: call_soon_from_thread(
                loop, self._rendered_in_thread, frame, variants, kind, job
            )
        )

    def _render_here(
        self,
        loop: asyncio.AbstractEventLoop,
        frame: Frame,
        variants: list[Variant],
        plans: list[Plan],
        kind: Any,
    ) -> None:
        """On the loop: the wall time it held the loop is what the budget counts."""
        assert self.inline is not None
        if not self._turn_marked:  # the turn's first render here: count the turn's renders
            self._turn_marked = True
            loop.call_soon(self._turn_over)
        started = time.perf_counter()
        try:
            results, exc = codec.render_many(frame.image, plans, self.metrics.observe_codec), None
        except Exception as error:  # a bug, not a bad frame: as a thread's job would
            results, exc = {}, error
        self.inline.spent(kind, time.perf_counter() - started, on_loop=True)
        try:  # inside the poller's reply: a bug here must not cost the rest of its batch
            self._rendered(frame, variants, results, exc)
        except Exception:
            log.exception("publishing %s #%d", frame.source, frame.seq)

    def _render_later(self, frame: Frame, variants: list[Variant]) -> None:
        """A render put off to a later turn of the loop: placed again, since a turn (or the
        codec threads) may have room now, or it waits one more turn."""
        self._rendering.discard(frame.source)
        if self._closed:
            self._waiting.pop(frame.source, None)
            return
        self._render(frame, variants)

    def _turn_over(self) -> None:
        assert self.inline is not None
        self._turn_marked = False
        self.inline.turn_over()

    def _rendered_in_thread(
        self, frame: Frame, variants: list[Variant], kind: Any, job: Future
    ) -> None:
        """On the loop, a codec thread's result: the source may render again (``_rendering``),
        and what the render cost there tells ``inline`` whether the next may run here."""
        self._rendering.discard(frame.source)
        if job.cancelled():  # shutting down
            self._waiting.pop(frame.source, None)
            return
        exc = job.exception()
        results: dict = {}
        if exc is None:
            results, seconds = job.result()
            if self.inline is not None:
                self.inline.spent(kind, seconds, on_loop=False)
        self._rendered(frame, variants, results, exc)

    def _rendered(
        self,
        frame: Frame,
        variants: list[Variant],
        results: dict[Plan, bytes | codec.CodecError],
        exc: BaseException | None,
    ) -> None:
        failed = exc is not None
        now = self.clock()
        for v in variants:
            out = results.get(v.plan, exc)
            if isinstance(out, bytes):
                v.publish(Encoded(out, frame.acquired, frame.seq), now)
            else:
                failed = True
        if failed:
            self.metrics.frames_dropped.labels(source=frame.source, reason="decode_error").inc()
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

    def _update_coarse(self, source: str) -> None:
        """Tell ``on_coarse`` when whether ``source`` may come coarse changes (module docstring)."""
        variants = self._watched_variants(source)
        coarse = (
            bool(variants)
            and not self._fine_waiters.get(source)
            and all(v.plan.small for v in variants)
        )
        if coarse != (source in self._coarse):
            (self._coarse.add if coarse else self._coarse.discard)(source)
            self.on_coarse(source, coarse)

    def admit(self, source: str, specs: Sequence[RenderSpec]) -> None:
        """Raise TooManyVariants if serving ``specs`` (one rendering, or an adaptive viewer's
        whole ladder) would pass ``max_variants`` renderings of the camera in use or reserved:
        forty qualities of one camera would cost forty encodes a frame. A ladder is reserved
        whole at admission, so an adaptive viewer's step changes never meet the limit."""
        shape = self.shape(source)
        wanted = {plan(source, shape, s) for s in specs}
        taken = self._in_use(source, shape)
        if not wanted <= taken and len(taken | wanted) > self.max_variants:
            raise TooManyVariants(source, sorted(taken, key=lambda p: p.out_size, reverse=True))

    def _in_use(self, source: str, shape: Shape) -> set[Plan]:
        """Renderings of ``source`` watched now, or reserved by adaptive viewers' ladders."""
        used = {p for (s, p), v in self._variants.items() if s == source and v.subscribers}
        for c in self._clients.values():
            if c.source == source:
                used.update(plan(source, shape, s) for s in c.ladder)
        return used

    def dropped(self, client: Client, reason: str) -> None:
        """An output hung up on a client (it made no progress): counted, then forgotten."""
        self.metrics.clients_dropped.labels(reason=reason).inc()
        log.info("dropped %s viewer of %s: %s", client.kind, client.source, reason)

    def _subscribe(self, source: str, spec: RenderSpec, reserved: bool) -> Variant:
        """``reserved``: a step of the client's own ladder, counted at its admission."""
        if not reserved:
            self.admit(source, [spec])
        key = (source, self.plan(source, spec))
        variant = self._variants.get(key)
        if variant is None:
            variant = self._variants[key] = Variant(key[1], self.clock())
        variant.subscribers += 1
        self._update_coarse(source)
        if variant.latest is None and (frame := self._latest.get(source)) is not None:
            self._publish_to(frame, [variant])  # a first picture now, not at the next capture
        return variant

    def _unsubscribe(self, source: str, variant: Variant) -> None:
        variant.subscribers -= 1
        key = (source, variant.plan)
        if variant.subscribers == 0 and self._variants.get(key) is variant:
            del self._variants[key]
        self._update_coarse(source)

    async def frames(self, client: Client) -> AsyncIterator[Encoded]:
        """Yield the newest rendering of ``client.spec`` whenever there is a newer one, at most
        ``client.max_fps``.

        Renderings published while the caller was still busy with the previous one (writing it,
        or waiting for the viewer's link to take it) are skipped and counted as dropped for a
        slow link; those skipped to honour max_fps are the client's choice, not a drop. When
        ``client.hold`` says so, a rendering already waiting is passed over for the next one (a
        link slower than the camera gets fresh frames, not ones that aged while it was busy).
        A change of ``client.spec`` (adaptation) moves the client to that rendering at its next
        frame. Close it (``contextlib.aclosing``) to unsubscribe at once.
        """
        source = client.source
        client.id = next(self._ids)
        self._clients[client.id] = client
        self._watch(source, +1)
        self.metrics.clients.labels(source=source).inc()
        if client.ladder:
            self.metrics.adapt_step_clients.labels(source=source, step=str(client.step)).inc()
        min_gap = 1.0 / client.max_fps if client.max_fps else 0.0
        next_at = 0.0
        try:
            while not self._closed:
                spec = client.spec
                variant = client.variant = self._subscribe(source, spec, spec in client.ladder)
                seen = 0
                try:
                    while not self._closed and client.spec is spec:
                        while not variant.retired and (
                            variant.version == seen or variant.latest is None
                        ):
                            if self._closed:
                                return
                            await variant.changed()
                        if self._closed or variant.retired:
                            break
                        if min_gap:
                            delay = next_at - time.monotonic()
                            if delay > 0:
                                await asyncio.sleep(delay)
                            next_at = max(next_at + min_gap, time.monotonic())
                        elif seen and client.hold is not None:
                            await self._hold(variant, client.hold)
                        enc, taken = variant.latest, variant.version
                        assert enc is not None
                        if seen and not min_gap and taken > seen + 1:
                            # counted as taken: frames passed over while the link was busy
                            # with the last, and while waiting for a fresher one (hold)
                            skipped = taken - seen - 1
                            client.frames_dropped += skipped
                            self.metrics.frames_dropped.labels(
                                source=source, reason="slow_link"
                            ).inc(skipped)
                        client.writing = taken
                        yield enc
                        client.writing = 0
                        seen = taken
                finally:
                    self._unsubscribe(source, variant)
        finally:
            client.variant = None
            self._clients.pop(client.id, None)
            self._watch(source, -1)
            self.metrics.clients.labels(source=source).dec()
            if client.ladder:
                self.metrics.adapt_step_clients.labels(source=source, step=str(client.step)).dec()

    async def _hold(self, variant: Variant, hold: Callable[[float], float]) -> None:
        """Wait (briefly) for a rendering newer than the one waiting, if ``hold`` asks to."""
        wait = hold(self.clock() - variant.published_at)
        if wait <= 0 or variant.latest is None or variant.latest.stale:
            return
        version = variant.version
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while variant.version == version and not variant.retired and not self._closed:
                    await variant.changed()

    def move(self, client: Client, step: int) -> None:
        """Put an adaptive viewer on ``step`` of its ladder (from its next frame on)."""
        if step == client.step:
            return
        gauge = self.metrics.adapt_step_clients
        gauge.labels(source=client.source, step=str(client.step)).dec()
        gauge.labels(source=client.source, step=str(step)).inc()
        client.step, client.spec = step, client.ladder[step]

    def sent(self, client: Client, enc: Encoded, nbytes: int) -> None:
        """An output is about to write ``enc`` (``nbytes`` on the wire) to ``client``."""
        now = time.time()
        client.frames_sent += 1
        client.bytes_sent += nbytes
        client.rate.mark(now)
        served, sent_bytes, latency = self._series(client.source)
        served.inc()
        sent_bytes.inc(nbytes)
        if enc.acquired and not enc.stale:
            latency.observe(max(0.0, now - enc.acquired))

    def _series(self, source: str) -> tuple:
        """The per-source metric children a write counts into (looked up once per source:
        with fifty viewers, per-write label lookups are a measurable share of a frame)."""
        series = self._per_source.get(source)
        if series is None:
            m = self.metrics
            series = self._per_source[source] = (
                m.frames_served.labels(source=source),
                m.bytes_sent.labels(source=source),
                m.frame_latency.labels(source=source, stage="sent"),
            )
        return series

    async def next_frame(self, source: str, *, after: float = 0.0, timeout: float = 2.0) -> Frame:
        """The newest full-quality frame received after hub-clock time ``after``: the held one if
        it is that new, else the next to arrive (the source is polled at full rate and quality
        meanwhile).

        Raises LookupError if none arrives within ``timeout``."""
        at = self._fine_at.get(source)
        if at is not None and at > after:
            return self._latest_fine[source]
        self._watch(source, +1)
        self._fine_waiters[source] = self._fine_waiters.get(source, 0) + 1
        self._update_coarse(source)
        try:
            deadline = self.clock() + timeout
            while True:
                event = self._new_frame.setdefault(source, asyncio.Event())
                left = deadline - self.clock()
                if left <= 0:
                    raise LookupError(source)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await event.wait()
                at = self._fine_at.get(source)
                if at is not None and at > after:
                    return self._latest_fine[source]
        finally:
            self._watch(source, -1)
            self._fine_waiters[source] -= 1
            self._update_coarse(source)

    # -- staleness ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Twice a second, repeat each stalled variant's last picture marked STALE."""
        while not self._closed:
            await asyncio.sleep(STALE_REPEAT / 2)
            await self.repeat_stale()

    async def repeat_stale(self) -> None:
        """Staleness is judged per variant, on what its clients actually got: a source whose
        frames arrive but cannot be decoded is as stale to a viewer as one that stopped."""
        loop = asyncio.get_running_loop()
        for variant in list(self._variants.values()):
            if not variant.subscribers or not self._stale(variant.fresh_at, watched=True):
                continue
            if self.clock() - variant.published_at < STALE_REPEAT:
                continue
            enc = variant.last_fresh
            if enc is not None and enc.acquired:
                text = f"STALE {time.time() - enc.acquired:.0f} s"
            else:
                text = "WAITING FOR ROBOT"
            data = await loop.run_in_executor(
                self.executor,
                codec.stale_picture,
                enc.data if enc else None,
                variant.plan.out_size,
                variant.plan.quality or DEFAULT_QUALITY,
                text,
            )
            if variant.subscribers:
                variant.publish(
                    Encoded(data, enc.acquired if enc else 0.0, enc.seq if enc else 0, True),
                    self.clock(),
                )

    def close(self) -> None:
        """End every stream: wake all waiting clients, who then see the hub closed."""
        self._closed = True
        for variant in list(self._variants.values()):
            variant.wake()


def _render_measured(image, plans: list[Plan], observe) -> tuple[dict, float]:
    """``codec.render_many`` in a codec thread, and the CPU it took there (for ``inline``)."""
    started = time.thread_time()
    results = codec.render_many(image, plans, observe)
    return results, time.thread_time() - started
