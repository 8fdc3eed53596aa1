"""HTTP: MJPEG streams, snapshots, the viewer page, JSON API, health and metrics (aiohttp).

MJPEG is the lowest common denominator every client plays (browsers' <img>, ffmpeg/ffplay, VLC,
OpenCV): ``multipart/x-mixed-replace`` with one JPEG per part, each with Content-Length and the
capture time in ``X-Timestamp``. The viewer page uses one WebSocket per tile instead, because
browsers allow only six HTTP/1.1 connections per host and Spot has eleven cameras.

Query parameters are validated up front: a bad one is a 400 whose JSON names the parameter and the
allowed values, before any stream starts.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Mapping
from importlib import resources
from typing import Any

from aiohttp import WSMsgType, web

from spotrelay import __version__, codec, metrics
from spotrelay.codec import RenderSpec
from spotrelay.config import Config
from spotrelay.connection import RobotConnection
from spotrelay.hub import Client, Hub
from spotrelay.poller import Poller

log = logging.getLogger("spotrelay.http")

BOUNDARY = "spotrelayframe"
MAX_SIDE = 4096
SEND_BUFFER = 256 * 1024  # a few frames at most sit in the kernel for a slow client
OPEN_PATHS = ("/healthz", "/readyz")

CONN_KEY = web.AppKey("conn", RobotConnection)
HUB_KEY = web.AppKey("hub", Hub)
POLLER_KEY = web.AppKey("poller", Poller)
CONFIG_KEY = web.AppKey("config", Config)


class BadParam(Exception):
    def __init__(self, name: str, message: str, allowed: str):
        super().__init__(message)
        self.name, self.message, self.allowed = name, message, allowed


def _json(data: Any, status: int = 200, **kw: Any) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, indent=1), **kw)


def _int(q: Mapping[str, str], name: str, lo: int, hi: int) -> int | None:
    if name not in q:
        return None
    try:
        value = int(q[name])
    except ValueError:
        raise BadParam(name, f"{name} must be an integer", f"{lo}..{hi}") from None
    if not lo <= value <= hi:
        raise BadParam(name, f"{name}={value} is out of range", f"{lo}..{hi}")
    return value


def _choice(q: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = q.get(name, default).lower()
    if value not in allowed:
        raise BadParam(name, f"{name}={q[name]!r} is not allowed", ", ".join(allowed))
    return value


def parse_request(q: Mapping[str, str], *, snapshot: bool) -> tuple[RenderSpec, float | None]:
    """Query string -> (RenderSpec, max fps). Raises BadParam naming the first bad parameter."""
    width = _int(q, "width", 16, MAX_SIDE)
    height = _int(q, "height", 16, MAX_SIDE)
    quality = _int(q, "quality", 1, 100)
    rotate = _choice(q, "rotate", codec.ROTATIONS, "0")
    colormap = _choice(q, "colormap", codec.COLORMAPS, "turbo")
    fmt = _choice(q, "format", ("jpeg", "png") if snapshot else ("jpeg",), "jpeg")
    fps = None
    if "fps" in q and not snapshot:
        try:
            fps = float(q["fps"])
        except ValueError:
            raise BadParam("fps", "fps must be a number", "0.1..30") from None
        if not 0.1 <= fps <= 30:
            raise BadParam("fps", f"fps={fps:g} is out of range", "0.1..30")
    spec = RenderSpec(width, height, quality, rotate, colormap, fmt)
    return spec, fps


def _normalise(spec: RenderSpec, cols: int, rows: int) -> RenderSpec:
    """Requests that render to the same pixels share one variant (and one encode)."""
    w, h = spec.width, spec.height
    if w is None and h is None:
        return spec
    deg = codec.rotation_degrees(spec.rotate, "")
    if spec.rotate != "auto" and deg % 180 == 90:
        cols, rows = rows, cols
    out_w, out_h = codec.target_size(cols, rows, w, h)
    if (out_w, out_h) == (cols, rows):
        w = h = None
    else:
        w, h = out_w, out_h
    return RenderSpec(w, h, spec.quality, spec.rotate, spec.colormap, spec.format)


# -- middleware ---------------------------------------------------------------------------------


def _token_middleware(token: str):
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request, handler):
        if request.path in OPEN_PATHS:
            return await handler(request)
        given = request.query.get("token", "")
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), expected):
            return _json(
                {"error": "missing or wrong access token (Authorization: Bearer or ?token=)"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="spotrelay"'},
            )
        return await handler(request)

    return check


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except BadParam as exc:
        return _json(
            {"error": exc.message, "parameter": exc.name, "allowed": exc.allowed}, status=400
        )


# -- handlers -----------------------------------------------------------------------------------


def _source_or_404(request: web.Request) -> str:
    conn = request.app[CONN_KEY]
    name = request.match_info["source"]
    if not conn.sources:  # never connected yet: we cannot tell a typo from a real camera
        raise web.HTTPServiceUnavailable(
            text=json.dumps(
                {"error": "robot not connected yet", "source": name, "reason": conn.last_error}
            ),
            content_type="application/json",
            headers={"Retry-After": "2"},
        )
    if name not in conn.sources:
        raise web.HTTPNotFound(
            text=json.dumps(
                {
                    "error": f"unknown source {name!r}",
                    "source": name,
                    "available": sorted(conn.sources),
                }
            ),
            content_type="application/json",
        )
    return name


def _spec_for(
    request: web.Request, source: str, *, snapshot: bool
) -> tuple[RenderSpec, float | None]:
    spec, fps = parse_request(request.query, snapshot=snapshot)
    info = request.app[CONN_KEY].sources[source]
    return _normalise(spec, info.cols, info.rows), fps


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peer[0]}:{peer[1]}" if peer else "?"


def _small_send_buffer(request: web.Request) -> None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


def _count_sent(client: Client, source: str, nbytes: int, acquired: float) -> None:
    client.frames_sent += 1
    client.bytes_sent += nbytes
    client.rate.mark(time.time())
    metrics.FRAMES_SERVED.labels(source=source).inc()
    metrics.BYTES_SENT.labels(source=source).inc(nbytes)
    if acquired:
        metrics.FRAME_LATENCY.labels(source=source, stage="sent").observe(
            max(0.0, time.time() - acquired)
        )


async def stream(request: web.Request) -> web.StreamResponse:
    source = _source_or_404(request)
    spec, fps = _spec_for(request, source, snapshot=False)
    hub = request.app[HUB_KEY]
    resp = web.StreamResponse(
        headers={
            "Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}",
            "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
            "Pragma": "no-cache",
            "X-Accel-Buffering": "no",
            "Access-Control-Allow-Origin": "*",
        }
    )
    await resp.prepare(request)
    _small_send_buffer(request)
    client = Client(0, "mjpeg", source, spec, _peer(request), fps)
    try:
        async for enc in hub.frames(source, spec, client):
            head = (
                f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(enc.data)}\r\n"
                f"X-Timestamp: {enc.acquired:.6f}\r\n"
                + ("X-Stale: 1\r\n" if enc.stale else "")
                + "\r\n"
            ).encode()
            _count_sent(client, source, len(enc.data), 0.0 if enc.stale else enc.acquired)
            await resp.write(head)
            await resp.write(enc.data)
            await resp.write(b"\r\n")
    except (ConnectionResetError, ConnectionError):
        pass
    return resp


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """One tile of the viewer: a JSON text message with the frame's metadata, then its JPEG."""
    source = _source_or_404(request)
    spec, fps = _spec_for(request, source, snapshot=False)
    hub = request.app[HUB_KEY]
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=1024)
    await ws.prepare(request)
    _small_send_buffer(request)
    client = Client(0, "ws", source, spec, _peer(request), fps)
    reader = request.loop.create_task(_drain(ws))
    try:
        async for enc in hub.frames(source, spec, client):
            if ws.closed or reader.done():
                break
            meta = {"t": enc.acquired, "seq": enc.seq, "stale": enc.stale, "bytes": len(enc.data)}
            _count_sent(client, source, len(enc.data), 0.0 if enc.stale else enc.acquired)
            await ws.send_str(json.dumps(meta))
            await ws.send_bytes(enc.data)
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        reader.cancel()
        await ws.close()
    return ws


