"""The simulated robot, driven only through the official SDK over TLS, as the relay drives Spot."""

from __future__ import annotations

import time

import bosdyn.client
import cv2
import numpy as np
import pytest
from bosdyn.api import image_pb2
from bosdyn.client.auth import InvalidLoginError
from bosdyn.client.exceptions import UnauthenticatedError
from bosdyn.client.image import (
    ImageClient,
    ImageDataError,
    UnknownImageSourceError,
    build_image_request,
)
from bosdyn.client.payload_registration import InvalidPayloadCredentialsError

from spotrelay import codec
from spotrelay.frames import ImageData

I = image_pb2.Image  # noqa: E741
pytestmark = pytest.mark.e2e


def sdk_robot(sim):
    sdk = bosdyn.client.create_standard_sdk("spotrelay-test")
    sdk.load_robot_cert(sim.ca_path)
    robot = sdk.create_robot("127.0.0.1")
    robot.update_secure_channel_port(sim.port)
    return robot


@pytest.fixture
def robot(sim):
    r = sdk_robot(sim)
    r.authenticate(sim.username, sim.password)
    yield r
    r._shutdown()


def test_password_login_and_wrong_password(sim):
    robot = sdk_robot(sim)
    with pytest.raises(InvalidLoginError):
        robot.authenticate(sim.username, "wrong")
    robot.authenticate(sim.username, sim.password)
    names = {e.name for e in robot.list_services()}
    assert {"image", "time-sync", "directory", "auth"} <= names


def test_payload_credentials_login(sim):
    robot = sdk_robot(sim)
    with pytest.raises(InvalidPayloadCredentialsError):
        robot.authenticate_from_payload_credentials(sim.payload_guid, "nope", timeout=5)
    robot.authenticate_from_payload_credentials(sim.payload_guid, sim.payload_secret, timeout=5)
    assert robot.ensure_client(ImageClient.default_service_name).list_image_sources()


def test_services_need_a_token(sim):
    robot = sdk_robot(sim)
    with pytest.raises(UnauthenticatedError):
        robot.ensure_client(ImageClient.default_service_name)


def test_time_sync_recovers_the_robots_clock_skew(robot, sim):
    robot.time_sync.wait_for_sync(timeout_sec=10)
    skew = robot.time_sync.get_robot_clock_skew()
    assert abs(skew.seconds + skew.nanos * 1e-9 - sim.clock_skew) < 0.01


def test_sources_look_like_spots(robot):
    sources = {s.name: s for s in robot.ensure_client("image").list_image_sources()}
    assert len(sources) == 11
    fl = sources["frontleft_fisheye_image"]
    assert (fl.cols, fl.rows, fl.image_type) == (640, 480, image_pb2.ImageSource.IMAGE_TYPE_VISUAL)
    d = sources["back_depth"]
    assert (d.cols, d.rows, d.depth_scale) == (424, 240, 1000.0)
    assert list(d.pixel_formats) == [I.PIXEL_FORMAT_DEPTH_U16]


def test_frames_decode_and_advance_at_the_capture_rate(robot, sim):
    client = robot.ensure_client("image")
    req = [build_image_request("hand_color_image", quality_percent=75, image_format=I.FORMAT_JPEG)]
    first = client.get_image(req)[0]
    img = cv2.imdecode(np.frombuffer(first.shot.image.data, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (480, 640, 3)
    stamps = set()
    end = time.time() + 1.0
    while time.time() < end:
        r = client.get_image(req)[0]
        stamps.add(r.shot.acquisition_time.seconds + r.shot.acquisition_time.nanos * 1e-9)
    assert 13 <= len(stamps) <= 17
    # acquisition time is on the robot's (skewed) clock
    latest = max(stamps)
    assert abs(latest - (time.time() + sim.clock_skew)) < 0.2


def test_depth_rle_matches_raw(robot):
    client = robot.ensure_client("image")
    raw, rle = client.get_image(
        [
            build_image_request("left_depth", image_format=I.FORMAT_RAW),
            build_image_request("left_depth", image_format=I.FORMAT_RLE),
        ]
    )
    assert raw.shot.acquisition_time == rle.shot.acquisition_time
    assert len(raw.shot.image.data) == 424 * 240 * 2
    assert len(rle.shot.image.data) < len(raw.shot.image.data) / 2
    as_raw = codec.decode(
        ImageData(raw.shot.image.data, I.FORMAT_RAW, I.PIXEL_FORMAT_DEPTH_U16, 240, 424)
    )
    as_rle = codec.decode(
        ImageData(rle.shot.image.data, I.FORMAT_RLE, I.PIXEL_FORMAT_DEPTH_U16, 240, 424)
    )
    assert np.array_equal(as_raw, as_rle)
    assert (as_raw == 0).any() and 300 < np.median(as_raw[as_raw > 0]) < 5000


def test_a_bad_source_fails_the_batch_but_the_response_has_the_rest(robot):
    client = robot.ensure_client("image")
    with pytest.raises(UnknownImageSourceError) as info:
        client.get_image([build_image_request("back_fisheye_image"), build_image_request("nope")])
    good = [r for r in info.value.response.image_responses if r.status == r.STATUS_OK]
    assert [r.source.name for r in good] == ["back_fisheye_image"]
    assert good[0].shot.image.data


def test_faults(robot, clean_sim):
    sim = clean_sim
    client = robot.ensure_client("image")
    sim.set_fault("left_fisheye_image", "error")
    with pytest.raises(ImageDataError):
        client.get_image([build_image_request("left_fisheye_image")])
    sim.set_fault("left_fisheye_image", "corrupt")
    data = client.get_image([build_image_request("left_fisheye_image")])[0].shot.image.data
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is None
    sim.set_fault("left_fisheye_image", "stall")
    a = client.get_image([build_image_request("left_fisheye_image")])[0]
    time.sleep(0.2)
    b = client.get_image([build_image_request("left_fisheye_image")])[0]
    assert a.shot.acquisition_time == b.shot.acquisition_time
    sim.set_fault("left_fisheye_image", None)
    sim.rpc_latency = 0.2
    start = time.time()
    client.get_image([build_image_request("left_fisheye_image")])
    assert time.time() - start >= 0.2


def test_expired_tokens_are_refused(sim, clean_sim):
    robot = sdk_robot(sim)
    robot.authenticate(sim.username, sim.password)
    client = robot.ensure_client("image")
    client.get_image([build_image_request("back_depth")])
    sim.expire_tokens()
    with pytest.raises(UnauthenticatedError):
        client.get_image([build_image_request("back_depth")])
    robot._shutdown()
