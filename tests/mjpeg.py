"""A small, strict MJPEG client for tests and benchmarks: parses parts as a real client would.

It checks what players rely on (boundary from the Content-Type, per-part Content-Type and
Content-Length, the body being exactly that long) instead of trusting the server.
"""

from __future__ import annotations

import http.client
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes
    received: float  # local epoch when the part was fully read

    @property
    def timestamp(self) -> float:
        return float(self.headers["x-timestamp"])

    @property
    def stale(self) -> bool:
        return self.headers.get("x-stale") == "1"


class MjpegError(AssertionError):
    pass


def open_stream(url: str, timeout: float = 10.0) -> tuple[http.client.HTTPResponse, bytes]:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.request("GET", u.path + ("?" + u.query if u.query else ""))
    resp = conn.getresponse()
    if resp.status != 200:
        raise MjpegError(f"{url}: HTTP {resp.status}: {resp.read()[:300]!r}")
    ctype = resp.getheader("Content-Type", "")
    if not ctype.startswith("multipart/x-mixed-replace"):
        raise MjpegError(f"Content-Type is {ctype!r}")
    params = dict(p.strip().split("=", 1) for p in ctype.split(";")[1:] if "=" in p)
    boundary = params.get("boundary", "").strip('"')
    if not boundary:
        raise MjpegError(f"no boundary in {ctype!r}")
    return resp, boundary.encode()


def _readline(resp: http.client.HTTPResponse) -> bytes:
    line = resp.readline(1024)
    if not line:
        raise EOFError("stream ended")
    return line


def parts(url: str, timeout: float = 10.0) -> Iterator[Part]:
    """Yield parts forever (until the caller stops or the stream ends)."""
    resp, boundary = open_stream(url, timeout)
    try:
        while True:
            line = _readline(resp)
            while line in (b"\r\n", b"\n"):
                line = _readline(resp)
            if line.rstrip(b"\r\n") != b"--" + boundary:
                raise MjpegError(f"expected boundary, got {line[:80]!r}")
            headers: dict[str, str] = {}
            while True:
                line = _readline(resp).rstrip(b"\r\n")
                if not line:
                    break
                key, _, value = line.decode("latin-1").partition(":")
                headers[key.strip().lower()] = value.strip()
            if headers.get("content-type") != "image/jpeg":
                raise MjpegError(f"part Content-Type {headers.get('content-type')!r}")
            length = int(headers["content-length"])
            body = resp.read(length)
            if len(body) != length:
                raise EOFError("stream ended inside a part")
            yield Part(headers, body, time.time())
    finally:
        resp.close()


def collect(url: str, seconds: float, timeout: float = 10.0) -> list[Part]:
    """Read parts for `seconds` (after the first part arrives)."""
    out: list[Part] = []
    end = None
    for part in parts(url, timeout):
        out.append(part)
        if end is None:
            end = time.time() + seconds
        if time.time() >= end:
            break
    return out


def distinct_fps(parts_: list[Part]) -> float:
    """Distinct capture times per second over the span the parts cover (stale repeats excluded)."""
    fresh = [p for p in parts_ if not p.stale]
    stamps = sorted({p.timestamp for p in fresh})
    if len(stamps) < 2:
        return 0.0
    span = fresh[-1].received - fresh[0].received
    return (len(stamps) - 1) / span if span > 0 else 0.0


def stamps_and_latencies(url: str, seconds: float) -> tuple[list, list]:
    """Fresh parts' capture times and capture-to-received latencies for ``seconds``."""
    stamps: list[float] = []
    latencies: list[float] = []
    end = None
    for p in parts(url, timeout=20):
        if p.stale:
            continue
        stamps.append(p.timestamp)
        latencies.append(p.received - p.timestamp)
        end = end or time.time() + seconds
        if time.time() > end:
            break
    return stamps, latencies
