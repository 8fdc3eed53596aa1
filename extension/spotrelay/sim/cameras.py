"""Simulated cameras: when each capture happens and becomes available, and what it shows.

Timing follows what a client of Spot's image services can observe (see the schedule's docstring in
``spotrelay/schedule.py``): captures on a grid at the camera's rate, each a little off it (capture
jitter), available to GetImage a fixed delay after its acquisition time; GetImage returns the
newest available capture. The jitter of capture k is a hash of k, so every request that gets
capture k sees the same acquisition time, as on a robot. Cameras on one hardware trigger (the
body's) share their grid, jitter and all.

Pictures are a loop of frames with a moving object and a counter, rendered on first use and cached
with their encodings, so serving costs a protobuf copy. Depth has holes of 0 and a band of 65535
(no return), both of which mean "no data" to the SDK (bosdyn.client.image, MAX_DEPTH_IMAGE_RANGE).
"""

from __future__ import annotations

import math
import threading
import zlib
from dataclasses import dataclass, field

import cv2
import numpy as np
from bosdyn.api import image_pb2

Image = image_pb2.Image
VISUAL, DEPTH = image_pb2.ImageSource.IMAGE_TYPE_VISUAL, image_pb2.ImageSource.IMAGE_TYPE_DEPTH
JPEG_RAW = (Image.FORMAT_JPEG, Image.FORMAT_RAW)
RAW_RLE = (Image.FORMAT_RAW, Image.FORMAT_RLE)
LOOP_FRAMES = 30  # 2 s of distinct pictures at 15 Hz
# Uncompressed frames loop sooner: kept whole, the depth cameras' 30 would hold 140 MB, too much
# beside the relay in the container's 512 MB (make run's simulated robot runs there too).
RAW_LOOP_FRAMES = 10


@dataclass
class Camera:
    """One image source: what ListImageSources says, and how it captures."""

    name: str
    cols: int
    rows: int
    pixel_format: int
    image_type: int
    formats: tuple[int, ...]  # the first is the default
    rate: float = 15.0
    available_after: float = 0.025
    jitter: float = 0.002
    phase: float = 0.0  # seconds into the period of capture 0
    trigger: str = ""  # cameras on one hardware trigger share it: their captures coincide
    depth_scale: float = 1000.0
    # rate changes keep capture indices running: capture k >= first_k is at
    # epoch_t + (k - epoch_k) / rate (plus phase and jitter); ``before`` holds the same four
    # (first_k, epoch_k, epoch_t, rate) for the captures before the last change
    first_k: int = 0
    epoch_k: int = 0
    epoch_t: float = 0.0
    before: tuple[int, int, float, float] | None = None
    stalled_at: int | None = None
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def is_depth(self) -> bool:
        return self.pixel_format == Image.PIXEL_FORMAT_DEPTH_U16

    def _segment(self, k: int) -> tuple[int, int, float, float]:
        if k < self.first_k and self.before is not None:
            return self.before
        return self.first_k, self.epoch_k, self.epoch_t, self.rate

    def _slot(self, k: int) -> tuple[float, float]:
        """Capture k's place on its grid (its time without phase or jitter), and the rate."""
        _, epoch_k, epoch_t, rate = self._segment(k)
        return epoch_t + (k - epoch_k) / rate, rate

    def capture_time(self, k: int) -> float:
        """Acquisition time of capture k on the robot's clock. The jitter is drawn per slot of
        the grid, not per index, so cameras on one trigger share it whatever their indices."""
        slot, rate = self._slot(k)
        trigger = (self.trigger or self.name).encode()
        frac = ((round(slot * rate) * 2654435761 + zlib.crc32(trigger)) & 0xFFFFFFFF) / 2**32
        jitter = min(self.jitter, 0.25 / rate) * (2 * frac - 1)
        return slot + self.phase + jitter

    def newest(self, robot_now: float) -> tuple[int, float]:
        """(index, acquisition time) of the newest capture available at ``robot_now``."""
        with self.lock:
            if self.stalled_at is not None:
                return self.stalled_at, self.capture_time(self.stalled_at)
            base = robot_now - self.available_after - self.epoch_t - self.phase
            # before the current segment's first capture, count down from it through the last
            k = max(self.epoch_k + math.floor(base * self.rate) + 1, self.first_k)
            while self.capture_time(k) + self.available_after > robot_now:
                k -= 1
            return k, self.capture_time(k)

    def set_rate(self, rate: float, robot_now: float) -> None:
        """Change the rate from the next capture on (a camera mode change)."""
        k = self._taken(robot_now)
        with self.lock:
            self._begin(k + 1, k + 1, self._slot(k + 1)[0], rate)

    def rejoin(self, rate: float, robot_now: float) -> None:
        """Back at ``rate`` on the grid the camera started on (slot j at j / rate), from its
        first slot not before the next capture: a camera whose rate changed and changed back
        is on its trigger again, in step with the others (to the bit: the same j / rate)."""
        k = self._taken(robot_now)
        with self.lock:
            j = math.ceil(self._slot(k + 1)[0] * rate - 1e-3)
            self._begin(k + 1, k + 1 - j, 0.0, rate)

    def _taken(self, robot_now: float) -> int:
        """The newest capture taken by now, available or not."""
        return self.newest(robot_now + self.available_after)[0]

    def _begin(self, first_k: int, epoch_k: int, epoch_t: float, rate: float) -> None:
        if first_k > self.first_k:  # the current segment has begun: it becomes the one before
            self.before = (self.first_k, self.epoch_k, self.epoch_t, self.rate)
        self.first_k, self.epoch_k, self.epoch_t, self.rate = first_k, epoch_k, epoch_t, rate

    def stall(self, robot_now: float | None) -> None:
        """Stop capturing (keep returning the newest capture), or resume with None."""
        k = self.newest(robot_now)[0] if robot_now is not None else None
        with self.lock:
            self.stalled_at = k

    def fill_source(self, src: image_pb2.ImageSource) -> None:
        src.name, src.cols, src.rows = self.name, self.cols, self.rows
        src.image_type = self.image_type
        src.pixel_formats.append(self.pixel_format)
        src.image_formats.extend(self.formats)
        if self.is_depth:
            src.depth_scale = self.depth_scale
        src.pinhole.intrinsics.focal_length.x = src.pinhole.intrinsics.focal_length.y = 330.0
        src.pinhole.intrinsics.principal_point.x = self.cols / 2
        src.pinhole.intrinsics.principal_point.y = self.rows / 2


