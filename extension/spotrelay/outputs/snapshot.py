"""Snapshots: ``GET /snapshot/{source}``, one fresh picture as JPEG, or lossless PNG.

PNG keeps depth as the robot's own 16-bit millimetres, which is what vision code wants; JPEG
takes the same size and rotation parameters as streams.
"""

from __future__ import annotations

from aiohttp import web

from spotrelay import codec
from spotrelay.hub import Hub, SnapshotsBusy
from spotrelay.outputs.common import json_response, parse_request, source_or_error


def add_routes(app: web.Application, hub: Hub) -> None:
    async def snapshot(request: web.Request) -> web.Response:
        source = source_or_error(request, hub)
        spec, _ = parse_request(request.query, snapshot=True)
        try:
            data, frame = await hub.snapshot(source, spec)
        except LookupError:
            return json_response(
                {"error": f"no frame from {source!r} yet", "source": source}, status=503
            )
        except SnapshotsBusy:
            hub.metrics.requests_refused.labels(reason="snapshots_busy").inc()
            return json_response(
                {"error": "too many snapshots being rendered; try again", "source": source},
                status=503,
                headers={"Retry-After": "1"},
            )
        except codec.CodecError as exc:
            hub.metrics.frames_dropped.labels(source=source, reason="decode_error").inc()
            return json_response(
                {"error": f"cannot decode the robot's frame: {exc}", "source": source}, 502
            )
        headers = {"X-Timestamp": f"{frame.acquired:.6f}", "Cache-Control": "no-store"}
        if hub.is_stale(source):
            headers["X-Stale"] = "1"
        return web.Response(
            body=data,
            content_type="image/png" if spec.format == "png" else "image/jpeg",
            headers=headers,
        )

    app.router.add_get("/snapshot/{source}", snapshot)
