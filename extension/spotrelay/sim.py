"""A simulated Spot: a real gRPC server over TLS, with its own CA, speaking the robot's API.

It is a test double of the robot, not of our code: the relay reaches it only through the official
SDK, exactly as it reaches a robot (login or payload credentials, directory, time sync with a
skewed clock, image service). Cameras are like Spot's: five body fisheyes (640x480 greyscale, JPEG
or RAW), their depth cameras (424x240 DEPTH_U16, RAW or RLE) and the hand camera (640x480 RGB).

Each source captures at ``rate_hz`` on the robot's clock with its own phase; a capture becomes
available ``capture_latency`` after its acquisition time, and GetImage answers with the latest
available one, so asking twice within a period returns the same capture, as on the robot.
Content is rendered once at start-up (a loop of frames with a moving object and a counter) and
encodings are cached, so serving costs a protobuf copy: a small machine can run the robot, the
relay and its clients at once.

Faults for tests: added RPC latency, per-source errors / corrupt data / stalls, the whole robot
unavailable, and expiry of every issued token.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import ipaddress
import json
import math
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import cv2
import grpc
import numpy as np
from bosdyn.api import (
    auth_pb2,
    directory_pb2,
    header_pb2,
    image_pb2,
    payload_registration_pb2,
    robot_id_pb2,
    time_sync_pb2,
)
from bosdyn.api import auth_service_pb2_grpc as auth_grpc
from bosdyn.api import directory_service_pb2_grpc as directory_grpc
from bosdyn.api import image_service_pb2_grpc as image_grpc
from bosdyn.api import payload_registration_service_pb2_grpc as payload_grpc
from bosdyn.api import robot_id_service_pb2_grpc as robot_id_grpc
from bosdyn.api import time_sync_service_pb2_grpc as time_sync_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Image = image_pb2.Image
LOOP_FRAMES = 45  # 3 s of distinct pictures at 15 Hz


@dataclass(frozen=True)
class Camera:
    name: str
    cols: int
    rows: int
    pixel_format: int
    image_type: int
    formats: tuple[int, ...]  # the first is the default

    @property
    def is_depth(self) -> bool:
        return self.pixel_format == Image.PIXEL_FORMAT_DEPTH_U16


_BODY = ("frontleft", "frontright", "left", "right", "back")
CAMERAS: tuple[Camera, ...] = (
    *(
        Camera(
            f"{n}_fisheye_image",
            640,
            480,
            Image.PIXEL_FORMAT_GREYSCALE_U8,
            image_pb2.ImageSource.IMAGE_TYPE_VISUAL,
            (Image.FORMAT_JPEG, Image.FORMAT_RAW),
        )
        for n in _BODY
    ),
    *(
        Camera(
            f"{n}_depth",
            424,
            240,
            Image.PIXEL_FORMAT_DEPTH_U16,
            image_pb2.ImageSource.IMAGE_TYPE_DEPTH,
            (Image.FORMAT_RAW, Image.FORMAT_RLE),
        )
        for n in _BODY
    ),
    Camera(
        "hand_color_image",
        640,
        480,
        Image.PIXEL_FORMAT_RGB_U8,
        image_pb2.ImageSource.IMAGE_TYPE_VISUAL,
        (Image.FORMAT_JPEG, Image.FORMAT_RAW),
    ),
)


# -- certificates ---------------------------------------------------------------------------------


def make_certs(directory: str) -> tuple[str, bytes, bytes]:
    """A CA and a server certificate for *.spot.robot (the SDK overrides the TLS name)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spotrelay simulated robot CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(d) for d in ("*.spot.robot", "spot.robot", "localhost")]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.spot.robot")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path = os.path.join(directory, "sim-robot-ca.pem")
    with open(ca_path, "wb") as fh:
        fh.write(ca.public_bytes(pem))
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca_path, key_pem, cert.public_bytes(pem)


# -- pictures -------------------------------------------------------------------------------------


