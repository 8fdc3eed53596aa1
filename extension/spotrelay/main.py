"""Entry point: build every stage, wire them together here and only here, serve until SIGTERM.

The data flows one way: connection -> poller -> hub -> outputs. Each stage is handed, in its
constructor, the callbacks it calls; none of them knows who is on the other end.
"""

from __future__ import annotations

import os

# gRPC logs every GOAWAY of a robot that goes away; our own log says it once, in plain words.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import resource
import signal
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import cv2
from aiohttp import web

from spotrelay import __version__, logs
from spotrelay.captures import Store
from spotrelay.config import Config, load_or_exit
from spotrelay.connection import RobotConnection, Target
from spotrelay.frames import SourceInfo
from spotrelay.http import build_app
from spotrelay.hub import Hub
from spotrelay.metrics import Metrics
from spotrelay.mission import MissionServer
from spotrelay.outputs import api, captures, mjpeg, snapshot, viewer, ws
from spotrelay.poller import Poller

log = logging.getLogger("spotrelay")


def target_for(cfg: Config) -> Target:
    assert cfg.robot
    return Target(
        cfg.robot, cfg.robot_port, cfg.robot_cert, cfg.username, cfg.password, cfg.guid, cfg.secret
    )


async def supervise(
    name: str, run: Callable[[], Awaitable[None]], metrics: Metrics, pause: float = 1.0
) -> None:
    """Run a background task for ever: an unexpected error is logged with its traceback,
    counted, and the task started again after a pause, instead of ending it silently while the
    relay looks healthy."""
    while True:
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            metrics.task_restarts.labels(task=name).inc()
            log.exception("%s stopped on an unexpected error; restarting in %.0f s", name, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 30.0)


class EventLoop(asyncio.SelectorEventLoop):
    """asyncio's loop, accepting one connection per turn of the loop.

    When descriptors run out, CPython 3.11's accept loop (selector_events._accept_connection)
    goes on calling accept() for the rest of its batch after EMFILE, logging a traceback and
    scheduling one more retry each time; the retries compound every second until the process
    spends all its time logging. One accept per turn stops at the first EMFILE: one log line
    and one retry a second, and the listening socket, still readable, is served again on the
    very next turn when descriptors are free.
    """

    def _accept_connection(self, protocol_factory, sock, sslcontext=None, server=None, *args):
        rest = args[1:]  # the batch size is the first of the remaining arguments
        super()._accept_connection(protocol_factory, sock, sslcontext, server, 1, *rest)


def _loop_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Running out of descriptors is a state, not a bug: one line, no traceback."""
    exc = context.get("exception")
    if isinstance(exc, OSError) and "accept" in context.get("message", ""):
        log.warning("cannot accept connections: %s; retrying each second", exc.strerror)
        return
    loop.default_exception_handler(context)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives every thread that allocates under contention an arena of its own and seldom
    returns their memory; with codec, gRPC and SDK threads all handling frames, RSS grew from
    135 to 250 MB in a soak without any leak. Two arenas keep it flat (measured in
    tests/soak.py). Must run before the threads start; a no-op where libc has no mallopt."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX


def raise_file_limit(wanted: int = 65536) -> None:
    """Up to the hard limit: every viewer is a socket, and running out of descriptors is what
    made the accept loop spin before."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def build_relay_app(
    hub: Hub,
    metrics: Metrics,
    robot_status: Callable[[], dict[str, Any]],
    *,
    token: str | None,
    allow_origin: str | None,
    max_clients: int,
    timing: Callable[[str], dict[str, Any]] = lambda source: {},
    mission: Callable[[], dict[str, Any]] | None = None,
    store: Store | None = None,
) -> web.Application:
    """Every output on one app: the relay's route table, which the in-process tests use too."""
    return build_app(
        [
            viewer.add_routes,
            partial(mjpeg.add_routes, hub=hub),
            partial(ws.add_routes, hub=hub),
            partial(snapshot.add_routes, hub=hub),
            partial(
                api.add_routes,
                hub=hub,
                robot_status=robot_status,
                registry=metrics.registry,
                show_peers=bool(token),
                timing=timing,
                mission=mission,
            ),
            partial(captures.add_routes, store=store),
        ],
        token=token,
        allow_origin=allow_origin,
        max_clients=max_clients,
        refused=lambda reason: metrics.requests_refused.labels(reason=reason).inc(),
    )


