"""Autowalk callback: camera evidence captured at waypoints, as a RemoteMissionService.

Autowalk reaches payload software through "Remote gRPC" actions: the robot's mission service
calls a ``bosdyn.api.mission.RemoteMissionService`` that the payload registered in the robot's
directory. This module is that service for the relay's cameras: ``capture`` keeps full-quality
stills of the chosen cameras, ``record`` an MJPEG clip of each, in the captures folder
(``captures.py``). What the protocol asks, and where it is written down (bosdyn-api / -client /
-mission 5.2.0 and spot-sdk python/examples/remote_mission_service):

* The robot calls over plaintext gRPC: the SDK's ``GrpcServiceRunner`` listens with
  ``add_insecure_port`` (bosdyn/client/server_util.py) and a directory entry carries only an
  address and a port, no certificate (directory.proto, Endpoint). The server here is grpc.aio on
  the relay's own event loop, so the handlers share the hub without locks.
* Calls: EstablishSession once per node when the mission loads; Tick while the node runs; Stop
  when the node stops being ticked ("the next tick will be a restart"); TeardownSession to forget
  the session (remote_service.proto). Unknown sessions answer STATUS_INVALID_SESSION_ID
  (remote.proto; robot_command_mission_service.py).
* Tick returns at once: RUNNING while the work goes on in a task, then SUCCESS or FAILURE with
  ``error_message``; later ticks repeat the outcome, because a tick that fails (a timeout) is
  retried by the mission service (nodes.proto, RemoteGrpc.timeout; the pattern of
  network_request_callback/network_request_service_manager.py).
* Every response carries a filled header (``ResponseContext``, bosdyn/client/server_util.py) and
  a non-zero status: without them the robot's client raises UnsetStatusError
  (bosdyn/mission/remote_client.py, bosdyn/client/common.py). No exception may leave a handler:
  ResponseContext re-raises it and gRPC would abort the call.
* Parameters shown on the tablet come from GetRemoteMissionServiceInfo's ``custom_params`` and
  arrive in TickRequest.params, as recorded then: validated against today's spec (a camera may be
  gone), missing keys read as their defaults (``dict_params_to_dict`` does not fill them), the
  chosen one-of key read from ``one_of_value.key`` (bosdyn/client/service_customization_helpers.py).
* Names: a tick carries no mission or waypoint name. ``group_name`` (remote.proto) is Autowalk's
  group name, unique per start of the mission (walks.proto, GlobalParameters.group_name): it
  names the run. The deprecated ``inputs`` carry the node name as ``user-string`` in Autowalk
  (remote_mission_client.py); every input is kept in the sidecar.
* Registration: ``DirectoryRegistrationKeepAlive`` (bosdyn/client/directory_registration.py)
  registers, then re-registers every 30 s, which also restores the entry after a robot reboot;
  it is started again with each new login of the relay, whose session it reuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import grpc
import numpy as np
from bosdyn.api import service_customization_pb2 as sc
from bosdyn.api import units_pb2
from bosdyn.api.mission import remote_pb2, remote_service_pb2_grpc
from bosdyn.client.common import get_self_ip
from bosdyn.client.directory_registration import (
    DirectoryRegistrationClient,
    DirectoryRegistrationKeepAlive,
)
from bosdyn.client.server_util import ResponseContext
from bosdyn.client.service_customization_helpers import (
    InvalidCustomParamSpecError,
    create_value_validator,
    make_custom_param_spec,
    make_dict_child_spec,
    make_dict_param_spec,
    make_double_param_spec,
    make_list_param_spec,
    make_one_of_child_spec,
    make_one_of_param_spec,
    make_string_param_spec,
    make_user_interface_info,
)
from bosdyn.mission.util import get_value_from_constant_value_message
from google.protobuf import json_format
from google.protobuf.message import Message

from spotrelay import codec
from spotrelay.captures import Capture, Picture, StorageError, Store, utc_iso
from spotrelay.connection import describe_error, in_daemon_thread
from spotrelay.frames import JPEG, Frame, RenderSpec
from spotrelay.hub import Client, Hub
from spotrelay.logs import SDK_LOGGER
from spotrelay.metrics import Metrics
from spotrelay.plan import plan

log = logging.getLogger("spotrelay.mission")

# Recorded missions name the callback by its directory name: never change it.
SERVICE_NAME = "spotrelay-camera-capture"
# (authority, type) must be unique in the directory; a bare label becomes <label>.spot.robot.
AUTHORITY = "spotrelay-mission"
SERVICE_TYPE = "bosdyn.api.mission.RemoteMissionService"

CAPTURE, RECORD = "capture", "record"
DURATION_DEFAULT, DURATION_MIN, DURATION_MAX = 10.0, 1.0, 300.0
FRAME_DEADLINE = 5.0  # seconds a camera may take to deliver a frame before the tick fails
MAX_SESSIONS = 256  # sessions live from mission load to teardown; drop the oldest idle beyond
THUMB_WIDTH = 320
REGISTER_RETRY_MAX = 30.0
_Tick = remote_pb2.TickResponse


class JobFailed(Exception):
    """A capture or recording that could not be done; the message goes to the operator."""


# -- parameters ---------------------------------------------------------------------------------


def _ui(name: str, description: str, order: int) -> sc.UserInterfaceInfo:
    return make_user_interface_info(name, description, order)


def default_camera(cameras: list[str]) -> str:
    for preferred in ("hand_color_image", "frontleft_fisheye_image"):
        if preferred in cameras:
            return preferred
    return cameras[0] if cameras else ""


def build_spec(cameras: list[str]) -> sc.DictParam.Spec:
    """What the tablet shows: the action (with a duration for ``record``), cameras, a label.

    Camera names are a fixed choice among the cameras the relay sees now; with none known yet
    (robot not connected) they are typed in."""
    if cameras:
        camera = make_string_param_spec(cameras, False, default_camera(cameras))
    else:
        camera = make_string_param_spec(None, True, "")
    seconds = units_pb2.Units(name="s")
    duration = make_double_param_spec(DURATION_DEFAULT, seconds, DURATION_MIN, DURATION_MAX)
    record = make_dict_param_spec(
        {"duration": make_dict_child_spec(duration, _ui("Duration", "Seconds to record", 0))},
        False,
    )
    action = make_one_of_param_spec(
        {
            CAPTURE: make_one_of_child_spec(
                make_dict_param_spec({}, False),
                _ui("Capture stills", "Full-quality pictures (depth as 16-bit PNG)", 0),
            ),
            RECORD: make_one_of_child_spec(
                record, _ui("Record a clip", "MJPEG video (AVI) of each camera", 1)
            ),
        },
        default_key=CAPTURE,
    )
    cameras_spec = make_list_param_spec(
        make_custom_param_spec(camera),
        min_number_of_values=1,
        max_number_of_values=max(1, len(cameras)) if cameras else 16,
    )
    return make_dict_param_spec(
        {
            "action": make_dict_child_spec(action, _ui("Action", "What to keep", 0)),
            "cameras": make_dict_child_spec(cameras_spec, _ui("Cameras", "Relay cameras", 1)),
            "label": make_dict_child_spec(
                make_string_param_spec(None, True, ""),
                _ui("Label", "Free text kept with the pictures (e.g. the gauge's name)", 2),
            ),
        },
        False,
    )


@dataclass(frozen=True)
class Job:
    """One run of the callback, as its parameters asked."""

    action: str
    cameras: tuple[str, ...]
    duration: float
    label: str


def _params_error(message: str) -> sc.CustomParamError:
    return sc.CustomParamError(
        status=sc.CustomParamError.STATUS_INVALID_VALUE, error_messages=[message]
    )


def parse_params(params: sc.DictParam, cameras: list[str]) -> Job | sc.CustomParamError:
    """The job the parameters ask for, or why they cannot be done.

    Checked against today's spec: a mission recorded weeks ago may name a camera the robot no
    longer offers. Missing keys take their defaults."""
    values = params.values
    if "cameras" in values and values["cameras"].WhichOneof("value") == "list_value":
        for item in values["cameras"].list_value.values:
            name = item.string_value.value
            if item.WhichOneof("value") == "string_value" and name not in cameras:
                return _params_error(
                    f"camera {name!r} is not among the robot's cameras now "
                    f"(available: {', '.join(cameras) or 'none, robot not connected'})"
                )
    try:
        error = create_value_validator(build_spec(cameras))(params)
    except (TypeError, ValueError, AttributeError, InvalidCustomParamSpecError) as exc:
        error = _params_error(f"malformed parameters: {exc}")
    if error is not None:
        return error
    action, duration = CAPTURE, DURATION_DEFAULT
    if "action" in values:
        one_of = values["action"].one_of_value
        action = one_of.key
        chosen = one_of.values[action].values if action in one_of.values else {}
        if action == RECORD and "duration" in chosen:
            duration = chosen["duration"].double_value.value
    names = [default_camera(cameras)]
    if "cameras" in values:  # (reading a missing map key would add it)
        names = [item.string_value.value for item in values["cameras"].list_value.values]
    if not names or not all(names):
        return _params_error("choose at least one camera")
    label = values["label"].string_value.value if "label" in values else ""
    return Job(action, tuple(dict.fromkeys(names)), duration, label)


def _json_value(value: Any) -> Any:
    if isinstance(value, Message):
        return json_format.MessageToDict(value)
    return value


def inputs_of(request: remote_pb2.TickRequest) -> dict[str, Any]:
    """The deprecated KeyValue inputs as plain JSON values (variables by name)."""
    out: dict[str, Any] = {}
    for kv in request.inputs:
        which = kv.value.WhichOneof("source")
        try:
            if which == "constant":
                out[kv.key] = _json_value(get_value_from_constant_value_message(kv.value.constant))
            elif which is not None:
                out[kv.key] = {which: _json_value(getattr(kv.value, which))}
            else:
                out[kv.key] = None
        except AttributeError:  # a constant with nothing set
            out[kv.key] = None
    return out


# -- sessions and ticks -------------------------------------------------------------------------


@dataclass
class Session:
    id: str
    created: float
    task: asyncio.Task | None = None
    outcome: tuple[int, str] | None = None
    last_used: float = field(default_factory=time.monotonic)


class MissionService(remote_service_pb2_grpc.RemoteMissionServiceServicer):
    """The five RPCs. Work runs in tasks on the event loop; storage in ``io`` threads."""

    def __init__(
        self,
        hub: Hub,
        store: Store,
        metrics: Metrics,
        io: Executor,
        *,
        robot_clock: Callable[[float], float] = lambda local: local,
        deadline: float = FRAME_DEADLINE,
    ):
        self.hub, self.store, self.metrics, self.io = hub, store, metrics, io
        self.robot_clock = robot_clock  # local epoch seconds -> robot clock
        self.deadline = deadline
        self.sessions: dict[str, Session] = {}
        self.jobs: set[asyncio.Task] = set()

    def cameras(self) -> list[str]:
        return sorted(self.hub.sources)

    # -- RPCs ---------------------------------------------------------------------------------

    async def EstablishSession(self, request, context):
        resp = remote_pb2.EstablishSessionResponse()
        with ResponseContext(resp, request):
            self._forget_idle()
            session = Session(secrets.token_hex(8), time.time())
            self.sessions[session.id] = session
            resp.session_id = session.id
            resp.status = resp.STATUS_OK  # no lease needed: the relay does not move the robot
            log.info("mission session %s established", session.id)
        return resp

    async def Tick(self, request, context):
        resp = remote_pb2.TickResponse()
        with ResponseContext(resp, request):
            try:
                self._tick(request, resp)
            except Exception as exc:  # never escapes: the robot would see an aborted RPC
                log.exception("tick failed unexpectedly")
                resp.status = resp.STATUS_FAILURE
                resp.error_message = f"spotrelay internal error: {exc}"
        return resp

    async def Stop(self, request, context):
        resp = remote_pb2.StopResponse()
        with ResponseContext(resp, request):
            session = self.sessions.get(request.session_id)
            if session is None:
                resp.status = resp.STATUS_INVALID_SESSION_ID
            else:
                self._reset(session)
                resp.status = resp.STATUS_OK
        return resp

    async def TeardownSession(self, request, context):
        resp = remote_pb2.TeardownSessionResponse()
        with ResponseContext(resp, request):
            session = self.sessions.pop(request.session_id, None)
            if session is None:
                resp.status = resp.STATUS_INVALID_SESSION_ID
            else:
                self._reset(session)
                resp.status = resp.STATUS_OK
                log.info("mission session %s torn down", session.id)
        return resp

    async def GetRemoteMissionServiceInfo(self, request, context):
        resp = remote_pb2.GetRemoteMissionServiceInfoResponse()
        with ResponseContext(resp, request):
            resp.custom_params.CopyFrom(build_spec(self.cameras()))
        return resp

    # -- the work -----------------------------------------------------------------------------

    def _tick(self, request: remote_pb2.TickRequest, resp: remote_pb2.TickResponse) -> None:
        session = self.sessions.get(request.session_id)
        if session is None:
            resp.status = resp.STATUS_INVALID_SESSION_ID
            resp.error_message = f"unknown session {request.session_id!r} (torn down?)"
            return
        session.last_used = time.monotonic()
        if session.task is None:  # first tick, or the first after a Stop: start over
            job = parse_params(request.params, self.cameras())
            if isinstance(job, sc.CustomParamError):
                action = request.params.values["action"].one_of_value.key
                if action not in (CAPTURE, RECORD):
                    action = "unknown"
                self.metrics.mission_callbacks.labels(action=action, result="invalid").inc()
                resp.status = resp.STATUS_CUSTOM_PARAMS_ERROR
                resp.custom_param_error.CopyFrom(job)
                resp.error_message = "; ".join(job.error_messages)
                log.warning("mission tick refused: %s", resp.error_message)
                return
            context = self._context(request, session)
            session.task = asyncio.create_task(self._run(job, context))
            self.jobs.add(session.task)
            session.task.add_done_callback(self._done)
        if not session.task.done():
            resp.status = resp.STATUS_RUNNING
            return
        if session.outcome is None:
            session.outcome = self._outcome(session.task)
        resp.status, resp.error_message = session.outcome

    def _done(self, task: asyncio.Task) -> None:
        self.jobs.discard(task)
        if not task.cancelled():
            task.exception()  # read here too: a session torn down never asks

    def _outcome(self, task: asyncio.Task) -> tuple[int, str]:
        if task.cancelled():
            return _Tick.STATUS_FAILURE, "stopped"
        exc = task.exception()
        if exc is None:
            return _Tick.STATUS_SUCCESS, ""
        return _Tick.STATUS_FAILURE, str(exc)

    def _context(self, request: remote_pb2.TickRequest, session: Session) -> dict[str, Any]:
        inputs = inputs_of(request)
        node = inputs.get("user-string")
        return {
            "run": request.group_name or "ungrouped",
            "group_name": request.group_name,
            "node": node if isinstance(node, str) else "",
            "inputs": inputs,
            "session": session.id,
            "client": request.header.client_name,
            "tick_started": time.time(),
            "tick_clock": self.hub.clock(),
        }

    def _reset(self, session: Session) -> None:
        """Stop what runs (a clip keeps what it recorded): the next tick starts over."""
        if session.task is not None and not session.task.done():
            session.task.cancel()
        session.task, session.outcome = None, None

    def _forget_idle(self) -> None:
        """Keep at most MAX_SESSIONS: the robot may load missions and never tear them down."""
        while len(self.sessions) >= MAX_SESSIONS:
            idle = [s for s in self.sessions.values() if s.task is None or s.task.done()]
            victim = min(idle or self.sessions.values(), key=lambda s: s.last_used)
            self._reset(victim)
            del self.sessions[victim.id]

    async def _run(self, job: Job, context: dict[str, Any]) -> None:
        """One job; raises JobFailed with the reason the operator will read."""
        started = time.monotonic()
        result = "failure"
        try:
            if job.action == CAPTURE:
                await self._capture(job, context)
            else:
                await self._record(job, context)
            result = "success"
            log.info(
                "mission %s of %s done in %.2f s (run %r)",
                job.action,
                ",".join(job.cameras),
                time.monotonic() - started,
                context["run"],
            )
        except asyncio.CancelledError:
            result = "stopped"
            raise
        except JobFailed as exc:
            log.warning("mission %s failed: %s", job.action, exc)
            raise
        except Exception as exc:
            log.exception("mission %s failed unexpectedly", job.action)
            raise JobFailed(f"spotrelay internal error: {exc}") from exc
        finally:
            self.metrics.mission_callbacks.labels(action=job.action, result=result).inc()

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    def _meta(self, job: Job, context: dict[str, Any], source: str) -> dict[str, Any]:
        mission = {k: v for k, v in context.items() if k != "tick_clock"}
        return {"action": job.action, "source": source, "label": job.label, "mission": mission}

    # capture ---------------------------------------------------------------------------------

    async def _capture(self, job: Job, context: dict[str, Any]) -> list[Capture]:
        """The newest frame each camera delivered after the tick began, stored all or none."""
        frames = await asyncio.gather(
            *(
                self.hub.next_frame(s, after=context["tick_clock"], timeout=self.deadline)
                for s in job.cameras
            ),
            return_exceptions=True,
        )
        silent = [s for s, f in zip(job.cameras, frames, strict=True) if not isinstance(f, Frame)]
        if silent:
            raise JobFailed(
                f"no frame from {', '.join(silent)} within {self.deadline:g} s "
                "(camera stopped, or the robot is not connected)"
            )
        loop = asyncio.get_running_loop()
        pictures = []
        for frame in frames:
            assert isinstance(frame, Frame)
            try:
                picture = await loop.run_in_executor(self.hub.snapshot_executor, _still, frame)
            except codec.CodecError as exc:
                raise JobFailed(f"cannot decode the frame of {frame.source}: {exc}") from exc
            picture.meta = {**self._meta(job, context, frame.source), **picture.meta}
            pictures.append((frame, picture))
        items = [(self.store.new_stem(f.acquired, f.source), p) for f, p in pictures]
        try:
            return await self._io(self.store.write_pictures, items)
        except StorageError as exc:
            raise JobFailed(str(exc)) from exc

    # record ----------------------------------------------------------------------------------

    async def _record(self, job: Job, context: dict[str, Any]) -> None:
        results = await asyncio.gather(
            *(self._record_one(job, context, s) for s in job.cameras), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _record_one(self, job: Job, context: dict[str, Any], source: str) -> None:
        """Frames captured from the first after the tick for ``duration`` seconds of capture
        time, the robot's JPEG bytes as they come (colour-mapped JPEG for depth)."""
        stem = self.store.new_stem(time.time(), source)
        try:
            clip = await self._io(self.store.clip, stem)
        except (OSError, StorageError) as exc:
            raise JobFailed(f"cannot start recording {source}: {exc}") from exc
        spec = RenderSpec()
        frames = self.hub.frames(source, spec, Client("record", source, spec, "mission", None))
        loop = asyncio.get_running_loop()
        state = _Recording(start=context["tick_started"])
        give_up = loop.time() + self.deadline  # for the first frame
        problem: str | None = None
        try:
            async with contextlib.aclosing(frames):
                while True:
                    try:
                        async with asyncio.timeout_at(give_up):
                            enc = await anext(frames)
                    except TimeoutError:
                        problem = "timeout"
                        break
                    except StopAsyncIteration:  # the hub ends streams only when closing
                        problem = "the relay is shutting down"
                        break
                    if enc.stale:
                        if state.count:  # no new frame for --stale-after seconds
                            problem = "stopped"
                            break
                        continue
                    if enc.acquired < state.start or enc.seq == state.last_seq:
                        continue
                    if state.first is None:
                        state.first, state.first_jpeg = enc.acquired, enc.data
                        give_up = loop.time() + job.duration + self.deadline
                    if enc.acquired >= state.first + job.duration:
                        break
                    await self._io(clip.add, enc.data)
                    state.note(enc.acquired, enc.seq)
        except asyncio.CancelledError:
            await self._close_clip(clip, job, context, source, state, "stopped by the mission")
            raise
        except StorageError as exc:
            await self._io(clip.discard)
            raise JobFailed(f"recording {source}: {exc}") from exc
        except Exception as exc:  # ClipError: a frame of another size, a broken JPEG
            problem = f"{exc}"
        if state.count == 0:
            await self._io(clip.discard)
            raise JobFailed(f"no frame from {source} within {self.deadline:g} s")
        if problem in ("timeout", "stopped"):
            problem = (
                f"camera {source} stopped sending frames after {state.span:.1f} s "
                f"of the {job.duration:g} s asked"
            )
        await self._close_clip(clip, job, context, source, state, problem)
        if problem:
            raise JobFailed(f"{problem} (kept the {state.count} frames recorded)")

    async def _close_clip(self, clip, job, context, source, state, problem: str | None) -> None:
        if state.count == 0:
            await self._io(clip.discard)
            return
        assert state.first is not None and state.first_jpeg is not None
        meta = self._meta(job, context, source)
        loop = asyncio.get_running_loop()
        thumb = await loop.run_in_executor(
            self.hub.snapshot_executor, _thumbnail_of_jpeg, state.first_jpeg
        )
        width, height = clip.avi.size or (0, 0)
        meta.update(
            kind="clip",
            media_type="video/x-msvideo",
            encoding="MJPEG in AVI (the robot's JPEG bytes; colour-mapped for depth)",
            width=width,
            height=height,
            time=state.first,
            time_utc=utc_iso(state.first),
            robot_time=self.robot_clock(state.first),
            clip={
                "frames": state.count,
                "fps": round(state.fps, 3),
                "duration": round(state.span + 1 / state.fps, 3),
                "end_time": state.last,
                "requested_duration": job.duration,
                "complete": problem is None,
                "problem": problem,
            },
        )
        try:
            await self._io(clip.finish, state.fps, thumb, meta)
        except StorageError as exc:
            raise JobFailed(f"recording {source}: {exc}") from exc

    async def close(self, timeout: float = 1.0) -> None:
        """Stop every job (clips keep what they recorded) and wait a little for them."""
        for session in self.sessions.values():
            self._reset(session)
        jobs = list(self.jobs)
        for task in jobs:
            task.cancel()
        if jobs:
            await asyncio.wait(jobs, timeout=timeout)


