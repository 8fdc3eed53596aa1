"""One logged-in SDK ``Robot``: login (user or payload), time sync, the image services.

Every call here blocks on the network; the connection makes them from daemon threads
(``threads.py``). Each login builds a fresh SDK ``Robot``: after a robot reboot its tokens,
channels and time-sync thread are all stale, and a clean object is simpler to reason about than
repairing one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import bosdyn.client
from bosdyn.api import image_pb2
from bosdyn.client.directory import DirectoryClient
from bosdyn.client.image import ImageClient
from bosdyn.client.payload_registration import (
    PayloadNotAuthorizedError,
    PayloadRegistrationClient,
)

from spotrelay.frames import SourceInfo
from spotrelay.logs import SDK_LOGGER
from spotrelay.robot.errors import PayloadNotAuthorised

log = logging.getLogger("spotrelay.robot")

IMAGE_SERVICE_TYPE = "bosdyn.api.ImageService"
RPC_TIMEOUT = 10.0
# A frame older than this is of no use to anyone watching, and a short deadline notices a robot
# that vanished without closing the connection (cable pulled, Wi-Fi gone).
IMAGE_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Target:
    """Where the robot is and how to log in; the sim and a real robot differ only here.

    ``login`` is decided once, by the configuration: "payload" (GUID and secret) or "user"."""

    host: str
    port: int = 443
    cert: str | None = None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    guid: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    login: str = "user"

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


class Session:
    """A logged-in, time-synced SDK Robot. Raises the SDK's errors (or PayloadNotAuthorised)."""

    def __init__(self, target: Target):
        sdk = bosdyn.client.create_standard_sdk("spotrelay")
        # The SDK's loggers hang under its object's logger, named after the client ("spotrelay")
        # and so inheriting the relay's level: at DEBUG they would write whole login requests.
        sdk.logger = logging.getLogger(SDK_LOGGER)
        if target.cert:
            sdk.load_robot_cert(target.cert)
        robot = sdk.create_robot(target.host)
        robot.update_secure_channel_port(target.port)
        self.robot = robot
        self.clients: dict[str, ImageClient] = {}
        try:
            if target.login == "payload":
                self._payload_login(target)
            else:
                robot.authenticate(target.username, target.password, timeout=RPC_TIMEOUT)
            robot.time_sync.wait_for_sync(timeout_sec=RPC_TIMEOUT)
        except BaseException:
            self.close()
            raise

    def _payload_login(self, target: Target) -> None:
        # Not robot.authenticate_from_payload_credentials: it blocks until an operator
        # authorises the payload; we want to say so and retry on our own schedule.
        payload = self.robot.ensure_client(PayloadRegistrationClient.default_service_name)
        try:
            token = payload.get_payload_auth_token(target.guid, target.secret, timeout=RPC_TIMEOUT)
        except PayloadNotAuthorizedError:
            raise PayloadNotAuthorised(
                "payload not authorised yet: authorise it in the robot's admin console "
                "(Payloads page)"
            ) from None
        self.robot.update_user_token(token)

    @property
    def user_token(self) -> str | None:
        return self.robot.user_token

    def image_services(self) -> list[str]:
        """Every image service in the directory (and teach the SDK where each one lives)."""
        directory = self.robot.ensure_client(DirectoryClient.default_service_name)
        entries = directory.list(timeout=RPC_TIMEOUT)
        self.robot.sync_with_services_list(entries)
        return sorted(e.name for e in entries if e.type == IMAGE_SERVICE_TYPE)

    def discover(self, service: str) -> list[SourceInfo]:
        client = self.clients.get(service)
        if client is None:
            if service not in self.robot.service_type_by_name:
                # ensure_client only knows the SDK's default names until the directory is read
                # (it raises UnregisteredServiceNameError for e.g. spot-cam-image otherwise).
                self.image_services()
            client = self.clients[service] = self.robot.ensure_client(service)
        return [
            SourceInfo.from_proto(src, service)
            for src in client.list_image_sources(timeout=RPC_TIMEOUT)
        ]

    def get_images(self, service: str, requests: list[image_pb2.ImageRequest]) -> Any | None:
        """The SDK's future of one GetImage (``None`` if the service was never discovered).

        Returns at once; the reply arrives on a gRPC thread."""
        client = self.clients.get(service)
        if client is None:
            return None
        return client.get_image_async(requests, timeout=IMAGE_TIMEOUT)

    def skew_seconds(self) -> float | None:
        """Robot clock minus local clock, or None before time sync is established.

        ``robot.time_sync`` restarts the SDK's time-sync thread if an RPC error ended it, which is
        what we want: a lost robot is noticed by the poller, not here.
        """
        ts = self.robot.time_sync
        if not ts.has_established_time_sync:
            return None
        skew = ts.endpoint.clock_skew
        return skew.seconds + skew.nanos * 1e-9

    def close(self) -> None:
        try:
            self.robot._shutdown()  # stops the time-sync and token threads (no public call)
            self.robot.shutdown()  # closes channels
        except Exception:
            log.debug("error closing SDK robot", exc_info=True)
