"""Autowalk callback: camera evidence captured at waypoints, as a RemoteMissionService.

Autowalk reaches payload software through "Remote gRPC" actions: the robot's mission service
calls a ``bosdyn.api.mission.RemoteMissionService`` that the payload registered in the robot's
directory. This module is that service for the relay's cameras: the protocol, the parameters
the tablet shows, the sessions. What a run does (``capture`` full-quality stills of the chosen
cameras, ``record`` an MJPEG clip of each) is in ``evidence.py``, the files in ``captures.py``,
the directory entry in ``registration.py``. What the protocol asks, and where it is written down
(bosdyn-api / -client / -mission 5.2.0 and spot-sdk python/examples/remote_mission_service):

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
* Identity: recorded missions call the callback by its directory name, so ``SERVICE_NAME``
  never changes; (authority, type) is unique in the directory (directory_registration.py,
  DirectoryRegistrationClient.register), so the authority is the relay's own.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from bosdyn.api import service_customization_pb2 as sc
from bosdyn.api import units_pb2
from bosdyn.api.mission import remote_pb2, remote_service_pb2_grpc
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

from spotrelay.autowalk.jobs import CAPTURE, FRAME_DEADLINE, RECORD, Evidence, Job, JobFailed
from spotrelay.autowalk.registration import Registration
from spotrelay.autowalk.store import Store
from spotrelay.hub import Hub
from spotrelay.metrics import Metrics
from spotrelay.process import check_port
from spotrelay.stills import Stills

log = logging.getLogger("spotrelay.autowalk")

# Recorded missions name the callback by its directory name: never change it.
SERVICE_NAME = "spotrelay-camera-capture"
# (authority, type) must be unique in the directory; a bare label becomes <label>.spot.robot.
AUTHORITY = "spotrelay-mission"
SERVICE_TYPE = "bosdyn.api.mission.RemoteMissionService"

DURATION_DEFAULT, DURATION_MIN, DURATION_MAX = 10.0, 1.0, 300.0
MAX_SESSIONS = 256  # sessions live from mission load to teardown; drop the oldest idle beyond
_Tick = remote_pb2.TickResponse


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


def job_params(job: Job) -> sc.DictParam:
    """The parameters a tablet action sends for ``job``: what ``parse_params`` reads back."""
    p = sc.DictParam()
    p.values["action"].one_of_value.key = job.action
    if job.action == RECORD:
        record = p.values["action"].one_of_value.values[RECORD]
        record.values["duration"].double_value.value = job.duration
    cameras = p.values["cameras"].list_value
    for camera in job.cameras:
        cameras.values.add().string_value.value = camera
    p.values["label"].string_value.value = job.label
    return p


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
    task: asyncio.Task | None = None
    outcome: tuple[int, str] | None = None
    refused: str | None = None  # the last parameter error, said once
    last_used: float = field(default_factory=time.monotonic)


class MissionService(remote_service_pb2_grpc.RemoteMissionServiceServicer):
    """The five RPCs. Work runs in tasks on the event loop; storage in ``io`` threads."""

    def __init__(
        self,
        hub: Hub,
        store: Store,
        metrics: Metrics,
        io: Executor,
        stills: Stills,
        *,
        robot_clock: Callable[[float], float] = lambda local: local,
        deadline: float = FRAME_DEADLINE,
    ):
        self.hub, self.metrics = hub, metrics
        self.evidence = Evidence(hub, store, io, stills, robot_clock=robot_clock, deadline=deadline)
        self.sessions: dict[str, Session] = {}
        self.jobs: set[asyncio.Task] = set()

    def cameras(self) -> list[str]:
        return sorted(self.hub.sources)

    # -- RPCs ---------------------------------------------------------------------------------

    async def EstablishSession(self, request, context):
        resp = remote_pb2.EstablishSessionResponse()
        with ResponseContext(resp, request):
            self._forget_idle()
            session = Session(secrets.token_hex(8))
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
                resp.status = resp.STATUS_CUSTOM_PARAMS_ERROR
                resp.custom_param_error.CopyFrom(job)
                resp.error_message = "; ".join(job.error_messages)
                if session.refused != resp.error_message:  # once, not at every tick
                    session.refused = resp.error_message
                    self._count_refusal(request.params)
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

    def _count_refusal(self, params: sc.DictParam) -> None:
        action = params.values["action"].one_of_value.key if "action" in params.values else ""
        action = action if action in (CAPTURE, RECORD) else "unknown"
        self.metrics.mission_callbacks.labels(action=action, result="invalid").inc()

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
        session.task, session.outcome, session.refused = None, None, None

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
            await self.evidence.run(job, context)
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

    async def close(self, timeout: float = 1.0) -> None:
        """Stop every job (clips keep what they recorded) and wait a little for them."""
        for session in self.sessions.values():
            self._reset(session)
        jobs = list(self.jobs)
        for task in jobs:
            task.cancel()
        if jobs:
            await asyncio.wait(jobs, timeout=timeout)


# -- the server ---------------------------------------------------------------------------------


class MissionServer:
    """The callback's gRPC server, its service, its registration and the captures store."""

    def __init__(
        self,
        hub: Hub,
        store: Store,
        metrics: Metrics,
        stills: Stills,
        *,
        bind: str,
        port: int,
        host: str | None,
        robot_host: str,
        robot_clock: Callable[[float], float] = lambda local: local,
    ):
        self.store, self.bind, self.port = store, bind, port
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="captures")
        self.service = MissionService(hub, store, metrics, self.io, stills, robot_clock=robot_clock)
        self.registration = Registration(
            SERVICE_NAME, SERVICE_TYPE, AUTHORITY, port, host, robot_host
        )
        self._server: grpc.aio.Server | None = None
        metrics.capture_bytes.set_function(lambda: store.bytes_on_disk)
        metrics.captures.set_function(lambda: len(store))

    async def start(self) -> None:
        """Open the store (deleting what a crash left), then listen. Raises OSError."""
        await asyncio.get_running_loop().run_in_executor(self.io, self.store.open)
        check_port(self.bind, self.port, "--mission-port")
        # SO_REUSEPORT off: a second relay must fail to bind, not share the port silently.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        remote_service_pb2_grpc.add_RemoteMissionServiceServicer_to_server(self.service, server)
        try:
            server.add_insecure_port(f"{self.bind}:{self.port}")
        except RuntimeError as exc:
            await server.stop(None)
            raise OSError(
                f"cannot listen on {self.bind}:{self.port}; give another with --mission-port"
            ) from exc
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
