"""The simulated robot's state: its clock, cameras, logins, directory and faults, and what every
request goes through on its way in and out (latency, availability, tokens, the header).

The servicers (``services.py``) read and change it; ``robot.py`` serves them over gRPC. Both
depend on this module, and neither on the other.
"""

from __future__ import annotations

import base64
import collections
import logging
import math
import random
import secrets
import tempfile
import threading
import time

import grpc
from bosdyn.api import directory_pb2, header_pb2

from spotrelay.sim.cameras import (
    Camera,
    Content,
    payload_cameras,
    spot_cam_cameras,
    spot_cameras,
)

IMAGE_TYPE = "bosdyn.api.ImageService"
SPOT_CAM = ("spot-cam-image", "spot-cam-image.spot.robot")  # the authority is our guess
PAYLOAD = ("payload-camera", "payload-camera.spot.robot")
PAYLOAD_STATES = ("ok", "late", "faulted", "slow", "unauthorised")
_CORE = (  # name, type, authority, needs a user token
    ("auth", "bosdyn.api.AuthService", "auth.spot.robot", False),
    ("directory", "bosdyn.api.DirectoryService", "api.spot.robot", True),
    ("directory-registration", "bosdyn.api.DirectoryRegistrationService", "api.spot.robot", True),
    (
        "payload-registration",
        "bosdyn.api.PayloadRegistrationService",
        "payload-registration.spot.robot",
        False,
    ),
    ("robot-id", "bosdyn.api.RobotIdService", "id.spot.robot", False),
    ("time-sync", "bosdyn.api.TimeSyncService", "api.spot.robot", True),
    ("image", IMAGE_TYPE, "api.spot.robot", True),
)
log = logging.getLogger("spotrelay.sim")
RATE_LIMITS = {"auth": 5, "payload": 10}  # requests a second (spot-sdk release notes 3.0.0)


def ts(proto, seconds: float) -> None:
    """Fill a protobuf Timestamp."""
    proto.seconds = math.floor(seconds)
    proto.nanos = int((seconds - math.floor(seconds)) * 1e9)


def secs(proto) -> float:
    return proto.seconds + proto.nanos * 1e-9


