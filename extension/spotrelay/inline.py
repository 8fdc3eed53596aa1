"""Which renders the event loop does itself, and which go to the codec threads.

A render handed to a codec thread costs more than the render. The thread is woken; at each
OpenCV call it gives up the interpreter lock and must win it back from the loop; its result
wakes the loop again. On 2 cores with the viewer page's 11 tiles (165 renders a second, 0.3 to
1.3 ms each), doing the same renders on the loop took 13 % less of the relay's CPU, and the
viewers' p95 latency went down, not up (four alternated pairs: 52.1 -> 45.2 % of a core).

A render on the loop holds up everything else on it, though: requests to the robot and writes
to viewers. So the loop only takes a render that is known to be short (its last renders took
at most ``longest`` of CPU), and only while its renders of the current second leave it room
(``share`` of the second). Everything else goes to the codec threads, and so does a render that
has not been measured yet (a new camera, a new set of renderings), which is how it gets
measured. A heavy load, or a slower computer, thus still spreads over the cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

SHARE = 0.25  # of each second, at most, the loop spends rendering
LONGEST = 0.003  # s of CPU: a render that may hold the loop up for longer goes to a thread
WINDOW = 1.0  # s over which the share is counted
SMOOTHING = 0.25  # weight of the newest measure in a render's cost
KEEP = 256  # render kinds remembered (cameras x sets of renderings); the oldest go first


class InlineBudget:
    """Chooses where each render runs, from what renders of the same kind cost before.

    A kind is whatever the caller says makes renders cost the same: the hub uses the camera and
    the set of renderings a frame is made into."""

    def __init__(
        self,
        share: float = SHARE,
        longest: float = LONGEST,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.share, self.longest, self.window, self.clock = share, longest, window, clock
        self._cost: dict[Hashable, float] = {}
        self._since = clock()
        self._spent = 0.0  # CPU seconds rendered on the loop since ``_since``

    def on_loop(self, kind: Hashable) -> bool:
        """Render this one on the loop, now?"""
        cost = self._cost.get(kind)
        if cost is None or cost > self.longest:
            return False
        now = self.clock()
        if now - self._since >= self.window:
            self._since, self._spent = now, 0.0
        return self._spent + cost <= self.share * self.window

    def spent(self, kind: Hashable, seconds: float, on_loop: bool) -> None:
        """A render of ``kind`` took ``seconds`` of CPU, on the loop or in a thread."""
        old = self._cost.pop(kind, None)  # re-inserted: the dict's order is last use
        self._cost[kind] = seconds if old is None else old + SMOOTHING * (seconds - old)
        if len(self._cost) > KEEP:
            del self._cost[next(iter(self._cost))]
        if on_loop:
            self._spent += seconds
