"""Entry point: build every stage, wire them together here and only here, serve until SIGTERM.

The data flows one way: robot connection -> poller -> hub -> outputs. Each stage is handed, in its
constructor, what it needs and the callbacks it calls; none of them knows who is on the other end.
Operating-system details (event loop, limits, the user we run as) are in ``process.py``.
"""

from __future__ import annotations

import os

# gRPC logs every GOAWAY of a robot that goes away; our own log says it once, in plain words.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import cv2
from aiohttp import web

from spotrelay import __version__, logs, process, tls
from spotrelay.autowalk import routes as captures_routes
from spotrelay.autowalk.service import MAX_CLIPS, MAX_JOBS, MissionServer
from spotrelay.autowalk.store import Store
from spotrelay.config import Config, load_or_exit
from spotrelay.http.app import build_app
from spotrelay.http.outputs import api, mjpeg, snapshot, viewer, ws
from spotrelay.http.outputs.common import Streams
from spotrelay.hub import Hub
from spotrelay.inline import InlineBudget
from spotrelay.metrics import Metrics
from spotrelay.poller import Poller
from spotrelay.robot import RobotConnection, Target
from spotrelay.rtsp import engine as rtsp_engine
from spotrelay.rtsp.server import RtspOutput
from spotrelay.slots import Slots
from spotrelay.stills import Stills

log = logging.getLogger("spotrelay")

SNAPSHOTS_WAITING = 8  # snapshots queued for rendering before more are refused (503)
# Autowalk pictures queued for encoding: one per running capture and one thumbnail per clip, so
# the callback's own bounds (service.MAX_JOBS, MAX_CLIPS) never meet it: a tick is never Busy.
EVIDENCE_WAITING = MAX_JOBS + MAX_CLIPS


def target_for(cfg: Config) -> Target:
    assert cfg.robot
    return Target(
        cfg.robot,
        cfg.robot_port,
        cfg.robot_cert,
        cfg.username,
        cfg.password,
        cfg.guid,
        cfg.secret,
        login=cfg.login,
    )


