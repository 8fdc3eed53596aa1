"""Schedule: when to ask one camera for its next capture. Pure: no I/O, no clock of its own.

A camera captures on a grid (period P, phase; each capture a few milliseconds off it), a capture
becomes available to GetImage a fixed delay A after its acquisition time, and GetImage answers
with the newest capture available when the request *reaches the robot*. Asking one request at a
time loses frames to the round trip; asking often floods the robot with repeats. So each watched
source keeps a model of its camera, learned only from what replies tell:

* the grid: a least-squares line through the recent captures' acquisition times (indices found
  by rounding, so a missed capture does not disturb it); the jitter: its largest residual;
* the availability delay A, bracketed exactly: the robot stamps when it received each request
  (the reply header's ``request_received_timestamp``), so a reply carrying capture c at arrival r
  proves A <= r - t(c), and the next capture c', once known, proves A > r - t(c');
* the one-way delay to the robot (that stamp minus the send time), of which the lowest recent
  value is what a request must allow for so that it never arrives early.

Each request is then sent to *arrive* when the predicted capture is surely available (prediction
+ upper bound of A + jitter), without waiting for earlier replies, so round trips longer than a
period overlap. While the bracket on A is wide, every eighth request aims at its middle to narrow
it. A reply that is still the previous capture (arrived early) is retried at once if the next
capture is not yet due.

Until the grid is known (first watch, or the camera changed mode) the source is probed at short
intervals that grow with the silence; a request between grid points every ten seconds checks that
the camera has not become faster than the grid, as do any two captures closer together than the
grid allows (a probe starved by a busy machine can lock on a multiple of the period, and the
checks may land on that grid's own points), and index gaps that all share a factor show it
became slower. All times are local epoch seconds; the poller converts robot times first.
"""

from __future__ import annotations

import collections
import copy
import itertools
import math
from dataclasses import dataclass
from enum import Enum

FIT_WINDOW = 24  # captures in the grid fit: enough to average jitter out, short to follow drift
ONEWAY_WINDOW = 64  # one-way delays and round trips remembered, at most ...
ONEWAY_SECONDS = 2.0  # ... for this long, so a link that became slower is followed in seconds
PROBE_FIRST = 0.004  # probe interval while the grid is unknown; grows with the silence
LOCK_AFTER = 4  # distinct captures seen while probing before the grid is trusted
MARGIN = 0.0005  # added to the jitter: timer and rounding slack
NARROW_BELOW = 0.001  # bisect the availability bracket while it is wider than this
NARROW_EVERY = 8  # ... with one request in this many
RETRIES = 3  # early replies retried per capture
CHECK_EVERY = 10.0  # seconds between checks for captures between grid points ...
FIRST_CHECK = 1.0  # ... and the first, soon after locking: a probe that stalled (a busy
# machine) may have missed every other capture and locked on twice the period
FASTER = 0.7  # consecutive captures closer than this share of the period: the grid is wrong
# (capture jitter stays under a sixth of the period either way)
MAX_INFLIGHT_FLOOR = 3
JOIN_WINDOW = 1 / 3  # of the period: how much sooner than due a request may join a batch
FAILED_MAX = 0.5  # the longest wait after a failed request, before the next
ASK_NOW_MARGIN = 0.005  # a regular request due this soon after ask_now's serves instead of it


class Outcome(Enum):
    NEW = "new"  # a capture newer than any held: serve it
    REPEAT = "repeat"  # the capture already held
    OLD = "old"  # older than one held: a pipelined reply overtaken by a later one


@dataclass(frozen=True, slots=True)
class Ask:
    """One request in flight: when it was sent and which capture index it aims at."""

    sent: float
    aimed: int | None = None  # None: idle refresh or probe
    check: bool = False  # the request between grid points
    idle: bool = False  # off the grid (nobody watches, or ask_now): teaches nothing about timing


