"""The hub in-process, with the real codec on real JPEG frames: what each client is handed."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import cv2
import numpy as np
from bosdyn.api import image_pb2

from spotrelay.codec import ImageData, RenderSpec
from spotrelay.hub import Client, Hub
from spotrelay.poller import Frame

SOURCE = "back_fisheye_image"


def frame(seq: int) -> Frame:
    img = np.full((480, 640), seq * 20 % 256, np.uint8)
    data = cv2.imencode(".jpg", img)[1].tobytes()
    image = ImageData(
        data, image_pb2.Image.FORMAT_JPEG, image_pb2.Image.PIXEL_FORMAT_GREYSCALE_U8, 480, 640
    )
    t = 1_000_000.0 + seq / 15
    return Frame(SOURCE, "image", image, t, t + 2.5, t + 0.03, seq)


class GatedExecutor(ThreadPoolExecutor):
    """A real thread pool whose jobs start only when the test opens the gate."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.gate = threading.Event()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        def gated():
            self.gate.wait(5)
            return fn(*args, **kwargs)

        return super().submit(gated)


async def take(it, n: int, timeout: float = 5.0) -> list:
    return [await asyncio.wait_for(it.__anext__(), timeout) for _ in range(n)]


def test_a_client_joining_mid_render_does_not_make_others_see_a_frame_twice():
    async def scenario() -> tuple[list, list]:
        executor = GatedExecutor()
        hub = Hub(executor)
        small = hub.frames(
            SOURCE, RenderSpec(width=320), Client(0, "t", SOURCE, RenderSpec(), "", None)
        )
        executor.gate.set()
        hub.publish(frame(1))
        first = await take(small, 1)
        executor.gate.clear()
        hub.publish(frame(2))  # rendering of #2 is now held in the pool
        reading = asyncio.ensure_future(take(small, 2))  # the first client keeps reading
        await asyncio.sleep(0.05)
        other = hub.frames(
            SOURCE, RenderSpec(width=160), Client(0, "t", SOURCE, RenderSpec(), "", None)
        )
        joined = asyncio.ensure_future(take(other, 2))
        await asyncio.sleep(0.05)  # the joiner asks for #2 while it is still being rendered
        executor.gate.set()
        await asyncio.sleep(0.3)
        hub.publish(frame(3))
        rest = await reading
        hub.close()
        executor.shutdown()
        return [e.seq for e in first + rest], [e.seq for e in await joined]

    seen, joiner = asyncio.run(scenario())
    assert seen == [1, 2, 3]
    assert joiner == [2, 3]


def test_slow_client_gets_the_newest_frame_and_counts_what_it_skipped():
    async def scenario() -> tuple[list[int], int]:
        executor = ThreadPoolExecutor(2)
        hub = Hub(executor)
        client = Client(0, "t", SOURCE, RenderSpec(), "", None)
        frames = hub.frames(SOURCE, RenderSpec(), client)  # passthrough: published at once
        hub.publish(frame(1))
        got = await take(frames, 1)
        for seq in range(2, 7):  # five frames while the client is busy elsewhere
            hub.publish(frame(seq))
        got += await take(frames, 1)
        hub.close()
        executor.shutdown()
        return [e.seq for e in got], client.frames_dropped

    seqs, dropped = asyncio.run(scenario())
    assert seqs == [1, 6]
    assert dropped == 4


def test_passthrough_hands_every_client_the_same_bytes():
    async def scenario() -> list[bytes]:
        executor = ThreadPoolExecutor(2)
        hub = Hub(executor)
        its = [
            hub.frames(SOURCE, RenderSpec(), Client(0, "t", SOURCE, RenderSpec(), "", None))
            for _ in range(3)
        ]
        f = frame(1)
        hub.publish(f)
        out = [(await take(it, 1))[0].data for it in its]
        hub.close()
        executor.shutdown()
        return [f.image.data, *out]

    original, *served = asyncio.run(scenario())
    assert all(s is original for s in served)
