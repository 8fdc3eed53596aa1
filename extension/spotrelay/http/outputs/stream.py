"""The loop every stream output runs, whatever it writes (MJPEG parts, WebSocket messages).

For each viewer: take the newest rendering from the hub, write it, wait until the viewer's link
has taken it (queue control, ``http/link.py``), account for it; a viewer whose link takes
nothing for ``--client-timeout`` is dropped. A new output writes its own framing in a ``send``
function and gets all of this.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from aiohttp import web

from spotrelay.http.link import Link, hold_for_fresh, limit_send_buffer
from spotrelay.http.outputs.common import Streams
from spotrelay.hub import Client, Encoded

SEND_BUFFER = 256 * 1024  # the kernel's share of a slow viewer's queue, whatever the rest does

Send = Callable[[Encoded], Awaitable[int]]
"""Write one rendering to the viewer; the bytes it put on the wire."""


async def serve(
    streams: Streams, request: web.Request, client: Client, send: Send, *, stop=lambda: False
) -> None:
    """Stream to ``client`` until it leaves, stalls, or the hub closes (``stop()``: the output
    knows its viewer left, e.g. a WebSocket closed)."""
    hub = streams.hub
    transport = request.transport
    limit_send_buffer(transport, SEND_BUFFER)
    link = Link(transport, enabled=streams.queue_control)
    if streams.queue_control:

        def hold(age: float) -> float:
            fps = hub.fps(client.source)
            return hold_for_fresh(age, 1 / fps if fps > 1 else None, link.control.transfer)

        client.hold = hold
    with contextlib.suppress(ConnectionError):
        async with contextlib.aclosing(hub.frames(client)) as frames:
            async for enc in frames:
                if stop():
                    break
                hub.sent(client, enc, len(enc.data))
                try:
                    async with asyncio.timeout(streams.client_timeout):
                        link.wrote(await send(enc))
                        await link.taken()
                except TimeoutError:
                    # no progress: it would hold a slot and keep its camera polled for ever.
                    # Aborted, not closed: a close would wait on the same full buffer.
                    hub.dropped(client, "stalled")
                    if transport is not None:
                        transport.abort()
                    break