def _camera(name: str, size: tuple[int, int], pixel: int, **kw) -> Camera:
    kind = DEPTH if pixel == Image.PIXEL_FORMAT_DEPTH_U16 else VISUAL
    formats = RAW_RLE if kind == DEPTH else JPEG_RAW
    return Camera(name, size[0], size[1], pixel, kind, formats, **kw)


BODY = ("frontleft", "frontright", "left", "right", "back")
GREY8, RGB8 = Image.PIXEL_FORMAT_GREYSCALE_U8, Image.PIXEL_FORMAT_RGB_U8
DEPTH16, GREY16 = Image.PIXEL_FORMAT_DEPTH_U16, Image.PIXEL_FORMAT_GREYSCALE_U16


def spot_cameras(*, synced: bool = True) -> list[Camera]:
    """The robot's own ``image`` service, as listed on a Spot with an arm (source names from
    spot-sdk docs/python/understanding_spot_programming.md and the get_depth_plus_visual_image
    example; sizes as reported by robots, since Boston Dynamics does not document them).

    The body's cameras capture together, as we read "Multiple images requested in a single RPC
    will be hardware time-synced with one another" (the same document, about this service; it
    could also mean one clock, see the README's benchmarks): one grid of captures, jitter and
    all. The hand's cameras keep phases of their own, the cautious choice. Not ``synced``:
    every camera on its own phase, the worst case for batching sources into one GetImage (like
    this simulator before it modelled the trigger)."""
    body, trigger = [], "body" if synced else ""
    for n in BODY:
        body.append(_camera(f"{n}_fisheye_image", (640, 480), GREY8, trigger=trigger))
        body.append(_camera(f"{n}_depth", (424, 240), DEPTH16, trigger=trigger))
        body.append(_camera(f"{n}_depth_in_visual_frame", (640, 480), DEPTH16, trigger=trigger))
    hand = [
        _camera("hand_color_image", (640, 480), RGB8),
        _camera("hand_image", (224, 171), GREY8),
        _camera("hand_depth", (224, 171), DEPTH16),
        _camera("hand_depth_in_hand_color_frame", (640, 480), DEPTH16),
        _camera("hand_color_in_hand_depth_frame", (224, 171), RGB8),
    ]
    own = hand if synced else body + hand  # the body's trigger at phase 0
    for i, cam in enumerate(own, start=1):
        cam.phase = (i * 0.37 % 1.0) / cam.rate
    return body + hand


def spot_cam_cameras() -> list[Camera]:
    """A Spot CAM-like service: a panorama and a PTZ camera, slower and larger."""
    return [
        _camera("spot-cam-pano", (1280, 640), RGB8, rate=10.0, available_after=0.05),
        _camera("spot-cam-ptz", (1280, 720), RGB8, rate=10.0, available_after=0.04, phase=0.03),
    ]


def payload_cameras(rate: float = 5.0) -> list[Camera]:
    """A payload's camera service (say a thermal camera): 16-bit greyscale, RAW, 5 Hz."""
    cam = Camera("payload-thermal", 320, 240, GREY16, VISUAL, (Image.FORMAT_RAW,), rate=rate)
    cam.available_after = 0.04
    return [cam]