class RobotState:
    """Everything a simulated robot knows; ``SimRobot`` adds its servers."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock_skew: float = 2.5,
        username: str = "user",
        password: str = "password",
        payload_guid: str = "8b6f5a3c-sim0-4f1e-9c2a-000000000001",
        payload_secret: str = "sim-payload-secret",
        cert_dir: str | None = None,
        jitter: float = 0.002,
        available_after: float | tuple[float, float] = 0.025,
        hand_rate: float = 15.0,
        free_running: bool = False,
        rpc_latency: float = 0.0,
        rpc_jitter: float = 0.0,
        image_cost: float = 0.0,
        spot_cam: bool = False,
        payload_camera: str | None = None,
        payload_rate: float = 5.0,
        payload_late_after: float = 5.0,
        payload_authorised: bool = True,
        lockout_seconds: float = 60.0,
        seed: int | None = None,
    ):
        self.host, self.port = host, port
        self.clock_skew = clock_skew
        self.username, self.password = username, password
        self.payload_guid, self.payload_secret = payload_guid, payload_secret
        self.payload_authorised = payload_authorised
        self.rpc_latency, self.rpc_jitter, self.image_cost = rpc_latency, rpc_jitter, image_cost
        self.lockout_seconds = lockout_seconds
        self._own_cert_dir = cert_dir is None
        self.cert_dir = cert_dir or tempfile.mkdtemp(prefix="spotrelay-sim-")
        self._rng = random.Random(seed)
        self.services: dict[str, tuple[str, list[Camera]]] = {
            "image": ("api.spot.robot", spot_cameras(synced=not free_running))
        }
        if spot_cam:
            self.services[SPOT_CAM[0]] = (SPOT_CAM[1], spot_cam_cameras())
        self.payload_state = payload_camera
        if payload_camera is not None:
            assert payload_camera in PAYLOAD_STATES, payload_camera
            self.services[PAYLOAD[0]] = (PAYLOAD[1], payload_cameras(payload_rate))
        self._payload_visible_at = time.monotonic() + (
            payload_late_after if payload_camera == "late" else 0.0
        )
        self.cameras: dict[str, Camera] = {}
        for i, (_, cams) in enumerate(self.services.values()):
            firsts: dict[str, int] = {}  # trigger -> its first camera's place
            for j, cam in enumerate(cams):
                cam.jitter = jitter
                if isinstance(available_after, tuple):  # spread over the range, per camera
                    lo, hi = available_after  # (one trigger's captures are available together)
                    at = firsts.setdefault(cam.trigger, j) if cam.trigger else j
                    cam.available_after = lo + (hi - lo) * ((7 * at + 3 * i) % 11) / 10
                elif i == 0:
                    cam.available_after = available_after
                self.cameras[cam.name] = cam
        self.cameras["hand_color_image"].rate = hand_rate
        self._modes = {n: (c.rate, c.cols, c.rows) for n, c in self.cameras.items()}  # at start
        self.faults: dict[str, str] = {}
        self.statuses: dict[str, int] = {}
        self.registered: dict[str, tuple[directory_pb2.ServiceEntry, directory_pb2.Endpoint]] = {}
        self.content = Content()
        self._available = True
        self._tokens: set[str] = set()
        self.issued: list[str] = []  # every token ever issued, for tests that grep logs
        self._lock = threading.Lock()
        self._calls: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=64)
        )
        self._failed_logins = 0
        self._locked_until = 0.0
        self.auth_requests: list[float] = []  # monotonic times, for tests of login rate
        self.get_image_calls: collections.Counter[str] = collections.Counter()  # per service
        self.images_requested: collections.Counter[str] = collections.Counter()  # per source
        self._served: dict[str, collections.deque[bytes]] = collections.defaultdict(
            lambda: collections.deque(maxlen=64)
        )

    # -- knobs -------------------------------------------------------------------------------

    def set_fault(self, source: str, kind: str | None) -> None:
        """kind: None | "error" | "corrupt" | "stall"."""
        assert kind in (None, "error", "corrupt", "stall"), kind
        cam = self.cameras[source]
        # never take a camera's lock under ours: a GetImage holds the camera's, then takes ours
        cam.stall(self.robot_time() if kind == "stall" else None)
        with self._lock:
            if kind is None:
                self.faults.pop(source, None)
            else:
                self.faults[source] = kind

    def set_status(self, source: str, status: int | None) -> None:
        """Answer every request for ``source`` with this ImageResponse status (any integer)."""
        if status is None:
            self.statuses.pop(source, None)
        else:
            self.statuses[source] = status

    def set_rate(self, source: str, rate: float) -> None:
        self.cameras[source].set_rate(rate, self.robot_time())

    def set_resolution(self, source: str, cols: int, rows: int) -> None:
        """A camera mode change (e.g. the gripper camera to 1280x720), effective at once."""
        cam = self.cameras[source]
        with cam.lock:
            cam.cols, cam.rows = cols, rows

    def set_payload_state(self, state: str) -> None:
        assert state in PAYLOAD_STATES and self.payload_state is not None, state
        self.payload_state = state
        if state != "late":
            self._payload_visible_at = 0.0

    def clear_faults(self) -> None:
        """Every fault undone, and every camera back in the mode it started in."""
        with self._lock:
            self.faults.clear()
            self.statuses.clear()
        for name, cam in self.cameras.items():
            cam.stall(None)
            rate, cols, rows = self._modes[name]
            if cam.rate != rate or cam.first_k:  # its rate changed at some point
                cam.rejoin(rate, self.robot_time())
            self.set_resolution(name, cols, rows)
        self.rpc_latency = self.rpc_jitter = self.image_cost = 0.0
        self._available = True

    def set_available(self, available: bool) -> None:
        """False: every RPC fails UNAVAILABLE, as when the robot drops off the network."""
        self._available = available

    def expire_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    def has_served(self, source: str, data: bytes) -> bool:
        """Whether these exact bytes were among the last images served for the source."""
        return data in self.recent(source)

    def recent(self, source: str) -> list[bytes]:
        """The last images served for the source (to any client), oldest first."""
        with self._lock:
            return list(self._served[source])

    # -- the directory -----------------------------------------------------------------------

    def directory(self) -> list[directory_pb2.ServiceEntry]:
        entries = [
            directory_pb2.ServiceEntry(name=n, type=t, authority=a, user_token_required=u)
            for n, t, a, u in _CORE
        ]
        for name, (authority, _) in self.services.items():
            if name == "image" or (name == PAYLOAD[0] and not self._payload_listed()):
                continue
            entries.append(
                directory_pb2.ServiceEntry(
                    name=name, type=IMAGE_TYPE, authority=authority, user_token_required=True
                )
            )
        with self._lock:
            entries += [entry for entry, _ in self.registered.values()]
        return entries

    def _payload_listed(self) -> bool:
        return self.payload_state is not None and time.monotonic() >= self._payload_visible_at

    def register(
        self, entry: directory_pb2.ServiceEntry, endpoint: directory_pb2.Endpoint, replace: bool
    ) -> bool:
        """Directory registration. Names are unique, and so is (authority, type), as on the robot
        (spot-sdk docs/concepts/developing_api_services.md); False if taken."""
        with self._lock:
            clash = any(
                (e.authority, e.type) == (entry.authority, entry.type) and name != entry.name
                for name, (e, _) in self.registered.items()
            )
            if clash or (entry.name in self.registered and not replace):
                return False
            kept = directory_pb2.ServiceEntry()
            kept.CopyFrom(entry)
            if "." not in kept.authority:  # a bare label (directory.proto, ServiceEntry)
                kept.authority += ".spot.robot"
            at = directory_pb2.Endpoint()
            at.CopyFrom(endpoint)
            known = entry.name in self.registered
            self.registered[entry.name] = (kept, at)
        if not known:
            log.info(
                "simulated robot's directory: %s (%s, %s) registered at %s:%d",
                kept.name,
                kept.type,
                kept.authority,
                at.host_ip,
                at.port,
            )
        return True

    def unregister(self, name: str) -> bool:
        with self._lock:
            gone = self.registered.pop(name, None) is not None
        if gone:
            log.info("simulated robot's directory: %s unregistered", name)
        return gone

    # -- plumbing for the servicers ----------------------------------------------------------

    def robot_time(self) -> float:
        return time.time() + self.clock_skew

    def _leg(self) -> float:
        """One way of a round trip: half the latency, with half the jitter."""
        if not self.rpc_latency and not self.rpc_jitter:
            return 0.0
        return max(0.0, self.rpc_latency / 2 + self._rng.uniform(-1, 1) * self.rpc_jitter / 2)

    def arrive(
        self, context: grpc.ServicerContext, *, authenticated: bool = True, service: str = ""
    ) -> float:
        """A request reaches the robot: the way in, then the checks the robot makes. Returns
        when it arrived on the robot's clock."""
        leg = self._leg()
        if leg:
            time.sleep(leg)
        received = self.robot_time()
        if not self._available:
            context.abort(grpc.StatusCode.UNAVAILABLE, "simulated robot unreachable")
        if service == PAYLOAD[0]:
            self._payload_gate(context)
        if authenticated:
            md = dict(context.invocation_metadata())
            token = md.get("authorization", "").removeprefix("Bearer ").strip()
            if not self.token_valid(token):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or expired token")
        return received

    def _payload_gate(self, context: grpc.ServicerContext) -> None:
        """What the robot's proxy answers for a payload service that cannot serve."""
        state = self.payload_state
        if state == "faulted":  # the proxy cannot reach it: HTTP 502 -> ServiceUnavailableError
            context.abort(grpc.StatusCode.UNAVAILABLE, "Received http2 header with status: 502")
        if state == "unauthorised":  # HTTP 403 -> PermissionDeniedError
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "payload not authorized")
        if state == "slow":
            time.sleep(min(15.0, max(0.5, context.time_remaining() or 0) + 0.5))
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "payload service too slow")

    def reply(self, request, response, received: float):
        """The way out: fill the header as the robot does, then the return leg."""
        response.header.request_header.CopyFrom(request.header)
        ts(response.header.request_received_timestamp, received)
        ts(response.header.response_timestamp, self.robot_time())
        response.header.error.code = header_pb2.CommonError.CODE_OK
        leg = self._leg()
        if leg:
            time.sleep(leg)
        return response

    def rate_limit(self, context: grpc.ServicerContext, kind: str) -> None:
        """More than the robot's limit in a second: HTTP 429 -> TooManyRequestsError."""
        now = time.monotonic()
        with self._lock:
            calls = self._calls[kind]
            if kind == "auth":
                self.auth_requests.append(now)
            limited = sum(1 for t in calls if now - t < 1.0) >= RATE_LIMITS[kind]
            if not limited:  # only requests let through count towards the limit
                calls.append(now)
        if limited:
            context.abort(grpc.StatusCode.UNAVAILABLE, "Received http2 header with status: 429")

    def locked_out(self) -> bool:
        return time.monotonic() < self._locked_until

    def login_result(self, ok: bool) -> None:
        with self._lock:
            self._failed_logins = 0 if ok else self._failed_logins + 1
            if self._failed_logins >= 6:
                self._locked_until = time.monotonic() + self.lockout_seconds
                self._failed_logins = 0

    def issue_token(self) -> str:
        """A JWT-shaped token, as Spot issues (spot-sdk docs/concepts/base_services.md)."""
        token = ".".join(
            base64.urlsafe_b64encode(part).rstrip(b"=").decode()
            for part in (b'{"alg":"ES256","typ":"JWT"}', secrets.token_bytes(48), b"sim-sig")
        )
        with self._lock:
            self._tokens.add(token)
            self.issued.append(token)
        return token

    def token_valid(self, token: str) -> bool:
        with self._lock:
            return token in self._tokens

    def count_images(self, service: str, requests) -> None:
        with self._lock:
            self.get_image_calls[service] += 1
            for req in requests:
                self.images_requested[req.image_source_name] += 1

    def served(self, source: str, data: bytes) -> None:
        with self._lock:
            self._served[source].append(data)
