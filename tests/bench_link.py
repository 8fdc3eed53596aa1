"""Link benchmark (`make bench-link`): viewers behind a link slower than the cameras, the relay
with queue control off (baseline) and as shipped (relay), both in the same run.

Users watch over the robot's Wi-Fi, often slower than the cameras: one passthrough camera is about
9 Mbit/s of MJPEG. A relay that writes every frame it can into a socket queues seconds of video in
send buffers, and the viewer watches frames that old. This bench shows that queue (latency from
capture to the whole frame received, frames per second, distinct captures per second, link use)
with queue control off (``--no-queue-control``) and what queue control and adaptation save.

The simulated robot runs in its own process (tests.bench.SimProcess, the realistic profile), the
relay in another (tests.relay.Relay), the clients in a third (``--client``: MJPEG readers in
threads, WebSocket clients in one asyncio loop; no JPEG is decoded), so the measuring side is
not the bottleneck. The link is one of:

* ``--shaper user`` (default): tests/shaper.py, a user-space proxy on loopback whose
  server-to-client direction drains every connection through one token bucket, fair queued;
* ``--shaper tbf``: tests/netlink.py, a namespace of our own behind a veth with tbf (needs root;
  the clients run inside the namespace, the relay binds the host end).

Scenarios: (a) 10 Mbit/s shared by three passthrough MJPEG viewers of three cameras, (a1) the same
with three viewers of one camera, (b) (a) with ``?adapt=1``, (c) 2 Mbit/s with the viewer page's
tiles (WebSockets, width=320, quality=70, adapt=1) for eleven cameras, (d) six cameras on
loopback, no shaper (no-regression check). The first ``--warmup`` seconds of each run are
discarded. ``--json FILE`` also writes every figure, per viewer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from tests import netlink
from tests.mjpeg import parts
from tests.procs import cpu_seconds, end_group
from tests.shaper import BUFFER, Shaper

# The relay's extra arguments for each arm. A relay that refuses them ("unrecognized arguments",
# an older checkout under RELAY_UNDER_TEST) runs that arm without them, and the report says so.
BASELINE_ARGS: list[str] = ["--no-queue-control"]
RELAY_ARGS: list[str] = []

FISHEYES = [f"{n}_fisheye_image" for n in ("frontleft", "frontright", "left", "right", "back")]
DEPTHS = [f"{n}_depth" for n in ("frontleft", "frontright", "left", "right", "back")]
VISUAL = [*FISHEYES, "hand_color_image"]
TILE_QUERY = "width=320&quality=70&adapt=1"  # the viewer page's tile
CLIENT_START = 2.5  # seconds for the client process to start (imports) before it connects


# -- scenarios -------------------------------------------------------------------------------------


@dataclass
class Viewer:
    kind: str  # "mjpeg" or "ws"
    source: str
    query: str = ""

    @property
    def path(self) -> str:
        route = "/stream/" if self.kind == "mjpeg" else "/ws/"
        return route + self.source + (f"?{self.query}" if self.query else "")


@dataclass
class Scenario:
    key: str
    title: str
    mbit: float | None  # None: loopback, no shaper
    viewers: list[Viewer]
    optional: str = ""  # a query parameter today's relay may refuse
    drop_optional: bool = False  # refused: run without it (else: "not supported yet")


def scenarios() -> list[Scenario]:
    three = ["frontleft_fisheye_image", "frontright_fisheye_image", "back_fisheye_image"]
    tiles = [*FISHEYES, *DEPTHS, "hand_color_image"]
    return [
        Scenario(
            "a",
            "10 Mbit/s, 3 passthrough MJPEG viewers, 3 cameras",
            10,
            [Viewer("mjpeg", s) for s in three],
        ),
        Scenario(
            "a1",
            "10 Mbit/s, 3 passthrough MJPEG viewers, 1 camera",
            10,
            [Viewer("mjpeg", three[0]) for _ in range(3)],
        ),
        Scenario(
            "b",
            "10 Mbit/s, 3 MJPEG viewers, 3 cameras, ?adapt=1",
            10,
            [Viewer("mjpeg", s, "adapt=1") for s in three],
            optional="adapt=1",
        ),
        Scenario(
            "c",
            "2 Mbit/s, viewer page: 11 WebSocket tiles, width=320 quality=70 adapt=1",
            2,
            [Viewer("ws", s, TILE_QUERY) for s in tiles],
            optional="adapt=1",
            drop_optional=True,
        ),
        Scenario(
            "d",
            "loopback, no shaper, 6 cameras passthrough MJPEG",
            None,
            [Viewer("mjpeg", s) for s in VISUAL],
        ),
    ]


# -- the client process --------------------------------------------------------------------------


@dataclass
class Log:
    """What one viewer received inside the measuring window."""

    # (received, capture time t, stale, JPEG bytes) for each frame fully received in the window
    frames: list[tuple[float, float, bool, int]] = field(default_factory=list)
    error: str | None = None


def _keep(log: Log, received: float, t: float, stale: bool, size: int, window: tuple) -> bool:
    """Record a frame received inside the window; False once past it (stop reading)."""
    if received >= window[1]:
        return False
    if received >= window[0]:
        log.frames.append((received, t, stale, size))
    return True


def _failed(exc: BaseException, window: tuple[float, float]) -> str:
    when = time.time() - window[0]
    return f"{type(exc).__name__}: {str(exc)[:200]} ({when:+.1f} s into the window)"


def _mjpeg_viewer(url: str, window: tuple[float, float], log: Log) -> None:
    try:
        for p in parts(url, timeout=20):
            if not _keep(log, p.received, p.timestamp, p.stale, len(p.body), window):
                return
    except Exception as exc:
        log.error = _failed(exc, window)


async def _ws_viewer(session: Any, url: str, window: tuple[float, float], log: Log) -> None:
    """One tile: a JSON text message, then the JPEG; the frame counts when the JPEG is in."""
    try:
        async with session.ws_connect(url, max_msg_size=1 << 24) as ws:
            meta: dict[str, Any] | None = None
            async with asyncio.timeout(max(1.0, window[1] - time.time() + 20)):
                async for msg in ws:
                    now = time.time()
                    if msg.type.name == "TEXT":
                        meta = json.loads(msg.data)
                        continue
                    if msg.type.name != "BINARY":
                        raise ConnectionError(f"websocket {msg.type.name}")
                    if meta is None or meta["bytes"] != len(msg.data):
                        raise AssertionError(f"binary message without its metadata: {meta}")
                    if not _keep(log, now, meta["t"], bool(meta["stale"]), len(msg.data), window):
                        return
                    meta = None
            raise ConnectionError(f"closed by the relay (code {ws.close_code})")
    except Exception as exc:
        log.error = _failed(exc, window)


async def _ws_viewers(urls: list[str], window: tuple[float, float], logs: list[Log]) -> None:
    import aiohttp  # only where there are WebSocket viewers: the import is not free

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(
            *(_ws_viewer(session, u, window, lg) for u, lg in zip(urls, logs, strict=True))
        )


def client_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Connect every viewer at ``begin``, record frames received in [from, to), return them."""
    viewers = spec["viewers"]
    window = (spec["from"], spec["to"])
    logs = [Log() for _ in viewers]
    time.sleep(max(0.0, spec["begin"] - time.time()))
    threads = []
    ws: list[tuple[str, Log]] = []
    for v, log in zip(viewers, logs, strict=True):
        if v["kind"] == "mjpeg":
            url = spec["base"] + v["path"]
            t = threading.Thread(target=_mjpeg_viewer, args=(url, window, log), daemon=True)
            t.start()
            threads.append(t)
        else:
            ws.append(("ws" + spec["base"].removeprefix("http") + v["path"], log))
    if ws:
        asyncio.run(_ws_viewers([u for u, _ in ws], window, [lg for _, lg in ws]))
    for t in threads:
        t.join(max(1.0, window[1] - time.time() + 25))
    return {"viewers": [asdict(lg) for lg in logs]}


