"""A discrete-event model of one camera, the robot link and the poller's use of a ``Schedule``.

No sockets, no sleeps: simulated seconds pass in microseconds of real time, so schedule behaviour
can be checked over thousands of frames, with capture jitter, availability delay and RPC latency
drawn from a seeded generator. The camera follows the same rules as the simulated robot (and
Spot): a capture exists from its acquisition time plus the availability delay, and GetImage
answers with the newest capture existing when the request reaches the robot.
"""

from __future__ import annotations

import heapq
import random
import statistics
from dataclasses import dataclass, field

from spotrelay.schedule import Ask, Outcome, Schedule


@dataclass
class Camera:
    rate: float = 15.0
    jitter: float = 0.002  # capture times uniformly within +- this of the grid
    available_after: float = 0.025  # from acquisition to GetImage returning it
    phase: float = 0.013
    skew: float = 2.5  # robot clock minus local clock
    seed: int = 1
    switch_after: float | None = None  # seconds into the run when the rate changes ...
    new_rate: float = 15.0  # ... to this
    stall_after: float | None = None  # seconds into the run when captures stop
    captures: list[float] = field(default_factory=list)  # robot clock

    def build(self, start: float, seconds: float) -> None:
        """Captures on the robot clock from local time ``start - 1`` for ``seconds + 2``."""
        rng = random.Random(self.seed)
        t = start - 1 + self.skew + self.phase
        end = start + seconds + 1 + self.skew
        switch = start + self.skew + (self.switch_after if self.switch_after else 1e9)
        stall = start + self.skew + (self.stall_after if self.stall_after else 1e9)
        self.captures = []
        while t < min(end, stall):
            self.captures.append(t + rng.uniform(-self.jitter, self.jitter))
            t += 1 / (self.rate if t < switch else self.new_rate)

    def newest_at(self, robot_t: float) -> int | None:
        """Index of the newest capture available at robot time ``robot_t``."""
        lo, hi = 0, len(self.captures)
        while lo < hi:  # captures are increasing (jitter < period / 2)
            mid = (lo + hi) // 2
            if self.captures[mid] + self.available_after <= robot_t:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1 if lo else None


@dataclass
class Link:
    latency: float = 0.002  # round trip, split evenly between the two ways
    jitter: float = 0.0  # +- uniform, on the round trip
    seed: int = 2


@dataclass
class Stats:
    captures: int  # captures that became available while polling
    delivered: int  # distinct captures received
    requests: int
    latencies: list[float]  # capture (local) to received, per delivered capture
    schedule: Schedule

    @property
    def delivered_share(self) -> float:
        return self.delivered / max(1, self.captures)

    @property
    def requests_per_frame(self) -> float:
        return self.requests / max(1, self.delivered)

    def latency_pct(self, q: int) -> float:
        return statistics.quantiles(self.latencies, n=100)[q - 1]


def run(
    camera: Camera,
    link: Link,
    seconds: float = 60.0,
    warmup: float = 3.0,
    schedule: Schedule | None = None,
) -> Stats:
    """Poll ``camera`` over ``link`` for ``seconds`` of model time with a fresh Schedule (or one
    given, to start from a state it learnt wrongly).

    Like the poller's loop: it wakes when the schedule says a request is due or when a reply
    arrives, whichever comes first."""
    start = 1000.0
    camera.build(start, seconds)
    rng = random.Random(link.seed)
    sched = schedule or Schedule()
    sched.watch(True, start)
    replies: list[tuple[float, int, Ask, int | None, float]] = []
    end = start + seconds
    seen: set[int] = set()
    requests = 0
    latencies: list[float] = []
    sent = 0
    while True:
        due = sched.next_due
        if replies and replies[0][0] <= due:
            now, _, ask, index, arrival = heapq.heappop(replies)
            if index is None:
                sched.failed(ask, now)
                continue
            capture = camera.captures[index]
            outcome = sched.reply(ask, capture - camera.skew, arrival, now)
            if outcome is Outcome.NEW and now >= start + warmup:
                seen.add(index)
                latencies.append(now - (capture - camera.skew))
            continue
        now = due
        if now > end:
            break
        if not sched.can_send():
            sched.busy(now)
            continue
        ask = sched.ask(now, 1.0)
        if now >= start + warmup:
            requests += 1
        out = max(0.0, link.latency / 2 + rng.uniform(-link.jitter, link.jitter) / 2)
        back = max(0.0, link.latency / 2 + rng.uniform(-link.jitter, link.jitter) / 2)
        index = camera.newest_at(now + out + camera.skew)
        sent += 1
        heapq.heappush(replies, (now + out + back, sent, ask, index, now + out))
    # captures that became available during the measured window
    lo = camera.newest_at(start + warmup + camera.skew) or 0
    hi = camera.newest_at(end + camera.skew) or 0
    return Stats(hi - lo, len(seen), requests, latencies, sched)


def describe(stats: Stats) -> str:
    return (
        f"delivered {stats.delivered_share:.1%}, {stats.requests_per_frame:.2f} req/frame, "
        f"latency p50 {stats.latency_pct(50) * 1e3:.1f} ms p95 {stats.latency_pct(95) * 1e3:.1f}"
        f" ms p99 {stats.latency_pct(99) * 1e3:.1f} ms"
    )
