"""The hub in-process, with the real codec on real JPEG frames and a fake clock: what each client
is handed, when frames are shared, skipped, repeated as STALE, or re-planned."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import cv2
import numpy as np
import pytest

from spotrelay.frames import Frame, RenderSpec, SourceInfo
from spotrelay.hub import Client, Hub
from spotrelay.metrics import Metrics
from tests.inproc import FakeClock, GatedExecutor, make_frame
from tests.wait import async_wait_until

SOURCE = "back_fisheye_image"
INFO = SourceInfo(SOURCE, "image", 480, 640, "visual", ("GREYSCALE_U8",), ("JPEG", "RAW"))


def frame(seq: int, w: int = 640, h: int = 480) -> Frame:
    return make_frame(SOURCE, seq, w, h)


@contextlib.asynccontextmanager
async def hub_for_test(**kw):
    executor = GatedExecutor()
    watched: list[tuple[str, bool]] = []
    hub = Hub(executor, Metrics(), on_watch=lambda s, w: watched.append((s, w)), **kw)
    hub.set_sources([INFO])
    hub.watch_log = watched  # type: ignore[attr-defined]
    try:
        yield hub, executor
    finally:
        hub.close()
        executor.shutdown(wait=True)


def client(spec: RenderSpec | None = None, fps: float | None = None) -> Client:
    return Client("test", SOURCE, spec or RenderSpec(), "", fps)


async def take(it, n: int, timeout: float = 5.0) -> list:
    return [await asyncio.wait_for(it.__anext__(), timeout) for _ in range(n)]


def run(coro):
    return asyncio.run(coro)


def test_a_client_joining_mid_render_does_not_make_others_see_a_frame_twice():
    async def scenario() -> tuple[list, list]:
        async with hub_for_test() as (hub, executor):
            small = hub.frames(client(RenderSpec(width=320)))
            hub.publish(frame(1))
            first = await take(small, 1)
            executor.gate.clear()
            hub.publish(frame(2))  # rendering of #2 is now held in the pool
            reading = asyncio.ensure_future(take(small, 2))  # the first client keeps reading
            other = hub.frames(client(RenderSpec(width=160)))
            joined = asyncio.ensure_future(take(other, 2))
            # the joiner asks for #2 while it is still being rendered
            await async_wait_until(lambda: len(hub.viewers()) == 2, what="the joiner subscribed")
            executor.gate.set()
            await async_wait_until(lambda: hub.frame(SOURCE).seq == 2 and not hub._rendering)
            hub.publish(frame(3))
            rest = await reading
            return [e.seq for e in first + rest], [e.seq for e in await joined]

    seen, joiner = run(scenario())
    assert seen == [1, 2, 3]
    assert joiner == [2, 3]


def test_slow_client_gets_the_newest_frame_and_counts_what_it_skipped():
    async def scenario() -> tuple[list[int], int]:
        async with hub_for_test() as (hub, _):
            c = client()
            frames = hub.frames(c)  # passthrough: published at once
            hub.publish(frame(1))
            got = await take(frames, 1)
            for seq in range(2, 7):  # five frames while the client is busy elsewhere
                hub.publish(frame(seq))
            got += await take(frames, 1)
            return [e.seq for e in got], c.frames_dropped

    seqs, dropped = run(scenario())
    assert seqs == [1, 6]
    assert dropped == 4


def test_frames_passed_over_for_a_fresher_one_count_as_dropped_too():
    """On a link slower than the camera the viewer may wait for the next capture (hold): the
    frame it passes over then is a slow-link drop like the ones published during its write."""

    async def scenario() -> tuple[list[int], int]:
        async with hub_for_test() as (hub, _):
            c = client()
            asked: list[float] = []
            c.hold = lambda age: asked.append(age) or 5.0  # wait for the next capture
            frames = hub.frames(c)
            hub.publish(frame(1))
            got = await take(frames, 1)
            for seq in range(2, 5):  # three frames while the client writes #1
                hub.publish(frame(seq))
            later = asyncio.ensure_future(take(frames, 1))
            await async_wait_until(lambda: asked, what="the hub holding for a fresher capture")
            hub.publish(frame(5))  # ... which comes
            got += await later
            return [e.seq for e in got], c.frames_dropped

    seqs, dropped = run(scenario())
    assert seqs == [1, 5]
    assert dropped == 3


def test_passthrough_hands_every_client_the_same_bytes_and_renders_nothing():
    async def scenario() -> tuple[list[bytes], bytes, int]:
        async with hub_for_test() as (hub, executor):
            its = [hub.frames(client()) for _ in range(3)]
            f = frame(1)
            hub.publish(f)
            out = [(await take(it, 1))[0].data for it in its]
            return out, f.image.data, executor.jobs

    served, original, jobs = run(scenario())
    assert all(s is original for s in served)
    assert jobs == 0


def test_no_viewer_is_always_served_last():
    """Clients of one variant are written one after another; with many viewers the last gets
    each frame milliseconds after the first. Each should take its turn at the front."""

    async def scenario() -> list[list[int]]:
        async with hub_for_test() as (hub, _):
            order: dict[int, list[int]] = {}

            async def viewer(k: int) -> None:
                async with contextlib.aclosing(hub.frames(client())) as it:
                    async for enc in it:
                        order.setdefault(enc.seq, []).append(k)

            tasks = [asyncio.ensure_future(viewer(k)) for k in range(4)]
            await async_wait_until(lambda: len(hub.viewers()) == 4, what="four viewers")
            for seq in range(1, 9):
                hub.publish(frame(seq))
                await async_wait_until(lambda s=seq: len(order.get(s, ())) == 4, what=f"#{seq}")
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return [order[seq] for seq in range(1, 9)]

    rounds = run(scenario())
    assert all(sorted(r) == [0, 1, 2, 3] for r in rounds)  # every viewer had every frame
    last = [r[-1] for r in rounds]
    assert sorted(last[:4]) == sorted(last[4:]) == [0, 1, 2, 3]  # each last once in four frames


def test_requests_that_render_alike_share_one_render_per_frame():
    async def scenario() -> tuple[int, set[int]]:
        async with hub_for_test() as (hub, executor):
            specs = [RenderSpec(width=320), RenderSpec(height=240), RenderSpec(width=320)] * 4
            its = [hub.frames(client(s)) for s in specs]
            for seq in (1, 2, 3):
                hub.publish(frame(seq))
                got = [await take(it, 1) for it in its]
                await async_wait_until(lambda: not hub._rendering)
            return executor.jobs, {id(g[0].data) for g in got}

    jobs, distinct = run(scenario())
    assert jobs == 3  # one render per frame for twelve clients
    assert len(distinct) == 1


def test_watching_is_reported_once_per_source_and_undone_on_close():
    async def scenario() -> list:
        async with hub_for_test() as (hub, _):
            a = hub.frames(client())
            b = hub.frames(client(RenderSpec(width=100)))
            hub.publish(frame(1))
            await take(a, 1)
            await take(b, 1)
            assert hub.watched(SOURCE) == 2
            await a.aclose()
            await b.aclose()
            assert hub.watched(SOURCE) == 0 and not hub.viewers()
            return hub.watch_log  # type: ignore[attr-defined]

    assert run(scenario()) == [(SOURCE, True), (SOURCE, False)]


def test_stalled_stream_repeats_its_last_picture_marked_stale():
    async def scenario() -> list:
        clock = FakeClock()
        async with hub_for_test(clock=clock, stale_after=2.0) as (hub, _):
            it = hub.frames(client(RenderSpec(width=320)))
            hub.publish(frame(1))
            first = await take(it, 1)
            clock.now += 1.0
            await hub.repeat_stale()  # not stale yet: nothing published
            clock.now += 1.5
            await hub.repeat_stale()
            stale = await take(it, 1)
            clock.now += 0.5
            await hub.repeat_stale()  # repeats once a second, not at every check
            clock.now += 0.6
            await hub.repeat_stale()
            again = await take(it, 1)
            assert hub.is_stale(SOURCE)
            hub.publish(frame(2))
            fresh = await take(it, 1)
            assert not hub.is_stale(SOURCE)
            return first + stale + again + fresh

    got = run(scenario())
    assert [(e.seq, e.stale) for e in got] == [(1, False), (1, True), (1, True), (2, False)]
    assert got[1].acquired == got[0].acquired  # X-Timestamp repeats: a program can tell
    assert got[1].data != got[0].data  # a person can tell: the picture carries a banner


def test_a_camera_that_changes_resolution_is_replanned_for_its_clients():
    async def scenario() -> list[tuple[int, int]]:
        async with hub_for_test() as (hub, _):
            it = hub.frames(client(RenderSpec(width=320)))
            native = hub.frames(client())
            sizes = []
            for seq, (w, h) in enumerate([(640, 480), (1280, 720), (1280, 720)], start=1):
                hub.publish(frame(seq, w, h))
                enc = (await take(it, 1))[0]
                img = cv2.imdecode(np.frombuffer(enc.data, np.uint8), cv2.IMREAD_UNCHANGED)
                sizes.append((img.shape[1], img.shape[0]))
                assert (await take(native, 1))[0].seq == seq
            return sizes

    assert run(scenario()) == [(320, 240), (320, 180), (320, 180)]


def test_next_frame_waits_for_a_frame_newer_than_asked_and_times_out_cleanly():
    async def scenario() -> None:
        clock = FakeClock()
        async with hub_for_test(clock=clock) as (hub, _):
            hub.publish(frame(1))
            assert (await hub.next_frame(SOURCE, after=clock.now - 1)).seq == 1
            waiting = asyncio.ensure_future(hub.next_frame(SOURCE, after=clock.now, timeout=5))
            await async_wait_until(lambda: hub.watched(SOURCE) == 1, what="source polled")
            clock.now += 0.1
            hub.publish(frame(2))
            assert (await waiting).seq == 2
            assert hub.watched(SOURCE) == 0
            with pytest.raises(LookupError):
                await hub.next_frame(SOURCE, after=clock.now, timeout=0)

    run(scenario())


def test_with_a_budget_short_renders_run_on_the_loop_once_a_thread_has_measured_them(monkeypatch):
    """The first frame of a rendering is made in a codec thread (it has no cost yet); the next
    ones on the loop: held codec threads do not hold them up, and each is the real picture."""
    from spotrelay import codec
    from spotrelay.inline import InlineBudget

    async def scenario() -> tuple[list, int, int]:
        # longest=1 s: whatever the runner, a measured render is short enough for the loop
        async with hub_for_test(inline=InlineBudget(longest=1.0)) as (hub, executor):
            frames = hub.frames(client(RenderSpec(width=320)))
            hub.publish(frame(1))
            got = await take(frames, 1)
            await async_wait_until(lambda: not hub._rendering, what="the thread's result in")
            executor.gate.clear()  # the codec threads are held from here on
            for seq in (2, 3):
                hub.publish(frame(seq))
                got += await take(frames, 1)
            real = codec.render_many
            monkeypatch.setattr(codec, "render_many", lambda *a: 1 / 0)  # a bug, once
            hub.publish(frame(4))
            monkeypatch.setattr(codec, "render_many", real)
            hub.publish(frame(5))
            got += await take(frames, 1)
            dropped = hub.metrics.frames_dropped.labels(source=SOURCE, reason="decode_error")
            executor.gate.set()
            return got, executor.jobs, int(dropped._value.get())

    got, jobs, dropped = run(scenario())
    assert [e.seq for e in got] == [1, 2, 3, 5]
    assert jobs == 1
    assert dropped == 1  # the frame the bug hit, counted; the next one served
    for e in got:
        img = cv2.imdecode(np.frombuffer(e.data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.shape == (240, 320)
        assert abs(int(img.mean()) - e.seq * 20 % 256) <= 2


def test_a_source_rendering_in_a_thread_keeps_its_newest_waiting_frame_then_renders_on_the_loop():
    """While a thread renders a source's frame, the loop does not render the next ones: the
    newest waits (the one it replaces is counted as dropped), and once the thread's render is
    in, the waiting frame and the next are rendered on the loop."""
    from spotrelay.inline import InlineBudget

    async def scenario() -> tuple[list[int], int, float]:
        async with hub_for_test(inline=InlineBudget(longest=1.0)) as (hub, executor):
            frames = hub.frames(client(RenderSpec(width=320)))
            first = asyncio.ensure_future(take(frames, 1))
            await async_wait_until(lambda: hub.viewers(), what="the client subscribed")
            executor.gate.clear()
            hub.publish(frame(1))  # never measured: to a thread, held there
            hub.publish(frame(2))
            hub.publish(frame(3))  # replaces #2, which is never rendered
            executor.gate.set()
            got = await first  # the newest rendering once the client runs: #3, made on the loop
            hub.publish(frame(4))
            got += await take(frames, 1)
            busy = hub.metrics.frames_dropped.labels(source=SOURCE, reason="encoder_busy")
            return [e.seq for e in got], executor.jobs, busy._value.get()

    seqs, jobs, busy = run(scenario())
    assert seqs == [3, 4]
    assert jobs == 1  # only #1 went to a thread
    assert busy == 1


def test_a_reply_of_several_cameras_is_rendered_on_the_loop_a_turn_at_a_time():
    """The body cameras come in one GetImage reply, so their frames are published in one turn
    of the loop. That turn renders its share, and the rest wait for the next turns instead of
    going to the codec threads: with the threads held, every camera's frame still arrives."""
    from spotrelay.inline import InlineBudget

    class OneATurn(InlineBudget):
        """Every render costs 1 ms, and a turn renders for at most 1.5 ms: one a turn."""

        def spent(self, kind, seconds: float, on_loop: bool) -> None:
            super().spent(kind, 0.001, on_loop)

    names = ["left_fisheye_image", "right_fisheye_image", "back_fisheye_image"]

    async def scenario() -> tuple[list[int], int]:
        async with hub_for_test(inline=OneATurn(longest=0.0015)) as (hub, executor):
            hub.set_sources([dataclasses.replace(INFO, name=n) for n in names])
            tiles = [hub.frames(Client("test", n, RenderSpec(width=320), "", None)) for n in names]
            for n in names:  # each measured once, in a thread
                hub.publish(make_frame(n, 1))
            for tile in tiles:
                await take(tile, 1)
            await async_wait_until(lambda: not hub._rendering, what="the threads' results in")
            executor.gate.clear()  # the codec threads are held from here on
            for n in names:  # one reply: one turn
                hub.publish(make_frame(n, 2))
            got = [(await take(tile, 1))[0].seq for tile in tiles]
            executor.gate.set()
            return got, executor.jobs

    got, jobs = run(scenario())
    assert got == [2, 2, 2]
    assert jobs == 3  # the first frame of each camera only


