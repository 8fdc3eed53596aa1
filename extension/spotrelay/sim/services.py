"""The simulated robot's gRPC services, each as the SDK's client for it expects.

Every response carries a filled header (echoed request header, received and response timestamps
on the robot's clock, CODE_OK): the SDK raises UnsetStatusError without CODE_OK, and time sync
reads the timestamps back (bosdyn/client/time_sync.py, get_new_estimate).
"""

from __future__ import annotations

import secrets
import threading
import time

from bosdyn.api import (
    auth_pb2,
    directory_pb2,
    directory_registration_pb2,
    image_pb2,
    payload_registration_pb2,
    robot_id_pb2,
    time_sync_pb2,
)
from bosdyn.api import auth_service_pb2_grpc as auth_grpc
from bosdyn.api import directory_registration_service_pb2_grpc as dir_reg_grpc
from bosdyn.api import directory_service_pb2_grpc as directory_grpc
from bosdyn.api import image_service_pb2_grpc as image_grpc
from bosdyn.api import payload_registration_service_pb2_grpc as payload_grpc
from bosdyn.api import robot_id_service_pb2_grpc as robot_id_grpc
from bosdyn.api import time_sync_service_pb2_grpc as time_sync_grpc

from spotrelay.sim.cameras import Camera, Image
from spotrelay.sim.state import RobotState, secs, ts

_Status = image_pb2.ImageResponse


class Auth(auth_grpc.AuthServiceServicer):
    def __init__(self, sim: RobotState):
        self.sim = sim

    def GetAuthToken(self, request, context):
        received = self.sim.arrive(context, authenticated=False)
        self.sim.rate_limit(context, "auth")
        resp = auth_pb2.GetAuthTokenResponse()
        if request.token:
            ok = self.sim.token_valid(request.token)
            resp.status = resp.STATUS_OK if ok else resp.STATUS_INVALID_TOKEN
        elif self.sim.locked_out():
            ok = False
            resp.status = resp.STATUS_TEMPORARILY_LOCKED_OUT
        else:
            ok = (request.username, request.password) == (self.sim.username, self.sim.password)
            self.sim.login_result(ok)
            resp.status = resp.STATUS_OK if ok else resp.STATUS_INVALID_LOGIN
        if ok:
            resp.token = self.sim.issue_token()
        return self.sim.reply(request, resp, received)


class Payload(payload_grpc.PayloadRegistrationServiceServicer):
    def __init__(self, sim: RobotState):
        self.sim = sim

    def GetPayloadAuthToken(self, request, context):
        received = self.sim.arrive(context, authenticated=False)
        self.sim.rate_limit(context, "payload")
        resp = payload_registration_pb2.GetPayloadAuthTokenResponse()
        creds = request.payload_credentials
        guid = creds.guid or request.payload_guid
        secret = creds.secret or request.payload_secret
        if (guid, secret) != (self.sim.payload_guid, self.sim.payload_secret):
            resp.status = resp.STATUS_INVALID_CREDENTIALS
        elif not self.sim.payload_authorised:
            resp.status = resp.STATUS_PAYLOAD_NOT_AUTHORIZED
        else:
            resp.status = resp.STATUS_OK
            resp.token = self.sim.issue_token()
        return self.sim.reply(request, resp, received)


class Directory(directory_grpc.DirectoryServiceServicer):
    def __init__(self, sim: RobotState):
        self.sim = sim

    def ListServiceEntries(self, request, context):
        received = self.sim.arrive(context)
        resp = directory_pb2.ListServiceEntriesResponse(service_entries=self.sim.directory())
        return self.sim.reply(request, resp, received)

    def GetServiceEntry(self, request, context):
        received = self.sim.arrive(context)
        resp = directory_pb2.GetServiceEntryResponse()
        match = [e for e in self.sim.directory() if e.name == request.service_name]
        if match:
            resp.status = resp.STATUS_OK
            resp.service_entry.CopyFrom(match[0])
        else:
            resp.status = resp.STATUS_NONEXISTENT_SERVICE
        return self.sim.reply(request, resp, received)


class DirectoryRegistration(dir_reg_grpc.DirectoryRegistrationServiceServicer):
    """Payload services register here (the mission callback does); entries show in the list."""

    def __init__(self, sim: RobotState):
        self.sim = sim

    def RegisterService(self, request, context):
        received = self.sim.arrive(context)
        resp = directory_registration_pb2.RegisterServiceResponse()
        resp.status = (
            resp.STATUS_OK
            if self.sim.register(request.service_entry, request.endpoint, replace=False)
            else resp.STATUS_ALREADY_EXISTS
        )
        return self.sim.reply(request, resp, received)

    def UpdateService(self, request, context):
        received = self.sim.arrive(context)
        resp = directory_registration_pb2.UpdateServiceResponse()
        known = request.service_entry.name in self.sim.registered
        if known:
            self.sim.register(request.service_entry, request.endpoint, replace=True)
        resp.status = resp.STATUS_OK if known else resp.STATUS_NONEXISTENT_SERVICE
        return self.sim.reply(request, resp, received)

    def UnregisterService(self, request, context):
        received = self.sim.arrive(context)
        resp = directory_registration_pb2.UnregisterServiceResponse()
        gone = self.sim.unregister(request.service_name)
        resp.status = resp.STATUS_OK if gone else resp.STATUS_NONEXISTENT_SERVICE
        return self.sim.reply(request, resp, received)


