"""The RTSP encoder's pipeline in-process (GStreamer, x264, real JPEG in, H.264 RTP out): what its
latency and timestamps are made of, without a server or a network."""

from __future__ import annotations

import itertools
import os
import time

import cv2
import numpy as np
import pytest

from spotrelay.frames import RenderSpec
from spotrelay.hub import Encoded
from spotrelay.rtsp import engine
from spotrelay.rtsp.server import Feed, Rendering, nominal_rate, pipeline
from tests.wait import wait_until

try:
    GST: engine.Gst | None = engine.load()
    REASON = ""
except engine.Unavailable as exc:
    GST, REASON = None, str(exc)
pytestmark = pytest.mark.skipif(
    GST is None and not os.environ.get("CI"), reason=f"needs GStreamer and x264: {REASON}"
)


class Media:
    """What a Feed reads of GstRTSPMedia: its element (the bin the launch line makes)."""

    def __init__(self, element):
        self.element = element

    def get_element(self):
        return self.element


@pytest.fixture
def encoder():
    """The launch line's bin in a pipeline of its own: (the feed, the running times of the
    frames out of x264, the indexes of those that are IDRs)."""
    g = GST.Gst
    r = Rendering("frontleft_fisheye_image", RenderSpec(), None, 1400, (640, 480))
    element = g.parse_launch(pipeline(r))
    pipe = g.Pipeline.new("test")
    pipe.add(element)
    sink = g.ElementFactory.make("fakesink")
    sink.set_property("sync", False)
    sink.set_property("async", False)  # playing at once, as a live RTSP media is
    pipe.add(sink)
    pad = g.GhostPad.new("src", element.get_by_name("pay0").get_static_pad("src"))
    element.add_pad(pad)
    pad.link(sink.get_static_pad("sink"))
    sent: list[int] = []  # running times of the frames the encoder handed over
    keys: list[int] = []  # ... and which of them (their index) are IDRs

    def encoded(pad, info):
        buf = info.get_buffer()
        seg = pad.get_sticky_event(g.EventType.SEGMENT, 0).parse_segment()
        if not buf.has_flags(g.BufferFlags.DELTA_UNIT):
            keys.append(len(sent))
        sent.append(seg.to_running_time(g.Format.TIME, buf.pts))
        return g.PadProbeReturn.OK

    element.get_by_name("enc").get_static_pad("src").add_probe(g.PadProbeType.BUFFER, encoded)
    feed = Feed(GST, r, Media(element), lambda seconds: None)
    pipe.set_state(g.State.PLAYING)
    pipe.get_state(5 * g.SECOND)
    feed.set_rate(15)  # as the server does: from the event loop, the media already playing
    yield feed, sent, keys
    pipe.set_state(g.State.NULL)
    feed.close()


def jpeg(i: int) -> bytes:
    picture = np.full((480, 640, 3), (i * 37) % 256, np.uint8)
    cv2.putText(picture, str(i), (200, 300), cv2.FONT_HERSHEY_SIMPLEX, 6, (255, 255, 255), 8)
    return cv2.imencode(".jpg", picture)[1].tobytes()


def test_each_frame_leaves_the_encoder_before_the_next_is_captured(encoder):
    """JPEG caps carry no frame rate; without one x264 held each frame until the next arrived,
    a frame's interval (67 ms at 15 fps) added to every frame's latency."""
    feed, sent, _ = encoder
    base = feed.pipeline.get_base_time()
    for i in range(6):
        captured = time.time() - 0.030  # as the robot stamps it, some time before it arrives
        feed.push(Encoded(jpeg(i), captured, i))
        wait_until(lambda n=i: len(sent) > n, 5, f"frame {i} out of the encoder")
        # its capture time, not the time it was pushed or encoded
        assert abs(sent[i] - (int(captured * 1e9) - base)) < 1_000_000


def test_a_new_frame_rate_midstream_keeps_every_frame_flowing(encoder):
    """The hand camera changes rate (15, 30, 60 Hz): the encoder's budget per frame follows."""
    feed, sent, _ = encoder
    for i in range(12):
        if i == 6:
            feed.set_rate(30)
        feed.push(Encoded(jpeg(i), time.time() - 0.030, i))
        wait_until(lambda n=i: len(sent) > n, 5, f"frame {i} out of the encoder")


@pytest.mark.parametrize(
    ("asked", "measured", "current", "expected"),
    [
        (5, 15.0, None, 5),  # the client's fps
        (0.4, 15.0, None, 1),
        (60, 15.0, None, 15),  # more than the camera gives: the camera's
        (None, 400.0, None, 60),  # a burst: not a rate
        (None, 1.0, None, 15),  # an unwatched camera, refreshed once a second: Spot's rate
        (None, 0.0, None, 15),
        (None, 29.6, None, 30),  # a hand camera someone already watches at 30 Hz
        (None, 14.2, 15, 15),  # jitter: unchanged
        (None, 59.8, 15, 60),  # the hand camera went to 60 Hz
        (None, 33.0, 30, 30),  # ... then jitters
        (None, 14.9, 60, 15),  # ... and back to 15 Hz
        (None, 0.0, 15, 15),  # no measure yet
        (None, 7.0, 15, 15),  # a moment's hiccup: the budget stays
    ],
)
def test_the_rate_the_bitrate_is_spread_over(asked, measured, current, expected):
    assert nominal_rate(asked, measured, current) == expected


def test_a_camera_that_changes_resolution_keeps_its_stream(encoder):
    """The gripper camera switches modes (640x480 to 1280x720) while clients watch: the stream
    keeps its size, the new pictures scaled into it with borders (square pixels), rather than
    failing to negotiate."""
    feed, sent, _ = encoder
    wide = np.zeros((720, 1280, 3), np.uint8)
    for i in range(8):
        data = jpeg(i) if i < 4 else cv2.imencode(".jpg", wide)[1].tobytes()
        feed.push(Encoded(data, time.time() - 0.030, i))
        wait_until(lambda n=i: len(sent) > n, 5, f"frame {i} out of the encoder")
    caps = feed.encoder.get_static_pad("sink").get_current_caps().get_structure(0)
    assert (caps.get_value("width"), caps.get_value("height")) == (640, 480)
    assert caps.get_fraction("pixel-aspect-ratio")[1:] == (1, 1)


def test_an_idr_every_second_of_stream_whatever_the_rate(encoder):
    """A late joiner waits at most a second for a picture: at 15 Hz and at 60 Hz alike (x264's
    own interval counts frames, and the rate changes under it)."""
    feed, sent, keys = encoder
    start = time.time() - 1.0
    at = 0.0
    for i in range(75):  # 2 s at 15 Hz, then 1 s at 60 Hz
        if i == 30:
            feed.set_rate(60)
        at += 1 / 15 if i < 30 else 1 / 60
        feed.push(Encoded(jpeg(i), start + at, i))
        wait_until(lambda n=i: len(sent) > n, 5, f"frame {i} out of the encoder")
    gaps = [(sent[b] - sent[a]) / 1e9 for a, b in itertools.pairwise(keys)]
    assert len(keys) >= 3 and all(0.9 < g <= 1.0 + 1e-6 for g in gaps), (keys, gaps)