def test_only_small_views_let_the_robot_send_a_coarse_jpeg_and_only_they_are_given_one():
    """The viewer page's tiles alone: the poller is told the camera may come coarse. A full-size
    viewer, or a snapshot waiting, undoes that, and neither is ever handed a coarse frame: they
    get the next full-quality one, while the tile goes on with every frame."""
    tile_spec = RenderSpec(width=320, quality=70)

    def coarse(seq: int) -> Frame:
        return dataclasses.replace(frame(seq), coarse=True)

    async def scenario() -> None:
        clock = FakeClock()
        told: list[bool] = []
        async with hub_for_test(clock=clock, on_coarse=lambda s, c: told.append(c)) as (hub, _):
            hub.publish(frame(1))
            tile = hub.frames(client(tile_spec))
            assert [e.seq for e in await take(tile, 1)] == [1]
            assert told == [True]
            hub.publish(coarse(2))
            assert [e.seq for e in await take(tile, 1)] == [2]

            full = hub.frames(client())  # passthrough: the robot's own bytes, at full quality
            first = asyncio.ensure_future(take(full, 1))
            await async_wait_until(lambda: told == [True, False], what="told: full quality")
            hub.publish(coarse(3))  # asked for before the full-size viewer came
            assert [e.seq for e in await take(tile, 1)] == [3]
            assert not first.done()
            hub.publish(frame(4))
            assert [e.seq for e in await first] == [4]
            assert [e.seq for e in await take(tile, 1)] == [4]
            await full.aclose()
            assert told == [True, False, True]

            hub.publish(coarse(5))
            assert hub.frame(SOURCE).seq == 5 and hub.frame(SOURCE, fine=True).seq == 4
            clock.now += 0.1
            snap = asyncio.ensure_future(hub.next_frame(SOURCE, after=clock.now - 0.05))
            await async_wait_until(lambda: told[-1] is False, what="told: full quality")
            clock.now += 0.1
            hub.publish(coarse(6))
            await asyncio.sleep(0)
            assert not snap.done()
            hub.publish(frame(7))
            assert (await snap).seq == 7
            assert told == [True, False, True, False, True]
            await tile.aclose()
            assert told == [True, False, True, False, True, False]

    run(scenario())