def build_relay_app(
    streams: Streams,
    snapshots: Stills,
    robot_status: Callable[[], dict[str, Any]],
    *,
    token: str | None,
    allow_origin: str | None,
    slots: Slots,
    timing: Callable[[str], dict[str, Any]] = lambda source: {},
    mission: Callable[[], dict[str, Any]] | None = None,
    store: Store | None = None,
    rtsp: Callable[[], dict[str, Any]] | None = None,
) -> web.Application:
    """Every output on one app: the relay's route table, which the in-process tests use too."""
    metrics = streams.metrics
    return build_app(
        [
            viewer.add_routes,
            partial(mjpeg.add_routes, streams=streams),
            partial(ws.add_routes, streams=streams),
            partial(snapshot.add_routes, streams=streams, stills=snapshots),
            partial(
                api.add_routes,
                hub=streams.hub,
                robot_status=robot_status,
                registry=metrics.registry,
                show_peers=bool(token),
                timing=timing,
                mission=mission,
                rtsp=rtsp,
            ),
            partial(
                captures_routes.add_routes,
                store=store,
                client_timeout=streams.client_timeout,
                refused=lambda reason: metrics.requests_refused.labels(reason=reason).inc(),
            ),
        ],
        token=token,
        allow_origin=allow_origin,
        slots=slots,
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
        # HTTPS (and WSS, RTSPS): the user's certificate, or one made once and kept
        self.ssl = None
        tls_files = None
        if cfg.tls:
            tls_files = (
                (cfg.tls_cert, cfg.tls_key)
                if cfg.tls_cert and cfg.tls_key
                else tls.ensure_certificate(cfg.tls_dir, [*tls.default_names(), *cfg.tls_names])
            )
            self.ssl = tls.server_context(*tls_files)
            log.info("TLS certificate %s, SHA-256 %s", tls_files[0], tls.fingerprint(tls_files[0]))
        # One core for the event loop, the rest for rendering: a codec thread more than that
        # only contends for the interpreter lock (the viewer page's tiles on 2 cores: 1.1 % of
        # a core more with 2 threads than with 1, over four alternated pairs, same latency).
        self.executor = ThreadPoolExecutor(
            max_workers=max(1, process.usable_cores() - 1), thread_name_prefix="codec"
        )
        self.snapshots = Stills("snapshot", SNAPSHOTS_WAITING)
        # how often the poller refreshes unwatched sources, and so when the hub calls them stale
        idle_interval = 1 / cfg.idle_fps if cfg.idle_fps > 0 else 3600.0
        self.conn = RobotConnection(
            target,
            cfg.image_services,
            cfg.sources,
            raw=cfg.fetch_raw,
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
            on_watch=lambda source, watched: self.poller.set_watched(source, watched),
            on_coarse=lambda source, coarse: self.poller.set_coarse(source, coarse),
            max_variants=cfg.max_variants,
            inline=InlineBudget(),
        )
        self.poller = Poller(
            self.conn.get_images,
            self.conn.report,
            self.conn.robot_to_local,
            metrics,
            self.hub.publish,
            quality=cfg.robot_quality,
            small_quality=cfg.small_robot_quality,
            idle_interval=idle_interval,
        )
        # The Autowalk callback: stills and clips from the hub into the captures folder.
        self.mission: MissionServer | None = None
        self.evidence: Stills | None = None
        store = None
        if cfg.mission:
            store = Store(
                cfg.captures_dir,
                int(cfg.captures_max_mb * 1e6),
                delete_after=(
                    cfg.captures_keep_days * 86400 if cfg.captures_full == "delete-oldest" else None
                ),
                on_deleted=metrics.captures_deleted.inc,
            )
            # below the streams' priority: a flood of captures costs pictures time, not viewers
            self.evidence = Stills("evidence", EVIDENCE_WAITING, nice=10)
            self.mission = MissionServer(
                self.hub,
                store,
                metrics,
                self.evidence,
                bind=cfg.mission_bind or cfg.bind,
                port=cfg.mission_port,
                host=cfg.mission_host,
                robot_host=target.host,
                allow=cfg.mission_allow,
                robot_clock=lambda local: local + self.conn.skew,
                capture_rate=lambda source: self.poller.timing(source)["capture_hz"],
            )
        # Every client of every output takes a slot: --max-clients, and a share of it per address.
        self.slots = Slots(
            cfg.max_clients, cfg.max_clients_per_host or max(1, cfg.max_clients // 2)
        )
        # RTSP (H.264) from GStreamer, when asked for and installed.
        self.rtsp: RtspOutput | None = None
        if cfg.rtsp_port is not None:
            try:
                self.rtsp = RtspOutput(
                    rtsp_engine.load(),
                    self.hub,
                    metrics,
                    self.slots,
                    bind=cfg.bind,
                    port=cfg.rtsp_port,
                    token=cfg.token,
                    client_timeout=cfg.client_timeout,
                    max_encoders=cfg.rtsp_max_encoders,
                    idle_timeout=cfg.idle_timeout,
                    tls_files=tls_files,
                )
            except rtsp_engine.Unavailable as exc:
                log.warning("RTSP off: %s", exc)
        # Read at scrape time from the connection's own state, so the gauges cannot go stale.
        metrics.robot_connected.set_function(lambda: 1.0 if self.conn.connected.is_set() else 0.0)
        metrics.time_sync_skew.set_function(lambda: self.conn.skew)
        metrics.build_info.labels(version=__version__).set(1)
        self.app = build_relay_app(
            Streams(self.hub, metrics, cfg.client_timeout, not cfg.no_queue_control),
            self.snapshots,
            self.conn.status,
            token=cfg.token,
            allow_origin=cfg.allow_origin,
            slots=self.slots,
            timing=self.poller.timing,
            mission=self.mission.status if self.mission else None,
            store=store,
            rtsp=self.rtsp.status if self.rtsp else None,
        )

    def _sources_changed(self, sources: dict, services: dict[str, bool]) -> None:
        self.metrics.sources_changed(sources, services)
        self.hub.set_sources(sources.values())
        self.poller.set_sources(sources, services)
        if self.rtsp is not None:
            self.rtsp.mount(list(sources))

    def _session_changed(self, robot) -> None:
        if self.mission is not None:
            self.mission.registration.on_session(robot)

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
        site = web.TCPSite(runner, bind, port, reuse_address=True, ssl_context=self.ssl)
        try:
            await site.start()
        except OSError as exc:
            log.error(
                "cannot listen on %s:%d: %s; give another with --port",
                bind,
                port,
                exc.strerror or exc,
            )
            await runner.cleanup()
            return 1
        scheme = "https" if self.ssl else "http"
        log.info("spotrelay %s serving %s://%s:%d/", __version__, scheme, bind, port)
        for what, server in (("the Autowalk callback", self.mission), ("RTSP", self.rtsp)):
            if server is None:
                continue
            try:
                await server.start()
            except OSError as exc:
                log.error("cannot start %s: %s", what, exc)
                await runner.cleanup()
                return 1
        restarted = self.metrics.task_restarts.labels
        tasks = [
            asyncio.create_task(
                process.supervise(name, run, lambda task: restarted(task=task).inc()), name=name
            )
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
        if self.rtsp is not None:
            self.rtsp.close()
        self.hub.close()  # ends every stream, so the server has nothing to wait for
        await runner.cleanup()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.conn.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.snapshots.close()
        if self.evidence is not None:
            self.evidence.close()
        return 0


async def serve(cfg: Config, redactor: logs.Redactor | None = None) -> int:
    sim = None
    if cfg.sim:  # in a process of its own: in ours it would take the relay's interpreter lock
        from spotrelay.sim.child import start_sim

        sim = await start_sim()
        target = Target("127.0.0.1", sim.port, sim.ca_path, sim.username, sim.password)
        log.info("simulated robot on 127.0.0.1:%d (%s)", sim.port, sim.where)
    else:
        target = target_for(cfg)
    relay = Relay(cfg, target, Metrics(process=True), redactor)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await relay.serve(cfg.bind, cfg.port, stop)
    finally:
        if sim:
            await sim.stop()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["site-config"]:  # the base station's config generator, not the relay
        from spotrelay import site

        sys.exit(site.main(argv[1:]))
    if argv[:1] == ["mission-demo"]:  # an Autowalk mission's calls, without a tablet
        from spotrelay.autowalk import demo

        sys.exit(demo.main(argv[1:]))
    cfg = load_or_exit(argv)  # reads the credentials file: still as whoever started us
    process.limit_malloc_arenas()
    process.raise_file_limit()
    if cfg.run_as and os.geteuid() == 0:
        if cfg.mission:
            process.own_folder(cfg.captures_dir, *cfg.run_as)
        if cfg.tls and not cfg.tls_cert:  # the relay makes (once) and keeps its certificate
            process.own_folder(cfg.tls_dir, *cfg.run_as)
        process.drop_privileges(*cfg.run_as)
    redactor = logs.setup(cfg.log_level, [cfg.password, cfg.secret, cfg.token, cfg.guid])
    cv2.setNumThreads(1)  # parallelism comes from rendering sources in separate threads
    with asyncio.Runner(loop_factory=process.EventLoop) as runner:
        sys.exit(runner.run(serve(cfg, redactor)))


if __name__ == "__main__":
    main()
