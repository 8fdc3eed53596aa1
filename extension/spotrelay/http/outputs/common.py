"""What every HTTP output shares: what main gives them, JSON errors, the source check, the
variant bound. Query parsing is ``spotrelay.query``'s (RTSP parses the same parameters)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NoReturn

from aiohttp import web

from spotrelay.frames import RenderSpec
from spotrelay.hub import Hub, TooManyVariants
from spotrelay.metrics import Metrics
from spotrelay.query import Ask, BadParam, int_param, parse_request

__all__ = ["Ask", "BadParam", "Streams", "int_param", "parse_request"]


@dataclass(frozen=True)
class Streams:
    """What main gives the stream outputs: the hub to take frames from, the metrics to count
    refusals and drops in, and how long a viewer may make no progress before it is dropped."""

    hub: Hub
    metrics: Metrics
    client_timeout: float = 10.0
    queue_control: bool = True  # off: write as fast as the socket takes (the bench's baseline)


def json_response(data: Any, status: int = 200, **kw: Any) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, indent=1), **kw)


def json_error(exc: type[web.HTTPException], data: dict[str, Any], **kw: Any) -> NoReturn:
    raise exc(text=json.dumps(data), content_type="application/json", **kw)


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
