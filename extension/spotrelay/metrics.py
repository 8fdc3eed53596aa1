"""Prometheus metrics: what the robot produced, what the relay got and served, how late, what broke.

Labels come only from bounded sets (source, image service, reason, stage, kind), never from
clients or addresses, so a busy relay cannot blow up a fleet's Prometheus; the per-client view is
``GET /api/state``. Every per-source series is created as soon as the source is known, so
dashboards and alerts see zeros rather than gaps before the first frame.

Every metric lives on a registry the caller owns (``Metrics(registry)``): the relay's own, which
adds the process collector (CPU, memory, open files: the relay's cost is the first thing operators
of a small payload computer ask about), or a fresh one per test, so tests never share counters.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from spotrelay.adapt import STEPS
from spotrelay.frames import SourceInfo

# Fine where frames land (a capture becomes available 20-60 ms after it is taken), then around
# Spot's frame period (66.7 ms): on time, one or two periods late, or stalled.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.025,
    0.03,
    0.035,
    0.04,
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

DROP_REASONS = ("slow_link", "decode_error", "stale", "image_error", "encoder_busy")
"""slow_link: a viewer's link (or the viewer) had not taken the previous frame yet, so the newest
replaced the waiting one (queue control: skipped at the relay, never queued).
decode_error: a frame from the robot could not be decoded or rendered.
stale: a reply older than the newest frame already held (pipelined replies can overtake).
image_error: the robot answered with an error status for that image.
encoder_busy: a frame replaced an earlier one still waiting to be rendered."""
RPC_ERROR_KINDS = (
    "unavailable",
    "timeout",
    "unauthenticated",
    "permission_denied",
    "rate_limited",
    "image_error",
    "other",
)
STAGES = ("received", "sent")
DROP_CLIENT_REASONS = ("stalled",)
REFUSAL_REASONS = (
    "max_clients",
    "max_clients_per_host",
    "max_variants",
    "max_encoders",
    "snapshots_busy",
    "downloads_busy",
)
MISSION_ACTIONS = ("capture", "record", "unknown")
MISSION_REFUSALS = ("caller", "sessions", "busy", "captures_full", "limits")
MISSION_RESULTS = ("success", "failure", "stopped", "invalid")
"""success / failure: the job's outcome as the mission saw it; stopped: the mission stopped the
node first; invalid: parameters refused (STATUS_CUSTOM_PARAMS_ERROR), the job never started."""
DECODE_KINDS = ("jpeg", "raw", "rle")
ADAPT_STEPS = tuple(str(step) for step in range(len(STEPS)))  # an adaptive ladder's steps
ENCODE_KINDS = ("jpeg", "png", "h264")


class Metrics:
    """The relay's metrics on one registry; every stage is handed this object by ``main``."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = False):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        if process:
            ProcessCollector(registry=r)
        self.frames_received = Counter(
            "spotrelay_frames_received_total",
            "Distinct frames fetched from the robot.",
            ["source"],
            registry=r,
        )
        self.frames_duplicate = Counter(
            "spotrelay_frames_duplicate_total",
            "Replies that repeated a frame already seen (asked before the next capture existed).",
            ["source"],
            registry=r,
        )
        self.frames_served = Counter(
            "spotrelay_frames_served_total",
            "Frames written to clients (each client counts).",
            ["source"],
            registry=r,
        )
        self.bytes_sent = Counter(
            "spotrelay_bytes_sent_total", "Image bytes written to clients.", ["source"], registry=r
        )
        self.frames_dropped = Counter(
            "spotrelay_frames_dropped_total",
            "Frames not shown, by reason.",
            ["source", "reason"],
            registry=r,
        )
        self.source_fps = Gauge(
            "spotrelay_source_fps",
            "Frames received per second over the last few seconds (use rate() on the counter).",
            ["source"],
            registry=r,
        )
        self.frame_latency = Histogram(
            "spotrelay_frame_latency_seconds",
            "From capture (robot clock, converted with time sync) to received from the robot / "
            "to the first byte written to a client.",
            ["source", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.poll_duration = Histogram(
            "spotrelay_poll_duration_seconds",
            "GetImage round trip.",
            ["service"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rpc_errors = Counter(
            "spotrelay_rpc_errors_total",
            "Failed GetImage calls or images, by kind.",
            ["service", "kind"],
            registry=r,
        )
        self.image_errors = Counter(
            "spotrelay_image_errors_total",
            "Images the robot answered with an error status, by source and status.",
            ["source", "status"],
            registry=r,
        )
        self.service_ok = Gauge(
            "spotrelay_image_service_ok",
            "1 while an image service answers, 0 while it is failing and retried.",
            ["service"],
            registry=r,
        )
        self.decode_seconds = Histogram(
            "spotrelay_decode_seconds",
            "Time to decode one frame.",
            ["kind"],
            buckets=CODEC_BUCKETS,
            registry=r,
        )
        self.encode_seconds = Histogram(
            "spotrelay_encode_seconds",
            "Time to render and encode one variant of one frame (h264: x264's time per frame).",
            ["kind"],
            buckets=CODEC_BUCKETS,
            registry=r,
        )
        self.clients = Gauge(
            "spotrelay_clients", "Connected stream clients.", ["source"], registry=r
        )
        self.rtsp_clients = Gauge(
            "spotrelay_rtsp_clients",
            "Connected RTSP clients playing a stream.",
            ["source"],
            registry=r,
        )
        self.rtsp_bytes_sent = Counter(
            "spotrelay_rtsp_bytes_sent_total",
            "Bytes RTSP clients received (acknowledged), H.264 and RTP/RTSP framing.",
            ["source"],
            registry=r,
        )
        self.adapt_step_clients = Gauge(
            "spotrelay_adapt_step_clients",
            "Adaptive viewers (adapt=1) at each step of their ladder: 0 is what they asked for, "
            "higher steps are smaller renderings for a slower link.",
            ["source", "step"],
            registry=r,
        )
        self.last_frame_ts = Gauge(
            "spotrelay_last_frame_timestamp_seconds",
            "Capture time (local epoch) of the newest frame received.",
            ["source"],
            registry=r,
        )
        self.robot_connected = Gauge(
            "spotrelay_robot_connected", "1 while logged in to the robot.", registry=r
        )
        self.time_sync_skew = Gauge(
            "spotrelay_time_sync_skew_seconds",
            "Robot clock minus local clock (time sync).",
            registry=r,
        )
        self.build_info = Gauge(
            "spotrelay_build_info",
            "Always 1; the version is in the label.",
            ["version"],
            registry=r,
        )
        self.source_info = Gauge(
            "spotrelay_source_info",
            "Always 1; joins a source to its image service and type.",
            ["source", "service", "image_type"],
            registry=r,
        )
        self.clients_dropped = Counter(
            "spotrelay_clients_dropped_total",
            "Viewers the relay hung up on: stalled (made no progress for --client-timeout).",
            ["reason"],
            registry=r,
        )
        self.requests_refused = Counter(
            "spotrelay_requests_refused_total",
            "Requests answered 503 to keep the relay bounded, by reason.",
            ["reason"],
            registry=r,
        )
        self.task_restarts = Counter(
            "spotrelay_task_restarts_total",
            "Background tasks restarted after an unexpected error.",
            ["task"],
            registry=r,
        )
        self.mission_callbacks = Counter(
            "spotrelay_mission_callbacks_total",
            "Autowalk callback runs (capture / record), by result.",
            ["action", "result"],
            registry=r,
        )
        self.capture_bytes = Gauge(
            "spotrelay_capture_bytes",
            "Bytes in the captures folder, clips being recorded included.",
            registry=r,
        )
        self.captures = Gauge(
            "spotrelay_captures", "Captures (pictures and clips) kept.", registry=r
        )
        self.captures_deleted = Counter(
            "spotrelay_captures_deleted_total",
            "Captures deleted, oldest first, to stay under --captures-max-mb.",
            registry=r,
        )
        self.mission_refused = Counter(
            "spotrelay_mission_refused_total",
            "Autowalk callback calls refused to stay bounded, by reason: caller (not an allowed "
            "address), sessions, busy (jobs or clips at once), captures_full, limits (a value "
            "too long or not finite).",
            ["reason"],
            registry=r,
        )
        for reason in MISSION_REFUSALS:
            self.mission_refused.labels(reason=reason)
        self._services: set[str] = set()
        for action in MISSION_ACTIONS:
            for result in MISSION_RESULTS:
                self.mission_callbacks.labels(action=action, result=result)
        for reason in DROP_CLIENT_REASONS:
            self.clients_dropped.labels(reason=reason)
        for reason in REFUSAL_REASONS:
            self.requests_refused.labels(reason=reason)
        for kind in DECODE_KINDS:
            self.decode_seconds.labels(kind=kind)
        for kind in ENCODE_KINDS:
            self.encode_seconds.labels(kind=kind)

    def register_sources(self, sources: Iterable[tuple[str, str, str]]) -> None:
        """Create every per-source series at zero; idempotent. Items: (source, service, type)."""
        for source, service, image_type in sources:
            self.frames_received.labels(source=source)
            self.frames_duplicate.labels(source=source)
            self.frames_served.labels(source=source)
            self.bytes_sent.labels(source=source)
            for reason in DROP_REASONS:
                self.frames_dropped.labels(source=source, reason=reason)
            self.source_fps.labels(source=source)
            for stage in STAGES:
                self.frame_latency.labels(source=source, stage=stage)
            self.clients.labels(source=source)
            self.rtsp_clients.labels(source=source)
            self.rtsp_bytes_sent.labels(source=source)
            for step in ADAPT_STEPS:
                self.adapt_step_clients.labels(source=source, step=step)
            self.last_frame_ts.labels(source=source)
            self.source_info.labels(source=source, service=service, image_type=image_type).set(1)

    def sources_changed(
        self, sources: Mapping[str, SourceInfo], services: Mapping[str, bool]
    ) -> None:
        """The robot's offer changed: every series of a new source or service exists at zero,
        and each service's ``image_service_ok`` says whether it answers now (a service the robot
        no longer lists, or every service of a robot that was lost, reads 0)."""
        self.register_sources((s.name, s.service, s.image_type) for s in sources.values())
        self._services |= {s.service for s in sources.values()} | set(services)
        self.register_services(self._services)
        for service in self._services:
            self.service_ok.labels(service=service).set(1 if services.get(service) else 0)

    def register_services(self, services: Iterable[str]) -> None:
        for service in services:
            self.poll_duration.labels(service=service)
            for kind in RPC_ERROR_KINDS:
                self.rpc_errors.labels(service=service, kind=kind)

    def observe_codec(self, stage: str, kind: str, seconds: float) -> None:
        """Codec timings (called from worker threads; prometheus-client is thread-safe)."""
        hist = self.decode_seconds if stage == "decode" else self.encode_seconds
        hist.labels(kind=kind).observe(seconds)


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
