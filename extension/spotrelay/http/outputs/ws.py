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

from spotrelay.http.outputs.common import (
    Streams,
    admit,
    parse_request,
    peer,
    small_send_buffer,
    source_or_error,
    write_or_drop,
)
from spotrelay.hub import Client


async def _drain(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the browser sends, so close frames and pongs are processed."""
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break


async def _send(ws: web.WebSocketResponse, meta: str, picture: bytes) -> None:
    await ws.send_str(meta)
    await ws.send_bytes(picture)


def add_routes(app: web.Application, streams: Streams) -> None:
    hub = streams.hub

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        source = source_or_error(request, hub)
        spec, fps = parse_request(request.query, snapshot=False)
        admit(streams, source, spec)
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=1024)
        await ws.prepare(request)
        small_send_buffer(request)
        client = Client("ws", source, spec, peer(request), fps)
        reader = asyncio.create_task(_drain(ws))
        try:
            with contextlib.suppress(ConnectionError):
                async with contextlib.aclosing(hub.frames(source, spec, client)) as frames:
                    async for enc in frames:
                        if ws.closed or reader.done():
                            break
                        meta = {
                            "t": enc.acquired,
                            "seq": enc.seq,
                            "stale": enc.stale,
                            "bytes": len(enc.data),
                        }
                        hub.sent(client, enc, len(enc.data))
                        sent = _send(ws, json.dumps(meta), enc.data)
                        if not await write_or_drop(streams, client, request, sent):
                            break
        finally:
            reader.cancel()
            with contextlib.suppress(ConnectionError):
                await ws.close()
        return ws

    app.router.add_get("/ws/{source}", websocket)