# -- pictures -------------------------------------------------------------------------------------


def loop_frames(fmt: int) -> int:
    """How many distinct pictures a camera's loop has in this format."""
    return LOOP_FRAMES if fmt == Image.FORMAT_JPEG else RAW_LOOP_FRAMES


def _scene(cam: Camera, k: int, loop: int = LOOP_FRAMES) -> np.ndarray:
    """Frame k of a loop of ``loop`` at the camera's current size, in the pixel format it
    sends."""
    seed = sum(map(ord, cam.name))
    rng = np.random.default_rng(seed)
    h, w = cam.rows, cam.cols
    yy, _ = np.mgrid[0:h, 0:w]
    t = 2 * math.pi * (k % loop) / loop
    if cam.is_depth:
        d = (600 + 3400 * (1 - yy / h) ** 2).astype(np.uint16)  # far at the top, near below
        cx = int((0.15 + 0.7 * (0.5 + 0.5 * math.sin(t))) * w)
        top = h // 3
        cv2.rectangle(d, (cx - w // 14, top), (cx + w // 14, top + h // 3), 1200 + seed % 800, -1)
        d[rng.random((h, w)) < 0.02] = 0  # holes: no data
        d[: max(1, h // 12)] = 65535  # no return (the sky, a window)
        return d
    if cam.pixel_format == GREY16:
        ramp = np.linspace(20000, 30000, w, dtype=np.float32)[None, :].repeat(h, 0)
        cx, cy = int(w / 2 + w / 3 * math.cos(t)), int(h / 2 + h / 3 * math.sin(t))
        cv2.circle(ramp, (cx, cy), max(4, h // 8), 34000, -1)
        return ramp.astype(np.uint16)
    base = ((np.arange(w)[None, :] * 0.25 + yy * 0.15) % 64 + 40).astype(np.uint8)
    base = cv2.add(base, rng.integers(0, 50, (h, w), dtype=np.uint8))
    for _ in range(12):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        size = int(rng.integers(w // 30 + 2, w // 7 + 3))
        cv2.rectangle(base, (x, y), (x + size, y + size), int(rng.integers(60, 220)), -1)
    img = cv2.applyColorMap(base, cv2.COLORMAP_OCEAN) if cam.pixel_format == RGB8 else base
    centre = (int(w / 2 + w / 3 * math.cos(t)), int(h / 2 + h / 3 * math.sin(t)))
    colour = (40, 200, 255) if img.ndim == 3 else 255
    scale = max(0.4, w / 700)
    cv2.circle(img, centre, max(6, h // 13), colour, -1)
    cv2.putText(img, cam.name, (16, int(36 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 2)
    label = f"sim #{k % loop:02d}"
    cv2.putText(img, label, (16, h - 20), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 2)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if img.ndim == 3 else img  # the robot sends RGB


def rle_encode(pixels: np.ndarray, bytes_per_pixel: int) -> bytes:
    """image.proto RLE: a count byte (1..255) then one pixel, for each run."""
    flat = np.ascontiguousarray(pixels).view(np.uint8).reshape(-1, bytes_per_pixel)
    change = np.any(flat[1:] != flat[:-1], axis=1)
    starts = np.concatenate(([0], np.nonzero(change)[0] + 1))
    lengths = np.diff(np.concatenate((starts, [len(flat)])))
    records = []
    for start, length in zip(starts, lengths, strict=True):
        value = flat[start].tobytes()
        while length > 0:
            n = min(255, int(length))
            records.append(bytes([n]) + value)
            length -= n
    return b"".join(records)


class Content:
    """Rendered frames and their encodings, made on first use and kept (bounded)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, bytes] = {}
        self._lock = threading.Lock()

    def data(self, cam: Camera, fmt: int, quality: int, k: int) -> bytes:
        key = (cam.name, cam.cols, cam.rows, fmt, quality if fmt == Image.FORMAT_JPEG else 0)
        loop = loop_frames(fmt)
        key += (k % loop,)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        img = _scene(cam, k, loop)
        if fmt == Image.FORMAT_JPEG:
            bgr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
            data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
        elif fmt == Image.FORMAT_RLE:
            bpp = img.dtype.itemsize * (img.shape[2] if img.ndim == 3 else 1)
            data = rle_encode(img.astype("<u2") if cam.is_depth else img, bpp)
        elif cam.pixel_format == GREY16:
            data = img.astype(">u2").tobytes()  # image.proto: GREYSCALE_U16 is big-endian
        else:
            data = img.astype("<u2").tobytes() if cam.is_depth else img.tobytes()
        with self._lock:
            if len(self._cache) > 3000:  # many qualities asked: start again rather than grow
                self._cache.clear()
            self._cache[key] = data
        return data
