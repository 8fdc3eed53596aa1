"""Snapshots: ``GET /snapshot/{source}``, one fresh picture as JPEG, or lossless PNG.

PNG keeps depth as the robot's own 16-bit millimetres, which is what vision code wants; JPEG
takes the same size and rotation parameters as streams. Snapshots are rendered per request on a
bounded pool of their own (``stills.Stills``): a flood of them costs its senders a wait or a
503, never the streams their frames.
"""

from __future__ import annotations

from aiohttp import web

from spotrelay import codec
from spotrelay.http.outputs.common import Streams, json_response, parse_request, source_or_error
from spotrelay.plan import plan
from spotrelay.stills import Busy, Stills

FRESH_ENOUGH = 0.2  # a snapshot may reuse a frame this young instead of waiting for the next
WAIT = 2.0  # for a new frame, before answering with the newest held, marked stale
STALLED_WAIT = 0.25  # the same, for a camera already stale: a poll's round trip, with room


def add_routes(app: web.Application, streams: Streams, stills: Stills) -> None:
    hub, metrics = streams.hub, streams.metrics

    async def snapshot(request: web.Request) -> web.Response:
        source = source_or_error(request, hub)
        spec = parse_request(request.query, snapshot=True).spec
        # A camera already stale (no new frame for --stale-after) whose newest frame came at
        # full quality waits STALLED_WAIT, not WAIT, before answering with that frame: 2 s more
        # for one that stopped would only delay the same answer (a program polling a stalled
        # camera paid it on every snapshot). The short wait still catches a camera nobody
        # watched that came back: watching it polls it at once (Schedule.watch). If the newest
        # came coarse (tiles watch it), the poller fetches that capture again at full quality at
        # once, which beats an older full-quality frame: the full wait.
        newest = hub.frame(source)
        stalled = newest is not None and not newest.coarse and hub.is_stale(source)
        old = False
        try:
            frame = await hub.next_frame(
                source,
                after=hub.clock() - FRESH_ENOUGH,
                timeout=STALLED_WAIT if stalled else WAIT,
            )
        except LookupError:
            # an old frame (marked stale) beats none; a full-quality one, as any snapshot (the
            # newest frame may be a coarse one of the tiles', however fresh)
            frame, old = hub.frame(source, fine=True), True
            if frame is None:
                return json_response(
                    {"error": f"no frame from {source!r} yet", "source": source}, status=503
                )
        the_plan = plan(source, frame.image.shape, spec)
        try:
            data = frame.image.data
            if not the_plan.passthrough:
                data = await stills.run(codec.render, frame.image, the_plan, metrics.observe_codec)
        except Busy:
            metrics.requests_refused.labels(reason="snapshots_busy").inc()
            return json_response(
                {"error": "too many snapshots being rendered; try again", "source": source},
                status=503,
                headers={"Retry-After": "1"},
            )
        except codec.CodecError as exc:
            metrics.frames_dropped.labels(source=source, reason="decode_error").inc()
            return json_response(
                {"error": f"cannot decode the robot's frame: {exc}", "source": source}, 502
            )
        headers = {"X-Timestamp": f"{frame.acquired:.6f}", "Cache-Control": "no-store"}
        if old or hub.is_stale(source):
            headers["X-Stale"] = "1"
        return web.Response(
            body=data,
            content_type="image/png" if spec.format == "png" else "image/jpeg",
            headers=headers,
        )

    app.router.add_get("/snapshot/{source}", snapshot)
