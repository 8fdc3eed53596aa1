"""The loop every stream output runs, whatever it writes (MJPEG parts, WebSocket messages).

For each viewer: take the newest rendering from the hub, write it, wait until the viewer's link
has taken it (queue control, ``http/link.py``), account for it, and with ``adapt=1`` move the
viewer along its ladder of renderings (``adapt.py``); a viewer whose link takes nothing for
``--client-timeout`` is dropped. A new output writes its own framing in a ``send`` function and
gets all of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from spotrelay import adapt
from spotrelay.http.link import Link, hold_for_fresh, limit_send_buffer
from spotrelay.http.outputs.common import Ask, Streams, admit, peer
from spotrelay.hub import Client, Encoded
from spotrelay.plan import plan

SEND_BUFFER = 256 * 1024  # the kernel's share of a slow viewer's queue, whatever the rest does

Send = Callable[[Encoded, Client], Awaitable[int]]
"""Write one rendering to the viewer; the bytes it put on the wire."""


def viewer(streams: Streams, request: web.Request, kind: str, source: str, ask: Ask) -> Client:
    """The client record of a new viewer, admitted (its whole ladder when it adapts), or a 503."""
    specs = [ask.spec]
    if ask.adapt:
        width, height = plan(source, streams.hub.shape(source), ask.spec).out_size
        specs = adapt.ladder(ask.spec, width, height)
    admit(streams, source, specs)
    ladder = tuple(specs) if ask.adapt else ()
    return Client(kind, source, ask.spec, peer(request), ask.fps, ladder=ladder)


def rendering(client: Client) -> dict[str, object]:
    """What an adaptive viewer is getting now, for its part headers and WebSocket metadata."""
    variant = client.variant
    if variant is None:
        return {}
    width, height = variant.plan.out_size
    return {
        "rendering": adapt.describe(width, height, variant.plan.quality),
        "step": client.step,
        "steps": len(client.ladder),
    }


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
    adapter = _adapter(streams, client) if client.ladder else None
    with contextlib.suppress(ConnectionError):
        async with contextlib.aclosing(hub.frames(client)) as frames:
            async for enc in frames:
                if stop():
                    break
                hub.sent(client, enc, len(enc.data))
                step = client.step
                try:  # no progress for --client-timeout: the viewer stopped reading, or vanished
                    async with asyncio.timeout(streams.client_timeout):
                        nbytes = await send(enc, client)
                    link.wrote(nbytes)
                    await link.taken(stall_after=streams.client_timeout)
                except TimeoutError:
                    # no progress: it would hold a slot and keep its camera polled for ever.
                    # Aborted, not closed: a close would wait on the same full buffer.
                    hub.dropped(client, "stalled")
                    if transport is not None:
                        transport.abort()
                    break
                client.link_rate = link.rate
                if adapter is not None and not enc.stale:
                    fps = adapt.fps_target(client.max_fps, hub.fps(client.source))
                    hub.move(client, adapter.delivered(step, nbytes, link.rate, fps))


def _adapter(streams: Streams, client: Client) -> adapt.Adapter:
    shape = streams.hub.shape(client.source)
    sizes = [plan(client.source, shape, s).out_size for s in client.ladder]
    return adapt.Adapter(adapt.step_shapes(list(client.ladder), sizes), time.monotonic)
