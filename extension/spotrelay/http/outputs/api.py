"""JSON API and health: ``/api/sources``, ``/api/state``, ``/healthz``, ``/readyz``, ``/metrics``.

What the relay knows about the robot comes from ``robot_status`` (a callable, so these handlers
never hold on to the connection itself), what it knows about frames and viewers from the hub.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from spotrelay import __version__
from spotrelay.adapt import describe
from spotrelay.frames import format_name
from spotrelay.http.outputs.common import json_response
from spotrelay.hub import Hub

RobotStatus = Callable[[], dict[str, Any]]
# /readyz is open: it says what kind of trouble the robot link has (credentials or network),
# while the robot's own error text stays behind the token, in /api/state
READY_REASONS = {"login": "robot login failed", "unreachable": "robot unreachable"}


def add_routes(
    app: web.Application,
    hub: Hub,
    robot_status: RobotStatus,
    registry: CollectorRegistry,
    *,
    show_peers: bool = True,
    timing: Callable[[str], dict[str, Any]] = lambda source: {},
    mission: Callable[[], dict[str, Any]] | None = None,
    rtsp: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """``mission``: the Autowalk callback's state (registration, sessions), when it runs;
    ``rtsp``: the RTSP output's (port, encoders, clients), when it runs."""

    async def api_sources(request: web.Request) -> web.Response:
        now = time.time()
        out = []
        # the RTSP address as this client reaches the relay (its Host header), on the RTSP port
        rtsp_base = None
        if rtsp is not None:
            out_rtsp = rtsp()
            rtsp_base = f"{out_rtsp['scheme']}://{request.url.host}:{out_rtsp['port']}"
        for name, info in sorted(hub.sources.items()):
            frame = hub.frame(name)
            out.append(
                {
                    "name": name,
                    "service": info.service,
                    "rows": frame.image.rows if frame else info.rows,
                    "cols": frame.image.cols if frame else info.cols,
                    "image_type": info.image_type,
                    "pixel_formats": list(info.pixel_formats),
                    "formats": list(info.image_formats),
                    # how its frames come: the newest one's format, else what is asked for
                    "fetched_as": format_name(frame.image.format if frame else info.wire_format),
                    "fps": round(hub.fps(name), 2),
                    **timing(name),
                    "age": round(now - frame.acquired, 3) if frame else None,
                    "stale": hub.is_stale(name),
                    "clients": hub.watched(name),
                    "stream": f"/stream/{name}",
                    "snapshot": f"/snapshot/{name}",
                    **({"rtsp": f"{rtsp_base}/{name}"} if rtsp_base else {}),
                }
            )
        return json_response({"robot": robot_status(), "sources": out})

    async def api_state(request: web.Request) -> web.Response:
        now = time.time()
        clients = []
        for c in hub.viewers():
            entry = {
                "id": c.id,
                "kind": c.kind,
                "source": c.source,
                "variant": {
                    "width": c.spec.width,
                    "height": c.spec.height,
                    "quality": c.spec.quality,
                    "rotate": c.spec.rotate,
                    "colormap": c.spec.colormap,
                },
                "max_fps": c.max_fps,
                "fps": round(c.rate.rate(now), 2),
                "frames_sent": c.frames_sent,
                "bytes_sent": c.bytes_sent,
                "frames_dropped": c.dropped,
                "connected_for": round(now - c.started, 1),
                "link_mbit": round(c.link_rate * 8e-6, 3) if c.link_rate else None,
            }
            if c.ladder and c.variant is not None:  # adapt=1: where it is on its ladder
                w, h = c.variant.plan.out_size
                entry["adapt"] = {
                    "step": c.step,
                    "steps": len(c.ladder),
                    "rendering": describe(w, h, c.variant.plan.quality),
                }
            if show_peers:
                entry["peer"] = c.peer
            clients.append(entry)
        state = {"version": __version__, "robot": robot_status(), "clients": clients}
        if mission is not None:
            state["mission"] = mission()
        if rtsp is not None:
            state["rtsp"] = rtsp()
        return json_response(state)

    async def healthz(request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        status = robot_status()
        if not status["connected"]:  # open to anyone: the kind of trouble, never its text
            reason = READY_REASONS.get(status.get("problem"), "robot not connected yet")
            return json_response({"ready": False, "reason": reason}, 503)
        fresh = [s for s in hub.sources if not hub.is_stale(s)]
        if not fresh:
            return json_response({"ready": False, "reason": "no fresh frames from the robot"}, 503)
        return json_response({"ready": True, "fresh_sources": len(fresh)})

    app.router.add_get("/api/sources", api_sources)
    app.router.add_get("/api/state", api_state)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