async def _drain(ws: web.WebSocketResponse) -> None:
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break


async def snapshot(request: web.Request) -> web.Response:
    source = _source_or_404(request)
    spec, _ = _spec_for(request, source, snapshot=True)
    try:
        data, frame = await request.app[HUB_KEY].snapshot(source, spec)
    except LookupError:
        return _json({"error": f"no frame from {source!r} yet", "source": source}, status=503)
    except codec.CodecError as exc:
        metrics.FRAMES_DROPPED.labels(source=source, reason="decode_error").inc()
        return _json({"error": f"cannot decode the robot's frame: {exc}", "source": source}, 502)
    stale = time.time() - frame.received > request.app[CONFIG_KEY].stale_after
    return web.Response(
        body=data,
        content_type="image/png" if spec.format == "png" else "image/jpeg",
        headers={
            "X-Timestamp": f"{frame.acquired:.6f}",
            "Cache-Control": "no-store",
            "Access-Control-Allow-Origin": "*",
            **({"X-Stale": "1"} if stale else {}),
        },
    )


async def api_sources(request: web.Request) -> web.Response:
    conn, hub, poller = request.app[CONN_KEY], request.app[HUB_KEY], request.app[POLLER_KEY]
    now = time.time()
    out = []
    for name in sorted(conn.sources):
        info = conn.sources[name]
        frame = hub.latest.get(name)
        out.append(
            {
                "name": name,
                "service": info.service,
                "rows": info.rows,
                "cols": info.cols,
                "image_type": info.image_type,
                "pixel_formats": list(info.pixel_formats),
                "formats": list(info.image_formats),
                "fps": round(poller.fps(name), 2),
                "age": round(now - frame.acquired, 3) if frame else None,
                "clients": hub.watched(name),
                "stream": f"/stream/{name}",
                "snapshot": f"/snapshot/{name}",
            }
        )
    return _json({"robot": _robot_state(conn), "sources": out})