# -- figures -------------------------------------------------------------------------------------


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 2 else float("nan")


@dataclass
class ViewerResult:
    path: str
    error: str | None
    fps: float  # frames fully received per second (stale repeats included)
    distinct_fps: float  # distinct capture times per second
    p50: float  # capture to fully received, seconds (fresh frames)
    p95: float
    p99: float
    mbit: float  # JPEG bytes received, Mbit/s
    stale: int
    p50_start: float  # in the first third of the window: a queue still filling shows as
    p50_end: float  # p50_end well above p50_start


def viewer_result(path: str, log: dict[str, Any], window: tuple[float, float]) -> ViewerResult:
    frames = log["frames"]
    seconds = window[1] - window[0]
    fresh = [(r, t) for r, t, stale, _ in frames if not stale]
    lat = [r - t for r, t in fresh]
    third = seconds / 3
    start = [r - t for r, t in fresh if r < window[0] + third]
    end = [r - t for r, t in fresh if r >= window[1] - third]
    return ViewerResult(
        path,
        log["error"],
        len(frames) / seconds,
        len({t for _, t in fresh}) / seconds,
        pct(lat, 50),
        pct(lat, 95),
        pct(lat, 99),
        sum(f[3] for f in frames) * 8 / seconds / 1e6,
        len(frames) - len(fresh),
        statistics.median(start) if start else float("nan"),
        statistics.median(end) if end else float("nan"),
    )


