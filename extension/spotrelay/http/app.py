"""HTTP app: access control, JSON errors, and the table of outputs (see ``outputs/``).

Every output adds its own routes; this module only decides what applies to all of them:

* With a token, a request is let in if its ``Authorization: Bearer`` header *or* its ``?token=``
  parameter carries it (players that cannot set headers use the parameter; a stale header a
  browser keeps sending does not lock out a correct parameter). Tokens are compared as bytes in
  constant time, whatever bytes the client sent. ``/healthz`` and ``/readyz`` stay open, and so
  does the viewer page itself (static, no camera data): it asks for the token.
* Every error is JSON, the router's own 404 and 405 included.
* Cross-origin reads are opt-in (``--allow-origin``): by default no CORS header is sent and a
  WebSocket opened by a page from another origin is refused, so a web page from elsewhere cannot
  read the cameras through a LAN user's browser.
* At most ``--max-clients`` requests are served at once (streams last), and a share of them per
  address (``slots.py``, shared with RTSP); past that a 503 with the
  reason, except for ``/healthz`` and ``/metrics``, which a supervisor must always reach.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable

from aiohttp import web

from spotrelay.http.outputs.common import BadParam, json_response
from spotrelay.slots import Slots

log = logging.getLogger("spotrelay.http")

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
ALWAYS_SERVED = frozenset({"/healthz", "/metrics"})


def _as_bytes(text: str) -> bytes:
    """Whatever the client sent (headers arrive surrogate-escaped) as bytes; never raises."""
    return text.encode("utf-8", "surrogatepass")


def token_ok(request: web.Request, expected: bytes) -> bool:
    """Either credential may carry the token; each is compared in constant time."""
    offered = []
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        offered.append(auth[7:].strip())
    if "token" in request.query:
        offered.append(request.query["token"])
    ok = False
    for given in offered:
        ok |= hmac.compare_digest(_as_bytes(given), expected)
    return ok


def _token_middleware(token: str):
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request, handler):
        if request.path in OPEN_PATHS or token_ok(request, expected):
            return await handler(request)
        return json_response(
            {"error": "missing or wrong access token (Authorization: Bearer or ?token=)"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="spotrelay"'},
        )

    return check


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except BadParam as exc:
        return json_response(
            {"error": exc.message, "parameter": exc.name, "allowed": exc.allowed}, status=400
        )
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.status < 400:
            raise
        body = {"error": exc.reason.lower(), "path": request.path}
        if exc.status == 405:
            body["allowed"] = sorted(exc.headers.get("Allow", "").split(","))
        return json_response(body, status=exc.status, headers=_kept_headers(exc))


def _kept_headers(exc: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}


def _limit_middleware(slots: Slots, refused):
    """Every request in progress holds a slot (``slots.py``: at most ``--max-clients``, and a
    share of them per address); a bound on memory and descriptors that a crowd (or an attacker)
    reaches before the machine does."""

    @web.middleware
    async def limit(request: web.Request, handler):
        if request.path in ALWAYS_SERVED:
            return await handler(request)
        host = request.remote or "?"
        reason = slots.take(host)
        if reason is not None:
            refused(reason)
            option = "--max-clients" if reason == "max_clients" else "--max-clients-per-host"
            return json_response(
                {"error": f"serving {slots.busy} clients, the most allowed ({option})"},
                status=503,
                headers={"Retry-After": "5"},
            )
        try:
            return await handler(request)
        finally:
            slots.give(host)

    return limit


def _origin_middleware(allow_origin: str | None):
    """Browsers send their page's Origin with a WebSocket upgrade and do not enforce CORS on it:
    refuse pages from elsewhere unless allowed."""

    @web.middleware
    async def origin(request: web.Request, handler):
        given = request.headers.get("Origin")
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if upgrade and given and allow_origin != "*" and given != allow_origin:
            own = f"{request.scheme}://{request.host}"
            if given != own:
                return json_response(
                    {"error": f"WebSocket from origin {given!r} refused (see --allow-origin)"},
                    status=403,
                )
        return await handler(request)

    return origin


def build_app(
    outputs: Iterable,
    *,
    token: str | None = None,
    allow_origin: str | None = None,
    slots: Slots | None = None,
    refused=lambda reason: None,
) -> web.Application:
    """The app with each output's routes. ``outputs`` are callables taking the app;
    ``refused(reason)`` is told of every 503 given to stay bounded."""
    middlewares = [_errors, _origin_middleware(allow_origin)]
    if token:
        middlewares.insert(0, _token_middleware(token))
    middlewares.insert(0, _limit_middleware(slots or Slots(200, 200), refused))
    app = web.Application(middlewares=middlewares)
    for add_routes in outputs:
        add_routes(app)
    if allow_origin:

        async def cors(request: web.Request, response: web.StreamResponse) -> None:
            response.headers["Access-Control-Allow-Origin"] = allow_origin

        app.on_response_prepare.append(cors)
    return app
