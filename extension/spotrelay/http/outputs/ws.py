"""WebSocket feed: ``GET /ws/{source}``, one per tile of the viewer page.

Browsers allow only six HTTP/1.1 connections per host and Spot has eleven cameras, so the viewer
cannot use one MJPEG ``<img>`` per tile; WebSockets do not count against that limit. Per frame a
JSON text message with its metadata, then the JPEG as a binary message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import WSMsgType, web

from spotrelay.http.outputs import stream
from spotrelay.http.outputs.common import Streams, admit, parse_request, peer, source_or_error
from spotrelay.hub import Client, Encoded

WS_OVERHEAD = 14  # framing of the two messages a frame takes


async def _drain(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the browser sends, so close frames and pongs are processed."""
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break


def add_routes(app: web.Application, streams: Streams) -> None:
    hub = streams.hub

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        source = source_or_error(request, hub)
        spec, fps = parse_request(request.query, snapshot=False)
        admit(streams, source, spec)
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=1024)
        await ws.prepare(request)
        reader = asyncio.create_task(_drain(ws))

        async def send(enc: Encoded) -> int:
            meta = json.dumps(
                {"t": enc.acquired, "seq": enc.seq, "stale": enc.stale, "bytes": len(enc.data)}
            )
            await ws.send_str(meta)
            await ws.send_bytes(enc.data)
            return len(meta) + len(enc.data) + WS_OVERHEAD

        client = Client("ws", source, spec, peer(request), fps)
        try:
            await stream.serve(
                streams, request, client, send, stop=lambda: ws.closed or reader.done()
            )
        finally:
            reader.cancel()
            with contextlib.suppress(ConnectionError):
                await ws.close()
        return ws

    app.router.add_get("/ws/{source}", websocket)
