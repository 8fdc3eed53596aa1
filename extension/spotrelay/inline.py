"""Which renders the event loop does itself, and which go to the codec threads.

A render handed to a codec thread costs more than the render. The thread is woken; at each
OpenCV call it gives up the interpreter lock and must win it back from the loop; its result
wakes the loop again. On 2 cores with the viewer page's 11 tiles (165 renders a second, 0.5 to
1.4 ms of CPU each), doing the same renders on the loop took 15 % less of the relay's CPU, and
the viewers' p95 latency went down, not up (49.4 -> 42.0 % of a core, the median of four
alternated pairs of 25 s; p95 35.8-44.2 ms on the loop, 37.6-46.4 in the threads).

A render on the loop holds up everything else on it, though: requests to the robot and writes
to viewers. So the loop only takes a render that is known to be short (its renders of that
kind have taken at most ``longest``), and only while its renders of the current window leave
it room (``share`` of it). Everything else goes to the codec threads, and so does a render that
has not been measured yet (a new camera, a new set of renderings), which is how it gets
measured. A heavy load, or a slower computer, thus still spreads over the cores.

A GetImage reply with several cameras publishes them all in one turn of the loop. A turn
renders for at most ``longest``; the rest of the reply's renders wait for the next turns
(``Place.LATER``), one turn's worth at a time, with the writes of what was just rendered run
in between. They used to go to the codec threads: the body cameras' reply for the viewer
page's tiles (ten frames, 9-11 ms of renders on a slow 2-core VM) then sent most of its renders
through a thread. Taken on the loop a turn at a time, the tiles took 0.81-0.90x of the relay's
CPU (median 0.86x, six alternated pairs of 15 s), with p50 and p95 latency lower in five pairs
of the six.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Hashable

SHARE = 0.25  # of each window, at most, the loop spends rendering
LONGEST = 0.003  # s: a render that may hold the loop up for longer goes to a thread
WINDOW = 1.0  # s: a fixed window, counted afresh once it has passed
EASING = 0.25  # how far a render's cost moves down towards a cheaper measure (up: at once)
KEEP = 256  # render kinds remembered (cameras x sets of renderings); the oldest go first


class Place(enum.Enum):
    LOOP = "on the loop, now"
    LATER = "on the loop, at a later turn: this one has rendered its share"
    THREAD = "in a codec thread"


class InlineBudget:
    """Chooses where each render runs, from what renders of the same kind cost before.

    A kind is whatever the caller says makes renders cost the same: the hub uses the camera and
    the set of renderings a frame is made into. ``place`` reserves nothing: a render it puts on
    the loop is reported with ``spent`` right after, and ``turn_over`` is called once the loop
    has moved on to other work (the hub schedules it with ``call_soon`` at the first render of
    a turn)."""

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
        self._spent = 0.0  # seconds rendered on the loop since ``_since``
        self._turn = 0.0  # seconds rendered on the loop in this turn of it

    def place(self, kind: Hashable) -> Place:
        """Where to render this one."""
        cost = self._cost.get(kind)
        if cost is None or cost > self.longest:
            return Place.THREAD
        now = self.clock()
        if now - self._since >= self.window:
            self._since, self._spent = now, 0.0
        if self._spent + cost > self.share * self.window:
            return Place.THREAD
        return Place.LATER if self._turn + cost > self.longest else Place.LOOP

    def spent(self, kind: Hashable, seconds: float, on_loop: bool) -> None:
        """A render of ``kind`` took ``seconds``: on the loop, the time it held the loop; in a
        thread, the CPU it took there (what it would cost the loop)."""
        old = self._cost.pop(kind, None)  # re-inserted: the dict's order is last use
        # a dearer render counts at once (the next is likely as dear), a cheaper one by degrees
        dearer = old is None or seconds >= old
        self._cost[kind] = seconds if dearer else old + EASING * (seconds - old)
        if len(self._cost) > KEEP:
            del self._cost[next(iter(self._cost))]
        if on_loop:
            self._spent += seconds
            self._turn += seconds

    def turn_over(self) -> None:
        """The loop has run other work since the last render on it."""
        self._turn = 0.0