def _render_loop(cam: Camera, index: int) -> list[np.ndarray]:
    """LOOP_FRAMES pictures: a textured scene, a moving object and a frame counter."""
    rng = np.random.default_rng(index)
    h, w = cam.rows, cam.cols
    yy, xx = np.mgrid[0:h, 0:w]
    if cam.is_depth:
        floor = (600 + 3400 * (1 - yy / h) ** 2).astype(np.uint16)  # far at the top, near below
        holes = rng.random((h, w)) < 0.02
        out = []
        for k in range(LOOP_FRAMES):
            d = floor.copy()
            cx = int((0.15 + 0.7 * (0.5 + 0.5 * math.sin(2 * math.pi * k / LOOP_FRAMES))) * w)
            cv2.rectangle(d, (cx - 30, h // 3), (cx + 30, h // 3 + 80), 1200 + 80 * index, -1)
            d[holes] = 0
            out.append(d)
        return out
    base = ((xx * 0.25 + yy * 0.15) % 64 + 40).astype(np.uint8)
    base = cv2.add(base, rng.integers(0, 50, (h, w), dtype=np.uint8))
    for _ in range(12):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        cv2.rectangle(
            base,
            (x, y),
            (x + int(rng.integers(20, 90)), y + int(rng.integers(20, 90))),
            int(rng.integers(60, 220)),
            -1,
        )
    if cam.pixel_format == Image.PIXEL_FORMAT_RGB_U8:
        base = cv2.applyColorMap(base, cv2.COLORMAP_OCEAN)
    out = []
    for k in range(LOOP_FRAMES):
        img = base.copy()
        t = 2 * math.pi * k / LOOP_FRAMES
        centre = (int(w / 2 + w / 3 * math.cos(t)), int(h / 2 + h / 3 * math.sin(t)))
        colour = (40, 200, 255) if img.ndim == 3 else 255
        cv2.circle(img, centre, 36, colour, -1)
        cv2.putText(img, cam.name, (16, 36), cv2.FONT_HERSHEY_SIMPLEX, 0.9, colour, 2)
        cv2.putText(img, f"sim #{k:02d}", (16, h - 20), cv2.FONT_HERSHEY_SIMPLEX, 0.9, colour, 2)
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)  # the robot sends RGB
        out.append(img)
    return out


def rle_encode(pixels: np.ndarray, bytes_per_pixel: int) -> bytes:
    """image.proto RLE: a count byte (1..255) then one pixel, for each run."""
    flat = np.ascontiguousarray(pixels).view(np.uint8).reshape(-1, bytes_per_pixel)
    change = np.any(flat[1:] != flat[:-1], axis=1)
    starts = np.concatenate(([0], np.nonzero(change)[0] + 1))
    lengths = np.diff(np.concatenate((starts, [len(flat)])))
    records = []
    for start, length in zip(starts, lengths, strict=True):
        value = flat[start].tobytes()
        while length > 0:
            n = min(255, int(length))
            records.append(bytes([n]) + value)
            length -= n
    return b"".join(records)


class _Content:
    """Pre-rendered pictures and cached encodings, per camera."""

    def __init__(self, cameras: tuple[Camera, ...]):
        self.frames = {cam.name: _render_loop(cam, i) for i, cam in enumerate(cameras)}
        self._cache: dict[tuple[str, int, int, int], bytes] = {}
        self._lock = threading.Lock()

    def data(self, cam: Camera, fmt: int, quality: int, k: int) -> bytes:
        key = (cam.name, fmt, quality if fmt == Image.FORMAT_JPEG else 0, k % LOOP_FRAMES)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        img = self.frames[cam.name][k % LOOP_FRAMES]
        if fmt == Image.FORMAT_JPEG:
            bgr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
            data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
        elif fmt == Image.FORMAT_RLE:
            data = rle_encode(
                img.astype("<u2") if cam.is_depth else img,
                img.dtype.itemsize * (img.shape[2] if img.ndim == 3 else 1),
            )
        else:
            data = img.astype("<u2").tobytes() if cam.is_depth else img.tobytes()
        with self._lock:
            if len(self._cache) > 4000:  # many qualities asked: start again rather than grow
                self._cache.clear()
            self._cache[key] = data
        return data


# -- the robot ------------------------------------------------------------------------------------


def _ts(proto, seconds: float) -> None:
    proto.seconds = math.floor(seconds)
    proto.nanos = int((seconds - math.floor(seconds)) * 1e9)


def _secs(proto) -> float:
    return proto.seconds + proto.nanos * 1e-9


class SimRobot:
    """The simulated robot. ``start()`` serves on ``host:port``; ``ca_path`` is its CA."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock_skew: float = 2.5,
        rate_hz: float = 15.0,
        capture_latency: float = 0.03,
        username: str = "user",
        password: str = "password",
        payload_guid: str = "8b6f5a3c-sim0-4f1e-9c2a-000000000001",
        payload_secret: str = "sim-payload-secret",
        cert_dir: str | None = None,
    ):
        self.host, self.port = host, port
        self.clock_skew = clock_skew
        self.rate_hz = rate_hz
        self.capture_latency = capture_latency
        self.username, self.password = username, password
        self.payload_guid, self.payload_secret = payload_guid, payload_secret
        self._own_cert_dir = cert_dir is None
        self.cert_dir = cert_dir or tempfile.mkdtemp(prefix="spotrelay-sim-")
        self.cameras = {cam.name: cam for cam in CAMERAS}
        self._phase = {cam.name: (i * 0.37 % 1.0) / rate_hz for i, cam in enumerate(CAMERAS)}
        self.rpc_latency = 0.0
        self._faults: dict[str, str] = {}
        self._stalled_at: dict[str, int] = {}
        self._available = True
        self._tokens: set[str] = set()
        self._lock = threading.Lock()
        self._served: dict[str, collections.deque[bytes]] = collections.defaultdict(
            lambda: collections.deque(maxlen=64)
        )
        self._timesync_samples: dict[str, list[tuple[float, float]]] = {}
        self._content: _Content | None = None
        self._server: grpc.Server | None = None
        self.ca_path = ""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> SimRobot:
        if self._content is None:
            self._content = _Content(CAMERAS)
        if not self.ca_path:
            self.ca_path, self._key, self._cert = make_certs(self.cert_dir)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="sim"))
        auth_grpc.add_AuthServiceServicer_to_server(_Auth(self), server)
        payload_grpc.add_PayloadRegistrationServiceServicer_to_server(_Payload(self), server)
        directory_grpc.add_DirectoryServiceServicer_to_server(_Directory(self), server)
        robot_id_grpc.add_RobotIdServiceServicer_to_server(_RobotId(self), server)
        time_sync_grpc.add_TimeSyncServiceServicer_to_server(_TimeSync(self), server)
        image_grpc.add_ImageServiceServicer_to_server(_ImageService(self), server)
        creds = grpc.ssl_server_credentials([(self._key, self._cert)])
        self.port = server.add_secure_port(f"{self.host}:{self.port}", creds)
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0).wait(2)
            self._server = None
        if self._own_cert_dir:
            shutil.rmtree(self.cert_dir, ignore_errors=True)

    def __enter__(self) -> SimRobot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- knobs -------------------------------------------------------------------------------

    def set_fault(self, source: str, kind: str | None) -> None:
        """kind: None | "error" | "corrupt" | "stall"."""
        assert kind in (None, "error", "corrupt", "stall"), kind
        with self._lock:
            if kind is None:
                self._faults.pop(source, None)
                self._stalled_at.pop(source, None)
            else:
                self._faults[source] = kind
                if kind == "stall":
                    self._stalled_at[source] = self._capture_index(source, self.robot_time())

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._stalled_at.clear()
        self.rpc_latency = 0.0
        self._available = True

    def set_available(self, available: bool) -> None:
        """False: every RPC fails UNAVAILABLE, as when the robot drops off the network."""
        self._available = available

    def expire_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    def has_served(self, source: str, data: bytes) -> bool:
        """Whether these exact bytes were among the last images served for the source."""
        with self._lock:
            return any(d == data for d in self._served[source])

    # -- the robot's clock and cameras --------------------------------------------------------

    def robot_time(self) -> float:
        return time.time() + self.clock_skew

    def _capture_index(self, source: str, robot_now: float) -> int:
        period = 1.0 / self.rate_hz
        return math.floor((robot_now - self.capture_latency - self._phase[source]) / period)

    def latest_capture(self, source: str) -> tuple[int, float]:
        """(index, acquisition time on the robot clock) of the newest available capture."""
        k = self._stalled_at.get(source)
        if k is None:
            k = self._capture_index(source, self.robot_time())
        return k, self._phase[source] + k / self.rate_hz

    # -- plumbing for the servicers ----------------------------------------------------------

    def gate(self, context: grpc.ServicerContext, *, authenticated: bool = True) -> None:
        if not self._available:
            context.abort(grpc.StatusCode.UNAVAILABLE, "simulated robot unreachable")
        if authenticated:
            md = dict(context.invocation_metadata())
            token = md.get("authorization", "").removeprefix("Bearer ").strip()
            with self._lock:
                ok = token in self._tokens
            if not ok:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or expired token")

    def issue_token(self) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens.add(token)
        return token

    def token_valid(self, token: str) -> bool:
        with self._lock:
            return token in self._tokens

    def fill_header(self, request, response, received: float) -> None:
        response.header.request_header.CopyFrom(request.header)
        _ts(response.header.request_received_timestamp, received)
        _ts(response.header.response_timestamp, self.robot_time())
        response.header.error.code = header_pb2.CommonError.CODE_OK

    def image_response(self, req: image_pb2.ImageRequest, out: image_pb2.ImageResponse) -> None:
        cam = self.cameras.get(req.image_source_name)
        if cam is None:
            out.source.name = req.image_source_name
            out.status = image_pb2.ImageResponse.STATUS_UNKNOWN_CAMERA
            return
        self.fill_source(cam, out.source)
        fault = self._faults.get(cam.name)
        if fault == "error":
            out.status = image_pb2.ImageResponse.STATUS_IMAGE_DATA_ERROR
            return
        if req.pixel_format not in (Image.PIXEL_FORMAT_UNKNOWN, cam.pixel_format):
            out.status = image_pb2.ImageResponse.STATUS_UNSUPPORTED_PIXEL_FORMAT_REQUESTED
            return
        fmt = req.image_format or cam.formats[0]
        if fmt not in cam.formats:
            out.status = image_pb2.ImageResponse.STATUS_UNSUPPORTED_IMAGE_FORMAT_REQUESTED
            return
        k, acquired = self.latest_capture(cam.name)
        assert self._content is not None
        data = self._content.data(cam, fmt, int(req.quality_percent or 75), k)
        if fault == "corrupt":
            data = data[: len(data) // 2] + b"\x00" * 7
        shot = out.shot
        _ts(shot.acquisition_time, acquired)
        shot.frame_name_image_sensor = cam.name.replace("_image", "") + "_sensor"
        shot.image.rows, shot.image.cols = cam.rows, cam.cols
        shot.image.format = fmt
        shot.image.pixel_format = cam.pixel_format
        shot.image.data = data
        out.status = image_pb2.ImageResponse.STATUS_OK
        with self._lock:
            self._served[cam.name].append(data)

    @staticmethod
    def fill_source(cam: Camera, src: image_pb2.ImageSource) -> None:
        src.name, src.cols, src.rows = cam.name, cam.cols, cam.rows
        src.image_type = cam.image_type
        src.pixel_formats.append(cam.pixel_format)
        src.image_formats.extend(cam.formats)
        if cam.is_depth:
            src.depth_scale = 1000.0
        src.pinhole.intrinsics.focal_length.x = src.pinhole.intrinsics.focal_length.y = 330.0
        src.pinhole.intrinsics.principal_point.x = cam.cols / 2
        src.pinhole.intrinsics.principal_point.y = cam.rows / 2


class _Auth(auth_grpc.AuthServiceServicer):
    def __init__(self, sim: SimRobot):
        self.sim = sim

    def GetAuthToken(self, request, context):
        received = self.sim.robot_time()
        self.sim.gate(context, authenticated=False)
        resp = auth_pb2.GetAuthTokenResponse()
        if request.token:
            ok = self.sim.token_valid(request.token)
            resp.status = resp.STATUS_OK if ok else resp.STATUS_INVALID_TOKEN
        else:
            ok = (request.username, request.password) == (self.sim.username, self.sim.password)
            resp.status = resp.STATUS_OK if ok else resp.STATUS_INVALID_LOGIN
        if ok:
            resp.token = self.sim.issue_token()
        self.sim.fill_header(request, resp, received)
        return resp


class _Payload(payload_grpc.PayloadRegistrationServiceServicer):
    def __init__(self, sim: SimRobot):
        self.sim = sim

    def GetPayloadAuthToken(self, request, context):
        received = self.sim.robot_time()
        self.sim.gate(context, authenticated=False)
        resp = payload_registration_pb2.GetPayloadAuthTokenResponse()
        creds = request.payload_credentials
        guid = creds.guid or request.payload_guid
        secret = creds.secret or request.payload_secret
        if (guid, secret) == (self.sim.payload_guid, self.sim.payload_secret):
            resp.status = resp.STATUS_OK
            resp.token = self.sim.issue_token()
        else:
            resp.status = resp.STATUS_INVALID_CREDENTIALS
        self.sim.fill_header(request, resp, received)
        return resp


_SERVICES = (  # name, type, authority
    ("auth", "bosdyn.api.AuthService", "auth.spot.robot"),
    ("directory", "bosdyn.api.DirectoryService", "api.spot.robot"),
    (
        "payload-registration",
        "bosdyn.api.PayloadRegistrationService",
        "payload-registration.spot.robot",
    ),
    ("robot-id", "bosdyn.api.RobotIdService", "id.spot.robot"),
    ("time-sync", "bosdyn.api.TimeSyncService", "api.spot.robot"),
    ("image", "bosdyn.api.ImageService", "api.spot.robot"),
)


class _Directory(directory_grpc.DirectoryServiceServicer):
    def __init__(self, sim: SimRobot):
        self.sim = sim

    def _entries(self) -> list[directory_pb2.ServiceEntry]:
        return [
            directory_pb2.ServiceEntry(name=n, type=t, authority=a, user_token_required=True)
            for n, t, a in _SERVICES
        ]

    def ListServiceEntries(self, request, context):
        received = self.sim.robot_time()
        self.sim.gate(context)
        resp = directory_pb2.ListServiceEntriesResponse(service_entries=self._entries())
        self.sim.fill_header(request, resp, received)
        return resp

    def GetServiceEntry(self, request, context):
        received = self.sim.robot_time()
        self.sim.gate(context)
        resp = directory_pb2.GetServiceEntryResponse()
        match = [e for e in self._entries() if e.name == request.service_name]
        if match:
            resp.status = resp.STATUS_OK
            resp.service_entry.CopyFrom(match[0])
        else:
            resp.status = resp.STATUS_NONEXISTENT_SERVICE
        self.sim.fill_header(request, resp, received)
        return resp


class _RobotId(robot_id_grpc.RobotIdServiceServicer):
    def __init__(self, sim: SimRobot):
        self.sim = sim

    def GetRobotId(self, request, context):
        received = self.sim.robot_time()
        self.sim.gate(context, authenticated=False)
        resp = robot_id_pb2.RobotIdResponse()
        resp.robot_id.serial_number = "sim-0001"
        resp.robot_id.species = "spot"
        resp.robot_id.nickname = "simulated-spot"
        resp.robot_id.software_release.version.major_version = 5
        self.sim.fill_header(request, resp, received)
        return resp


class _TimeSync(time_sync_grpc.TimeSyncServiceServicer):
    """NTP-style estimate from the client's previous round trip, as the robot does."""

    def __init__(self, sim: SimRobot):
        self.sim = sim
        self._lock = threading.Lock()

    def TimeSyncUpdate(self, request, context):
        received = self.sim.robot_time()
        self.sim.gate(context)
        resp = time_sync_pb2.TimeSyncUpdateResponse()
        clock = request.clock_identifier or secrets.token_hex(8)
        rt = request.previous_round_trip
        with self._lock:
            samples = self.sim._timesync_samples.setdefault(clock, [])
            if request.clock_identifier and rt.HasField("client_rx"):
                t0, t1, t2, t3 = (
                    _secs(rt.client_tx),
                    _secs(rt.server_rx),
                    _secs(rt.server_tx),
                    _secs(rt.client_rx),
                )
                samples.append((((t1 - t0) + (t2 - t3)) / 2, (t3 - t0) - (t2 - t1)))
                del samples[:-20]
            best = min(samples, key=lambda s: s[1]) if samples else None
        resp.clock_identifier = clock
        if best is None or len(samples) < 3:
            resp.state.status = time_sync_pb2.TimeSyncState.STATUS_MORE_SAMPLES_NEEDED
        else:
            resp.state.status = time_sync_pb2.TimeSyncState.STATUS_OK
            skew, rtt = best
            resp.state.best_estimate.clock_skew.seconds = math.floor(skew)
            resp.state.best_estimate.clock_skew.nanos = int((skew - math.floor(skew)) * 1e9)
            resp.state.best_estimate.round_trip_time.nanos = int(max(0.0, rtt) * 1e9)
            _ts(resp.state.measurement_time, received)
        self.sim.fill_header(request, resp, received)
        return resp


class _ImageService(image_grpc.ImageServiceServicer):
    def __init__(self, sim: SimRobot):
        self.sim = sim

    def ListImageSources(self, request, context):
        received = self.sim.robot_time()
        self.sim.gate(context)
        resp = image_pb2.ListImageSourcesResponse()
        for cam in self.sim.cameras.values():
            self.sim.fill_source(cam, resp.image_sources.add())
        self.sim.fill_header(request, resp, received)
        return resp

    def GetImage(self, request, context):
        received = self.sim.robot_time()
        self.sim.gate(context)
        resp = image_pb2.GetImageResponse()
        for req in request.image_requests:
            self.sim.image_response(req, resp.image_responses.add())
        if self.sim.rpc_latency:
            time.sleep(self.sim.rpc_latency)
        self.sim.fill_header(request, resp, received)
        return resp


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m spotrelay.sim",
        description="A simulated Spot robot for demos and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert-dir", default=None)
    parser.add_argument("--clock-skew", type=float, default=2.5)
    parser.add_argument("--rate", type=float, default=15.0)
    parser.add_argument("--rpc-latency", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.cert_dir:
        os.makedirs(args.cert_dir, exist_ok=True)
    sim = SimRobot(
        host=args.host,
        port=args.port,
        clock_skew=args.clock_skew,
        rate_hz=args.rate,
        cert_dir=args.cert_dir,
    )
    sim.rpc_latency = args.rpc_latency
    sim.start()
    print(
        json.dumps(
            {
                "port": sim.port,
                "ca": sim.ca_path,
                "username": sim.username,
                "password": sim.password,
                "guid": sim.payload_guid,
                "secret": sim.payload_secret,
            }
        ),
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    sim.stop()


if __name__ == "__main__":
    main()
