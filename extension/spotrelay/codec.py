"""Codec: every decode and encode of the relay. Pure functions, safe in threads.

What the robot sent -> the bytes a plan asks for (``render``, ``render_many``), and the few
pictures the relay draws itself: the STALE banner over a stream's last picture and thumbnails.

What to do is decided beforehand by ``plan.plan``; this module only does it. Decode once, render
many: a frame watched at several sizes is decoded once per JPEG reduction factor, not once per
client or variant. JPEG is decoded at 1/2, 1/4 or 1/8 scale inside the JPEG decoder when the
target allows (OpenCV ``IMREAD_REDUCED_*``): most of the cost of a thumbnail is the full-size
decode it avoids. A passthrough plan is not decoded at all.

Byte orders follow image.proto: DEPTH_U16 is little-endian, GREYSCALE_U16 big-endian. RLE is
"1 byte run-length before each pixel value": records of a count byte N, then one pixel of the pixel
format's width, meaning that pixel N times.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable

import cv2
import numpy as np
from bosdyn.api import image_pb2

from spotrelay.frames import DEPTH16, GREY8, GREY16, JPEG, RAW, RGB8, RGBA8, RLE, ImageData
from spotrelay.plan import DEFAULT_QUALITY, Plan, rotated_size

_Image = image_pb2.Image

# pixel format -> (numpy dtype as sent, channels)
_LAYOUT: dict[int, tuple[str, int]] = {
    GREY8: ("u1", 1),
    RGB8: ("u1", 3),
    RGBA8: ("u1", 4),
    DEPTH16: ("<u2", 1),
    GREY16: (">u2", 1),
}

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
_FORMAT_KIND = {JPEG: "jpeg", RAW: "raw", RLE: "rle"}

Observer = Callable[[str, str, float], None]
"""Called as observe("decode" | "encode", kind, seconds): lets the caller time the stages
(metrics) without the codec knowing about them."""
DEPTH_MAX_M = 5.0  # fixed colour range, so colours mean the same distance in every frame
NO_RETURN = 65535


class CodecError(ValueError):
    """Robot data that cannot be decoded (corrupt, wrong length, unsupported); counted, skipped."""


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
    # little-endian 16-bit is already native: no copy (30 us for a 640x480 depth frame); the
    # array is read-only (the robot's bytes), and no render writes into a decoded picture
    return arr.astype(np.uint16, copy=False) if arr.dtype.itemsize == 2 else arr


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
    bw, bh = rotated_size(w, h, degrees_cw)
    m[0, 2] += bw / 2 - w / 2
    m[1, 2] += bh / 2 - h / 2
    return cv2.warpAffine(img, m, (bw, bh), flags=cv2.INTER_LINEAR, borderValue=0)


def depth_to_colour(
    depth: np.ndarray, depth_scale: float, colormap: str, max_m: float = DEPTH_MAX_M
) -> np.ndarray:
    """uint16 depth -> BGR; near is the low end of the colour map. 0 and 65535 are both "no
    data" (bosdyn.client.image: MAX_DEPTH_IMAGE_RANGE marks invalid depth too) and are black.

    One lookup in a table of every uint16 value (``_depth_table``): the same bytes as colouring
    each pixel (``colour_depth``) at a sixth of the cost (48 vs 314 us a 320x181 tile), which
    the viewer's five depth tiles pay 75 times a second. Each colour is packed in one uint32
    (B, G, R, 0): a lookup of scalars, then a conversion that drops the fourth byte, is less
    than half the cost of looking up rows of three bytes (112 us)."""
    packed = _depth_table(depth_scale, colormap, max_m).take(depth)
    return cv2.cvtColor(packed.view(np.uint8).reshape(*depth.shape, 4), cv2.COLOR_BGRA2BGR)


def colour_depth(
    depth: np.ndarray, depth_scale: float, colormap: str, max_m: float = DEPTH_MAX_M
) -> np.ndarray:
    """``depth_to_colour`` pixel by pixel: scale to 0-255 over 0-``max_m``, colour map, black
    for no data. The definition the table is made from."""
    scale = 255.0 / (max_m * (depth_scale or 1000.0))
    grey = cv2.convertScaleAbs(depth, alpha=scale)  # saturates beyond max_m
    if colormap == "gray":
        out = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    else:
        out = cv2.applyColorMap(grey, _CV_COLORMAPS[colormap])
    out[(depth == 0) | (depth == NO_RETURN)] = 0
    return out


@functools.lru_cache(maxsize=16)
def _depth_table(depth_scale: float, colormap: str, max_m: float) -> np.ndarray:
    """The colour of every uint16 depth value as a little-endian uint32 of B, G, R, 0 (256 KiB),
    made once per depth scale and colour map by ``colour_depth`` itself, so the lookup is
    bit-identical to it."""
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    bgr = colour_depth(every, depth_scale, colormap, max_m).reshape(65536, 3)
    bgr0 = np.zeros((65536, 4), np.uint8)
    bgr0[:, :3] = bgr
    table = bgr0.view("<u4").reshape(65536)
    table.setflags(write=False)  # shared by every codec thread
    return table


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


def _timed(observe: Observer | None, stage: str, kind: str, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    if observe is not None:
        observe(stage, kind, time.perf_counter() - start)
    return out


def _finish(img: np.ndarray, image: ImageData, plan: Plan) -> bytes:
    """Decoded pixels -> the planned picture: resize, then colour or stretch, rotate, encode."""
    small = resize(img, plan.width, plan.height, nearest=image.is_depth)
    if plan.format == "png":  # lossless: 16-bit values stay 16-bit, no colour map
        return encode_png(rotate(small, plan.degrees))
    out = to_display(small, image, plan.colormap or "turbo")
    return encode_jpeg(rotate(out, plan.degrees), plan.quality or DEFAULT_QUALITY)


def _check(image: ImageData, plan: Plan) -> None:
    if not plan.fits(image.shape):
        raise CodecError(f"plan for {plan.shape} given a {image.shape} picture")


def render(image: ImageData, plan: Plan, observe: Observer | None = None) -> bytes:
    """One planned picture of one frame; raises CodecError."""
    return render_result(render_many(image, [plan], observe)[plan])


def render_result(out: bytes | CodecError) -> bytes:
    """One entry of ``render_many``'s result: the bytes, or its CodecError raised."""
    if isinstance(out, CodecError):
        raise out
    return out


