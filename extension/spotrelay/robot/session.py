"""One logged-in SDK ``Robot``: login (user or payload), time sync, the image services.

Login and time sync block on the network; the connection makes them from daemon threads
(``threads.py``). The image services are called on the event loop instead (``images.py``: the
SDK's requests and errors on ``grpc.aio`` channels, without a thread per call). Each login builds
a fresh SDK ``Robot``: when the robot rejects the token, its tokens, channels and time-sync thread
are all stale, and a clean object is simpler to reason about than repairing one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import bosdyn.client
from bosdyn.api import image_pb2
from bosdyn.client.directory import DirectoryClient
from bosdyn.client.image import ImageClient
from bosdyn.client.payload_registration import (
    PayloadNotAuthorizedError,
    PayloadRegistrationClient,
)
from bosdyn.client.robot import Robot

from spotrelay.frames import SourceInfo
from spotrelay.logs import SDK_LOGGER
from spotrelay.robot.errors import PayloadNotAuthorised
from spotrelay.robot.images import RECONNECT_OPTIONS, Channels, ImageService
from spotrelay.robot.threads import failed, in_daemon_thread

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
        # The SDK's own channels (login, directory, time sync, the Autowalk registration) are
        # made with the same short reconnect backoff as the image channels, before anything
        # uses them (options count only when a channel is made): after an outage the time sync
        # and the registration come back with the images, not up to two minutes later.
        for authority in sorted(set(Robot._bootstrap_service_authorities.values())):
            robot.ensure_secure_channel(authority, options=list(RECONNECT_OPTIONS))
        self.robot = robot
        self.images: dict[str, ImageService] = {}
        self._channels: Channels | None = None
        # the connection's hook: an image service's channel is connected again
        self.on_ready: Callable[[str], None] = lambda service: None
        try:
            if target.login == "payload":
                self._payload_login(target)
            else:
                robot.authenticate(target.username, target.password, timeout=RPC_TIMEOUT)
            robot.time_sync.wait_for_sync(timeout_sec=RPC_TIMEOUT)
        except BaseException:
            self._close_sdk()
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

    def _client(self, service: str) -> tuple[ImageClient, str]:
        """The SDK's client of an image service and its authority (blocks: may read the
        directory). Raises as ``Robot.ensure_client`` does for a name the robot does not know."""
        if service not in self.robot.service_type_by_name:
            # ensure_client only knows the SDK's default names until the directory is read
            # (it raises UnregisteredServiceNameError for e.g. spot-cam-image otherwise).
            self.image_services()
        client = self.robot.ensure_client(service)
        authority = Robot._bootstrap_service_authorities.get(service)
        return client, authority or self.robot.authorities_by_name[service]

    async def discover(self, service: str, timeout: float = RPC_TIMEOUT) -> list[SourceInfo]:
        """The sources of one image service (ListImageSources), on the event loop."""
        images = self.images.get(service)
        if images is None:
            client, authority = await in_daemon_thread(lambda: self._client(service))
            if self._channels is None:
                self._channels = Channels(self.robot, self._ready)
            images = self.images[service] = ImageService(
                self.robot, client, authority, self._channels
            )
        return [
            SourceInfo.from_proto(src, service)
            for src in await images.list_sources(timeout=timeout)
        ]

    def get_images(
        self, service: str, requests: list[image_pb2.ImageRequest]
    ) -> Awaitable[image_pb2.GetImageResponse]:
        """One GetImage, sent now: await it for the whole response, or the SDK's exception."""
        images = self.images.get(service)
        if images is None:
            return failed(ConnectionError(f"image service {service} not discovered yet"))
        return images.get_images(requests, timeout=IMAGE_TIMEOUT)

    def _ready(self, authority: str) -> None:
        for name, images in list(self.images.items()):
            if images.authority == authority:
                self.on_ready(name)

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

    async def close(self) -> None:
        """Close the image channels (on the loop), then the SDK's robot (in a thread)."""
        if self._channels is not None:
            await self._channels.close()
        await asyncio.to_thread(self._close_sdk)

    def _close_sdk(self) -> None:
        try:
            self.robot._shutdown()  # stops the time-sync and token threads (no public call)
            self.robot.shutdown()  # closes channels
        except Exception:
            log.debug("error closing SDK robot", exc_info=True)