@dataclass
class _Recording:
    start: float  # local epoch: frames captured before the tick are not part of the clip
    first: float | None = None
    first_jpeg: bytes | None = None
    last: float = 0.0
    last_seq: int = -1
    count: int = 0

    def note(self, acquired: float, seq: int) -> None:
        self.last, self.last_seq, self.count = acquired, seq, self.count + 1

    @property
    def span(self) -> float:
        return self.last - self.first if self.first is not None else 0.0

    @property
    def fps(self) -> float:
        """Measured from capture times: what the camera delivered, for the AVI's frame rate."""
        return (self.count - 1) / self.span if self.count > 1 and self.span > 0 else 15.0


def _still(frame: Frame) -> Picture:
    """The robot's JPEG as it sent it, else lossless PNG (16-bit for depth); and a thumbnail."""
    image = frame.image
    shape = image.shape
    if image.format == JPEG:
        data, suffix, media, encoding = image.data, ".jpg", "image/jpeg", "robot JPEG"
    else:
        data = codec.render(image, plan(frame.source, shape, RenderSpec(format="png")))
        suffix, media = ".png", "image/png"
        encoding = "16-bit PNG, depth units" if image.is_depth else "PNG"
    thumb = codec.render(image, plan(frame.source, shape, RenderSpec(width=THUMB_WIDTH)))
    meta: dict[str, Any] = {
        "kind": "still",
        "media_type": media,
        "encoding": encoding,
        "width": image.cols,
        "height": image.rows,
        "time": frame.acquired,
        "time_utc": utc_iso(frame.acquired),
        "robot_time": frame.robot_time,
        "received": frame.received,
        "seq": frame.seq,
    }
    if image.is_depth:
        meta["depth_scale"] = image.depth_scale  # PNG value / depth_scale = metres
    return Picture(suffix, data, thumb, meta)