@dataclass
class Run:
    """One scenario, one arm."""

    scenario: str
    title: str
    arm: str
    relay_args: list[str]
    note: str = ""
    supported: bool = True
    viewers: list[ViewerResult] = field(default_factory=list)
    link_mbit: float | None = None  # bytes on the wire through the bottleneck
    link_drops: int | None = None  # tbf only
    relay_cpu: float | None = None  # share of one core
    link_queued: int | None = None  # user shaper: bytes queued behind the bottleneck at the end
    stalled: int | None = None  # viewers the relay hung up on (no progress for --client-timeout)

    @property
    def seen(self) -> list[ViewerResult]:
        """Viewers that received anything: one cut off half-way counts (its frame rate over the
        whole window shows the harm), one refused from the start does not."""
        return [v for v in self.viewers if v.fps > 0]

    def figures(self) -> dict[str, float]:
        v = self.seen
        if not v or not self.supported:
            return {}
        return {
            "fps_min": min(x.fps for x in v),
            "fps_max": max(x.fps for x in v),
            "distinct_min": min(x.distinct_fps for x in v),
            "p50": max(x.p50 for x in v),
            "p95": max(x.p95 for x in v),
            "p99": max(x.p99 for x in v),
            "mbit": sum(x.mbit for x in v),
            "p50_start": max(x.p50_start for x in v),
            "p50_end": max(x.p50_end for x in v),
        }

    def growing(self) -> str:
        """A note when latency was still climbing at the end (a queue filling up: no steady
        state within the run, so the percentiles understate where it is going)."""
        f = self.figures()
        if f and f["p50_end"] > 1.3 * f["p50_start"] + 0.05:
            return (
                f"latency still growing: worst p50 {_ms(f['p50_start'])} ms in the first third, "
                f"{_ms(f['p50_end'])} ms in the last"
            )
        return ""


