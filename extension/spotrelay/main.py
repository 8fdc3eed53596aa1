"""Entry point: build every stage, wire them together here and only here, serve until SIGTERM.

The data flows one way: connection -> poller -> hub -> outputs. Each stage is handed, in its
constructor, the callbacks it calls; none of them knows who is on the other end.
"""

from __future__ import annotations

import os

# gRPC logs every GOAWAY of a robot that goes away; our own log says it once, in plain words.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import asyncio
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import cv2
from aiohttp import web

from spotrelay import __version__
from spotrelay.config import Config, load_or_exit
from spotrelay.connection import RobotConnection, Target
from spotrelay.frames import SourceInfo
from spotrelay.http import build_app
from spotrelay.hub import Hub
from spotrelay.metrics import Metrics
from spotrelay.outputs import api, mjpeg, snapshot, viewer, ws
from spotrelay.poller import Poller

log = logging.getLogger("spotrelay")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # The SDK logs whole requests at DEBUG, login requests included: never below WARNING, so no
    # password or token can reach the log. The access log is off for the same reason (?token=).
    logging.getLogger("bosdyn").setLevel(logging.WARNING)


def target_for(cfg: Config) -> Target:
    assert cfg.robot
    return Target(
        cfg.robot, cfg.robot_port, cfg.robot_cert, cfg.username, cfg.password, cfg.guid, cfg.secret
    )


class Relay:
    """Every stage of one relay, wired; ``main`` runs it, tests can run it in-process."""

    def __init__(self, cfg: Config, target: Target, metrics: Metrics):
        self.cfg = cfg
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="codec"
        )
        idle_interval = 1 / cfg.idle_fps if cfg.idle_fps > 0 else 3600.0
        self.conn = RobotConnection(
            target,
            cfg.image_services,
            cfg.sources,
            on_change=self._sources_changed,
            rediscover=cfg.rediscover,
        )
        self.hub = Hub(
            self.executor,
            metrics,
            stale_after=cfg.stale_after,
            idle_interval=idle_interval,
            on_watch=self._watch_changed,
        )
        self.poller = Poller(
            self.conn.get_images,
            self.conn.report,
            self.conn.robot_to_local,
            metrics,
            self.hub.publish,
            quality=cfg.robot_quality,
            idle_fps=cfg.idle_fps,
        )
        # Read at scrape time from the connection's own state, so the gauges cannot go stale.
        metrics.robot_connected.set_function(lambda: 1.0 if self.conn.connected.is_set() else 0.0)
        metrics.time_sync_skew.set_function(lambda: self.conn.skew)
        metrics.build_info.labels(version=__version__).set(1)
        self.app = build_app(
            [
                viewer.add_routes,
                partial(mjpeg.add_routes, hub=self.hub),
                partial(ws.add_routes, hub=self.hub),
                partial(snapshot.add_routes, hub=self.hub),
                partial(
                    api.add_routes,
                    hub=self.hub,
                    robot_status=self.conn.status,
                    registry=metrics.registry,
                    show_peers=bool(cfg.token),
                    timing=self.poller.timing,
                ),
            ],
            token=cfg.token,
        )

    def _sources_changed(self, sources: dict[str, SourceInfo], healthy: tuple[str, ...]) -> None:
        self.metrics.register_sources((s.name, s.service, s.image_type) for s in sources.values())
        self.metrics.register_services({s.service for s in sources.values()} | set(healthy))
        for service in self.conn.state:
            self.metrics.service_ok.labels(service=service).set(1 if service in healthy else 0)
        self.hub.set_sources(sources.values())
        self.poller.set_sources({n: s for n, s in sources.items() if s.service in healthy}, healthy)

    def _watch_changed(self, source: str, watched: bool) -> None:
        self.poller.set_watched(source, watched)

    async def serve(self, bind: str, port: int, stop: asyncio.Event) -> int:
        runner = web.AppRunner(
            self.app, handle_signals=False, access_log=None, shutdown_timeout=0.5
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
        tasks = [
            asyncio.create_task(self.conn.run(), name="connection"),
            asyncio.create_task(self.poller.run(), name="poller"),
            asyncio.create_task(self.hub.run(), name="stale"),
        ]
        await stop.wait()
        log.info("shutting down")
        self.hub.close()  # ends every stream, so the server has nothing to wait for
        await runner.cleanup()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.conn.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        return 0


async def serve(cfg: Config) -> int:
    sim = None
    if cfg.sim:
        from spotrelay.sim import SimRobot  # only the demo and tests need it

        sim = SimRobot().start()
        target = Target("127.0.0.1", sim.port, sim.ca_path, sim.username, sim.password)
        log.info("simulated robot on 127.0.0.1:%d", sim.port)
    else:
        target = target_for(cfg)
    relay = Relay(cfg, target, Metrics(process=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await relay.serve(cfg.bind, cfg.port, stop)
    finally:
        if sim:
            sim.stop()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["site-config"]:  # the base station's config generator, not the relay
        from spotrelay import site

        sys.exit(site.main(argv[1:]))
    cfg = load_or_exit(argv)
    _setup_logging(cfg.log_level)
    cv2.setNumThreads(1)  # parallelism comes from rendering sources in separate threads
    sys.exit(asyncio.run(serve(cfg)))


if __name__ == "__main__":
    main()
