"""Prometheus metrics: what the robot produced, what the relay got and served, how late, what broke.

Labels come only from bounded sets (source, image service, reason, stage, kind), never from
clients or addresses, so a busy relay cannot blow up a fleet's Prometheus; the per-client view is
``GET /api/state``. Every per-source series is created as soon as the source is known, so
dashboards and alerts see zeros rather than gaps before the first frame.

A private registry keeps the exposition to what is declared here, plus the process collector
(CPU, memory, open files): the relay's own cost is the first thing operators of a small payload
computer ask about.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)

# Around Spot's frame period (66.7 ms): a frame is on time, one or two periods late, or stalled.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.033,
    0.05,
    0.067,
    0.1,
    0.133,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
)
# Decoding or encoding one 640x480 frame takes about a millisecond; thumbnails less.
CODEC_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)

DROP_REASONS = ("slow_client", "decode_error", "stale", "image_error", "encoder_busy")
"""slow_client: a client skipped renderings while still writing an earlier one.
decode_error: a frame from the robot could not be decoded or rendered.
stale: a reply older than the newest frame already held (pipelined replies can overtake).
image_error: the robot answered with an error status for that image.
encoder_busy: a frame replaced an earlier one still waiting to be rendered."""
RPC_ERROR_KINDS = ("unavailable", "timeout", "unauthenticated", "image_error", "other")
STAGES = ("received", "sent")
DECODE_KINDS = ("jpeg", "raw", "rle")
ENCODE_KINDS = ("jpeg", "png")

FRAMES_RECEIVED = Counter(
    "spotrelay_frames_received_total",
    "Distinct frames fetched from the robot.",
    ["source"],
    registry=REGISTRY,
)
FRAMES_DUPLICATE = Counter(
    "spotrelay_frames_duplicate_total",
    "Replies that repeated a frame already seen (asked before the next capture existed).",
    ["source"],
    registry=REGISTRY,
)
FRAMES_SERVED = Counter(
    "spotrelay_frames_served_total",
    "Frames written to clients (each client counts).",
    ["source"],
    registry=REGISTRY,
)
BYTES_SENT = Counter(
    "spotrelay_bytes_sent_total", "Image bytes written to clients.", ["source"], registry=REGISTRY
)
FRAMES_DROPPED = Counter(
    "spotrelay_frames_dropped_total",
    "Frames not shown, by reason.",
    ["source", "reason"],
    registry=REGISTRY,
)
SOURCE_FPS = Gauge(
    "spotrelay_source_fps",
    "Frames received per second over the last few seconds (use rate() on the counter for truth).",
    ["source"],
    registry=REGISTRY,
)
FRAME_LATENCY = Histogram(
    "spotrelay_frame_latency_seconds",
    "From capture (robot clock, converted with time sync) to received from the robot / to the "
    "first byte written to a client.",
    ["source", "stage"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
POLL_DURATION = Histogram(
    "spotrelay_poll_duration_seconds",
    "GetImage round trip.",
    ["service"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
RPC_ERRORS = Counter(
    "spotrelay_rpc_errors_total",
    "Failed GetImage calls or images, by kind.",
    ["service", "kind"],
    registry=REGISTRY,
)
DECODE_SECONDS = Histogram(
    "spotrelay_decode_seconds",
    "Time to decode one frame.",
    ["kind"],
    buckets=CODEC_BUCKETS,
    registry=REGISTRY,
)
ENCODE_SECONDS = Histogram(
    "spotrelay_encode_seconds",
    "Time to render and encode one variant of one frame.",
    ["kind"],
    buckets=CODEC_BUCKETS,
    registry=REGISTRY,
)
CLIENTS = Gauge("spotrelay_clients", "Connected stream clients.", ["source"], registry=REGISTRY)
LAST_FRAME_TS = Gauge(
    "spotrelay_last_frame_timestamp_seconds",
    "Capture time (local epoch) of the newest frame received.",
    ["source"],
    registry=REGISTRY,
)
ROBOT_CONNECTED = Gauge(
    "spotrelay_robot_connected", "1 while logged in to the robot.", registry=REGISTRY
)
TIME_SYNC_SKEW = Gauge(
    "spotrelay_time_sync_skew_seconds",
    "Robot clock minus local clock (time sync).",
    registry=REGISTRY,
)
BUILD_INFO = Gauge(
    "spotrelay_build_info", "Always 1; the version is in the label.", ["version"], registry=REGISTRY
)
SOURCE_INFO = Gauge(
    "spotrelay_source_info",
    "Always 1; joins a source to its image service and type.",
    ["source", "service", "image_type"],
    registry=REGISTRY,
)

for _kind in DECODE_KINDS:
    DECODE_SECONDS.labels(kind=_kind)
for _kind in ENCODE_KINDS:
    ENCODE_SECONDS.labels(kind=_kind)


def register_sources(sources: Iterable[tuple[str, str, str]]) -> None:
    """Create every per-source series at zero; idempotent. Items: (source, service, image_type)."""
    for source, service, image_type in sources:
        FRAMES_RECEIVED.labels(source=source)
        FRAMES_DUPLICATE.labels(source=source)
        FRAMES_SERVED.labels(source=source)
        BYTES_SENT.labels(source=source)
        for reason in DROP_REASONS:
            FRAMES_DROPPED.labels(source=source, reason=reason)
        SOURCE_FPS.labels(source=source)
        for stage in STAGES:
            FRAME_LATENCY.labels(source=source, stage=stage)
        CLIENTS.labels(source=source)
        LAST_FRAME_TS.labels(source=source)
        SOURCE_INFO.labels(source=source, service=service, image_type=image_type).set(1)


def register_services(services: Iterable[str]) -> None:
    for service in services:
        POLL_DURATION.labels(service=service)
        for kind in RPC_ERROR_KINDS:
            RPC_ERRORS.labels(service=service, kind=kind)


def set_build_info(version: str) -> None:
    BUILD_INFO.labels(version=version).set(1)


def exposition() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class RateWindow:
    """Events per second over the last ``window`` seconds, in bounded memory.

    Keeps at most ``max_events`` timestamps: at 15 Hz and a 3 s window that is 45, so the default
    bound only matters for a client reading far faster than any camera.
    """

    def __init__(self, window: float = 3.0, max_events: int = 512):
        self.window = window
        self._marks: collections.deque[float] = collections.deque(maxlen=max_events)

    def mark(self, t: float) -> None:
        self._marks.append(t)

    def rate(self, now: float) -> float:
        marks = self._marks
        while marks and now - marks[0] > self.window:
            marks.popleft()
        if len(marks) < 2:
            return 0.0
        span = max(now - marks[0], marks[-1] - marks[0])
        return (len(marks) - 1) / span if span > 0 else 0.0
