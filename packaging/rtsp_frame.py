"""Fetch one H.264 key frame from an RTSP URL with the standard library only (the container tests
use it where no player is installed, and under emulation):

    python3 packaging/rtsp_frame.py rtsp://127.0.0.1:21082/back_fisheye_image [--out f.h264]

DESCRIBE (the SDP must offer H.264), SETUP over TCP (RTP interleaved on the RTSP connection, as
on a CORE I/O), PLAY, then RTP packets (single NAL units, STAP-A, FU-A) until a whole access unit
with an IDR slice arrives. ``--out`` writes it as an Annex B stream with its SPS and PPS, which
``ffprobe -f h264`` decodes. One line on stdout; on failure one line on stderr and exit code 1.
A ``user:password@`` in the URL is sent as Basic authentication.
"""

from __future__ import annotations

import argparse
import base64
import re
import socket
import sys
import time
from urllib.parse import unquote, urlsplit, urlunsplit

START = b"\x00\x00\x00\x01"
IDR, SPS, PPS, STAP_A, FU_A = 5, 7, 8, 24, 28


class Rtsp:
    def __init__(self, url: str, timeout: float):
        parts = urlsplit(url)
        self.url = urlunsplit(parts._replace(netloc=parts.hostname + f":{parts.port or 554}"))
        self.auth = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.auth = "Basic " + base64.b64encode(pair.encode()).decode()
        self.sock = socket.create_connection((parts.hostname, parts.port or 554), timeout=timeout)
        self.buf = b""
        self.cseq = 0

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buf += chunk

    def _read(self, n: int) -> bytes:
        self._fill(n)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _skip_packet(self) -> tuple[int, bytes]:
        head = self._read(4)  # "$", channel, length
        return head[1], self._read(int.from_bytes(head[2:], "big"))

    def _response(self) -> tuple[int, dict[str, str], bytes]:
        self._fill(1)
        while self.buf[:1] == b"$":  # an interleaved packet before the response
            self._skip_packet()
            self._fill(1)
        while b"\r\n\r\n" not in self.buf:
            self._fill(len(self.buf) + 1)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, self._read(int(headers.get("content-length", 0)))

    def request(self, method: str, url: str, **headers: str) -> tuple[dict[str, str], bytes]:
        self.cseq += 1
        lines = [f"{method} {url} RTSP/1.0", f"CSeq: {self.cseq}", "User-Agent: spotrelay-test"]
        if self.auth:
            lines.append(f"Authorization: {self.auth}")
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        status, got, body = self._response()
        if status != 200:
            raise ConnectionError(f"{method} answered {status}")
        return got, body

    def packet(self) -> tuple[int, bytes]:
        self._fill(1)
        while self.buf[:1] != b"$":  # an RTSP message from the server: not expected here
            self._response()
            self._fill(1)
        return self._skip_packet()


def nals(payload: bytes, fu: list[bytes]) -> list[bytes]:
    """The NAL units an RTP payload completes (RFC 6184); ``fu`` holds a fragmented one."""
    kind = payload[0] & 0x1F
    if kind == STAP_A:
        out, i = [], 1
        while i + 2 <= len(payload):
            size = int.from_bytes(payload[i : i + 2], "big")
            out.append(payload[i + 2 : i + 2 + size])
            i += 2 + size
        return out
    if kind == FU_A:
        start, end = payload[1] & 0x80, payload[1] & 0x40
        if start:
            fu[:] = [bytes([(payload[0] & 0xE0) | (payload[1] & 0x1F)])]
        if fu:
            fu.append(payload[2:])
        if end and fu:
            whole = b"".join(fu)
            fu.clear()
            return [whole]
        return []
    return [payload]


def fetch(url: str, timeout: float) -> tuple[bytes, int, float]:
    """The first whole access unit with an IDR slice, as Annex B; packets read; seconds."""
    start = time.monotonic()
    rtsp = Rtsp(url, timeout)
    got, sdp = rtsp.request("DESCRIBE", rtsp.url, Accept="application/sdp")
    text = sdp.decode("latin-1")
    if not re.search(r"a=rtpmap:\d+ H264/90000", text):
        raise ValueError("the SDP offers no H.264 stream")
    video = text[text.index("m=video") :]
    control = re.search(r"a=control:(\S+)", video)
    base = got.get("content-base", rtsp.url).rstrip("/")
    track = control.group(1) if control else ""
    if not track.startswith("rtsp://"):
        track = f"{base}/{track}" if track and track != "*" else base
    params = [
        base64.b64decode(p)
        for m in re.finditer(r"sprop-parameter-sets=([^;\s]+)", video)
        for p in m.group(1).split(",")
    ]
    got, _ = rtsp.request("SETUP", track, Transport="RTP/AVP/TCP;unicast;interleaved=0-1")
    session = got["session"].split(";")[0]
    rtsp.request("PLAY", base, Session=session, Range="npt=0.000-")
    unit: list[bytes] = []
    fu: list[bytes] = []
    packets = 0
    while time.monotonic() - start < timeout:
        channel, data = rtsp.packet()
        if channel != 0 or len(data) < 12:
            continue  # RTCP
        packets += 1
        skip = 12 + 4 * (data[0] & 0x0F)
        if data[0] & 0x10:  # header extension
            skip += 4 + 4 * int.from_bytes(data[skip + 2 : skip + 4], "big")
        unit += nals(data[skip:], fu)
        if data[1] & 0x80:  # marker: the access unit is whole
            kinds = {n[0] & 0x1F for n in unit if n}
            if IDR in kinds:
                if SPS not in kinds or PPS not in kinds:
                    unit = params + unit
                with_start = b"".join(START + n for n in unit if n)
                rtsp.sock.close()
                return with_start, packets, time.monotonic() - start
            unit = []
    raise TimeoutError(f"no key frame in {timeout:.0f} s ({packets} RTP packets)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=30, help="seconds (default 30)")
    parser.add_argument("--out", help="write the key frame here (H.264 Annex B)")
    args = parser.parse_args()
    try:
        frame, packets, took = fetch(args.url, args.timeout)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        print(f"rtsp: FAIL: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    if args.out:
        with open(args.out, "wb") as f:
            f.write(frame)
    print(f"rtsp: H.264 key frame, {len(frame)} bytes, after {packets} RTP packets, {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
