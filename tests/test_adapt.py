"""Adaptation, in-process: the ladder a viewer may be moved along, the adapter's choice of step
from measured deliveries (fake clock), and the hub keeping a viewer's whole ladder reserved."""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest

from spotrelay import adapt
from spotrelay.frames import RenderSpec
from spotrelay.hub import Client, Hub, TooManyVariants
from spotrelay.metrics import Metrics
from spotrelay.plan import plan
from tests.inproc import SOURCES, counted, make_frame


def test_the_ladder_lowers_quality_first_then_size_and_never_goes_above_the_ceiling():
    steps = adapt.ladder(RenderSpec(), 640, 480)  # passthrough asked for
    assert steps[0] == RenderSpec()
    assert steps[1] == RenderSpec(quality=50)  # the same size, a lower quality
    widths = [s.width for s in steps[2:]]
    assert widths == sorted(widths, reverse=True) and widths[0] < 640 and widths[-1] >= 80
    assert all(s.quality <= 50 for s in steps[1:])


def test_the_ladder_keeps_the_ceilings_rotation_and_colours_and_stops_at_a_useful_size():
    ceiling = RenderSpec(width=320, quality=40, rotate="auto", colormap="jet")
    steps = adapt.ladder(ceiling, 320, 240)
    assert steps[0] == ceiling
    assert all(s.rotate == "auto" and s.colormap == "jet" for s in steps)
    assert all(s.quality <= 40 for s in steps)  # a ceiling on quality too
    assert RenderSpec(width=320, quality=40, rotate="auto", colormap="jet") not in steps[1:]
    assert min(s.width for s in steps[1:]) >= adapt.MIN_WIDTH
    assert len(adapt.ladder(RenderSpec(width=100), 100, 75)) == 2  # nothing useful below


def test_every_step_renders_smaller_than_the_one_above():
    shape = make_frame("back_fisheye_image").image.shape
    sizes = [plan("x", shape, s).out_size for s in adapt.ladder(RenderSpec(), 640, 480)]
    areas = [w * h for w, h in sizes]
    assert areas == sorted(areas, reverse=True)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


STEPS = [(640 * 480, 80), (640 * 480, 50), (448 * 336, 50), (320 * 240, 50), (160 * 120, 40)]
SIZES = [75_000, 60_000, 30_000, 11_000, 3_000]  # bytes a frame takes at each step


def run(adapter: adapt.Adapter, clock: Clock, rate: float, frames: int, fps: float = 15.0):
    """Frames delivered at ``rate`` bytes/s; the steps the adapter chose, one per frame."""
    chosen = []
    for _ in range(frames):
        step = adapter.step
        adapter.delivered(step, SIZES[step], rate, fps)
        chosen.append(adapter.step)
        clock.now += 1 / fps
    return chosen


def test_a_link_too_slow_for_the_ceiling_moves_down_within_two_frames_to_a_step_that_fits():
    clock = Clock()
    adapter = adapt.Adapter(STEPS, clock)
    chosen = run(adapter, clock, rate=400_000, frames=2)  # 3.2 Mbit/s: 26 KB a frame at 15 fps
    assert chosen[0] == 0 and chosen[1] > 0
    # from 75 KB measured at step 0 it guesses the others, and lands where frames fit
    run(adapter, clock, rate=400_000, frames=30)
    assert SIZES[adapter.step] <= adapt.FIT * 400_000 / 15 and adapter.step <= 3


def test_it_goes_back_up_only_after_the_link_has_had_room_for_a_while():
    clock = Clock()
    adapter = adapt.Adapter(STEPS, clock)
    run(adapter, clock, rate=100_000, frames=20)
    low = adapter.step
    assert low == len(STEPS) - 1
    chosen = run(adapter, clock, rate=10_000_000, frames=int(15 * adapt.UP_AFTER) - 2)
    assert set(chosen) == {low}  # not yet: the room must last
    chosen = run(adapter, clock, rate=10_000_000, frames=15 * 30)
    assert chosen[-1] == 0  # one step at a time, back to what the viewer asked for
    ups = [b for a, b in itertools.pairwise(chosen) if b != a]
    assert all(b == a - 1 for a, b in zip([low, *ups], ups, strict=False))


def test_a_link_that_just_fits_does_not_flap():
    clock = Clock()
    adapter = adapt.Adapter(STEPS, clock)
    rate = SIZES[2] * 15 / (adapt.FIT - 0.05)  # step 2 fits, step 1 never fits well enough
    chosen = run(adapter, clock, rate=rate, frames=15 * 60)
    settled = chosen[15 * 5 :]
    assert set(settled) == {2}, sorted(set(settled))


def test_the_fps_target_is_the_cameras_or_the_viewers_ceiling():
    assert adapt.fps_target(None, 15.0) == 15.0
    assert adapt.fps_target(5.0, 15.0) == 5.0
    assert adapt.fps_target(None, 0.0) == 15.0  # rate not known yet


def test_an_adaptive_viewers_ladder_is_reserved_so_its_steps_never_meet_the_limit():
    async def scenario():
        metrics = Metrics()
        hub = Hub(ThreadPoolExecutor(2), metrics, max_variants=7)
        hub.set_sources(SOURCES)
        source = "back_fisheye_image"
        hub.publish(make_frame(source))
        ladder = adapt.ladder(RenderSpec(), 640, 480)
        hub.admit(source, ladder)  # six renderings reserved, one more allowed
        viewer = Client("test", source, ladder[0], "", None, ladder=tuple(ladder))
        frames = hub.frames(viewer)
        await anext(frames)
        other = Client("test", source, RenderSpec(width=100), "", None)
        hub.admit(source, [other.spec])
        others = hub.frames(other)
        await anext(others)
        with pytest.raises(TooManyVariants):  # an eighth rendering
            hub.admit(source, [RenderSpec(width=200)])
        for step in range(1, len(ladder)):  # but every step of the ladder is served
            hub.move(viewer, step)
            hub.publish(make_frame(source, seq=step + 1))
            enc = await asyncio.wait_for(anext(frames), 5)
            w, _ = viewer.variant.plan.out_size
            assert enc.data and w == plan(source, hub.shape(source), ladder[step]).out_size[0]
        steps = {
            s: counted(metrics, "spotrelay_adapt_step_clients", source=source, step=str(s))
            for s in range(len(ladder))
        }
        await frames.aclose()
        await others.aclose()
        hub.close()
        return steps, len(ladder)

    steps, n = asyncio.run(scenario())
    assert steps == {s: (1.0 if s == n - 1 else 0.0) for s in range(n)}


def test_a_step_that_did_not_hold_is_tried_again_ever_more_rarely():
    """A link shared with others looks free between their frames, so the step above looks fine
    until it is taken: each failed try doubles the wait before the next (a flapping viewer
    would make everyone's frames late)."""
    clock = Clock()
    adapter = adapt.Adapter(STEPS, clock)
    roomy, crowded = 10_000_000, 300_000  # what step 3 measures; what step 2 then finds
    tries = []
    for _ in range(15 * 200):  # 200 s
        step = adapter.step
        rate = crowded if step <= 2 else roomy
        adapter.delivered(step, SIZES[step], rate, 15.0)
        if adapter.step == 2 and step == 3:
            tries.append(clock.now)
        clock.now += 1 / 15
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert len(tries) >= 3, tries
    assert all(b > min(1.5 * a, adapt.UP_AFTER_MAX) for a, b in itertools.pairwise(gaps)), gaps
    assert len(tries) <= 7  # not every 4 s: 50 tries in 200 s
