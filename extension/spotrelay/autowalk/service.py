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

Trust: the port is plaintext and the robot sends no token (the SDK's own servers check nothing),
and the CORE I/O forwards the robot's ports 21000-22000 keeping the sender's address, so anyone
on the robot's networks can reach it. What the relay can check is the caller's address
(``context.peer()``): only the robot's (``Callers``; ``--mission-allow``) may drive it, others
get PERMISSION_DENIED before anything is done. Whoever calls, the port is bounded: message size,
calls and connections at once, idle and old connections closed, sessions (a new one never
evicts a live one: refused, and idle ones expire), the lengths of what a tick carries and
finite numbers, jobs and clips at once; session ids never leave the relay (sidecars keep a
hash).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import logging
import math
import secrets
import socket
import time
import urllib.parse
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

from spotrelay.autowalk.jobs import (
    CAPTURE,
    FRAME_DEADLINE,
    RECORD,
    Evidence,
    Job,
    JobFailed,
    Refused,
)
from spotrelay.autowalk.registration import Registration
from spotrelay.autowalk.store import MAX_TEXT, Store, strict_json
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
# Bounds of the port, whoever calls (README, Security):
MAX_SESSIONS = 64  # sessions live from mission load to teardown (one per callback node)
SESSION_IDLE = 3600.0  # s untouched (and nothing running) before a session may make room
MAX_JOBS = 16  # captures and recordings running at once (each renders one still at a time)
MAX_CLIPS = 24  # cameras being recorded at once, over every recording
MAX_STILLS = 40  # cameras being captured at once, over every capture (two of all 20 cameras)
MAX_LABEL = MAX_TEXT  # characters of a label, a group name, a client name
MAX_INPUTS_JSON = 4096  # bytes of the mission's inputs as kept in each sidecar
MAX_MESSAGE = 1 << 20  # bytes of one request (a tick is a few kilobytes; the SDK allows 100 MiB)
MAX_CALLS = 32  # calls in progress at once; past it RESOURCE_EXHAUSTED
MAX_CONNECTIONS = 128  # TCP connections at once; past it new ones are closed at once
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second relay must fail to bind, not share the port silently
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_concurrent_streams", 8),  # calls at once on one connection
    ("grpc.max_allowed_incoming_connections", MAX_CONNECTIONS),
    ("grpc.server_handshake_timeout_ms", 5000),  # a connection that never speaks HTTP/2
    ("grpc.max_connection_idle_ms", 60_000),  # no call for a minute: closed (clients reconnect)
    ("grpc.max_connection_age_ms", 600_000),  # every connection is renewed within 10 min...
    ("grpc.max_connection_age_grace_ms", 30_000),  # ...letting its calls finish
    ("grpc.keepalive_time_ms", 5000),  # as the SDK's servers: a vanished peer is noticed
    ("grpc.keepalive_timeout_ms", 10_000),
]
_Tick = remote_pb2.TickResponse