def test_a_view_that_is_not_small_keeps_the_robot_at_full_quality():
    """Among the tile's neighbours: a full-size re-encode, a sharp small one, a lossless one."""

    async def told_for(spec: RenderSpec) -> list[bool]:
        told: list[bool] = []
        async with hub_for_test(on_coarse=lambda s, c: told.append(c)) as (hub, _):
            hub.publish(frame(1))
            views = [
                hub.frames(client(RenderSpec(width=320, quality=70))),
                hub.frames(client(spec)),
            ]
            for view in views:
                await take(view, 1)
            both = list(told)
            for view in views:
                await view.aclose()
        return both

    async def scenario() -> None:
        assert await told_for(RenderSpec(width=160, quality=50)) == [True]
        for spec in (
            RenderSpec(quality=70),  # full size
            RenderSpec(width=320, quality=90),
            RenderSpec(width=320, format="png"),
            RenderSpec(width=480, quality=70),  # more than half size: decoded whole
        ):
            assert await told_for(spec) == [True, False], spec

    run(scenario())


def test_a_coarse_capture_sent_again_at_full_quality_reaches_only_the_views_that_waited():
    """The poller hands on a capture held coarse once more at full quality (a stalled camera):
    the full-size viewer gets it; the tile, which already showed that capture, gets nothing."""

    async def scenario() -> None:
        async with hub_for_test() as (hub, executor):
            tile = hub.frames(client(RenderSpec(width=320, quality=70)))
            hub.publish(dataclasses.replace(frame(1), coarse=True))
            assert [e.seq for e in await take(tile, 1)] == [1]
            full = hub.frames(client())
            waiting = asyncio.ensure_future(take(full, 1))
            await async_wait_until(lambda: len(hub.viewers()) == 2, what="the full view")
            renders = executor.jobs
            hub.publish(frame(1))  # the same capture, at full quality
            assert executor.jobs == renders  # not rendered again for the tile
            assert [e.seq for e in await waiting] == [1]
            assert hub.frame(SOURCE, fine=True).seq == 1
            for view in (tile, full):
                await view.aclose()

    run(scenario())