def render_many(
    image: ImageData, plans: Iterable[Plan], observe: Observer | None = None
) -> dict[Plan, bytes | CodecError]:
    """Several plans of one frame, decoding once per distinct reduction; one failure each."""
    out: dict[Plan, bytes | CodecError] = {}
    decoded: dict[int, np.ndarray | CodecError] = {}
    kind = _FORMAT_KIND.get(image.format, "raw")
    for plan in plans:
        try:
            _check(image, plan)
            if plan.passthrough:
                out[plan] = image.data
                continue
            if plan.reduction not in decoded:
                try:
                    decoded[plan.reduction] = _timed(
                        observe, "decode", kind, decode, image, plan.reduction
                    )
                except CodecError as exc:
                    decoded[plan.reduction] = exc
            img = decoded[plan.reduction]
            if isinstance(img, CodecError):
                raise img
            out[plan] = _timed(observe, "encode", plan.format, _finish, img, image, plan)
        except CodecError as exc:
            out[plan] = exc
    return out


# -- pictures of the relay's own -----------------------------------------------------------------


def stale_picture(jpeg: bytes | None, size: tuple[int, int], quality: int, text: str) -> bytes:
    """The last picture darkened under a banner (``text``), or a grey placeholder of ``size``
    (width, height) if there never was one or it does not decode."""
    img = None
    if jpeg is not None:
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        w, h = size
        img = np.full((h, w, 3), 48, np.uint8)
    else:
        img = (img * 0.5).astype(np.uint8)
    h, w = img.shape[:2]
    scale = max(0.4, w / 640)
    thick = max(1, round(2 * scale))
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x, y = max(0, (w - tw) // 2), (h + th) // 2
    cv2.rectangle(img, (x - 8, y - th - 8), (x + tw + 8, y + 8), (0, 0, 160), -1)
    cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick)
    return encode_jpeg(img, quality)


def thumbnail_of_jpeg(jpeg: bytes, width: int, quality: int = 70) -> bytes:
    """A JPEG at most ``width`` wide; a grey picture if it cannot be decoded (a thumbnail never
    fails what it illustrates)."""
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
    if img is None:
        img = np.full((width * 3 // 4, width, 3), 48, np.uint8)
    h, w = img.shape[:2]
    if w > width:
        img = resize(img, width, max(1, round(h * width / w)))
    return encode_jpeg(img, quality)
