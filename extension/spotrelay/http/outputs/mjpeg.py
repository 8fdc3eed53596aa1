"""MJPEG streams: ``GET /stream/{source}``, the format every client plays.

``multipart/x-mixed-replace`` with one JPEG per part is what browsers' ``<img>``, ffmpeg/ffplay,
VLC and OpenCV all read. Each part carries its own Content-Length (players rely on it) and the
capture time in ``X-Timestamp``, so a program can measure latency and spot stale repeats.
"""

from __future__ import annotations

from aiohttp import web

from spotrelay.http.outputs import stream
from spotrelay.http.outputs.common import Streams, parse_request, source_or_error
from spotrelay.hub import Client, Encoded

BOUNDARY = "spotrelayframe"
HEADERS = {
    "Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}",
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
    "Pragma": "no-cache",
    "X-Accel-Buffering": "no",
}


def part(enc: Encoded, extra: str = "") -> bytes:
    """One multipart part: boundary, headers, the JPEG, CRLF; one write, shared by all clients."""
    head = (
        f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(enc.data)}\r\n"
        f"X-Timestamp: {enc.acquired:.6f}\r\n"
        + ("X-Stale: 1\r\n" if enc.stale else "")
        + extra
        + "\r\n"
    ).encode()
    return b"".join((head, enc.data, b"\r\n"))


def add_routes(app: web.Application, streams: Streams) -> None:
    hub = streams.hub

    async def stream_parts(request: web.Request) -> web.StreamResponse:
        source = source_or_error(request, hub)
        ask = parse_request(request.query, snapshot=False)
        if request.method == "HEAD":  # what a GET would answer, without holding a viewer slot
            return web.Response(headers=HEADERS)
        client = stream.viewer(streams, request, "mjpeg", source, ask)
        resp = web.StreamResponse(headers=HEADERS)
        await resp.prepare(request)

        async def send(enc: Encoded, client: Client) -> int:
            if client.ladder:  # adaptive: says which rendering, and its step on this viewer's
                # ladder (viewers with other ceilings may share the rendering at another step)
                now = stream.rendering(client)
                extra = f"X-Rendering: {now['rendering']}\r\nX-Adapt-Step: {now['step']}\r\n"
                data = enc.framed(f"mjpeg-adapt-{now['step']}", lambda e: part(e, extra))
            else:
                data = enc.framed("mjpeg", part)
            await resp.write(data)
            return len(data)

        await stream.serve(streams, request, client, send)
        return resp

    app.router.add_get("/stream/{source}", stream_parts)
