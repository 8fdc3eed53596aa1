"""WebSocket feed: ``GET /ws/{source}``, one per tile of the viewer page.

Browsers allow only six HTTP/1.1 connections per host and Spot has eleven cameras, so the viewer
cannot use one MJPEG ``<img>`` per tile; WebSockets do not count against that limit. Per frame a
JSON text message with its metadata, then the JPEG as a binary message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from aiohttp import WSMsgType, web

from spotrelay.http.outputs import stream
from spotrelay.http.outputs.common import Streams, parse_request, source_or_error
from spotrelay.hub import Client, Encoded

WS_OVERHEAD = 14  # framing of the two messages a frame takes


async def _read(ws: web.WebSocketResponse) -> None:
    """What the browser sends: clock pings, answered at once with the relay's time, so a page on
    another computer can tell a frame's age (``{"ping": T}`` -> ``{"pong": T, "now": epoch}``);
    anything else is ignored. Reading also processes close frames and pongs."""
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break
        if msg.type == WSMsgType.TEXT:
            try:
                ping = json.loads(msg.data).get("ping")
            except (ValueError, AttributeError):
                continue
            if isinstance(ping, int | float):
                await ws.send_str(json.dumps({"pong": ping, "now": time.time()}))


def add_routes(app: web.Application, streams: Streams) -> None:
    hub = streams.hub

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        source = source_or_error(request, hub)
        ask = parse_request(request.query, snapshot=False)
        client = stream.viewer(streams, request, "ws", source, ask)
        # no permessage-deflate: JPEG does not compress, and deflating each frame for each viewer
        # cost about a millisecond per 70 KB frame (browsers ask for it by default)
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=1024, compress=False)
        await ws.prepare(request)
        reader = asyncio.create_task(_read(ws))

        async def send(enc: Encoded, client: Client) -> int:
            meta: dict[str, object] = {
                "t": enc.acquired,
                "seq": enc.seq,
                "stale": enc.stale,
                "bytes": len(enc.data),
            }
            if client.ladder:
                meta.update(stream.rendering(client))
            text = json.dumps(meta)
            await ws.send_str(text)
            await ws.send_bytes(enc.data)
            return len(text) + len(enc.data) + WS_OVERHEAD

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