class RobotId(robot_id_grpc.RobotIdServiceServicer):
    def __init__(self, sim: RobotState):
        self.sim = sim

    def GetRobotId(self, request, context):
        received = self.sim.arrive(context, authenticated=False)
        resp = robot_id_pb2.RobotIdResponse()
        resp.robot_id.serial_number = "sim-0001"
        resp.robot_id.species = "spot"
        resp.robot_id.nickname = "simulated-spot"
        resp.robot_id.software_release.version.major_version = 5
        return self.sim.reply(request, resp, received)


class TimeSync(time_sync_grpc.TimeSyncServiceServicer):
    """NTP-style estimate from the client's previous round trip, as the robot does."""

    def __init__(self, sim: RobotState):
        self.sim = sim
        self._lock = threading.Lock()
        self._samples: dict[str, list[tuple[float, float]]] = {}

    def TimeSyncUpdate(self, request, context):
        received = self.sim.arrive(context)
        resp = time_sync_pb2.TimeSyncUpdateResponse()
        clock = request.clock_identifier or secrets.token_hex(8)
        rt = request.previous_round_trip
        with self._lock:
            samples = self._samples.setdefault(clock, [])
            if request.clock_identifier and rt.HasField("client_rx"):
                t0, t1 = secs(rt.client_tx), secs(rt.server_rx)
                t2, t3 = secs(rt.server_tx), secs(rt.client_rx)
                samples.append((((t1 - t0) + (t2 - t3)) / 2, (t3 - t0) - (t2 - t1)))
                del samples[:-20]
            best = min(samples, key=lambda s: s[1]) if samples else None
        resp.clock_identifier = clock
        if best is None or len(samples) < 3:
            resp.state.status = time_sync_pb2.TimeSyncState.STATUS_MORE_SAMPLES_NEEDED
        else:
            resp.state.status = time_sync_pb2.TimeSyncState.STATUS_OK
            skew, rtt = best
            ts(resp.state.best_estimate.clock_skew, skew)
            resp.state.best_estimate.round_trip_time.nanos = int(max(0.0, rtt) * 1e9)
            ts(resp.state.measurement_time, received)
        return self.sim.reply(request, resp, received)


class ImageService(image_grpc.ImageServiceServicer):
    """One image service: the robot's ``image``, or a Spot CAM's, or a payload's."""

    def __init__(self, sim: RobotState, name: str, cameras: list[Camera]):
        self.sim, self.name = sim, name
        self.cameras = {c.name: c for c in cameras}

    def ListImageSources(self, request, context):
        received = self.sim.arrive(context, service=self.name)
        resp = image_pb2.ListImageSourcesResponse()
        for cam in self.cameras.values():
            with cam.lock:
                cam.fill_source(resp.image_sources.add())
        return self.sim.reply(request, resp, received)

    def GetImage(self, request, context):
        received = self.sim.arrive(context, service=self.name)
        resp = image_pb2.GetImageResponse()
        for req in request.image_requests:
            self.image(req, resp.image_responses.add(), received)
        self.sim.count_images(self.name, request.image_requests)
        if self.sim.image_cost:
            time.sleep(self.sim.image_cost * len(request.image_requests))
        return self.sim.reply(request, resp, received)

    def image(self, req: image_pb2.ImageRequest, out: _Status, robot_now: float) -> None:
        """The newest capture available when the request reached the robot, or a status."""
        cam = self.cameras.get(req.image_source_name)
        out.source.name = req.image_source_name
        if cam is None:
            out.status = _Status.STATUS_UNKNOWN_CAMERA
            return
        with cam.lock:  # one consistent picture even while the camera changes mode
            self._capture(cam, req, out, robot_now)

    def _capture(self, cam: Camera, req: image_pb2.ImageRequest, out, robot_now: float) -> None:
        sim = self.sim
        cam.fill_source(out.source)
        cols, rows = cam.cols, cam.rows
        fault = sim.faults.get(cam.name)
        status = sim.statuses.get(cam.name)
        if status is not None:
            out.status = status  # any value, those newer than the SDK included
            if status == _Status.STATUS_CUSTOM_PARAMS_ERROR:
                out.custom_param_error.status = out.custom_param_error.STATUS_INVALID_VALUE
                out.custom_param_error.error_messages.append("simulated custom parameter error")
            return
        if fault == "error":
            out.status = _Status.STATUS_IMAGE_DATA_ERROR
            return
        if req.pixel_format not in (Image.PIXEL_FORMAT_UNKNOWN, cam.pixel_format):
            out.status = _Status.STATUS_UNSUPPORTED_PIXEL_FORMAT_REQUESTED
            return
        fmt = req.image_format or cam.formats[0]
        if fmt not in cam.formats:
            out.status = _Status.STATUS_UNSUPPORTED_IMAGE_FORMAT_REQUESTED
            return
        k, acquired = cam.newest(robot_now)
        data = sim.content.data(cam, fmt, int(req.quality_percent or 75), k)
        if fault == "corrupt":
            data = data[: len(data) // 2] + b"\x00" * 7
        shot = out.shot
        ts(shot.acquisition_time, acquired)
        shot.frame_name_image_sensor = cam.name.replace("_image", "") + "_sensor"
        shot.image.rows, shot.image.cols = rows, cols
        shot.image.format = fmt
        shot.image.pixel_format = cam.pixel_format
        shot.image.data = data
        out.status = _Status.STATUS_OK
        sim.served(cam.name, data)
