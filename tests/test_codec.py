"""The codec on real bytes: JPEGs made by a real encoder, RAW and RLE built byte by byte."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from bosdyn.api import image_pb2

from spotrelay import codec, plan
from spotrelay.codec import CodecError
from spotrelay.frames import ImageData, RenderSpec

I = image_pb2.Image  # noqa: E741 - proto namespace


def jpeg_of(img: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def grey_jpeg(w: int = 640, h: int = 480) -> ImageData:
    img = np.zeros((h, w), np.uint8)
    img[: h // 4, : w // 4] = 255  # a bright marker in the top-left corner
    return ImageData(jpeg_of(img), I.FORMAT_JPEG, I.PIXEL_FORMAT_GREYSCALE_U8, h, w)


def render(image: ImageData, spec: RenderSpec, source: str = "x") -> bytes:
    return codec.render(image, plan.plan(source, image.shape, spec))


def decoded(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None
    return img


def marker_corner(img: np.ndarray) -> str:
    g = img if img.ndim == 2 else img.mean(axis=2)
    h, w = g.shape
    corners = {
        "top-left": g[: h // 8, : w // 8],
        "top-right": g[: h // 8, -w // 8 :],
        "bottom-left": g[-h // 8 :, : w // 8],
        "bottom-right": g[-h // 8 :, -w // 8 :],
    }
    return max(corners, key=lambda k: corners[k].mean())


# -- passthrough and JPEG -------------------------------------------------------------------------


def test_passthrough_returns_the_robots_bytes():
    image = grey_jpeg()
    assert render(image, RenderSpec(), "back_fisheye_image") is image.data
    # asking for the native size explicitly, or auto-rotation of a camera that needs none
    assert render(image, RenderSpec(width=640), "back_fisheye_image") is image.data
    assert render(image, RenderSpec(rotate="auto"), "back_fisheye_image") is image.data
    assert render(image, RenderSpec(rotate="auto"), "frontleft_fisheye_image") != image.data
    assert render(image, RenderSpec(quality=50)) != image.data


def test_a_plan_for_another_shape_is_refused():
    image = grey_jpeg()
    other = plan.plan("x", grey_jpeg(320, 240).shape, RenderSpec(width=100))
    with pytest.raises(CodecError, match="plan for"):
        codec.render(image, other)


def test_reduced_decode_is_used_when_the_target_allows():
    image = grey_jpeg()
    assert codec.decode(image, 4).shape == (120, 160)
    out = decoded(render(image, RenderSpec(width=160), "x"))
    assert out.shape == (120, 160)
    assert marker_corner(out) == "top-left"


def test_colour_jpeg_stays_colour_and_reduced():
    bgr = np.zeros((480, 640, 3), np.uint8)
    bgr[..., 2] = 200  # red in BGR
    image = ImageData(jpeg_of(bgr), I.FORMAT_JPEG, I.PIXEL_FORMAT_RGB_U8, 480, 640)
    out = decoded(render(image, RenderSpec(width=320), "hand_color_image"))
    assert out.shape == (240, 320, 3)
    assert out[..., 2].mean() > 150 and out[..., 0].mean() < 50


def test_corrupt_jpeg_is_a_codec_error():
    good = grey_jpeg()
    for data in (b"", b"\xff\xd8garbage", good.data[: len(good.data) // 3]):
        bad = ImageData(data, I.FORMAT_JPEG, I.PIXEL_FORMAT_GREYSCALE_U8, 480, 640)
        with pytest.raises(CodecError):
            render(bad, RenderSpec(width=320), "x")
    assert not codec.looks_like_jpeg(good.data[:-10])
    assert codec.looks_like_jpeg(good.data)


def test_jpeg_of_the_wrong_size_is_rejected():
    image = grey_jpeg(320, 240)
    wrong = ImageData(image.data, I.FORMAT_JPEG, I.PIXEL_FORMAT_GREYSCALE_U8, 480, 640)
    with pytest.raises(CodecError, match="expected"):
        codec.decode(wrong)


# -- size and rotation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((320, None), (320, 240)),
        ((None, 120), (160, 120)),
        ((320, 100), (133, 100)),
        ((2000, None), (640, 480)),
        ((None, None), (640, 480)),
    ],
)
def test_target_size_keeps_aspect_and_never_upscales(box, expected):
    assert plan.target_size(640, 480, *box) == expected


@pytest.mark.parametrize(
    ("rotate", "corner", "shape"),
    [
        ("90", "top-right", (640, 480)),
        ("180", "bottom-right", (480, 640)),
        ("270", "bottom-left", (640, 480)),
    ],
)
def test_quarter_turns_are_clockwise(rotate, corner, shape):
    out = decoded(render(grey_jpeg(), RenderSpec(rotate=rotate), "x"))
    assert out.shape == shape
    assert marker_corner(out) == corner


def test_rotated_output_fits_the_requested_box():
    out = decoded(render(grey_jpeg(), RenderSpec(width=240, rotate="90"), "x"))
    assert out.shape == (320, 240)


def test_auto_rotation_follows_the_sdk_viewer():
    assert plan.rotation_degrees("auto", "frontleft_fisheye_image") == 78
    assert plan.rotation_degrees("auto", "frontright_fisheye_image") == 102
    assert plan.rotation_degrees("auto", "right_fisheye_image") == 180
    assert plan.rotation_degrees("auto", "back_fisheye_image") == 0
    out = decoded(render(grey_jpeg(), RenderSpec(rotate="auto"), "frontleft_fisheye_image"))
    # a 78 degree turn of 640x480 needs a canvas about 603 wide and 726 tall
    assert abs(out.shape[1] - 603) <= 2 and abs(out.shape[0] - 726) <= 2
    out = decoded(
        render(grey_jpeg(), RenderSpec(rotate="auto", width=300), "frontleft_fisheye_image")
    )
    assert out.shape[1] == 300  # the rotated picture is the width asked for


# -- RAW ------------------------------------------------------------------------------------------


def test_raw_greyscale_u16_is_big_endian():
    data = bytes([0x01, 0x02, 0xFF, 0x00])  # 258, 65280
    img = codec.decode(ImageData(data, I.FORMAT_RAW, I.PIXEL_FORMAT_GREYSCALE_U16, 1, 2))
    assert img.dtype == np.uint16 and img.tolist() == [[258, 65280]]


def test_raw_depth_u16_is_little_endian():
    data = bytes([0x02, 0x01, 0x00, 0xFF])  # 258, 65280
    img = codec.decode(ImageData(data, I.FORMAT_RAW, I.PIXEL_FORMAT_DEPTH_U16, 1, 2))
    assert img.tolist() == [[258, 65280]]


def test_raw_rgb_and_rgba_become_bgr():
    rgb = bytes([255, 0, 0, 0, 0, 255])  # a red pixel, a blue pixel
    img = codec.decode(ImageData(rgb, I.FORMAT_RAW, I.PIXEL_FORMAT_RGB_U8, 1, 2))
    assert img.tolist() == [[[0, 0, 255], [255, 0, 0]]]
    rgba = bytes([255, 0, 0, 9, 0, 0, 255, 9])
    img = codec.decode(ImageData(rgba, I.FORMAT_RAW, I.PIXEL_FORMAT_RGBA_U8, 1, 2))
    assert img.tolist() == [[[0, 0, 255], [255, 0, 0]]]


def test_raw_of_the_wrong_length_is_rejected():
    with pytest.raises(CodecError, match="expected 8"):
        codec.decode(ImageData(b"\x00" * 7, I.FORMAT_RAW, I.PIXEL_FORMAT_DEPTH_U16, 2, 2))
    with pytest.raises(CodecError):
        codec.decode(ImageData(b"\x00" * 4, I.FORMAT_RAW, I.PIXEL_FORMAT_UNKNOWN, 2, 2))


# -- RLE ------------------------------------------------------------------------------------------


def test_rle_hand_written_bytes():
    # 3 x 0x07, 1 x 0x09, 2 x 0x00 -> a 2x3 greyscale image
    data = bytes([3, 7, 1, 9, 2, 0])
    img = codec.decode(ImageData(data, I.FORMAT_RLE, I.PIXEL_FORMAT_GREYSCALE_U8, 2, 3))
    assert img.tolist() == [[7, 7, 7], [9, 0, 0]]
    # 16-bit depth, little-endian pixel after each count: 2 x 1000 mm, 1 x 0 (no data), 1 x 258
    data = bytes([2, 0xE8, 0x03, 1, 0, 0, 1, 0x02, 0x01])
    img = codec.decode(ImageData(data, I.FORMAT_RLE, I.PIXEL_FORMAT_DEPTH_U16, 2, 2))
    assert img.tolist() == [[1000, 1000], [0, 258]]


def _rle(pixels: np.ndarray, bpp: int) -> bytes:
    """An independent encoder: runs of at most 255, each a count byte then one pixel."""
    flat = pixels.reshape(-1).view(np.uint8).reshape(-1, bpp)
    out, i = bytearray(), 0
    while i < len(flat):
        j = i
        while j < len(flat) and j - i < 255 and (flat[j] == flat[i]).all():
            j += 1
        out += bytes([j - i]) + flat[i].tobytes()
        i = j
    return bytes(out)


def test_rle_round_trips_with_long_runs():
    rng = np.random.default_rng(1)
    depth = np.repeat(rng.integers(0, 5000, 40, dtype=np.uint16), 300).astype("<u2")
    depth = depth[: 60 * 200].reshape(60, 200)  # runs of 300 force splits at 255
    data = _rle(depth, 2)
    assert max(data[::3]) == 255
    img = codec.decode(ImageData(data, I.FORMAT_RLE, I.PIXEL_FORMAT_DEPTH_U16, 60, 200))
    assert np.array_equal(img, depth)
    grey = rng.integers(0, 3, (30, 40), dtype=np.uint8)
    img = codec.decode(ImageData(_rle(grey, 1), I.FORMAT_RLE, I.PIXEL_FORMAT_GREYSCALE_U8, 30, 40))
    assert np.array_equal(img, grey)


@pytest.mark.parametrize(
    "data",
    [bytes([2, 7, 1]), bytes([2, 7, 1, 7]), bytes([3, 7, 3, 7, 1, 7]), b""],
    ids=["truncated record", "too few pixels", "too many pixels", "empty"],
)
def test_rle_that_does_not_decode_to_rows_by_cols_is_rejected(data):
    with pytest.raises(CodecError):
        codec.decode(ImageData(data, I.FORMAT_RLE, I.PIXEL_FORMAT_GREYSCALE_U8, 1, 5))


# -- depth ----------------------------------------------------------------------------------------


def depth_image() -> ImageData:
    depth = np.zeros((240, 424), np.uint16)
    depth[:, 100:200] = 800  # near
    depth[:, 200:300] = 4500  # far
    depth[:, 330:] = 65535  # no return
    return ImageData(
        depth.astype("<u2").tobytes(), I.FORMAT_RAW, I.PIXEL_FORMAT_DEPTH_U16, 240, 424
    )


def test_depth_colour_map_fixed_range_and_black_holes():
    image = depth_image()
    out = decoded(render(image, RenderSpec(quality=100), "left_depth"))
    assert out.shape == (240, 424, 3)
    assert out[:, 10:90].max() < 20  # no data stays black
    assert out[:, 340:].max() < 20  # so does no return (it was drawn as "far")
    near, far = out[:, 120:180].mean(axis=(0, 1)), out[:, 220:280].mean(axis=(0, 1))
    assert np.abs(near - far).sum() > 100
    again = decoded(render(image, RenderSpec(quality=100), "left_depth"))
    assert np.array_equal(out, again)  # same distance, same colour: no per-frame stretching
    grey = decoded(render(image, RenderSpec(quality=100, colormap="gray"), "left_depth"))
    assert np.abs(grey[..., 0].astype(int) - grey[..., 2]).max() < 10


@pytest.mark.parametrize("colormap", codec.COLORMAPS)
def test_depth_colours_from_the_table_are_those_of_each_pixel(colormap):
    """The lookup table changes no byte: every uint16 value, every colour map, odd scales."""
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    rng = np.random.default_rng(7)
    frame = rng.integers(0, 8000, (181, 320)).astype(np.uint16)
    frame[:10], frame[10:20] = 0, 65535
    for depth in (every, frame):
        for scale in (1000.0, 999.5, 0.0):
            table = codec.depth_to_colour(depth, scale, colormap)
            each = codec.colour_depth(depth, scale, colormap)
            assert table.dtype == each.dtype and np.array_equal(table, each)


def test_depth_png_is_16_bit_and_lossless():
    image = depth_image()
    out = decoded(render(image, RenderSpec(format="png"), "left_depth"))
    assert out.dtype == np.uint16
    assert np.array_equal(out, np.frombuffer(image.data, "<u2").reshape(240, 424))


def test_greyscale_u16_is_stretched_for_display():
    ramp = np.tile(np.linspace(20000, 30000, 64, dtype=np.uint16), (48, 1))
    image = ImageData(
        ramp.astype(">u2").tobytes(), I.FORMAT_RAW, I.PIXEL_FORMAT_GREYSCALE_U16, 48, 64
    )
    out = decoded(render(image, RenderSpec(quality=100), "ir"))
    assert out.dtype == np.uint8 and out.min() < 30 and out.max() > 220


def test_render_many_shares_decodes_and_isolates_errors():
    image = grey_jpeg()
    specs = [
        RenderSpec(),
        RenderSpec(width=320),
        RenderSpec(width=320, quality=30),
        RenderSpec(rotate="90"),
    ]
    plans = [plan.plan("x", image.shape, s) for s in specs]
    decodes = []
    out = codec.render_many(image, plans, lambda stage, kind, t: decodes.append(stage))
    assert out[plans[0]] is image.data
    assert decoded(out[plans[1]]).shape == (240, 320)
    assert len(out[plans[2]]) < len(out[plans[1]])
    assert decoded(out[plans[3]]).shape == (640, 480)
    assert decodes.count("decode") == 2  # one at 1/2 scale for both 320s, one full for the turn
    bad = ImageData(image.data[:100], I.FORMAT_JPEG, I.PIXEL_FORMAT_GREYSCALE_U8, 480, 640)
    out = codec.render_many(bad, plans)
    assert all(isinstance(out[p], CodecError) for p in plans[1:])