class Grid:
    """Capture times as a line t = t0 + period * index, fitted to the recent captures."""

    def __init__(self, period: float, first: float):
        self.period = period
        self.t0 = first
        self.points: collections.deque[tuple[int, float]] = collections.deque(maxlen=FIT_WINDOW)
        self.points.append((0, first))
        self.jitter = 0.0  # largest |residual| of the points fitted

    def index(self, t: float) -> int:
        return round((t - self.t0) / self.period)

    def floor(self, t: float) -> int:
        return math.floor((t - self.t0) / self.period)

    def time(self, index: int) -> float:
        return self.t0 + index * self.period

    def add(self, t: float) -> float:
        """Fit one more capture; returns its residual against the grid as it was."""
        n = self.index(t)
        residual = t - self.time(n)
        points = self.points
        points.append((n, t))
        if len(points) >= 3:  # once per frame: plain loops, the same sums in the same order
            count = len(points)
            sk = st = 0.0
            for k, x in points:
                sk += k
                st += x
            mk, mt = sk / count, st / count
            var = cov = 0.0
            for k, x in points:
                var += (k - mk) ** 2
                cov += (k - mk) * (x - mt)
            period = self.period = cov / var
            t0 = self.t0 = mt - period * mk
            self.jitter = max([abs(x - (t0 + k * period)) for k, x in points])
        return residual

    def keep_newest(self) -> None:
        """A new watch: the line stays, but its points start again from the newest, so the
        index gaps the slower-camera check reads are those of one watch. One capture per watch
        for two dozen evenly spaced watches would otherwise leave only gaps of the watches'
        spacing in the window, and the grid would be 'rebased' onto it."""
        newest = self.points[-1]
        self.points.clear()
        self.points.append(newest)

    def rebase(self, factor: int) -> None:
        """The camera is ``factor`` times slower than thought: every index divides by it."""
        base = self.points[0][0]
        self.period *= factor
        self.points = collections.deque(
            (((k - base) // factor, t) for k, t in self.points), maxlen=FIT_WINDOW
        )
        self.t0 = self.points[0][1]


class Schedule:
    """The request schedule and repeat detection of one source."""

    def __init__(self) -> None:
        self.watched = False
        self.grid: Grid | None = None
        self.next_due = 0.0
        self.inflight = 0
        self.errors = 0
        self.last_capture: float | None = None  # local capture time of the newest capture held
        self.avail_lo = 0.0  # bracket on the availability delay A (local seconds)
        self.avail_hi: float | None = None
        self._probe_seen: list[float] = []
        self._new_at = 0.0  # when the newest capture arrived
        self._aim: int | None = None  # index the next regular request aims at
        self._retry_of: int | None = None
        self._retries = 0
        self._aims = 0  # regular requests sent since locking (for narrowing)
        self._narrowing: int | None = None  # index aimed at the bracket's middle
        self._pending: collections.deque[tuple[float, float]] = collections.deque(maxlen=32)
        self._oneway: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=ONEWAY_WINDOW
        )
        self._roundtrip: collections.deque[float] = collections.deque(maxlen=ONEWAY_WINDOW)
        self._low: float | None = None  # _oneway_low, until _oneway changes
        self._rt_max = 0.0  # max(_roundtrip)
        self._next_check = 0.0
        self._check_due = False
        self._bad_fits = 0
        self._extra_at: float | None = None  # when the request of ask_now is due

    # -- what the poller asks ---------------------------------------------------------------

    def watch(self, watched: bool, now: float) -> None:
        self.watched = watched
        if watched:  # a grid learnt before may be stale: check it early
            # and a grid is learnt only from captures of one watch: those of earlier moments
            # (a mission capture every 5 s watches a camera for one frame) would make a grid of
            # the moments, not the camera
            self._probe_seen = []
            if self.grid is not None:
                self.grid.keep_newest()
            self._next_check = now + FIRST_CHECK
            self._new_at = now
            self._restart(now)

    def ask_now(self, now: float) -> None:
        """One request at once, off the grid: it aims at no capture, its reply is fitted to no
        grid, and the requests planned after it keep their times. For a view that cannot use
        what was just fetched (a capture fetched coarse, wanted at full quality): the next
        regular request may be a period away, or a second for a camera that stalled."""
        self._extra_at = now if self._extra_at is None else min(self._extra_at, now)

    def cancel_ask_now(self) -> None:
        """What ask_now was for is no longer wanted (the view that wanted it left)."""
        self._extra_at = None

    def _extra_due(self) -> float | None:
        """When ask_now's request is due, if the next request is that one: one is pending, the
        camera is watched (else the idle refresh is all it gets), and no regular request is due
        as soon."""
        extra = self._extra_at
        if extra is not None and self.watched and extra < self.next_due - ASK_NOW_MARGIN:
            return extra
        return None

    @property
    def due(self) -> float:
        """When the next request is due: the regular one, or sooner the one of ask_now."""
        extra = self._extra_due()
        return self.next_due if extra is None else extra

    def can_send(self) -> bool:
        return self.inflight < self.max_inflight()

    def max_inflight(self) -> int:
        """Enough requests in flight to cover the round trip at this rate, never a flood."""
        if self.grid is None or not self._roundtrip:
            return MAX_INFLIGHT_FLOOR
        return max(MAX_INFLIGHT_FLOOR, math.ceil(self._rt_max / self.grid.period) + 2)

    @property
    def period(self) -> float | None:
        return self.grid.period if self.grid else None

    def ask(self, now: float, idle_interval: float) -> Ask:
        """A request is being sent now: what it aims at, and when the next one is due."""
        self.inflight += 1
        extra, self._extra_at = self._extra_due(), None
        if extra is not None:
            return Ask(now, idle=True)  # (else the regular request serves as well)
        if not self.watched:
            self.next_due = now + idle_interval
            return Ask(now, idle=True)
        grid = self.grid
        if grid is None or self._aim is None:  # probing: intervals grow with the silence
            quiet = now - self._new_at if self._probe_seen else 0.0
            self.next_due = now + max(PROBE_FIRST, quiet / 8)
            if grid is not None:
                self._restart(now)
            return Ask(now)
        if self._check_due:
            self._check_due = False
            self.next_due = self._send_time(self._aim)
            return Ask(now, self._aim - 1, check=True)
        aimed = self._aim
        if self._retry_of != aimed:
            self._retry_of, self._retries = aimed, 0
        self._aim += 1
        self._aims += 1
        self.next_due = self._send_time(self._aim)
        quiet = now - self._new_at
        if quiet > 4 * grid.period:  # stalled: ask less often the longer it lasts, up to 1 s
            self.next_due = max(self.next_due, now + min(quiet / 8, 1.0))
        if now >= self._next_check:
            self._next_check = now + CHECK_EVERY
            self._check_due = True
            self.next_due = min(self.next_due, self._send_time(aimed) + grid.period / 2)
        return Ask(now, aimed)

    def aimed_capture(self) -> float | None:
        """The predicted time of the capture the next regular request aims at (local time)."""
        if not self.watched or self.grid is None or self._aim is None or self._check_due:
            return None  # (a check aims between grid points)
        if self._extra_due() is not None:
            return None  # the next request is ask_now's, which aims at nothing
        return self.grid.time(self._aim)

    def joins(self, now: float, captures: set[float] | list[float]) -> bool:
        """Whether this camera's next request may be sent now, sooner than due, with a batch
        aimed at ``captures`` (their predicted times): it aims at a capture of the same moment
        (cameras on one trigger), is due within a third of a period, and would not surely reach
        the robot before its capture exists (the bracket's lower bound on the delay A).

        Cameras on one trigger have one delay A, but each learns its own bracket on it, and a
        busy machine leaves them apart by milliseconds for seconds: their requests, due a few
        milliseconds apart, then went out one call each (on a 2-core VM, one call a camera in a
        capture of five, or two calls each). Sent with the others, this request narrows its
        own bracket too: a hit lowers its upper bound to the others' (and it is due with them
        from then on); a miss raises its lower bound, so it does not join that soon again."""
        at = self.aimed_capture()
        if at is None:
            return False
        grid, aim = self.grid, self._aim
        assert grid is not None
        if (
            aim == self._narrowing
            or (self._retry_of == aim and self._retries > 0)  # it already arrived early
            or not self.can_send()
            or self.next_due - now > JOIN_WINDOW * grid.period
        ):
            return False
        slack = grid.jitter + MARGIN
        if not any(abs(at - c) <= slack for c in captures):
            return False
        return now + self._oneway_low() >= at + grid.jitter + self.avail_lo

    def busy(self, now: float) -> None:
        """Too many requests in flight: wait for a reply (or half a period) before the next."""
        period = self.grid.period if self.grid else PROBE_FIRST * 4
        extra = self._extra_due()
        if extra is not None:  # the regular one keeps its time
            self._extra_at = max(extra, now + period / 2)
        else:
            self.next_due = max(self.next_due, now + period / 2)

    def failed(self, ask: Ask, now: float) -> None:
        """The request or its image failed: back off, up to half a second (an outage of the
        whole service is the connection's to probe, once it gives the service up), then aim
        afresh. A request of ask_now's that failed leaves the planned ones as they are: the
        next of them will tell whether the camera fails."""
        self.inflight -= 1
        self.errors += 1
        if ask.idle and self.watched and self._aim is not None:
            return
        period = self.grid.period if self.grid else 1 / 15
        self._aim = None
        self.next_due = max(self.next_due, now + min(FAILED_MAX, period * 2 ** min(self.errors, 5)))

    def reply(self, ask: Ask, capture: float, arrival: float | None, now: float) -> Outcome:
        """A reply: ``capture`` is its acquisition time, ``arrival`` when the robot received the
        request (both local time; arrival None if the robot did not say)."""
        self.inflight -= 1
        self.errors = 0
        self._roundtrip.append(now - ask.sent)
        self._rt_max = max(self._roundtrip)
        if arrival is not None:
            self._oneway.append((now, arrival - ask.sent))
            while len(self._oneway) > 8 and now - self._oneway[0][0] > ONEWAY_SECONDS:
                self._oneway.popleft()
            self._low = None
        last = self.last_capture
        if last is not None and capture < last:
            return Outcome.OLD
        new = last is None or capture > last
        if new:
            self._resolve(capture)
        if arrival is not None:
            self._bound(capture, arrival)
        if not new:
            if ask.aimed is not None and not ask.check:
                self._early(ask, now)
            return Outcome.REPEAT
        self.last_capture = capture
        self._new_at = now
        if ask.idle:  # off the grid (a refresh, or ask_now): no grid can be read from it
            return Outcome.NEW
        if self.grid is None:
            self._probe(capture, now)
        elif last is not None and capture - last < FASTER * self.grid.period:
            # two captures closer than the grid allows: it was learnt on a multiple of the
            # camera's period (a probe starved by a busy machine) or the camera became faster
            self._relearn()
        else:
            self._fit(capture, ask, now)
        return Outcome.NEW

    def keep_learning(self, old: Schedule) -> None:
        """After a reconnect: what was learned about the camera still holds."""
        # copies: replies still in flight to the old schedule must not move the new one's model
        self.grid = copy.deepcopy(old.grid)
        self.avail_lo, self.avail_hi = old.avail_lo, old.avail_hi
        self._oneway, self._roundtrip = old._oneway.copy(), old._roundtrip.copy()
        self._low, self._rt_max = None, old._rt_max

    def reset(self) -> None:
        """The camera changed mode (e.g. resolution): learn its grid again."""
        self._relearn()

    # -- timing -----------------------------------------------------------------------------

    def _lead(self, index: int) -> float:
        """From a capture's predicted time to when a request for it must reach the robot: the
        delay A (its upper bound) plus how late the capture may be against the grid. A request
        that narrows the bracket aims at its middle, jitter and all: its answer, a hit or a
        miss, moves one bound whichever way the capture fell."""
        grid = self.grid
        assert grid is not None
        hi = self.avail_hi if self.avail_hi is not None else grid.period / 2
        if index == self._narrowing:
            return (self.avail_lo + hi) / 2 + MARGIN
        return hi + grid.jitter + MARGIN

    def _oneway_low(self) -> float:
        """A one-way delay that almost no request undercuts: the lowest recent one, less a
        sixteenth of their spread (a new low is rarely lower than that)."""
        if self._low is None:  # asked several times a frame, changed once
            if not self._oneway:
                return 0.0
            values = [v for _, v in self._oneway]
            low, high = min(values), max(values)
            self._low = low - (high - low) / 16
        return self._low

    def _send_time(self, index: int) -> float:
        assert self.grid is not None
        return self.grid.time(index) + self._lead(index) - self._oneway_low()

    def _restart(self, now: float) -> None:
        """Aim at the newest capture that is surely available now, or the next one."""
        grid = self.grid
        if grid is None:
            self._aim = None
            self.next_due = now
            return
        k = grid.floor(now + self._oneway_low() - self._lead(0))
        if self.last_capture is not None:
            k = max(k, grid.index(self.last_capture) + 1)
        self._aim = k
        self.next_due = max(now, self._send_time(k))

    # -- learning ---------------------------------------------------------------------------

    def _early(self, ask: Ask, now: float) -> None:
        """A request reached the robot before its capture existed: ask again right away, unless
        the capture came in another reply or the next capture is due before it could arrive."""
        grid = self.grid
        if grid is None or ask.aimed is None or self._retry_of != ask.aimed:
            return
        if self.last_capture is not None and grid.index(self.last_capture) >= ask.aimed:
            return
        if self._narrowing == ask.aimed:
            self._narrowing = None  # the probe of the bracket's middle is answered: too early
        self._retries += 1
        quiet = now - self._new_at
        if (
            self._retries > RETRIES
            or quiet > 2 * grid.period  # the camera is not delivering: no point insisting
            or now >= self._send_time(ask.aimed + 1)
        ):
            return
        self._aim = ask.aimed
        again = max(now + MARGIN * 2 ** (self._retries - 1), self._send_time(ask.aimed))
        self.next_due = min(self.next_due, again)

    def _probe(self, capture: float, now: float) -> None:
        self._probe_seen.append(capture)
        if len(self._probe_seen) < LOCK_AFTER:
            return
        seen = self._probe_seen
        grid = Grid(min(b - a for a, b in itertools.pairwise(seen)), seen[0])
        for t in seen[1:]:
            grid.add(t)
        self.grid, self._probe_seen, self._aims = grid, [], 0
        self._next_check = now + FIRST_CHECK
        self._restart(now)

    def _fit(self, capture: float, ask: Ask, now: float) -> None:
        grid = self.grid
        assert grid is not None
        residual = grid.add(capture)
        if ask.check and abs(residual) > grid.period / 4:
            self._relearn()  # a capture between grid points: the camera is faster
            return
        if abs(residual) > grid.period / 3:
            self._bad_fits += 1
            if self._bad_fits >= 3:
                self._relearn()
            return
        self._bad_fits = 0
        ks = [k for k, _ in grid.points]
        if len(ks) >= 8:
            step = 0
            for a, b in itertools.pairwise(ks):
                step = math.gcd(step, b - a)
            if step > 1:  # every gap a multiple: the camera is that many times slower
                grid.rebase(step)
                self._restart(now)
        # Narrow a wide bracket on A by aiming one request in eight at its middle: worth a retry
        # only when the retry can still fetch the capture, i.e. the round trip is short.
        if (
            self._narrowing is None
            and self.avail_hi is not None
            and self.avail_hi - self.avail_lo > NARROW_BELOW
            and self._aims % NARROW_EVERY == 0
            and self._roundtrip
            and self._rt_max < grid.period / 2
        ):
            self._narrowing = (self._aim or 0) + 1

    def _bound(self, capture: float, arrival: float) -> None:
        """This capture was available at ``arrival``; the next one, when known, was not."""
        hi = arrival - capture
        if self.avail_hi is None or hi < self.avail_hi:
            self.avail_hi = hi
        self._pending.append((capture, arrival))

    def _resolve(self, capture: float) -> None:
        """A new capture: every request that arrived while an older one was the newest arrived
        before this one existed, which bounds A from below."""
        while self._pending and self._pending[0][0] < capture:
            _, arrival = self._pending.popleft()
            self.avail_lo = max(self.avail_lo, arrival - capture)
        grid, narrowing = self.grid, self._narrowing
        if narrowing is not None and grid is not None and grid.index(capture) >= narrowing:
            self._narrowing = None
        if self.avail_hi is not None and self.avail_lo > self.avail_hi:
            # the delay changed (or was never what it seemed): bracket it again from here
            self.avail_hi, self.avail_lo = self.avail_lo + MARGIN, 0.0

    def _relearn(self) -> None:
        self.grid = None
        self._probe_seen = [self.last_capture] if self.last_capture is not None else []
        self._aim = None
        self._bad_fits = 0
        self._narrowing = None
        self.avail_lo, self.avail_hi = 0.0, None
        self._pending.clear()
