"""Codec: what the robot sent -> the bytes a client asked for. Pure functions, safe in threads.

Decode once, render many: a frame watched at several sizes is decoded once per JPEG reduction
factor, not once per client or variant. JPEG is decoded at 1/2, 1/4 or 1/8 scale inside the JPEG
decoder when the target allows (OpenCV ``IMREAD_REDUCED_*``): most of the cost of a thumbnail is the
full-size decode it avoids. A frame asked for as the robot sent it is not decoded at all.

Byte orders follow image.proto: DEPTH_U16 is little-endian, GREYSCALE_U16 big-endian. RLE is
"1 byte run-length before each pixel value": records of a count byte N, then one pixel of the pixel
format's width, meaning that pixel N times.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import cv2
import numpy as np
from bosdyn.api import image_pb2

_Image = image_pb2.Image
JPEG, RAW, RLE = _Image.FORMAT_JPEG, _Image.FORMAT_RAW, _Image.FORMAT_RLE
GREY8, RGB8, RGBA8 = (
    _Image.PIXEL_FORMAT_GREYSCALE_U8,
    _Image.PIXEL_FORMAT_RGB_U8,
    _Image.PIXEL_FORMAT_RGBA_U8,
)
DEPTH16, GREY16 = _Image.PIXEL_FORMAT_DEPTH_U16, _Image.PIXEL_FORMAT_GREYSCALE_U16

# pixel format -> (numpy dtype as sent, channels)
_LAYOUT: dict[int, tuple[str, int]] = {
    GREY8: ("u1", 1),
    RGB8: ("u1", 3),
    RGBA8: ("u1", 4),
    DEPTH16: ("<u2", 1),
    GREY16: (">u2", 1),
}

ROTATIONS = ("0", "90", "180", "270", "auto")
COLORMAPS = ("turbo", "jet", "inferno", "magma", "plasma", "viridis", "bone", "gray")
_CV_COLORMAPS = {
    "turbo": cv2.COLORMAP_TURBO,
    "jet": cv2.COLORMAP_JET,
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "plasma": cv2.COLORMAP_PLASMA,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "bone": cv2.COLORMAP_BONE,
}
# The SDK's image viewer (python/examples/get_image) turns these fisheyes upright with
# scipy.ndimage.rotate(angle), angles counter-clockwise; ours are clockwise, hence the sign.
AUTO_ROTATION_CW = {
    "frontleft_fisheye_image": 78.0,
    "frontright_fisheye_image": 102.0,
    "right_fisheye_image": 180.0,
}
DEFAULT_QUALITY = 80
_FORMAT_KIND = {JPEG: "jpeg", RAW: "raw", RLE: "rle"}

Observer = Callable[[str, str, float], None]
"""Called as observe("decode" | "encode", kind, seconds): lets the caller time the stages
(metrics) without the codec knowing about them."""
DEPTH_MAX_M = 5.0  # fixed colour range, so colours mean the same distance in every frame


class CodecError(ValueError):
    """Robot data that cannot be decoded (corrupt, wrong length, unsupported); counted, skipped."""


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


@dataclass(frozen=True, slots=True)
class RenderSpec:
    """One stream or snapshot variant; hashable, so the hub can share renderings by it."""

    width: int | None = None
    height: int | None = None
    quality: int | None = None
    rotate: str = "0"
    colormap: str = "turbo"
    format: str = "jpeg"


# -- planning -------------------------------------------------------------------------------------


def rotation_degrees(rotate: str, source_name: str) -> float:
    if rotate == "auto":
        return AUTO_ROTATION_CW.get(source_name, 0.0)
    return float(rotate)


def _quarter_turn(degrees: float) -> bool:
    return degrees % 180 == 90


def target_size(cols: int, rows: int, width: int | None, height: int | None) -> tuple[int, int]:
    """Fit (cols, rows) inside the box, keeping aspect; never larger than native; at least 1x1."""
    scale = 1.0
    if width:
        scale = min(scale, width / cols)
    if height:
        scale = min(scale, height / rows)
    return max(1, round(cols * scale)), max(1, round(rows * scale))


def jpeg_reduction(cols: int, rows: int, out_w: int, out_h: int) -> int:
    """The largest decoder reduction (1, 2, 4, 8) that still leaves at least the target size."""
    for factor in (8, 4, 2):
        if cols // factor >= out_w and rows // factor >= out_h:
            return factor
    return 1


def _plan(image: ImageData, spec: RenderSpec, source_name: str) -> tuple[float, int, int]:
    """(clockwise degrees, output width, output height before rotation)."""
    degrees = rotation_degrees(spec.rotate, source_name) % 360
    cols, rows = image.cols, image.rows
    if _quarter_turn(degrees):  # the box is given in the rotated orientation
        out_h, out_w = target_size(rows, cols, spec.width, spec.height)
    elif degrees:  # an arbitrary angle grows the canvas; fit its bounding box
        rad = math.radians(degrees)
        bw = abs(cols * math.cos(rad)) + abs(rows * math.sin(rad))
        bh = abs(cols * math.sin(rad)) + abs(rows * math.cos(rad))
        fw, fh = target_size(round(bw), round(bh), spec.width, spec.height)
        scale = min(fw / bw, fh / bh, 1.0)
        out_w, out_h = max(1, round(cols * scale)), max(1, round(rows * scale))
    else:
        out_w, out_h = target_size(cols, rows, spec.width, spec.height)
    return degrees, out_w, out_h


def is_passthrough(image: ImageData, spec: RenderSpec, source_name: str = "") -> bool:
    """Asked for as the robot sent it: serve its JPEG bytes, no decode, no re-encode."""
    return (
        image.format == JPEG
        and spec.format == "jpeg"
        and spec.quality is None
        and rotation_degrees(spec.rotate, source_name) % 360 == 0
        and target_size(image.cols, image.rows, spec.width, spec.height) == (image.cols, image.rows)
    )


def looks_like_jpeg(data: bytes) -> bool:
    """Cheap structural check for passthrough frames, which are never decoded: SOI ... EOI."""
    return len(data) > 4 and data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"


# -- decoding -------------------------------------------------------------------------------------


def decode_rle(data: bytes, rows: int, cols: int, bytes_per_pixel: int) -> bytes:
    record = 1 + bytes_per_pixel
    if len(data) % record:
        raise CodecError(f"RLE data of {len(data)} bytes is not whole {record}-byte records")
    recs = np.frombuffer(data, np.uint8).reshape(-1, record)
    counts = recs[:, 0].astype(np.int64)
    total = int(counts.sum())
    if total != rows * cols:
        raise CodecError(f"RLE decodes to {total} pixels, expected {rows}x{cols}={rows * cols}")
    return np.repeat(recs[:, 1:], counts, axis=0).tobytes()


def _raw_to_array(data: bytes, image: ImageData) -> np.ndarray:
    layout = _LAYOUT.get(image.pixel_format)
    if layout is None:
        raise CodecError(f"unsupported pixel format {image.pixel_format}")
    dtype, channels = layout
    expected = image.rows * image.cols * channels * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise CodecError(
            f"RAW {_Image.PixelFormat.Name(image.pixel_format)} {image.cols}x{image.rows}: "
            f"{len(data)} bytes, expected {expected}"
        )
    arr = np.frombuffer(data, dtype)
    shape = (image.rows, image.cols) if channels == 1 else (image.rows, image.cols, channels)
    arr = arr.reshape(shape)
    if channels == 3:
        return cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    if channels == 4:
        return cv2.cvtColor(arr, cv2.COLOR_RGBA2BGR)
    return arr.astype(np.uint16) if arr.dtype.itemsize == 2 else arr


_REDUCED = {
    (1, True): cv2.IMREAD_GRAYSCALE,
    (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4,
    (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
    (1, False): cv2.IMREAD_COLOR,
    (2, False): cv2.IMREAD_REDUCED_COLOR_2,
    (4, False): cv2.IMREAD_REDUCED_COLOR_4,
    (8, False): cv2.IMREAD_REDUCED_COLOR_8,
}


def decode(image: ImageData, reduction: int = 1) -> np.ndarray:
    """uint8 grey (H, W) or BGR (H, W, 3), or uint16 (H, W); JPEG at 1/reduction scale."""
    if image.format == JPEG:
        grey = image.pixel_format in (GREY8, GREY16)
        buf = np.frombuffer(image.data, np.uint8)
        img = cv2.imdecode(buf, _REDUCED[(reduction, grey)]) if len(buf) else None
        if img is None:
            raise CodecError(f"JPEG of {len(image.data)} bytes does not decode")
        want = (math.ceil(image.rows / reduction), math.ceil(image.cols / reduction))
        if image.rows and image.cols and img.shape[:2] != want:
            raise CodecError(f"JPEG is {img.shape[1]}x{img.shape[0]}, expected {want[1]}x{want[0]}")
        return img
    if image.format == RAW:
        return _raw_to_array(image.data, image)
    if image.format == RLE:
        layout = _LAYOUT.get(image.pixel_format)
        if layout is None:
            raise CodecError(f"unsupported pixel format {image.pixel_format}")
        bpp = layout[1] * np.dtype(layout[0]).itemsize
        return _raw_to_array(decode_rle(image.data, image.rows, image.cols, bpp), image)
    raise CodecError(f"unsupported image format {image.format}")


# -- transforming ---------------------------------------------------------------------------------


def resize(img: np.ndarray, w: int, h: int, *, nearest: bool = False) -> np.ndarray:
    """Area averaging for pictures; nearest for depth, where averaging invents distances."""
    if img.shape[1] == w and img.shape[0] == h:
        return img
    if nearest:
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)
    shrinking = w < img.shape[1] or h < img.shape[0]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def rotate(img: np.ndarray, degrees_cw: float) -> np.ndarray:
    """Quarter turns are exact; other angles rotate onto a canvas that holds the whole image."""
    degrees_cw %= 360
    if degrees_cw == 0:
        return img
    quarter = {
        90: cv2.ROTATE_90_CLOCKWISE,
        180: cv2.ROTATE_180,
        270: cv2.ROTATE_90_COUNTERCLOCKWISE,
    }
    if degrees_cw in quarter:
        return cv2.rotate(img, quarter[int(degrees_cw)])
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), -degrees_cw, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    bw, bh = round(h * sin + w * cos), round(h * cos + w * sin)
    m[0, 2] += bw / 2 - w / 2
    m[1, 2] += bh / 2 - h / 2
    return cv2.warpAffine(img, m, (bw, bh), flags=cv2.INTER_LINEAR, borderValue=0)


def depth_to_colour(
    depth: np.ndarray, depth_scale: float, colormap: str, max_m: float = DEPTH_MAX_M
) -> np.ndarray:
    """uint16 depth -> BGR; 0 (no data) is black; near is the low end of the colour map."""
    scale = 255.0 / (max_m * (depth_scale or 1000.0))
    grey = cv2.convertScaleAbs(depth, alpha=scale)  # saturates beyond max_m
    if colormap == "gray":
        out = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    else:
        out = cv2.applyColorMap(grey, _CV_COLORMAPS[colormap])
    out[depth == 0] = 0
    return out


def to_display(img: np.ndarray, image: ImageData, colormap: str) -> np.ndarray:
    """An 8-bit picture for JPEG: colour-mapped depth, stretched 16-bit greyscale, else as is."""
    if img.dtype == np.uint8:
        return img
    if image.is_depth:
        return depth_to_colour(img, image.depth_scale, colormap)
    lo, hi = np.percentile(img, (1, 99))
    return cv2.convertScaleAbs(
        img, alpha=255.0 / max(1.0, hi - lo), beta=-lo * 255.0 / max(1.0, hi - lo)
    )


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise CodecError("JPEG encode failed")
    return buf.tobytes()


def encode_png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise CodecError("PNG encode failed")
    return buf.tobytes()


# -- the whole path -------------------------------------------------------------------------------


def _reduction_for(image: ImageData, spec: RenderSpec, source_name: str) -> int:
    if image.format != JPEG or spec.format == "png":
        return 1
    _, out_w, out_h = _plan(image, spec, source_name)
    return jpeg_reduction(image.cols, image.rows, out_w, out_h)


def _render_decoded(
    img: np.ndarray,
    image: ImageData,
    spec: RenderSpec,
    source_name: str,
    observe: Observer | None = None,
) -> bytes:
    start = time.perf_counter()
    out = _render_decoded_untimed(img, image, spec, source_name)
    if observe is not None:
        observe("encode", spec.format, time.perf_counter() - start)
    return out


def _timed_decode(image: ImageData, reduction: int, observe: Observer | None) -> np.ndarray:
    start = time.perf_counter()
    img = decode(image, reduction)
    if observe is not None:
        observe("decode", _FORMAT_KIND.get(image.format, "raw"), time.perf_counter() - start)
    return img


def _render_decoded_untimed(
    img: np.ndarray, image: ImageData, spec: RenderSpec, source_name: str
) -> bytes:
    degrees, out_w, out_h = _plan(image, spec, source_name)
    small = resize(img, out_w, out_h, nearest=image.is_depth)
    if spec.format == "png":  # lossless: 16-bit values stay 16-bit, no colour map
        return encode_png(rotate(small, degrees))
    out = to_display(small, image, spec.colormap)
    return encode_jpeg(rotate(out, degrees), spec.quality or DEFAULT_QUALITY)


def render(
    image: ImageData, spec: RenderSpec, source_name: str, observe: Observer | None = None
) -> bytes:
    if is_passthrough(image, spec, source_name):
        return image.data
    img = _timed_decode(image, _reduction_for(image, spec, source_name), observe)
    return _render_decoded(img, image, spec, source_name, observe)


def render_many(
    image: ImageData,
    specs: Iterable[RenderSpec],
    source_name: str,
    observe: Observer | None = None,
) -> dict[RenderSpec, bytes | CodecError]:
    """Several variants of one frame, decoding once per distinct reduction."""
    out: dict[RenderSpec, bytes | CodecError] = {}
    decoded: dict[int, np.ndarray | CodecError] = {}
    for spec in specs:
        if is_passthrough(image, spec, source_name):
            out[spec] = image.data
            continue
        factor = _reduction_for(image, spec, source_name)
        if factor not in decoded:
            try:
                decoded[factor] = _timed_decode(image, factor, observe)
            except CodecError as exc:
                decoded[factor] = exc
        img = decoded[factor]
        if isinstance(img, CodecError):
            out[spec] = img
            continue
        try:
            out[spec] = _render_decoded(img, image, spec, source_name, observe)
        except CodecError as exc:
            out[spec] = exc
    return out
