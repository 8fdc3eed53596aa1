"""Ready for a real Spot: the relay against a simulated robot that behaves like one (several image
services, payloads registering late or failing, per-image statuses, login limits, cameras that
change mode), end to end through the SDK, TLS and HTTP."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest
from bosdyn.api import image_pb2

from spotrelay.robot.connection import AuthLimiter
from tests.mjpeg import collect, distinct_fps, parts
from tests.relay import Relay
from tests.wait import wait_until

pytestmark = pytest.mark.e2e
STATUS = image_pb2.ImageResponse


def size_of(jpeg: bytes) -> tuple[int, int]:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    return img.shape[1], img.shape[0]


@pytest.fixture
def own_sim(request, robots):
    """A robot for one test, configured by the test's ``sim_options`` marker."""
    marker = request.node.get_closest_marker("sim_options")
    return robots(**(marker.kwargs if marker else {}))


def services(relay: Relay) -> dict:
    return relay.json("/api/sources")["robot"]["services"]


@pytest.mark.sim_options(spot_cam=True, payload_camera="faulted")
def test_auto_serves_every_answering_service_and_says_which_one_fails(own_sim):
    sim = own_sim
    r = Relay.for_sim(sim, "--image-services", "auto", "--rediscover", "1")
    try:
        r.wait_ready()
        state = wait_until(lambda: services(r).get("payload-camera"), 10, "the payload tried")
        assert state["ok"] is False and "ServiceUnavailableError" in state["error"], state
        assert services(r)["image"]["ok"] and services(r)["spot-cam-image"]["ok"]
        pano = next(parts(r.url + "/stream/spot-cam-pano"))
        assert size_of(pano.body) == (1280, 640)
        sim.set_payload_state("ok")  # the payload comes back: retried, then served
        wait_until(lambda: services(r)["payload-camera"]["ok"], 20, "the payload served")
        thermal = next(p for p in parts(r.url + "/stream/payload-thermal") if not p.stale)
        assert size_of(thermal.body) == (320, 240)  # 16-bit greyscale, stretched for JPEG
        assert "lost robot" not in r.log()
    finally:
        r.stop()


@pytest.mark.sim_options(payload_camera="late", payload_late_after=3600)
def test_a_payload_service_that_registers_late_appears_without_a_restart(own_sim):
    r = Relay.for_sim(own_sim, "--image-services", "auto", "--rediscover", "1")
    try:
        r.wait_ready()
        assert "payload-camera" not in services(r)
        own_sim.set_payload_state("ok")  # the payload registers, long after the relay started
        wait_until(lambda: services(r).get("payload-camera", {}).get("ok"), 15, "late payload")
        names = {s["name"] for s in r.json("/api/sources")["sources"]}
        assert "payload-thermal" in names and "back_fisheye_image" in names
    finally:
        r.stop()


@pytest.mark.sim_options(payload_authorised=False)
def test_a_payload_not_yet_authorised_is_told_to_the_installer_and_retried(own_sim):
    sim = own_sim
    r = Relay.for_sim(sim, payload=True)
    try:
        wait_until(lambda: "admin console" in r.log(), 15, "the log saying what to do")
        state = r.json("/api/state")["robot"]
        assert not state["connected"] and "admin console" in state["last_error"]
        status, _, body = r.get("/readyz")  # open: says what kind of trouble, not the text
        assert status == 503 and json.loads(body)["reason"] == "robot login failed"
        assert b"admin console" not in body
        sim.payload_authorised = True  # an operator authorises it
        r.wait_ready(30)
    finally:
        r.stop()
    assert r.log().count("admin console") == 1  # said once, not at every retry


def test_a_wrong_login_is_retried_slower_than_the_robot_locks_logins_out(own_sim):
    r = Relay(
        [
            "--robot",
            "127.0.0.1",
            "--robot-port",
            str(own_sim.port),
            "--robot-cert",
            own_sim.ca_path,
        ],
        env={"BOSDYN_CLIENT_USERNAME": own_sim.username, "BOSDYN_CLIENT_PASSWORD": "wrong"},
    )
    try:
        wait_until(lambda: "InvalidLoginError" in r.log(), 15, "the refused login")
        first = len(own_sim.auth_requests)
        t = time.time()
        wait_until(lambda: time.time() > t + 3, what="three seconds of retries")
        assert len(own_sim.auth_requests) - first <= 1  # 15 s apart: never six a minute
        assert not own_sim.locked_out()
        status, _, body = r.get("/readyz")
        assert status == 503 and json.loads(body)["reason"] == "robot login failed"
    finally:
        r.stop()


def test_refused_logins_never_exceed_five_a_minute():
    clock = [0.0]
    limiter = AuthLimiter(clock=lambda: clock[0])
    allowed = []
    for _ in range(600):  # ten minutes of a relay retrying as fast as it likes
        if limiter.wait_time() == 0:
            limiter.note()
            allowed.append(clock[0])
        clock[0] += 1.0
    for t in allowed:
        assert sum(1 for u in allowed if t <= u < t + 60) <= 5


def test_bad_statuses_are_counted_per_source_and_never_lose_the_robot(relay, clean_sim):
    sim = clean_sim
    source = "right_fisheye_image"
    for status, label in ((STATUS.STATUS_UNKNOWN, "unknown"), (42, "unrecognized")):
        before = relay.metric(
            "spotrelay_image_errors_total", default=0, source=source, status=label
        )
        stream = parts(relay.url + f"/stream/{source}")
        sim.set_status(source, status)
        wait_until(
            lambda s=label, b=before: (
                relay.metric("spotrelay_image_errors_total", 0, source=source, status=s) > b
            ),
            10,
            f"{label} counted",
        )
        # the other cameras go on: above 10 fps over 3 s, whatever captures a busy machine makes
        # the poller miss (a status that failed the whole batch would stop them)
        other = collect(relay.url + "/stream/left_fisheye_image", seconds=3.0)
        assert distinct_fps(other) > 10
        sim.set_status(source, None)
        assert any(not p.stale for p in stream)  # and this one recovers
        stream.close()
    assert "lost robot" not in relay.log()


def test_a_camera_that_changes_mode_keeps_its_streams(relay, clean_sim):
    """The gripper camera switched to 1280x720 at 60 Hz while streams are open."""
    sim = clean_sim
    source = "hand_color_image"
    small = parts(relay.url + f"/stream/{source}?width=320")
    native = parts(relay.url + f"/stream/{source}")
    try:
        assert size_of(next(small).body) == (320, 240)
        assert size_of(next(native).body) == (640, 480)
        sim.set_rate(source, 60.0)
        sim.set_resolution(source, 1280, 720)
        wait_until(lambda: size_of(next(small).body) == (320, 180), 10, "the new shape")
        wait_until(lambda: size_of(next(native).body) == (1280, 720), 10, "native 720p")
        # the schedule learns the new rate: every capture, at 60 Hz
        wait_until(lambda: distinct_fps(collect(relay.url + f"/stream/{source}", 1.0)) > 50, 20)
    finally:  # clean_sim puts the camera back in its first mode
        small.close()
        native.close()
