"""Entry point: wire the stages together, serve until SIGTERM/SIGINT, stop within two seconds."""

from __future__ import annotations

import os

# gRPC logs every GOAWAY of a robot that goes away; our own log says it once, in plain words.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import asyncio
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import cv2
from aiohttp import web

from spotrelay import __version__, metrics
from spotrelay.config import Config, load_or_exit
from spotrelay.connection import RobotConnection, Target
from spotrelay.http import build_app
from spotrelay.hub import Hub
from spotrelay.poller import Poller

log = logging.getLogger("spotrelay")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # The SDK logs whole requests at DEBUG, login requests included: never below WARNING, so no
    # password or token can reach the log. The access log is off for the same reason (?token=).
    logging.getLogger("bosdyn").setLevel(logging.WARNING)


async def serve(cfg: Config) -> int:
    sim = None
    if cfg.sim:
        from spotrelay.sim import SimRobot  # only the demo and tests need it

        sim = SimRobot(spot_cam="auto" in cfg.image_services).start()
        target = Target("127.0.0.1", sim.port, sim.ca_path, sim.username, sim.password)
        log.info("simulated robot on 127.0.0.1:%d", sim.port)
    else:
        target = Target.from_config(cfg)
    metrics.set_build_info(__version__)
    workers = max(2, os.cpu_count() or 2)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="codec")
    conn = RobotConnection(target, cfg.image_services, cfg.sources)
    # Read at scrape time from the connection's own state, so the gauges cannot go stale.
    metrics.ROBOT_CONNECTED.set_function(lambda: 1.0 if conn.connected.is_set() else 0.0)
    metrics.TIME_SYNC_SKEW.set_function(lambda: conn.skew)
    hub = Hub(executor, stale_after=cfg.stale_after)
    poller = Poller(conn, hub.publish, quality=cfg.robot_quality, idle_fps=cfg.idle_fps)
    hub.on_watch = poller.set_watched
    app = build_app(cfg, conn, hub, poller)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, cfg.bind, cfg.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", cfg.bind, cfg.port, exc.strerror or exc)
        await runner.cleanup()
        if sim:
            sim.stop()
        return 1
    log.info("spotrelay %s serving http://%s:%d/", __version__, cfg.bind, cfg.port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [
        asyncio.create_task(conn.run(), name="connection"),
        asyncio.create_task(hub.run(), name="stale"),
    ]
    await stop.wait()
    log.info("shutting down")
    hub.close()  # ends every stream, so the server has nothing to wait for
    await runner.cleanup()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await poller.close()
    await conn.close()
    executor.shutdown(wait=False, cancel_futures=True)
    if sim:
        sim.stop()
    return 0


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
