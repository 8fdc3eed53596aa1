"""A viewer's link: queue control for every stream output, and what the link can carry.

A viewer behind a link slower than the cameras (the robot's Wi-Fi, a site radio) cannot take
every frame. Keeping "one frame per viewer" in the relay is not enough: a frame handed to the
socket waits in buffers the relay does not see (asyncio's transport buffer, the kernel's send
queue, the bottleneck's queue further on), and frames queued there are watched seconds late.
So an output writes a viewer's next frame only once the link has *taken* the previous one: its
bytes left the transport and the kernel's queue, and the other end acknowledged them (TCP_INFO:
``tcpi_notsent_bytes`` and ``tcpi_unacked``, the segments sent and not yet acknowledged; not
``bytes_sent - bytes_retrans - bytes_acked``, which tail-loss probes leave off after losses).
Meanwhile the hub keeps replacing the waiting frame with the newest one, so a slow link skips
frames at the relay, where skipping is cheap, and a viewer always gets the newest picture the
moment its link can carry one: at most one frame is ever in flight per viewer. Viewers that
share a link each have one frame in flight, so TCP shares the link between them fairly.

Waiting for the acknowledgement (rather than for a kernel low-water mark, TCP_NOTSENT_LOWAT)
is what keeps the queue at the bottleneck empty: a low-water mark bounds only the bytes not yet
sent, while a congestion window's worth of sent-but-undelivered bytes still queues at the slow
hop (measured: p95 ~530 ms on a 10 Mbit/s link shared by three viewers, against ~200 ms here).
The kernel is not told when data is acknowledged, so the relay looks (a getsockopt, a few µs)
at the moments the frame should be through by the link's measured rate.

``QueueControl`` is the decision, pure (readings in, "taken?" and "look again in" out), tested
with a fake clock; ``Link`` feeds it readings of a real socket. The per-frame measurements (bytes,
transfer time less the link's round trip) are the delivery rate that adaptation uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# struct tcp_info (linux/tcp.h): the fields used here and their offsets; present since Linux
# 4.6 (notsent_bytes, min_rtt), 4.1 (bytes_acked).
_TCP_INFO_LEN = 160  # up to min_rtt
_FIELDS = {
    "unacked": (24, "I"),  # segments
    "snd_mss": (16, "I"),
    "rtt": (68, "I"),  # µs
    "bytes_acked": (120, "Q"),
    "notsent_bytes": (144, "I"),
    "min_rtt": (148, "I"),  # µs
}
SLACK_SEGMENTS = 2  # unacknowledged segments allowed: a receiver may delay its last ack 40 ms
HOLD_FRACTION = 0.3  # wait for the next capture if it comes within this share of a transfer
LOOK_MIN, LOOK_MAX = 0.001, 0.020  # between looks at a frame still in flight
RATE_SAMPLES = 8  # frames the delivery rate is measured over


@dataclass(frozen=True, slots=True)
class Reading:
    """What a link holds at one moment: bytes handed over but not yet delivered (in the
    transport, in the kernel's queue, or sent and not acknowledged), its round trip, and how
    many bytes the other end has acknowledged so far (0 where unknown)."""

    backlog: int
    min_rtt: float  # seconds; 0 if unknown
    mss: int = 1448
    acked: int = 0


class QueueControl:
    """Whether the frame last written has been taken by the link, and how fast the link goes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._sent_at: float | None = None
        self._bytes = 0
        self._samples: deque[float] = deque(maxlen=RATE_SAMPLES)  # bytes/s, one per frame
        self.transfer = 0.0  # seconds the last frame took, write to acknowledgement
        self._last: Reading | None = None  # the last reading (None: a frame just written) ...
        self._progress_at = clock()  # ... and when the link last took a byte

    def wrote(self, nbytes: int) -> None:
        """A frame of ``nbytes`` was handed to the transport just now."""
        self._sent_at, self._bytes = self.clock(), nbytes
        self._progress_at, self._last = self._sent_at, None

    def stalled(self, reading: Reading) -> float:
        """Seconds since the link last took anything (acknowledged a byte). A slow link makes
        progress, however slowly; a viewer that stopped reading, or vanished, does not."""
        now = self.clock()
        last = self._last
        if last is None or reading.acked > last.acked or reading.backlog < last.backlog:
            self._progress_at = now
        self._last = reading
        return now - self._progress_at

    def taken(self, reading: Reading) -> bool:
        """Whether the link has taken the last frame (all but a couple of segments acknowledged).
        The first reading that says so ends the frame's measurement."""
        if reading.backlog > SLACK_SEGMENTS * reading.mss:
            return False
        if self._sent_at is not None:
            self.transfer = self.clock() - self._sent_at
            busy = self.transfer - reading.min_rtt  # what the link spent carrying the bytes
            if self._bytes >= reading.mss and busy > 0.001:
                self._samples.append(self._bytes / busy)
            self._sent_at = None
        return True

    def look_again(self, reading: Reading) -> float:
        """Seconds until the frame should be through at the measured rate: no sooner than needed,
        never so late that a fast link would idle."""
        rate = self.rate
        expect = reading.backlog / rate if rate else LOOK_MIN
        return min(LOOK_MAX, max(LOOK_MIN, 0.7 * expect))

    @property
    def rate(self) -> float | None:
        """What the link delivered per second while carrying recent frames (median), or None
        before a frame large enough to tell."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        return ordered[len(ordered) // 2]


def hold_for_fresh(age: float, period: float | None, transfer: float) -> float:
    """How long to wait for the next capture instead of sending the newest, ``age`` seconds old.

    On a link slower than the camera, the link frees at a random moment of the camera's period,
    so the newest frame has waited half a period on average before it even starts its long
    transfer. Waiting for the next capture, when it is due within a fraction of a transfer,
    sends a frame that has not waited at all; other viewers' frames use the link meanwhile.
    A link that keeps up (transfer shorter than the period) never waits."""
    if not period or transfer < period:
        return 0.0
    left = period - age
    if left <= 0 or left > HOLD_FRACTION * transfer:
        return 0.0
    return left + 0.005  # a little late rather than early: the capture's arrival jitters


def _tcp_socket(transport: asyncio.BaseTransport | None) -> socket.socket | None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock


def tcp_info(sock: Any) -> dict[str, int] | None:
    """The fields of TCP_INFO used here, or None where the kernel gives too little."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(raw) < _TCP_INFO_LEN:
        return None
    return {name: struct.unpack_from(fmt, raw, off)[0] for name, (off, fmt) in _FIELDS.items()}


class Link:
    """``QueueControl`` on a real connection. ``enabled=False`` keeps only the relay's own
    bound (the transport's buffer drained), as before queue control: the baseline of
    ``make bench-link``."""

    def __init__(
        self,
        transport: asyncio.BaseTransport | None,
        *,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.transport = transport
        self.control = QueueControl(clock)
        self._sock = _tcp_socket(transport) if enabled else None
        self.enabled = enabled

    def wrote(self, nbytes: int) -> None:
        self.control.wrote(nbytes)

    def reading(self) -> Reading:
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        info = tcp_info(self._sock) if self._sock is not None else None
        if info is None:
            return Reading(buffered, 0.0)
        mss = info["snd_mss"] or 1448
        backlog = buffered + info["notsent_bytes"] + info["unacked"] * mss
        return Reading(backlog, info["min_rtt"] / 1e6, mss, info["bytes_acked"])

    async def taken(self, stall_after: float) -> None:
        """Until the link has taken the last frame; TimeoutError if it takes nothing (no byte
        acknowledged) for ``stall_after`` seconds, however long a slow link needs for the whole
        frame. With queue control off, at once: the output's own write already waited for the
        transport to drain below its high-water mark, as before."""
        if not self.enabled:
            return
        while True:
            reading = self.reading()
            if self.control.taken(reading):
                return
            if self.control.stalled(reading) > stall_after:
                raise TimeoutError
            await asyncio.sleep(self.control.look_again(reading))

    @property
    def rate(self) -> float | None:
        return self.control.rate


def limit_send_buffer(transport: asyncio.BaseTransport | None, nbytes: int) -> None:
    """At most a few frames in the kernel for a viewer (the rest is skipped, never queued)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)