# -- orchestration -------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.arms = {"baseline": args.baseline_args, "relay": args.relay_args}
        self.refused: dict[str, bool] = {}  # arm args this relay does not know
        self.link: netlink.NetLink | None = None
        self.sim: Any = None

    def start_relay(self, arm: str, bind: str, sources: list[str]) -> tuple[Any, list[str], str]:
        """The relay for one arm; its arguments dropped (and said so) if this relay refuses them."""
        from tests.relay import Relay

        extra = ["--sources", ",".join(sorted(set(sources))), "--bind", bind]
        wanted = self.arms[arm]
        args = [] if self.refused.get(arm) else wanted
        note = "" if args == wanted else f"{shlex.join(wanted)} refused by this relay: ran without"
        relay = Relay.for_sim(self.sim, *extra, *args)
        relay.url = f"http://{bind}:{relay.port}"
        try:
            relay.wait_ready()
        except AssertionError as exc:
            if args and "unrecognized arguments" in str(exc):
                self.refused[arm] = True
                return self.start_relay(arm, bind, sources)
            raise
        return relay, args, note

    def run_all(self) -> list[Run]:
        from tests.bench import SimProcess

        chosen = [s for s in scenarios() if s.key in self.args.scenarios]
        self.sim = SimProcess(0.0)
        runs: list[Run] = []
        try:
            self.warm_sim(sorted({v.source for sc in chosen for v in sc.viewers}))
            if self.args.shaper == "tbf":
                self.link = netlink.NetLink().start()
            for sc in chosen:
                print(f"\n{sc.key}: {sc.title}", flush=True)
                for arm in ("baseline", "relay"):
                    run = self.run_one(sc, arm)
                    runs.append(run)
                    print(format_run(run), flush=True)
        finally:
            if self.link is not None:
                self.link.stop()
            self.sim.stop()
        return runs

    def warm_sim(self, sources: list[str], seconds: float = 3.0) -> None:
        """Every camera's picture loop once through the sim before anything is measured: the sim
        renders and encodes each picture on first use (2 s of pictures per camera), which starved
        whichever arm ran first by 10 % of its frames."""
        from tests.mjpeg import collect
        from tests.relay import Relay

        print(f"warming the sim: {len(sources)} cameras, {seconds:g} s", flush=True)
        relay = Relay.for_sim(self.sim, "--sources", ",".join(sources)).wait_ready()
        try:
            threads = [
                threading.Thread(target=collect, args=(f"{relay.url}/stream/{s}", seconds))
                for s in sources
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(seconds + 30)
        finally:
            relay.stop()

    def run_one(self, sc: Scenario, arm: str) -> Run:
        shaped = sc.mbit is not None
        kernel = shaped and self.link is not None
        bind = self.link.host_addr if kernel and self.link else "127.0.0.1"
        relay, used, note = self.start_relay(arm, bind, [v.source for v in sc.viewers])
        run = Run(sc.key, sc.title, arm, used, note)
        shaper: Shaper | None = None
        try:
            viewers = self.check_query(relay, sc, run)
            if not run.supported:
                return run
            base = relay.url
            if kernel and self.link is not None:
                self.link.shape(sc.mbit or 0)
            elif shaped:
                shaper = Shaper(
                    "127.0.0.1",
                    relay.port,
                    sc.mbit or 0,
                    self.args.delay,
                    self.args.buffer_bytes,
                    discipline=self.args.discipline,
                ).start()
                base = shaper.url
            self.measure(run, relay, viewers, base, shaper, in_ns=kernel)
        finally:
            if shaper is not None:
                shaper.stop()
            if kernel and self.link is not None:
                self.link.unshape()
            relay.stop()
        return run

    def check_query(self, relay: Any, sc: Scenario, run: Run) -> list[Viewer]:
        """Today's relay may refuse a future query parameter with a 400: then drop it (c) or mark
        the scenario not supported yet (b). A HEAD of the stream parses the same query."""
        if not sc.optional:
            return sc.viewers
        v = sc.viewers[0]
        refused = head_status(f"{relay.url}/stream/{v.source}?{v.query}")
        if refused is None:
            run.note = _join(run.note, f"{sc.optional} accepted")
            return sc.viewers
        if not sc.drop_optional:
            run.supported = False
            run.note = _join(run.note, f"not supported yet ({sc.optional}: {refused})")
            return sc.viewers
        run.note = _join(run.note, f"{sc.optional} refused ({refused}): ran without")
        strip = [Viewer(x.kind, x.source, _drop(x.query, sc.optional)) for x in sc.viewers]
        return strip

    def measure(
        self,
        run: Run,
        relay: Any,
        viewers: list[Viewer],
        base: str,
        shaper: Shaper | None,
        in_ns: bool,
    ) -> None:
        secs, warm = self.args.seconds, self.args.warmup
        begin = time.time() + CLIENT_START
        t_from, t_to = begin + warm, begin + warm + secs
        spec = {
            "base": base,
            "viewers": [{"kind": v.kind, "path": v.path} for v in viewers],
            "begin": begin,
            "from": t_from,
            "to": t_to,
        }
        argv = [sys.executable, "-m", "tests.bench_link", "--client", json.dumps(spec)]
        if in_ns and self.link is not None:
            argv = self.link.exec_argv(argv)
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        try:
            time.sleep(max(0.0, t_from - time.time()))
            link0, cpu0, w0 = self.link_bytes(shaper), cpu_seconds(relay.proc.pid), time.time()
            drops0 = self.drops()
            time.sleep(max(0.0, t_to - time.time()))
            link1, cpu1, w1 = self.link_bytes(shaper), cpu_seconds(relay.proc.pid), time.time()
            drops1 = self.drops()
            if shaper is not None:
                run.link_queued = shaper.queued()
            with contextlib.suppress(OSError, AssertionError):
                run.stalled = int(
                    relay.metric("spotrelay_clients_dropped_total", 0, reason="stalled")
                )
            out, _ = proc.communicate(timeout=secs + 60)
        finally:
            if proc.poll() is None:
                end_group(proc)
        if proc.returncode != 0 or not out.strip():
            raise RuntimeError(f"client process failed ({proc.returncode}): {out[-500:]}")
        logs = json.loads(out.strip().splitlines()[-1])["viewers"]
        run.viewers = [
            viewer_result(v.path, lg, (t_from, t_to)) for v, lg in zip(viewers, logs, strict=True)
        ]
        run.relay_cpu = (cpu1 - cpu0) / (w1 - w0)
        if link0 is not None and link1 is not None:
            run.link_mbit = (link1 - link0) * 8 / (w1 - w0) / 1e6
        if drops0 is not None and drops1 is not None:
            run.link_drops = drops1 - drops0

    def link_bytes(self, shaper: Shaper | None) -> int | None:
        if shaper is not None:
            return shaper.down_bytes()
        if self.link is not None and self.link.mbit is not None:
            q = self.link.qdisc()
            return q.sent_bytes if q else None
        return None

    def drops(self) -> int | None:
        if self.link is not None and self.link.mbit is not None:
            q = self.link.qdisc()
            return q.drops if q else None
        return None


def head_status(url: str) -> str | None:
    """None if a HEAD of ``url`` is answered 200, else what it was answered."""
    req = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=10):
            return None
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"