class Relay:
    """Every stage of one relay, wired; ``main`` runs it, tests can run it in-process."""

    def __init__(
        self,
        cfg: Config,
        target: Target,
        metrics: Metrics,
        redactor: logs.Redactor | None = None,
    ):
        self.cfg = cfg
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="codec"
        )
        self.snapshot_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")
        # how often the poller refreshes unwatched sources, and so when the hub calls them stale
        idle_interval = 1 / cfg.idle_fps if cfg.idle_fps > 0 else 3600.0
        self.conn = RobotConnection(
            target,
            cfg.image_services,
            cfg.sources,
            on_change=self._sources_changed,
            on_token=redactor.add if redactor else lambda token: None,
            on_session=self._session_changed,
            rediscover=cfg.rediscover,
        )
        self.hub = Hub(
            self.executor,
            metrics,
            stale_after=cfg.stale_after,
            idle_interval=idle_interval,
            on_watch=self._watch_changed,
            max_variants=cfg.max_variants,
            client_timeout=cfg.client_timeout,
            snapshot_executor=self.snapshot_executor,
        )
        self.poller = Poller(
            self.conn.get_images,
            self.conn.report,
            self.conn.robot_to_local,
            metrics,
            self.hub.publish,
            quality=cfg.robot_quality,
            idle_interval=idle_interval,
        )
        # The Autowalk callback: stills and clips from the hub into the captures folder.
        self.mission: MissionServer | None = None
        store = None
        if cfg.mission:
            store = Store(
                cfg.captures_dir,
                int(cfg.captures_max_mb * 1e6),
                on_deleted=metrics.captures_deleted.inc,
            )
            self.mission = MissionServer(
                self.hub,
                store,
                metrics,
                bind=cfg.bind,
                port=cfg.mission_port,
                host=cfg.mission_host,
                robot_host=target.host,
                robot_clock=lambda local: local + self.conn.skew,
            )
        # Read at scrape time from the connection's own state, so the gauges cannot go stale.
        metrics.robot_connected.set_function(lambda: 1.0 if self.conn.connected.is_set() else 0.0)
        metrics.time_sync_skew.set_function(lambda: self.conn.skew)
        metrics.build_info.labels(version=__version__).set(1)
        self.app = build_relay_app(
            self.hub,
            metrics,
            self.conn.status,
            token=cfg.token,
            allow_origin=cfg.allow_origin,
            max_clients=cfg.max_clients,
            timing=self.poller.timing,
            mission=self.mission.status if self.mission else None,
            store=store,
        )

    def _sources_changed(self, sources: dict[str, SourceInfo], healthy: tuple[str, ...]) -> None:
        self.metrics.register_sources((s.name, s.service, s.image_type) for s in sources.values())
        self.metrics.register_services({s.service for s in sources.values()} | set(healthy))
        for service in self.conn.state:
            self.metrics.service_ok.labels(service=service).set(1 if service in healthy else 0)
        self.hub.set_sources(sources.values())
        self.poller.set_sources({n: s for n, s in sources.items() if s.service in healthy}, healthy)

    def _session_changed(self, robot) -> None:
        if self.mission is not None:
            self.mission.registration.on_session(robot)

    def _watch_changed(self, source: str, watched: bool) -> None:
        self.poller.set_watched(source, watched)

    async def serve(self, bind: str, port: int, stop: asyncio.Event) -> int:
        # keepalive_timeout is also how long a connection may take to send its request (aiohttp
        # arms it at connect): slow-header connections are closed, not held for an hour.
        runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=0.5,
            keepalive_timeout=self.cfg.idle_timeout,
        )
        await runner.setup()
        site = web.TCPSite(runner, bind, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", bind, port, exc.strerror or exc)
            await runner.cleanup()
            return 1
        log.info("spotrelay %s serving http://%s:%d/", __version__, bind, port)
        if self.mission is not None:
            try:
                await self.mission.start()
            except OSError as exc:
                log.error("cannot start the Autowalk callback: %s", exc)
                await runner.cleanup()
                return 1
        tasks = [
            asyncio.create_task(supervise(name, run, self.metrics), name=name)
            for name, run in (
                ("connection", self.conn.run),
                ("poller", self.poller.run),
                ("stale", self.hub.run),
            )
        ]
        await stop.wait()
        log.info("shutting down")
        if self.mission is not None:  # clips keep what they recorded; leave the directory
            await self.mission.close()
        self.hub.close()  # ends every stream, so the server has nothing to wait for
        await runner.cleanup()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.conn.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.snapshot_executor.shutdown(wait=False, cancel_futures=True)
        return 0


async def serve(cfg: Config, redactor: logs.Redactor | None = None) -> int:
    sim = None
    if cfg.sim:
        from spotrelay.sim import SimRobot  # only the demo and tests need it

        sim = SimRobot().start()
        target = Target("127.0.0.1", sim.port, sim.ca_path, sim.username, sim.password)
        log.info("simulated robot on 127.0.0.1:%d", sim.port)
    else:
        target = target_for(cfg)
    relay = Relay(cfg, target, Metrics(process=True), redactor)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_errors)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await relay.serve(cfg.bind, cfg.port, stop)
    finally:
        if sim:
            sim.stop()


def drop_privileges(uid: int, gid: int) -> None:
    """Become an unprivileged user for good (the container starts as root only so that the
    payload credentials, root's 0600 file on a CORE I/O, can be read first)."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise SystemExit("spotrelay: error: could not drop root privileges")


def own_folder(path: str, uid: int, gid: int) -> None:
    """Create the captures folder and give it (and what it holds) to the user the relay goes on
    as: a fresh volume is root's, and the relay no longer is once it has read the credentials."""
    with contextlib.suppress(OSError):  # if this fails, opening the store says why
        os.makedirs(path, exist_ok=True)
        for root, _, files in os.walk(path):
            for name in (root, *(os.path.join(root, f) for f in files)):
                os.chown(name, uid, gid)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["site-config"]:  # the base station's config generator, not the relay
        from spotrelay import site

        sys.exit(site.main(argv[1:]))
    cfg = load_or_exit(argv)  # reads the credentials file: still as whoever started us
    limit_malloc_arenas()
    raise_file_limit()
    if cfg.run_as and os.geteuid() == 0:
        if cfg.mission:
            own_folder(cfg.captures_dir, *cfg.run_as)
        drop_privileges(*cfg.run_as)
    redactor = logs.setup(cfg.log_level, [cfg.password, cfg.secret, cfg.token, cfg.guid])
    cv2.setNumThreads(1)  # parallelism comes from rendering sources in separate threads
    with asyncio.Runner(loop_factory=EventLoop) as runner:
        sys.exit(runner.run(serve(cfg, redactor)))


if __name__ == "__main__":
    main()
