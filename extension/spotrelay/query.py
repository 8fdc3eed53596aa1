"""What a request asks for, from its query string: the rendering, the rate, adaptation.

Shared by every output (HTTP streams and snapshots, RTSP), so that a parameter means the same
everywhere. A bad one raises ``BadParam`` naming it and the allowed values (HTTP answers 400 with
that in JSON, RTSP 400). Numbers are plain ASCII digits only (``+320``, `` 320``, ``3_20`` and
other scripts' digits are refused), so what is accepted is what the README says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from spotrelay import codec
from spotrelay.frames import RenderSpec
from spotrelay.plan import ROTATIONS

MAX_SIDE = 4096
_INT = re.compile(r"[0-9]{1,9}")
_DECIMAL = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")


class BadParam(Exception):
    """A query parameter that is not allowed; answered 400 by the app's error middleware."""

    def __init__(self, name: str, message: str, allowed: str):
        super().__init__(message)
        self.name, self.message, self.allowed = name, message, allowed


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