def _drop(query: str, param: str) -> str:
    return "&".join(p for p in query.split("&") if p and p != param)


def _join(a: str, b: str) -> str:
    return "; ".join(x for x in (a, b) if x)


# -- report --------------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return "-" if x != x else f"{x * 1e3:.0f}"


def format_run(run: Run) -> str:
    lines = [
        f"  {run.arm} {shlex.join(run.relay_args)}".rstrip() + (f"  ({run.note})" * bool(run.note))
    ]
    for v in run.viewers:
        if v.error and not v.fps:
            lines.append(f"    {v.path}: ERROR {v.error}")
            continue
        lines.append(
            f"    {v.path}: {v.fps:.1f} fps, {v.distinct_fps:.1f} distinct, "
            f"p50/p95/p99 {_ms(v.p50)}/{_ms(v.p95)}/{_ms(v.p99)} ms, {v.mbit:.2f} Mbit/s"
            + (f", {v.stale} stale" if v.stale else "")
            + (f", then ERROR {v.error}" if v.error else "")
        )
    extra = []
    if run.link_mbit is not None:
        extra.append(f"link {run.link_mbit:.2f} Mbit/s")
    if run.link_drops is not None:
        extra.append(f"tbf drops {run.link_drops}")
    if run.link_queued is not None:
        extra.append(f"queued behind the bottleneck at the end {run.link_queued} B")
    if run.relay_cpu is not None:
        extra.append(f"relay CPU {run.relay_cpu:.0%}")
    if run.stalled:
        extra.append(f"{run.stalled} viewer(s) dropped by the relay as stalled")
    if run.growing():
        extra.append(run.growing())
    if extra:
        lines.append("    " + ", ".join(extra))
    return "\n".join(lines)


HEAD = (
    "scenario",
    "arm",
    "fps min-max",
    "distinct fps min",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "Mbit/s (JPEG)",
    "link Mbit/s",
    "relay CPU",
    "note",
)


