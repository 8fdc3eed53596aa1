"""Shared vocabulary: what a camera is, what the robot sent, one capture, what a client asked for.

Every stage speaks these types: the connection describes sources, the poller makes frames, the
planner and codec turn them into pictures, the hub and the outputs hand them out. They live here,
not in any one stage, so that no stage has to import another stage to talk about a frame.
"""

from __future__ import annotations

from dataclasses import dataclass

from bosdyn.api import image_pb2

_Image = image_pb2.Image
JPEG, RAW, RLE = _Image.FORMAT_JPEG, _Image.FORMAT_RAW, _Image.FORMAT_RLE
GREY8, RGB8, RGBA8 = (
    _Image.PIXEL_FORMAT_GREYSCALE_U8,
    _Image.PIXEL_FORMAT_RGB_U8,
    _Image.PIXEL_FORMAT_RGBA_U8,
)
DEPTH16, GREY16 = _Image.PIXEL_FORMAT_DEPTH_U16, _Image.PIXEL_FORMAT_GREYSCALE_U16


@dataclass(frozen=True, slots=True)
class Shape:
    """What planning needs to know about a picture: its size and how it is encoded."""

    cols: int
    rows: int
    format: int
    pixel_format: int


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What an image service says about one camera, in the terms the HTTP API uses."""

    name: str
    service: str
    rows: int
    cols: int
    image_type: str  # "visual" | "depth" | "unknown"
    pixel_formats: tuple[str, ...]
    image_formats: tuple[str, ...]
    depth_scale: float = 1000.0
    fetch_raw: bool = False  # the relay was told to fetch this camera uncompressed (--fetch-raw)

    @classmethod
    def from_proto(cls, src: image_pb2.ImageSource, service: str) -> SourceInfo:
        kind = {
            image_pb2.ImageSource.IMAGE_TYPE_VISUAL: "visual",
            image_pb2.ImageSource.IMAGE_TYPE_DEPTH: "depth",
        }.get(src.image_type, "unknown")
        return cls(
            name=src.name,
            service=service,
            rows=src.rows,
            cols=src.cols,
            image_type=kind,
            pixel_formats=tuple(_enum_name(_Image.PixelFormat, p) for p in src.pixel_formats),
            image_formats=tuple(_enum_name(_Image.Format, f) for f in src.image_formats),
            depth_scale=src.depth_scale or 1000.0,
        )

    @property
    def wire_format(self) -> int | None:
        """The format the relay asks the robot for: JPEG for pictures that offer it (the robot
        compresses, and a full-size request passes through untouched), otherwise the service's
        default (RAW or RLE for depth, whose exact values must survive).

        A picture fetched RAW (``fetch_raw``) costs no JPEG decode when it is resized, the
        largest part of rendering the viewer page's tiles, at four times the bytes on the
        robot's link (a 640x480 greyscale camera: 37 Mbit/s at 15 Hz instead of about 9); its
        full-size viewers then get a JPEG of the relay's instead of the robot's own bytes."""
        if self.image_type != "visual":
            return None
        if self.fetch_raw and "RAW" in self.image_formats:
            return RAW
        return JPEG if "JPEG" in self.image_formats else None

    @property
    def shape(self) -> Shape:
        """The shape frames are expected to have before the first one arrives."""
        fmt = self.wire_format
        if fmt is None:
            fmt = RAW
        pixel = DEPTH16 if self.image_type == "depth" else _pixel_format(self.pixel_formats)
        return Shape(self.cols, self.rows, fmt, pixel)


@dataclass(frozen=True, slots=True)
class ImageData:
    """What the robot sent for one capture."""

    data: bytes
    format: int
    pixel_format: int
    rows: int
    cols: int
    depth_scale: float = 1000.0

    @property
    def is_depth(self) -> bool:
        return self.pixel_format == DEPTH16

    @property
    def shape(self) -> Shape:
        return Shape(self.cols, self.rows, self.format, self.pixel_format)


@dataclass(frozen=True, slots=True)
class Frame:
    """One new capture of one source, with its capture time in both clocks."""

    source: str
    image: ImageData
    acquired: float  # capture time, local epoch seconds (robot clock converted with time sync)
    robot_time: float  # capture time on the robot's own clock (what the robot's logs show)
    received: float  # local epoch seconds when the reply arrived
    seq: int  # per source, +1 for every new frame
    # the robot was asked for --small-robot-quality, not --robot-quality: only small views
    # (``Plan.small``) were watching, and only they are given this frame
    coarse: bool = False


@dataclass(frozen=True, slots=True)
class RenderSpec:
    """What a client asked for, as parsed from its query string (validated, not yet planned)."""

    width: int | None = None
    height: int | None = None
    quality: int | None = None
    rotate: str = "0"
    colormap: str = "turbo"
    format: str = "jpeg"


def format_name(fmt: int | None) -> str | None:
    """An image format as the HTTP API names it ("JPEG", "RAW", "RLE"); None stays None (the
    service's default)."""
    return None if fmt is None else _enum_name(_Image.Format, fmt)


def _enum_name(enum, value: int) -> str:
    try:
        return enum.Name(value).removeprefix("PIXEL_FORMAT_").removeprefix("FORMAT_")
    except ValueError:  # a value newer than this SDK
        return str(value)


def _pixel_format(names: tuple[str, ...]) -> int:
    for name in names:
        try:
            return _Image.PixelFormat.Value("PIXEL_FORMAT_" + name)
        except ValueError:
            continue
    return _Image.PIXEL_FORMAT_UNKNOWN
