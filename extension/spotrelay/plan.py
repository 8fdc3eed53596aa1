"""Planning: what one request renders to, decided once, in one pure function.

``plan(source, shape, spec)`` answers every question about a request before any pixel is touched:
the rotation ``auto`` stands for on this camera, the output size (fitted to the box the client gave,
in the orientation it will see), whether the robot's own bytes can pass through untouched, how far
the JPEG decoder may reduce while decoding, and the quality and colour map that apply. The answer,
a ``Plan``, is also the key clients share: two requests with equal plans get the same bytes, so
the hub renders each plan once per frame whatever the number of viewers.

A plan is made for one input shape. If a camera changes resolution at run time, its frames no
longer match the plans made for it, and the hub plans again (``Plan.fits``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spotrelay.frames import DEPTH16, JPEG, RenderSpec, Shape

ROTATIONS = ("0", "90", "180", "270", "auto")
# The SDK's get_image example (python/examples/get_image/get_image.py, ROTATION_ANGLE) turns these
# body cameras upright by -78, -102 and 180 degrees with scipy's anticlockwise ndimage.rotate;
# ours are clockwise. Depth "in visual frame" is drawn in its fisheye's frame, so it turns alike.
AUTO_ROTATION_CW = {
    "frontleft_fisheye_image": 78.0,
    "frontright_fisheye_image": 102.0,
    "right_fisheye_image": 180.0,
    "frontleft_depth_in_visual_frame": 78.0,
    "frontright_depth_in_visual_frame": 102.0,
    "right_depth_in_visual_frame": 180.0,
}
DEFAULT_QUALITY = 80  # re-encoded JPEG; the robot's own bytes keep the robot's quality
# A plan at most this quality, decoded at half size or less, cannot tell the robot's JPEG at
# quality 50 from one at 75: half-size tiles at q70 lost 0.19-0.26 dB of PSNR against an ideal
# downscale, on two photographs and the simulator's fisheye (the re-encode's own loss is 30 times
# that); at q80 they lost 0.36-0.51 dB, at q90 about 1 dB. See ``Plan.small``.
SMALL_MAX_QUALITY = 70


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything needed to render one frame for one request; hashable, the variant key."""

    shape: Shape  # the input this plan was made for
    passthrough: bool  # serve the robot's bytes: no decode, no encode
    degrees: float  # clockwise rotation, 0 <= degrees < 360
    width: int  # output size before rotation
    height: int
    reduction: int  # JPEG decoded at 1/reduction scale (1, 2, 4, 8)
    format: str  # "jpeg" | "png"
    quality: int | None  # JPEG quality of a re-encode; None when not re-encoding JPEG
    colormap: str | None  # depth colouring; None when the picture is not colour-mapped

    @property
    def out_size(self) -> tuple[int, int]:
        """(width, height) of the picture a client receives, after rotation."""
        return rotated_size(self.width, self.height, self.degrees)

    def fits(self, shape: Shape) -> bool:
        return shape == self.shape

    @property
    def small(self) -> bool:
        """A re-encode so much smaller than the robot's picture that the robot's JPEG may be
        coarser (``--small-robot-quality``) without it showing: decoded at half size or less,
        at ``SMALL_MAX_QUALITY`` or lower. The viewer page's tiles are; a passthrough, a
        full-size or lossless view, or a sharp re-encode is not."""
        return (
            self.reduction >= 2 and self.quality is not None and (self.quality <= SMALL_MAX_QUALITY)
        )


def rotation_degrees(rotate: str, source: str) -> float:
    """Clockwise degrees, 0 <= d < 360, for a ``rotate`` parameter on this camera."""
    if rotate == "auto":
        return AUTO_ROTATION_CW.get(source, 0.0) % 360
    return float(rotate) % 360


def target_size(cols: int, rows: int, width: int | None, height: int | None) -> tuple[int, int]:
    """Fit (cols, rows) inside the box, keeping aspect; never larger than native; at least 1x1."""
    scale = 1.0
    if width:
        scale = min(scale, width / cols)
    if height:
        scale = min(scale, height / rows)
    return max(1, round(cols * scale)), max(1, round(rows * scale))


def rotated_size(width: int, height: int, degrees: float) -> tuple[int, int]:
    """The canvas that holds a width x height picture turned by ``degrees`` (clockwise)."""
    if degrees % 180 == 0:
        return width, height
    if degrees % 180 == 90:
        return height, width
    rad = math.radians(degrees)
    cos, sin = abs(math.cos(rad)), abs(math.sin(rad))
    return round(height * sin + width * cos), round(height * cos + width * sin)


def jpeg_reduction(cols: int, rows: int, out_w: int, out_h: int) -> int:
    """The largest decoder reduction (1, 2, 4, 8) that still leaves at least the target size."""
    for factor in (8, 4, 2):
        if cols // factor >= out_w and rows // factor >= out_h:
            return factor
    return 1


def _fit(shape: Shape, degrees: float, width: int | None, height: int | None) -> tuple[int, int]:
    """Output size before rotation such that the rotated picture fits the client's box."""
    cols, rows = shape.cols, shape.rows
    if degrees % 180 == 90:  # the box is given in the rotated orientation
        out_h, out_w = target_size(rows, cols, width, height)
        return out_w, out_h
    if degrees % 180 == 0:
        return target_size(cols, rows, width, height)
    # An arbitrary angle grows the canvas: scale so that the canvas fits the box. Rounding to the
    # nearest pixel may overshoot by one; rounding down never does.
    rad = math.radians(degrees)
    cos, sin = abs(math.cos(rad)), abs(math.sin(rad))
    scale = 1.0
    if width:
        scale = min(scale, width / (rows * sin + cols * cos))
    if height:
        scale = min(scale, height / (rows * cos + cols * sin))
    if scale >= 1.0:
        return cols, rows
    size = max(1, round(cols * scale)), max(1, round(rows * scale))
    canvas = rotated_size(*size, degrees)
    if (width and canvas[0] > width) or (height and canvas[1] > height):
        size = max(1, int(cols * scale)), max(1, int(rows * scale))
    return size


def plan(source: str, shape: Shape, spec: RenderSpec) -> Plan:
    """Decide how ``spec`` renders a picture of ``shape`` from camera ``source``."""
    degrees = rotation_degrees(spec.rotate, source)
    width, height = _fit(shape, degrees, spec.width, spec.height)
    jpeg_in = shape.format == JPEG
    passthrough = (
        jpeg_in
        and spec.format == "jpeg"
        and spec.quality is None
        and degrees == 0
        and (width, height) == (shape.cols, shape.rows)
    )
    reduction = 1
    if jpeg_in and not passthrough and spec.format == "jpeg":
        reduction = jpeg_reduction(shape.cols, shape.rows, width, height)
    reencode = spec.format == "jpeg" and not passthrough
    return Plan(
        shape=shape,
        passthrough=passthrough,
        degrees=degrees,
        width=width,
        height=height,
        reduction=reduction,
        format=spec.format,
        quality=(spec.quality or DEFAULT_QUALITY) if reencode else None,
        colormap=spec.colormap if reencode and shape.pixel_format == DEPTH16 else None,
    )
