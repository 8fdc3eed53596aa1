"""The Autowalk callback's entry in the robot's directory, kept for as long as each session lasts.

The robot's mission service finds a payload callback by its directory name, at the address and
port the payload registered (directory.proto: ServiceEntry, Endpoint). The SDK's
``DirectoryRegistrationKeepAlive`` (bosdyn/client/directory_registration.py) registers, resets a
stale entry first, and re-registers every 30 s with a liveness timeout of 75 s: that also brings
the entry back after the robot's directory lost it. It runs on a logged-in SDK Robot, so it is
started again with each session of the relay's connection (the robot allows 5 logins a second:
the relay's own session is reused) and stopped when the robot is lost.

The address must be one the robot can reach: given (``--mission-host``; in a container the CORE
I/O's, 192.168.50.5), or our address on the route to the robot
(``bosdyn.client.common.get_self_ip``); never loopback or 0.0.0.0 unless the robot is local.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
from typing import Any

from bosdyn.client.common import get_self_ip
from bosdyn.client.directory_registration import (
    DirectoryRegistrationClient,
    DirectoryRegistrationKeepAlive,
)

from spotrelay.logs import SDK_LOGGER
from spotrelay.robot.errors import describe_error
from spotrelay.robot.threads import in_daemon_thread

log = logging.getLogger("spotrelay.autowalk")

RETRY_MAX = 30.0


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

    def __init__(
        self,
        name: str,
        service_type: str,
        authority: str,
        port: int,
        host: str | None,
        robot_host: str,
    ):
        self.name, self.type, self.authority = name, service_type, authority
        self.port, self.host, self.robot_host = port, host, robot_host
        self.endpoint: str | None = None
        self.error: str | None = None
        self._task: asyncio.Task | None = None
        self._alive: DirectoryRegistrationKeepAlive | None = None

    def status(self) -> dict[str, Any]:
        alive = self._alive
        return {
            "service": self.name,
            "authority": self.authority + ".spot.robot",
            "type": self.type,
            "endpoint": self.endpoint,
            "registered": alive is not None and alive.is_alive(),
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

    def _start(
        self, robot: Any, host: str, gone: threading.Event
    ) -> DirectoryRegistrationKeepAlive | None:
        client = robot.ensure_client(DirectoryRegistrationClient.default_service_name)
        alive = DirectoryRegistrationKeepAlive(
            client, logger=logging.getLogger(SDK_LOGGER), rpc_timeout_seconds=5.0
        )
        alive.start(self.name, self.type, self.authority, host, self.port)
        if gone.is_set():  # the session ended while we registered: nobody will stop it
            alive.shutdown()
            return None
        return alive

    async def _keep(self, robot: Any) -> None:
        alive = None
        gone = threading.Event()
        try:
            try:
                host = await in_daemon_thread(self._where)
            except ValueError as exc:
                self.error = str(exc)
                log.error("%s not registered: %s", self.name, exc)
                return
            self.endpoint = f"{host}:{self.port}"
            delay = 1.0
            while alive is None:
                try:
                    alive = await in_daemon_thread(lambda: self._start(robot, host, gone))
                except Exception as exc:
                    error = describe_error(exc)
                    if error != self.error:
                        log.warning("cannot register the Autowalk callback: %s; retrying", error)
                    self.error = error
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
            self._alive, self.error = alive, None
            log.info(
                "Autowalk callback %r registered in the robot's directory (authority %s), "
                "reached at %s over plaintext gRPC",
                self.name,
                self.authority + ".spot.robot",
                self.endpoint,
            )
            await asyncio.Event().wait()  # until the session ends
        finally:
            gone.set()
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
            log.info("Autowalk callback %r removed from the robot's directory", self.name)