def _robot_state(conn: RobotConnection) -> dict[str, Any]:
    return {
        "connected": conn.connected.is_set(),
        "address": f"{conn.target.host}:{conn.target.port}",
        "image_services": list(conn.image_services),
        "clock_skew": round(conn.skew, 6),
        "last_error": conn.last_error,
    }


async def api_state(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    now = time.time()
    clients = [
        {
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
            "peer": c.peer,
            "connected_for": round(now - c.started, 1),
        }
        for c in hub.clients.values()
    ]
    return _json(
        {"version": __version__, "robot": _robot_state(request.app[CONN_KEY]), "clients": clients}
    )


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    conn, hub = request.app[CONN_KEY], request.app[HUB_KEY]
    if not conn.connected.is_set():
        return _json({"ready": False, "reason": f"robot not connected: {conn.last_error}"}, 503)
    cfg = request.app[CONFIG_KEY]
    horizon = max(cfg.stale_after, 3.0 / cfg.idle_fps if cfg.idle_fps else 0.0)
    now = time.time()
    fresh = [s for s, f in hub.latest.items() if now - f.received < horizon]
    if not fresh:
        return _json({"ready": False, "reason": "no fresh frames from the robot"}, 503)
    return _json({"ready": True, "fresh_sources": len(fresh)})


async def metrics_handler(request: web.Request) -> web.Response:
    body, content_type = metrics.exposition()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


async def index(request: web.Request) -> web.Response:
    html = resources.files("spotrelay").joinpath("web/index.html").read_text(encoding="utf-8")
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-cache"})


def build_app(cfg: Config, conn: RobotConnection, hub: Hub, poller: Poller) -> web.Application:
    middlewares = [_errors]
    if cfg.token:
        middlewares.insert(0, _token_middleware(cfg.token))
    app = web.Application(middlewares=middlewares)
    app[CONN_KEY], app[HUB_KEY], app[POLLER_KEY], app[CONFIG_KEY] = conn, hub, poller, cfg
    app.router.add_get("/", index)
    app.router.add_get("/api/sources", api_sources)
    app.router.add_get("/api/state", api_state)
    app.router.add_get("/stream/{source}", stream)
    app.router.add_get("/ws/{source}", websocket)
    app.router.add_get("/snapshot/{source}", snapshot)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    return app
