"""What every output shares: what main gives them, query parsing, JSON errors, the source
check, socket tuning.

Query parameters are validated before any stream starts: a bad one is a 400 whose JSON names the
parameter and the allowed values. Numbers are plain ASCII digits only (``+320``, `` 320``,
``3_20`` and other scripts' digits are refused), so what is accepted is what the README says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from aiohttp import web

from spotrelay import codec
from spotrelay.frames import RenderSpec
from spotrelay.hub import Hub, TooManyVariants
from spotrelay.metrics import Metrics
from spotrelay.plan import ROTATIONS

MAX_SIDE = 4096
_INT = re.compile(r"[0-9]{1,9}")
_DECIMAL = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")


@dataclass(frozen=True)
class Streams:
    """What main gives the stream outputs: the hub to take frames from, the metrics to count
    refusals and drops in, and how long a viewer may make no progress before it is dropped."""

    hub: Hub
    metrics: Metrics
    client_timeout: float = 10.0
    queue_control: bool = True  # off: write as fast as the socket takes (the bench's baseline)


class BadParam(Exception):
    """A query parameter that is not allowed; answered 400 by the app's error middleware."""

    def __init__(self, name: str, message: str, allowed: str):
        super().__init__(message)
        self.name, self.message, self.allowed = name, message, allowed


def json_response(data: Any, status: int = 200, **kw: Any) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, indent=1), **kw)


def json_error(exc: type[web.HTTPException], data: dict[str, Any], **kw: Any) -> NoReturn:
    raise exc(text=json.dumps(data), content_type="application/json", **kw)


def int_param(q: Mapping[str, str], name: str, lo: int, hi: int) -> int | None:
    """``q[name]`` as a whole number in lo..hi, None if absent; BadParam naming it if not."""
    if name not in q:
        return None
    if not _INT.fullmatch(q[name]):
        raise BadParam(name, f"{name} must be a whole number", f"{lo}..{hi}")
    value = int(q[name])
    if not lo <= value <= hi:
        raise BadParam(name, f"{name}={value} is out of range", f"{lo}..{hi}")
    return value


def _choice(q: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = q.get(name, default).lower()
    if value not in allowed:
        raise BadParam(name, f"{name}={q[name]!r} is not allowed", ", ".join(allowed))
    return value


@dataclass(frozen=True)
class Ask:
    """What a request asks for: the rendering (for an adaptive stream, the best it may get), at
    most how many frames a second, and whether to adapt to the viewer's link (``adapt=1``)."""

    spec: RenderSpec
    fps: float | None = None
    adapt: bool = False


def parse_request(q: Mapping[str, str], *, snapshot: bool) -> Ask:
    """Query string -> Ask. Raises BadParam naming the first bad parameter."""
    width = int_param(q, "width", 16, MAX_SIDE)
    height = int_param(q, "height", 16, MAX_SIDE)
    quality = int_param(q, "quality", 1, 100)
    rotate = _choice(q, "rotate", ROTATIONS, "0")
    colormap = _choice(q, "colormap", codec.COLORMAPS, "turbo")
    fmt = _choice(q, "format", ("jpeg", "png") if snapshot else ("jpeg",), "jpeg")
    fps = None
    if "fps" in q and not snapshot:
        if not _DECIMAL.fullmatch(q["fps"]):
            raise BadParam("fps", "fps must be a number", "0.1..30")
        fps = float(q["fps"])
        if not 0.1 <= fps <= 30:
            raise BadParam("fps", f"fps={fps:g} is out of range", "0.1..30")
    adapt = False
    if not snapshot:
        adapt = _choice(q, "adapt", ("0", "1"), "0") == "1"
    return Ask(RenderSpec(width, height, quality, rotate, colormap, fmt), fps, adapt)


def source_or_error(request: web.Request, hub: Hub) -> str:
    """The source named in the path, or a JSON 503 (not connected yet) / 404 (unknown)."""
    name = request.match_info["source"]
    if not hub.sources:  # never connected yet: we cannot tell a typo from a real camera
        json_error(
            web.HTTPServiceUnavailable,
            {"error": "robot not connected yet", "source": name},
            headers={"Retry-After": "2"},
        )
    if name not in hub.sources:
        json_error(
            web.HTTPNotFound,
            {"error": f"unknown source {name!r}", "source": name, "available": sorted(hub.sources)},
        )
    return name


def admit(streams: Streams, source: str, specs: list[RenderSpec]) -> None:
    """A 503 naming the renderings already served when these would pass --max-variants."""
    try:
        streams.hub.admit(source, specs)
    except TooManyVariants as exc:
        streams.metrics.requests_refused.labels(reason="max_variants").inc()
        served = [
            {"width": p.out_size[0], "height": p.out_size[1], "quality": p.quality}
            for p in exc.existing
        ]
        json_error(
            web.HTTPServiceUnavailable,
            {
                "error": f"{len(served)} renderings of {source!r} are served already, the most "
                "allowed (--max-variants); ask for one of these",
                "source": source,
                "served": served,
            },
            headers={"Retry-After": "10"},
        )


def peer(request: web.Request) -> str:
    addr = request.transport.get_extra_info("peername") if request.transport else None
    return f"{addr[0]}:{addr[1]}" if addr else "?"