def table(runs: list[Run]) -> str:
    """One row per scenario and arm (worst latency and fewest frames across its viewers), then
    relay/baseline ratios per scenario."""
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for r in runs:
        f = r.figures()
        errors = [v for v in r.viewers if v.error]
        note = _join(r.note, r.growing())
        if r.stalled:
            note = _join(note, f"relay dropped {r.stalled} viewer(s) as stalled")
        if errors:
            note = _join(note, f"{len(errors)} viewer(s) failed: {errors[0].error}")
        if not f:
            cells = [r.scenario, r.arm, *["-"] * 8, note or "no data"]
        else:
            cells = [
                r.scenario,
                r.arm,
                f"{f['fps_min']:.1f}-{f['fps_max']:.1f}",
                f"{f['distinct_min']:.1f}",
                _ms(f["p50"]),
                _ms(f["p95"]),
                _ms(f["p99"]),
                f"{f['mbit']:.2f}",
                "-" if r.link_mbit is None else f"{r.link_mbit:.2f}",
                "-" if r.relay_cpu is None else f"{r.relay_cpu:.0%}",
                note,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for key in dict.fromkeys(r.scenario for r in runs):
        arms = {r.arm: r.figures() for r in runs if r.scenario == key}
        b, x = arms.get("baseline"), arms.get("relay")
        if not b or not x:
            lines.append(f"{key}: relay vs baseline: no data")
            continue
        ratio = ", ".join(
            f"{name} {x[k] / b[k]:.2f}x" if b[k] else f"{name} -"
            for name, k in (
                ("fps min", "fps_min"),
                ("distinct min", "distinct_min"),
                ("p50", "p50"),
                ("p95", "p95"),
                ("p99", "p99"),
                ("Mbit/s", "mbit"),
            )
        )
        lines.append(f"{key}: relay vs baseline: {ratio}")
    return "\n".join(lines)


# -- entry ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench_link", description=__doc__.split("\n")[0]
    )
    p.add_argument("--seconds", type=float, default=15.0, help="measured per run, after warm-up")
    p.add_argument("--warmup", type=float, default=3.0, help="discarded at the start of each run")
    p.add_argument("--shaper", choices=("user", "tbf"), default="user")
    p.add_argument("--scenarios", default="a,a1,b,c,d", help="comma-separated: a,a1,b,c,d")
    p.add_argument("--json", default=None, help="also write every figure here")
    p.add_argument(
        "--baseline-args", default=shlex.join(BASELINE_ARGS), help="relay arguments, baseline arm"
    )
    p.add_argument(
        "--relay-args", default=shlex.join(RELAY_ARGS), help="relay arguments, relay arm"
    )
    p.add_argument("--delay", type=float, default=0.0, help="one-way delay, s (user shaper only)")
    p.add_argument("--buffer-bytes", type=int, default=BUFFER, help="user shaper socket buffers")
    p.add_argument("--discipline", choices=("fair", "fifo"), default="fair", help="user shaper")
    p.add_argument("--client", default=None, help=argparse.SUPPRESS)  # JSON: one client process
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    known = {s.key for s in scenarios()}
    if unknown := set(args.scenarios) - known:
        p.error(f"unknown scenario(s) {sorted(unknown)}; known: {sorted(known)}")
    args.baseline_args = shlex.split(args.baseline_args)
    args.relay_args = shlex.split(args.relay_args)
    if args.shaper == "tbf" and args.delay:
        p.error("--delay needs netem, which this kernel lacks: only with --shaper user")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        print(json.dumps(client_main(json.loads(args.client))), flush=True)
        return 0
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if args.shaper == "tbf":
        reason = netlink.unavailable()
        if reason:
            print(f"bench-link: --shaper tbf skipped: {reason}")
            return 0
        netlink.remove_stale()
    # A SIGTERM unwinds like Ctrl-C, so the relay, the sim and the namespace are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or '?'}"
    link = "kernel tbf in a namespace (FIFO)"
    if args.shaper == "user":
        link = f"user-space shaper ({args.discipline}, socket buffers {args.buffer_bytes} B, "
        link += f"delay {args.delay * 1e3:.0f} ms)"
    print(f"bench-link on {machine}; link: {link}", flush=True)
    print(f"{args.seconds:g} s measured a run, after {args.warmup:g} s of warm-up", flush=True)
    runs = Bench(args).run_all()
    text = table(runs)
    print("\n" + text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "machine": machine,
                    "link": link,
                    "seconds": args.seconds,
                    "warmup": args.warmup,
                    "runs": [asdict(r) | {"figures": r.figures()} for r in runs],
                    "table": text,
                },
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