def public_id(session_id: str) -> str:
    """What sidecars and logs say of a session: enough to group its captures, useless to call
    the callback with."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:16]


# -- who may call -------------------------------------------------------------------------------


def peer_address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The caller's address from gRPC's ``context.peer()`` (``ipv4:1.2.3.4:567``,
    ``ipv6:[::1]:567``, percent-encoded or not); None for anything else (``unix:``)."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = rest.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def robot_addresses(robot_host: str) -> tuple[str, ...]:
    """Who the robot calls from: its address (resolved); a robot on this computer (the
    simulated one) calls from loopback, which is 127.0.0.1 or ::1, not the whole of 127/8."""
    try:
        infos = socket.getaddrinfo(robot_host, None, type=socket.SOCK_STREAM)
        found = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    except (OSError, ValueError):
        return ()
    if any(a.is_loopback or a.is_unspecified for a in found):
        return ("127.0.0.1", "::1")
    return tuple(sorted(str(a) for a in found))


class Callers:
    """The addresses allowed to call (``--mission-allow``; by default the robot's)."""

    def __init__(self, networks: tuple[str, ...] | list[str]):
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def allows(self, peer: str) -> bool:
        addr = peer_address(peer)
        return addr is not None and any(addr in net for net in self.networks)

    def __str__(self) -> str:
        return ", ".join(str(n) for n in self.networks) or "nobody"


def _from_allowed_callers(method):
    """Refuse the call (PERMISSION_DENIED, counted, logged at most once a minute) unless the
    caller's address is allowed; before anything else is looked at."""

    @functools.wraps(method)
    async def gated(self: MissionService, request, context):
        peer = context.peer()
        if not self.callers.allows(peer):
            self.refuse_caller(peer)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"spotrelay: {peer_address(peer) or peer} may not call this callback "
                "(only the robot: --mission-allow)",
            )
        return await method(self, request, context)

    return gated


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
            if not math.isfinite(duration):  # NaN passes the spec's min/max check
                return _params_error(f"duration must be a number of seconds, not {duration}")
    names = [default_camera(cameras)]
    if "cameras" in values:  # (reading a missing map key would add it)
        names = [item.string_value.value for item in values["cameras"].list_value.values]
    if not names or not all(names):
        return _params_error("choose at least one camera")
    label = values["label"].string_value.value if "label" in values else ""
    if len(label) > MAX_LABEL:
        return _params_error(f"the label is {len(label)} characters long, at most {MAX_LABEL}")
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
    refused: str | None = None  # the last refusal, said once
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
        callers: Callers | None = None,
        robot_clock: Callable[[float], float] = lambda local: local,
        capture_rate: Callable[[str], float | None] = lambda source: None,
        deadline: float = FRAME_DEADLINE,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.hub, self.metrics = hub, metrics
        self.callers = callers or Callers(["127.0.0.1", "::1"])
        self.evidence = Evidence(
            hub,
            store,
            io,
            stills,
            robot_clock=robot_clock,
            capture_rate=capture_rate,
            deadline=deadline,
        )
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.jobs: set[asyncio.Task] = set()
        self.busy = {CAPTURE: 0, RECORD: 0}  # cameras captured / recorded by running jobs
        self._refused_callers: dict[str, int] = {}
        self._refusal_logged = -math.inf

    def cameras(self) -> list[str]:
        return sorted(self.hub.sources)

    def refuse_caller(self, peer: str) -> None:
        """Count a refused caller; one log line a minute at most, naming who was refused."""
        self.metrics.mission_refused.labels(reason="caller").inc()
        who = str(peer_address(peer) or peer)[:64]
        if len(self._refused_callers) < 16 or who in self._refused_callers:
            self._refused_callers[who] = self._refused_callers.get(who, 0) + 1
        now = self.clock()
        if now - self._refusal_logged >= 60:
            self._refusal_logged = now
            seen = ", ".join(f"{n} from {w}" for w, n in self._refused_callers.items())
            self._refused_callers = {}
            log.warning(
                "Autowalk callback: refused calls (%s): only %s may call it (--mission-allow)",
                seen,
                self.callers,
            )

    def _refuse(self, reason: str) -> None:
        self.metrics.mission_refused.labels(reason=reason).inc()

    # -- RPCs ---------------------------------------------------------------------------------

    @_from_allowed_callers
    async def EstablishSession(self, request, context):
        resp = remote_pb2.EstablishSessionResponse()
        with ResponseContext(resp, request):
            if not self._room_for_a_session():
                self._refuse("sessions")
                error = resp.header.error
                error.code = error.CODE_INTERNAL_SERVER_ERROR
                error.message = (
                    f"spotrelay: {len(self.sessions)} mission sessions are open, the most at "
                    "once, and none has been idle for an hour; tear some down (reload the "
                    "mission) and try again"
                )
                return resp
            session = Session(secrets.token_hex(16), last_used=self.clock())
            self.sessions[session.id] = session
            resp.session_id = session.id
            resp.status = resp.STATUS_OK  # no lease needed: the relay does not move the robot
            log.info("mission session %s established", public_id(session.id))
        return resp

    @_from_allowed_callers
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

    @_from_allowed_callers
    async def Stop(self, request, context):
        resp = remote_pb2.StopResponse()
        with ResponseContext(resp, request):
            session = self.sessions.get(request.session_id)
            if session is None:
                resp.status = resp.STATUS_INVALID_SESSION_ID
            else:
                session.last_used = self.clock()
                self._reset(session)
                resp.status = resp.STATUS_OK
        return resp

    @_from_allowed_callers
    async def TeardownSession(self, request, context):
        resp = remote_pb2.TeardownSessionResponse()
        with ResponseContext(resp, request):
            session = self.sessions.pop(request.session_id, None)
            if session is None:
                resp.status = resp.STATUS_INVALID_SESSION_ID
            else:
                self._reset(session)
                resp.status = resp.STATUS_OK
                log.info("mission session %s torn down", public_id(session.id))
        return resp

    @_from_allowed_callers
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
            resp.error_message = "unknown session (torn down, or expired after an idle hour)"
            return
        session.last_used = self.clock()
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
            problem = self._too_much(job, request, context)
            if problem is not None:
                reason, message = problem
                resp.status, resp.error_message = resp.STATUS_FAILURE, message
                self._refuse(reason)
                if session.refused != message:
                    session.refused = message
                    log.warning("mission tick refused: %s", message)
                return
            session.refused = None
            self.busy[job.action] += len(job.cameras)
            session.task = asyncio.create_task(self._run(job, context))
            self.jobs.add(session.task)
            session.task.add_done_callback(functools.partial(self._done, job))
        if not session.task.done():
            resp.status = resp.STATUS_RUNNING
            return
        if session.outcome is None:
            session.outcome = self._outcome(session.task)
        resp.status, resp.error_message = session.outcome

    def _too_much(
        self, job: Job, request: remote_pb2.TickRequest, context: dict[str, Any]
    ) -> tuple[str, str] | None:
        """Why this tick may not start a job, as (metric reason, the operator's sentence)."""
        if len(request.group_name) > MAX_LABEL:
            n = len(request.group_name)
            return "limits", f"spotrelay: the group name is {n} characters, at most {MAX_LABEL}"
        inputs = len(strict_json(context["inputs"]).encode())
        if inputs > MAX_INPUTS_JSON:
            return "limits", (
                f"spotrelay: the mission's inputs take {inputs} bytes, at most {MAX_INPUTS_JSON}"
            )
        running = sum(1 for t in self.jobs if not t.done())
        if running >= MAX_JOBS:
            return "busy", (
                f"spotrelay: {running} captures and recordings are running, the most at once; "
                "this one was refused, try again when they are done"
            )
        most, doing = (MAX_CLIPS, "recorded") if job.action == RECORD else (MAX_STILLS, "captured")
        busy = self.busy[job.action]
        if busy + len(job.cameras) > most:
            return "busy", (
                f"spotrelay: {busy} cameras are being {doing}, and {len(job.cameras)} more "
                f"would pass the most at once ({most}); this {job.action} was refused, try again"
            )
        return None

    def _count_refusal(self, params: sc.DictParam) -> None:
        action = params.values["action"].one_of_value.key if "action" in params.values else ""
        action = action if action in (CAPTURE, RECORD) else "unknown"
        self.metrics.mission_callbacks.labels(action=action, result="invalid").inc()

    def _done(self, job: Job, task: asyncio.Task) -> None:
        self.jobs.discard(task)
        self.busy[job.action] -= len(job.cameras)
        if not task.cancelled():
            exc = task.exception()  # read here too: a session torn down never asks
            if isinstance(exc, Refused):
                self._refuse(exc.reason)

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
            "node": node[:MAX_LABEL] if isinstance(node, str) else "",
            "inputs": inputs,
            "session": public_id(session.id),  # never the id itself: it would drive the session
            "client": request.header.client_name[:MAX_LABEL],
            "tick_started": time.time(),
            "tick_clock": self.hub.clock(),
        }

    def _reset(self, session: Session) -> None:
        """Stop what runs (a clip keeps what it recorded): the next tick starts over."""
        if session.task is not None and not session.task.done():
            session.task.cancel()
        session.task, session.outcome, session.refused = None, None, None

    def _room_for_a_session(self) -> bool:
        """Below MAX_SESSIONS, or a session idle for SESSION_IDLE (nothing running) expires to
        make room: a new session never evicts one in use, it is refused instead."""
        if len(self.sessions) < MAX_SESSIONS:
            return True
        cutoff = self.clock() - SESSION_IDLE
        idle = [
            s
            for s in self.sessions.values()
            if s.last_used < cutoff and (s.task is None or s.task.done())
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.last_used)
        self._reset(victim)
        del self.sessions[victim.id]
        log.info("mission session %s expired (idle for an hour)", public_id(victim.id))
        return True

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
        allow: tuple[str, ...] = (),
        robot_clock: Callable[[float], float] = lambda local: local,
        capture_rate: Callable[[str], float | None] = lambda source: None,
    ):
        self.store, self.bind, self.port = store, bind, port
        self.allow, self.robot_host = allow, robot_host
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="captures")
        self.service = MissionService(
            hub,
            store,
            metrics,
            self.io,
            stills,
            robot_clock=robot_clock,
            capture_rate=capture_rate,
        )
        self.registration = Registration(
            SERVICE_NAME, SERVICE_TYPE, AUTHORITY, port, host, robot_host
        )
        self._server: grpc.aio.Server | None = None
        metrics.capture_bytes.set_function(lambda: store.bytes_on_disk)
        metrics.captures.set_function(lambda: len(store))

    async def start(self) -> None:
        """Open the store (deleting what a crash left), then listen. Raises OSError."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.io, self.store.open)
        allow = self.allow or await loop.run_in_executor(self.io, robot_addresses, self.robot_host)
        self.service.callers = Callers(allow)
        if not allow:
            log.error(
                "Autowalk callback: cannot resolve the robot's address %r, so no caller is "
                "allowed; give --mission-allow",
                self.robot_host,
            )
        check_port(self.bind, self.port, "--mission-port")
        server = grpc.aio.server(options=SERVER_OPTIONS, maximum_concurrent_rpcs=MAX_CALLS)
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
        log.info(
            "Autowalk callback listening on %s:%d (plaintext gRPC), callers allowed: %s",
            self.bind,
            self.port,
            self.service.callers,
        )

    def status(self) -> dict[str, Any]:
        jobs = self.service.jobs
        return {
            **self.registration.status(),
            "listening": f"{self.bind}:{self.port}",
            "allowed": str(self.service.callers),
            "sessions": len(self.service.sessions),
            "running": sum(1 for t in jobs if not t.done()),
        }

    async def close(self) -> None:
        await self.service.close()
        await self.registration.close()
        if self._server is not None:
            await self._server.stop(0.2)
        self.io.shutdown(wait=False, cancel_futures=True)
