"""Schedule: when to ask one camera for its next capture. Pure: no I/O, no clock of its own.

Spot's cameras capture at a steady rate and GetImage answers with the latest capture. Asking one
request at a time (the SDK examples' pattern) loses frames to the round trip; asking as fast as
possible floods the robot with repeats. So each watched source keeps a phase-locked schedule:

* the capture period is learned from successive acquisition times, the phase from the newest one;
* a request is sent ``lead`` seconds after each predicted capture, without waiting for the reply
  to the previous one (requests overlap when the round trip is longer than a period);
* if the reply is the previous capture (asked too early), ``lead`` grows and the request is retried
  a few milliseconds later; every on-time hit shrinks ``lead`` a little, so it settles just after
  the moment captures become available, at the cost of an occasional repeat.

The poller owns the sockets and the clock and tells the schedule what happened; tests drive it
with synthetic times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

NOMINAL_PERIOD = 1 / 15
MAX_INFLIGHT = 3  # per source: enough to cover a round trip of ~3 periods, never a flood
LEAD_START = 0.02
LEAD_UP = 0.004  # after asking too early
LEAD_DOWN = 0.00025  # after each on-time hit: ~1 repeat per 16 frames at equilibrium
RETRY_FIRST = 0.003


class Outcome(Enum):
    NEW = "new"  # a capture newer than any held: serve it
    REPEAT = "repeat"  # the capture already held: asked before the next one existed
    OLD = "old"  # older than one held: a pipelined reply overtaken by a later one


@dataclass(frozen=True, slots=True)
class Ask:
    """One request in flight: when it was sent, and which capture it aimed at (None: idle)."""

    sent: float
    aimed: float | None


class Schedule:
    """The request schedule and repeat detection of one source. Times are local epoch seconds."""

    def __init__(self) -> None:
        self.watched = False
        self.period = NOMINAL_PERIOD
        self.lead = LEAD_START
        self.anchor: float | None = None  # local capture time of the newest frame
        self.last_capture: float | None = None  # capture time of the newest frame, robot clock
        self.next_due = 0.0
        self.inflight = 0
        self.misses = 0
        self.errors = 0

    def watch(self, watched: bool, now: float) -> None:
        self.watched = watched
        if watched:
            self.next_due = now

    def can_send(self) -> bool:
        return self.inflight < MAX_INFLIGHT

    def ask(self, now: float, idle_interval: float) -> Ask:
        """A request is being sent now: decide what it aims at and when the next one is due."""
        self.inflight += 1
        if not self.watched:
            self.next_due = now + idle_interval
            return Ask(now, None)
        if self.anchor is None:
            self.next_due = now + self.period
            return Ask(now, None)
        k = math.floor((now - self.anchor - self.lead) / self.period)
        aimed = self.anchor + max(k, 0) * self.period
        self.next_due = aimed + self.period + self.lead
        return Ask(now, aimed)

    def busy(self, now: float) -> None:
        """Too many requests in flight: the robot is slower than the schedule; wait for replies."""
        self.next_due = now + self.period / 2

    def failed(self, ask: Ask, now: float) -> None:
        """The request or its image failed: back off, up to 2 s."""
        self.inflight -= 1
        self.errors += 1
        self.next_due = now + min(2.0, self.period * 2 ** min(self.errors, 5))

    def reply(self, ask: Ask, capture: float, local: float, now: float) -> Outcome:
        """A capture arrived: ``capture`` on the robot clock, ``local`` the same in local time."""
        self.inflight -= 1
        self.errors = 0
        last = self.last_capture
        if last is not None and capture <= last:
            if capture < last:
                return Outcome.OLD
            if ask.aimed is not None and local < ask.aimed - self.period / 2:  # too early
                self.lead = min(self.lead + LEAD_UP, 2 * self.period)
                self.misses += 1
                if self.misses <= 4:
                    self.next_due = min(self.next_due, now + RETRY_FIRST * 2 ** (self.misses - 1))
            return Outcome.REPEAT
        if last is not None:
            delta = capture - last
            if 0.5 * self.period < delta < 1.5 * self.period:
                self.period += 0.1 * (delta - self.period)
        if ask.aimed is not None and local >= ask.aimed - self.period / 2:
            self.lead = max(self.lead - LEAD_DOWN, -self.period)
        self.last_capture = capture
        self.anchor = local
        self.misses = 0
        return Outcome.NEW

    def keep_learning(self, old: Schedule) -> None:
        """After a reconnect: what was learned about the camera still holds."""
        self.period, self.lead = old.period, old.lead
