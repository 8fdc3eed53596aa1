"""Adaptation (``adapt=1``): each viewer gets the rendering its link can carry. Pure: no I/O.

A viewer's link is measured by queue control (``http/link.py``: the bytes each frame took to
deliver, less the round trip). From that rate and the camera's frame rate, the adapter picks a
step of a small ladder that starts at what the viewer asked for (the *ceiling*: its width,
height, quality; it never goes above them) and goes down by lowering the JPEG quality first,
then the size, each step about half the bytes of the one before. It steps down at once when
frames no longer fit, and up only after the next step has fitted for a while, so that a link
shared with others does not flap.

The ladder is the same for every viewer with the same ceiling, so viewers on similar links share
one rendering (one encode a frame); the hub reserves a viewer's whole ladder when it is admitted,
so a step change never meets ``--max-variants``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from spotrelay.frames import RenderSpec
from spotrelay.plan import DEFAULT_QUALITY

# (share of the ceiling's width, JPEG quality at most): quality first, then size; each step
# about half the bytes of the one above for camera pictures (measured on the sim's fisheyes:
# 73, 62, ~28, 11, 5, 2.5 KB at 640x480).
STEPS = ((1.0, None), (1.0, 50), (0.7, 50), (0.5, 50), (0.35, 45), (0.25, 40))
MIN_WIDTH = 80  # smaller is no picture at all
FIT = 0.7  # a step fits while its frames use at most this share of the link at the frame rate
UP_FIT = 0.45  # ... and the next step up must fit this well ...
UP_AFTER = 4.0  # ... for this long (seconds) before going up; doubled for a step that did not
UP_AFTER_MAX = 64.0  # hold last time (a link shared with others looks free between their frames)
DOWN_AFTER = 2  # frames in a row that do not fit before going down
KEPT = 10.0  # seconds at a step after going up that count as success


def ladder(ceiling: RenderSpec, width: int, height: int) -> list[RenderSpec]:
    """The renderings a viewer asking for ``ceiling`` may get, best first. ``width`` x ``height``
    is what the ceiling renders to (after its own box and rotation): the steps' boxes are
    shares of it. The first step is the ceiling itself."""
    quality = ceiling.quality or DEFAULT_QUALITY  # the robot's own quality when passed through
    steps, seen = [ceiling], set()
    for share, top in STEPS[1:]:
        w = max(1, round(width * share))
        if w < MIN_WIDTH and share < 1.0:
            break
        q = min(quality, top) if top else quality
        key = (w, q)
        if key in seen or (share == 1.0 and q >= quality):
            continue
        seen.add(key)
        box = replace(ceiling, quality=q)
        if share < 1.0:
            box = replace(box, width=w, height=max(1, round(height * share)))
        steps.append(box)
    return steps


@dataclass
class _Sizes:
    """Bytes a frame takes at each step: measured where the viewer has been, guessed elsewhere
    (area and quality scale the bytes of the nearest measured step)."""

    measured: dict[int, float]

    def at(self, step: int, steps: list[tuple[float, int]]) -> float | None:
        if step in self.measured:
            return self.measured[step]
        if not self.measured:
            return None
        near = min(self.measured, key=lambda s: abs(s - step))
        (area0, q0), (area1, q1) = steps[near], steps[step]
        return self.measured[near] * (area1 / area0) ** 1.2 * _quality_factor(q1, q0)


def _quality_factor(q: float, q0: float) -> float:
    """Bytes at quality ``q`` over bytes at ``q0``: roughly linear in this range."""
    return (0.3 + 0.01 * q) / (0.3 + 0.01 * q0)


class Adapter:
    """Picks the step for one viewer. ``steps``: (area, quality) of each ladder step, for the
    guesses; ``clock``: seconds."""

    def __init__(self, steps: list[tuple[float, int]], clock: Callable[[], float]):
        self.steps, self.clock = steps, clock
        self.step = 0
        self._sizes = _Sizes({})
        self._misfits = 0
        self._up_since: float | None = None
        self._failed: dict[int, int] = {}  # step -> times it was gone up to and left again
        self._went_up: tuple[int, float] | None = None  # (step, when): a probe under way

    def delivered(self, step: int, nbytes: int, rate: float | None, fps: float) -> int:
        """A frame of ``nbytes`` at ``step`` reached the viewer; the link carries ``rate``
        bytes/s; frames come at ``fps``. Returns the step for the next frames."""
        old = self._sizes.measured.get(step)
        self._sizes.measured[step] = nbytes if old is None else 0.7 * old + 0.3 * nbytes
        if step != self.step or not rate or fps <= 0:
            return self.step
        budget = rate / fps  # bytes a frame may take for the link to keep up with the camera
        now = self.clock()
        if self._went_up is not None and now - self._went_up[1] >= KEPT:
            self._failed.pop(self._went_up[0], None)  # it held: that step is fine again
            self._went_up = None
        if self._sizes.measured[step] > FIT * budget:
            self._misfits += 1
            self._up_since = None
            if self._misfits >= DOWN_AFTER:
                self._misfits = 0
                if self._went_up is not None and self._went_up[0] == step:
                    self._failed[step] = self._failed.get(step, 0) + 1  # a probe that failed
                self._went_up = None
                self.step = self._fitting(budget, below=step)
            return self.step
        self._misfits = 0
        above = self._sizes.at(step - 1, self.steps) if step > 0 else None
        if above is None or above > UP_FIT * budget:
            self._up_since = None
            return self.step
        wait = min(UP_AFTER_MAX, UP_AFTER * 2 ** self._failed.get(step - 1, 0))
        if self._up_since is None:
            self._up_since = now
        elif now - self._up_since >= wait:
            self._up_since = None
            self.step = step - 1
            self._went_up = (self.step, now)
        return self.step

    def _fitting(self, budget: float, below: int) -> int:
        """The best step under ``below`` whose frames should fit; the last one if none does."""
        for step in range(below + 1, len(self.steps)):
            size = self._sizes.at(step, self.steps)
            if size is not None and size <= FIT * budget:
                return step
        return len(self.steps) - 1


def step_shapes(specs: list[RenderSpec], sizes: list[tuple[int, int]]) -> list[tuple[float, int]]:
    """(area, quality) of each step, from the sizes its plans render to."""
    return [
        (float(w * h), spec.quality or DEFAULT_QUALITY)
        for spec, (w, h) in zip(specs, sizes, strict=True)
    ]


def describe(width: int, height: int, quality: int | None) -> str:
    """How a rendering is named in headers and the viewer: ``320x240 q50``."""
    return f"{width}x{height}" + (f" q{quality}" if quality else "")


def fps_target(ceiling_fps: float | None, camera_fps: float) -> float:
    """The frame rate a viewer should get: the camera's, or less if it asked for less."""
    fps = camera_fps if camera_fps > 0 else 15.0
    return min(fps, ceiling_fps) if ceiling_fps else fps
