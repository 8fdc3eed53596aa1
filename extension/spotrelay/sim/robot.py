"""The simulated robot: real gRPC over TLS with its own CA, reached only through the official SDK.

It is a test instrument for the relay, and a kind instrument hides bugs, so it models what a client
of a real Spot sees (sources noted in each module):

* the robot's clock, skewed from ours, and NTP-style time sync;
* cameras that capture on a jittered grid and become available after a delay (``cameras.py``);
* RPC latency with jitter, split between the way in and the way out, and a cost per image;
* several image services in the directory: ``image``, optionally a Spot CAM-like
  ``spot-cam-image``, and a payload's service that may register late, be faulted (HTTP 502 from
  the robot's proxy), slow, or not authorised (HTTP 403), each on its own authority behind one
  port (``router.py``);
* every ImageResponse status per source, values newer than the SDK included;
* logins limited to 5 a second (429), locked out for a minute after six failures in a row
  (spot-sdk docs/concepts/base_services.md), and payload credentials that an operator has not yet
  authorised (STATUS_PAYLOAD_NOT_AUTHORIZED);
* a directory-registration service, so payload services can register themselves.
"""

from __future__ import annotations

import shutil
import time
from concurrent import futures
from typing import Any

import grpc
from bosdyn.api import auth_service_pb2_grpc as auth_grpc
from bosdyn.api import directory_registration_service_pb2_grpc as dir_reg_grpc
from bosdyn.api import directory_service_pb2_grpc as directory_grpc
from bosdyn.api import image_service_pb2_grpc as image_grpc
from bosdyn.api import payload_registration_service_pb2_grpc as payload_grpc
from bosdyn.api import robot_id_service_pb2_grpc as robot_id_grpc
from bosdyn.api import time_sync_service_pb2_grpc as time_sync_grpc

from spotrelay.sim import services
from spotrelay.sim.certs import make_certs
from spotrelay.sim.router import Router
from spotrelay.sim.state import PAYLOAD, PAYLOAD_STATES, SPOT_CAM, RobotState

__all__ = ["PAYLOAD", "PAYLOAD_STATES", "SPOT_CAM", "SimRobot"]


class SimRobot(RobotState):
    """``start()`` serves on ``host:port`` (``port`` 0: any free one); ``ca_path`` is its CA.
    Takes ``RobotState``'s keyword arguments (clock skew, latency, cameras, faults...)."""

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self._servers: list[grpc.Server] = []
        self._router: Router | None = None
        self.ca_path = ""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> SimRobot:
        if not self.ca_path:
            self.ca_path, self._key, self._cert = make_certs(self.cert_dir)
        creds = grpc.ssl_server_credentials([(self._key, self._cert)])
        core = self._server()
        auth_grpc.add_AuthServiceServicer_to_server(services.Auth(self), core)
        payload_grpc.add_PayloadRegistrationServiceServicer_to_server(services.Payload(self), core)
        directory_grpc.add_DirectoryServiceServicer_to_server(services.Directory(self), core)
        dir_reg_grpc.add_DirectoryRegistrationServiceServicer_to_server(
            services.DirectoryRegistration(self), core
        )
        robot_id_grpc.add_RobotIdServiceServicer_to_server(services.RobotId(self), core)
        time_sync_grpc.add_TimeSyncServiceServicer_to_server(services.TimeSync(self), core)
        image_grpc.add_ImageServiceServicer_to_server(
            services.ImageService(self, "image", self.services["image"][1]), core
        )
        if len(self.services) == 1:  # one authority group: no router needed
            self.port = core.add_secure_port(f"{self.host}:{self.port}", creds)
            core.start()
            return self
        backends: dict[str, int] = {}
        for name, (authority, cams) in self.services.items():
            if name == "image":
                continue
            server = self._server()
            image_grpc.add_ImageServiceServicer_to_server(
                services.ImageService(self, name, cams), server
            )
            backends[authority] = server.add_secure_port("127.0.0.1:0", creds)
            server.start()
        core_port = core.add_secure_port("127.0.0.1:0", creds)
        core.start()
        self._router = Router(self.host, self.port, lambda sni: backends.get(sni or "", core_port))
        self.port = self._router.port
        return self

    def _server(self) -> grpc.Server:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="sim"))
        self._servers.append(server)
        return server

    def stop(self) -> None:
        self._stop_servers()
        if self._own_cert_dir:
            shutil.rmtree(self.cert_dir, ignore_errors=True)

    def _stop_servers(self) -> None:
        if self._router is not None:
            self._router.stop()
            self._router = None
        for server in self._servers:
            server.stop(grace=0).wait(2)
        self._servers = []

    def restart(self, down: float) -> tuple[float, float]:
        """The robot's servers go away for ``down`` seconds and come back on the same port, with
        the same certificate and the tokens it had issued (a robot keeps honouring them).
        Returns (went down, came back), local epoch seconds."""
        went = time.time()
        self._stop_servers()
        time.sleep(down)
        self.start()
        return went, time.time()

    def __enter__(self) -> SimRobot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