def _thumbnail_of_jpeg(jpeg: bytes) -> bytes:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
    if img is None:
        raise codec.CodecError("undecodable JPEG")
    h, w = img.shape[:2]
    if w > THUMB_WIDTH:
        img = codec.resize(img, THUMB_WIDTH, max(1, round(h * THUMB_WIDTH / w)))
    return codec.encode_jpeg(img, 70)


# -- directory registration ---------------------------------------------------------------------


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        return None


def unreachable_host(host: str) -> bool:
    """Loopback or unspecified: an address the robot could never reach us at."""
    addr = _address(host)
    return addr is not None and (addr.is_loopback or addr.is_unspecified)


class Registration:
    """Keeps the callback in the robot's directory for as long as each robot session lasts.

    ``on_session(robot)`` is the connection's hook: a new SDK Robot (after a login, a robot
    restart, an expired token) starts a new keep-alive with that session; None (robot lost) stops
    it. The first registration is retried with backoff; afterwards the SDK's keep-alive thread
    re-registers every 30 s, which also brings the entry back if the robot's directory lost it.
    """

    def __init__(self, port: int, host: str | None, robot_host: str):
        self.port, self.host, self.robot_host = port, host, robot_host
        self.registered = False
        self.endpoint: str | None = None
        self.error: str | None = None
        self._task: asyncio.Task | None = None
        self._alive: DirectoryRegistrationKeepAlive | None = None

    def status(self) -> dict[str, Any]:
        alive = self._alive
        return {
            "service": SERVICE_NAME,
            "authority": AUTHORITY + ".spot.robot",
            "type": SERVICE_TYPE,
            "endpoint": self.endpoint,
            "registered": self.registered and alive is not None and alive.is_alive(),
            "error": self.error,
        }

    def on_session(self, robot: Any) -> None:
        if self._task is not None:
            self._task.cancel()
        self._task = asyncio.create_task(self._keep(robot)) if robot is not None else None

    def _where(self) -> str:
        """The address the robot reaches us at: given, or ours on the route to the robot."""
        host = self.host or get_self_ip(self.robot_host)
        if unreachable_host(host) and not unreachable_host(self.robot_host):
            raise ValueError(
                f"{host} is not an address the robot can reach; set --mission-host to this "
                "computer's address on the robot's network (192.168.50.5 for a CORE I/O)"
            )
        return host

    def _start(self, robot: Any, host: str) -> DirectoryRegistrationKeepAlive:
        client = robot.ensure_client(DirectoryRegistrationClient.default_service_name)
        alive = DirectoryRegistrationKeepAlive(
            client, logger=logging.getLogger(SDK_LOGGER), rpc_timeout_seconds=5.0
        )
        alive.start(SERVICE_NAME, SERVICE_TYPE, AUTHORITY, host, self.port)
        return alive

    async def _keep(self, robot: Any) -> None:
        alive = None
        delay = 1.0
        try:
            while alive is None:
                try:
                    host = await in_daemon_thread(self._where)
                    self.endpoint = f"{host}:{self.port}"
                    alive = await in_daemon_thread(lambda h=host: self._start(robot, h))
                except ValueError as exc:
                    self.error = str(exc)
                    log.error("Autowalk callback not registered: %s", exc)
                    return
                except Exception as exc:
                    error = describe_error(exc)
                    if error != self.error:
                        log.warning("cannot register the Autowalk callback: %s; retrying", error)
                    self.error = error
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, REGISTER_RETRY_MAX)
            self._alive, self.registered, self.error = alive, True, None
            log.info(
                "Autowalk callback %r registered in the robot's directory (authority %s), "
                "reached at %s over plaintext gRPC",
                SERVICE_NAME,
                AUTHORITY + ".spot.robot",
                self.endpoint,
            )
            await asyncio.Event().wait()  # until the session ends
        finally:
            self.registered = False
            if alive is not None:  # joins the SDK's thread, which may be mid-RPC
                threading.Thread(target=alive.shutdown, daemon=True).start()
                if self._alive is alive:
                    self._alive = None

    async def close(self, timeout: float = 1.0) -> None:
        """Leave the directory (best effort, bounded: the robot may be gone)."""
        alive = self._alive
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if alive is None:
            return

        def leave() -> None:
            alive.shutdown()
            alive.unregister()

        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await in_daemon_thread(leave)
            log.info("Autowalk callback %r removed from the robot's directory", SERVICE_NAME)


