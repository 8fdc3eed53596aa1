"""In-process relay parts for fast tests: the real app, outputs and hub on aiohttp's test server,
fed synthetic frames, with a registry of the test's own; a thread pool whose jobs wait for a
gate; a clock the test moves."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import cv2
import numpy as np
from aiohttp.test_utils import TestClient, TestServer
from bosdyn.api import image_pb2

from spotrelay.frames import Frame, ImageData, SourceInfo
from spotrelay.http.outputs.common import Streams
from spotrelay.hub import Hub
from spotrelay.main import SNAPSHOTS_WAITING, build_relay_app
from spotrelay.metrics import Metrics
from spotrelay.slots import Slots
from spotrelay.stills import Stills

I = image_pb2.Image  # noqa: E741
SOURCES = [
    SourceInfo(
        "frontleft_fisheye_image", "image", 480, 640, "visual", ("GREYSCALE_U8",), ("JPEG",)
    ),
    SourceInfo("back_fisheye_image", "image", 480, 640, "visual", ("GREYSCALE_U8",), ("JPEG",)),
    SourceInfo("back_depth", "image", 240, 424, "depth", ("DEPTH_U16",), ("RAW",)),
]


def make_frame(source: str, seq: int = 1, w: int = 640, h: int = 480, noise: bool = False) -> Frame:
    """A real JPEG (or RAW depth) frame; its grey level changes with ``seq``. With ``noise`` the
    JPEG is large (~200 KB), as a busy scene's is."""
    if source.endswith("depth"):
        depth = np.full((240, 424), 1500, np.uint16)
        image = ImageData(depth.tobytes(), I.FORMAT_RAW, I.PIXEL_FORMAT_DEPTH_U16, 240, 424)
    else:
        pixels = np.full((h, w), seq * 20 % 256, np.uint8)
        if noise:
            pixels = np.random.default_rng(seq).integers(0, 256, (h, w), dtype=np.uint8)
        data = cv2.imencode(".jpg", pixels)[1].tobytes()
        image = ImageData(data, I.FORMAT_JPEG, I.PIXEL_FORMAT_GREYSCALE_U8, h, w)
    return Frame(source, image, 1000.0 + seq, 1002.5 + seq, 1000.03 + seq, seq)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class GatedExecutor(ThreadPoolExecutor):
    """A real thread pool whose jobs start only while the gate is open."""

    def __init__(self, open_: bool = True) -> None:
        super().__init__(max_workers=2)
        self.gate = threading.Event()
        if open_:
            self.gate.set()
        self.jobs = 0

    def submit(self, fn, /, *args, **kwargs) -> Future:
        self.jobs += 1

        def gated():
            self.gate.wait(10)
            return fn(*args, **kwargs)

        return super().submit(gated)


@contextlib.asynccontextmanager
async def relay_app(
    *,
    token: str | None = None,
    sources=SOURCES,
    frames: bool = True,
    allow_origin: str | None = None,
    max_clients: int = 200,
    max_clients_per_host: int | None = None,
    max_variants: int = 8,
    client_timeout: float = 10.0,
    snapshot_executor: GatedExecutor | None = None,
):
    """(test client, hub, metrics) of a relay app with no robot behind it; snapshots render on
    ``snapshot_executor`` (a test may hold them at its gate)."""
    metrics = Metrics()
    executor = ThreadPoolExecutor(1)  # as the relay has on a 2-core computer
    snapshots = snapshot_executor or GatedExecutor()
    hub = Hub(executor, metrics, max_variants=max_variants)
    hub.set_sources(sources)
    status = {"connected": True, "address": "robot:443", "last_error": None}
    app = build_relay_app(
        Streams(hub, metrics, client_timeout),
        Stills("snapshot", SNAPSHOTS_WAITING, snapshots),
        lambda: status,
        token=token,
        allow_origin=allow_origin,
        slots=Slots(max_clients, max_clients_per_host or max_clients),
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    if frames:
        for s in sources:
            hub.publish(make_frame(s.name))
    try:
        yield client, hub, metrics
    finally:
        hub.close()
        snapshots.gate.set()
        await client.close()
        executor.shutdown(wait=True)
        snapshots.shutdown(wait=True)


def counted(metrics: Metrics, name: str, **labels: str) -> float:
    """One series' value, read through prometheus-client's public API (0 if it does not exist)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0