# -- the server ---------------------------------------------------------------------------------


class MissionServer:
    """The callback's gRPC server, its service, its registration and the captures store."""

    def __init__(
        self,
        hub: Hub,
        store: Store,
        metrics: Metrics,
        *,
        bind: str,
        port: int,
        host: str | None,
        robot_host: str,
        robot_clock: Callable[[float], float] = lambda local: local,
    ):
        self.store, self.bind, self.port = store, bind, port
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="captures")
        self.service = MissionService(hub, store, metrics, self.io, robot_clock=robot_clock)
        self.registration = Registration(port, host, robot_host)
        self._server: grpc.aio.Server | None = None
        metrics.capture_bytes.set_function(lambda: store.bytes_on_disk)
        metrics.captures.set_function(lambda: len(store))

    async def start(self) -> None:
        """Open the store (deleting what a crash left), then listen. Raises OSError."""
        await asyncio.get_running_loop().run_in_executor(self.io, self.store.open)
        # SO_REUSEPORT off: a second relay must fail to bind, not share the port silently.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        remote_service_pb2_grpc.add_RemoteMissionServiceServicer_to_server(self.service, server)
        try:
            server.add_insecure_port(f"{self.bind}:{self.port}")
        except RuntimeError as exc:
            await server.stop(None)
            raise OSError(f"cannot listen on {self.bind}:{self.port} (in use?)") from exc
        await server.start()
        self._server = server
        log.info("Autowalk callback listening on %s:%d (plaintext gRPC)", self.bind, self.port)

    def status(self) -> dict[str, Any]:
        jobs = self.service.jobs
        return {
            **self.registration.status(),
            "listening": f"{self.bind}:{self.port}",
            "sessions": len(self.service.sessions),
            "running": sum(1 for t in jobs if not t.done()),
        }

    async def close(self) -> None:
        await self.service.close()
        await self.registration.close()
        if self._server is not None:
            await self._server.stop(0.2)
        self.io.shutdown(wait=False, cancel_futures=True)
