"""Benchmarks (`make bench`): every frame, latency, requests and CPU against the simulated robot,
each against a baseline measured in the same run (the machine is shared and noisy).

The robot runs in its own process (``python -m spotrelay.sim``, the realistic profile: capture
jitter +-2 ms, captures available 25 ms after acquisition), the relay in another, clients here.
Baselines:

* re-poll: a simple relay that asks every 10 ms until it sees a new capture (good latency by
  flooding the robot); measured at the moment it has the reply, so it pays no HTTP delivery;
* SDK loop: the SDK examples' one-request-at-a-time loop.

Scenarios: six visual cameras at once (loopback; with 50 clients on one; with a 100 +- 30 ms
round trip), a 5 Hz payload camera and a 60 Hz hand camera beside them, and the relay's CPU for
fan-out and for re-encoding. ``--json FILE`` also writes the rows as JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc loads

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from bosdyn.client.exceptions import TooManyRequestsError
from bosdyn.client.image import build_image_request

from tests.mjpeg import parts, stamps_and_latencies
from tests.procs import cpu_seconds
from tests.relay import Relay
from tests.sdk import sdk_robot
from tests.viewers import Viewers
from tests.wait import wait_until

VISUAL = [
    "frontleft_fisheye_image",
    "frontright_fisheye_image",
    "left_fisheye_image",
    "right_fisheye_image",
    "back_fisheye_image",
    "hand_color_image",
]
AVAILABLE_AFTER = 0.025
# The viewer page's tiles of issue 20: every fisheye, every depth camera and the hand's colour
# camera, each in a tile of its own (a WebSocket) at the page's own query.
FISHEYES = [f"{n}_fisheye_image" for n in ("frontleft", "frontright", "left", "right", "back")]
DEPTHS = [f"{n}_depth" for n in ("frontleft", "frontright", "left", "right", "back")]
TILES = [*FISHEYES, *DEPTHS, "hand_color_image"]
TILE_QUERY = "?width=320&quality=70&adapt=1"
# "Before" in the CPU and reconnect scenarios: main as it was just before the CPU work (issue 20)
# and the fast reconnect (issue 19, item 6), run from a copy of that commit in the same run.
BEFORE = "0bea11d"


class SimProcess:
    """The simulated robot in a process of its own; ``stats()`` asks it what it served."""

    def __init__(self, rpc_latency: float = 0.0, *args: str, password: str = "password"):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "spotrelay.sim",
                "--rpc-latency",
                str(rpc_latency),
                "--availability",
                str(AVAILABLE_AFTER),
                "--control",
                "--password",
                password,
                *args,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        info = json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]
        self.port, self.ca_path = info["port"], info["ca"]
        self.username, self.password = info["username"], info["password"]
        self.payload_guid, self.payload_secret = info["guid"], info["secret"]

    def command(self, cmd: str, **args: object) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stats(self) -> dict:
        return self.command("stats")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 2 else float("nan")


def logged_in(ca: str, port: int, username: str, password: str, name: str = "spotrelay-bench"):
    """An SDK robot logged in to the sim and time-synced; several starting at once exceed the
    robot's five logins a second, so a 429 is retried."""
    robot = sdk_robot(ca, port, name)
    for _ in range(20):
        try:
            robot.authenticate(username, password)
            break
        except TooManyRequestsError:
            time.sleep(0.3)
    robot.time_sync.wait_for_sync()
    return robot


@dataclass
class Seen:
    """What one client (or baseline loop) got from one camera."""

    stamps: list[float] = field(default_factory=list)  # capture times, local
    latencies: list[float] = field(default_factory=list)
    requests: int = 0

    def delivered(self, rate: float) -> float:
        """Distinct captures received over those the camera made in the same span."""
        s = sorted(set(self.stamps))
        if len(s) < 2:
            return 0.0
        return len(s) / (round((s[-1] - s[0]) * rate) + 1)

    @property
    def frames(self) -> int:
        return len(set(self.stamps))


def repoll(robot, source: str, seconds: float, out: Seen, interval: float = 0.010) -> None:
    """The flooding baseline: ask every 10 ms; keep what is new."""
    client = robot.ensure_client("image")
    skew = robot.time_sync.get_robot_clock_skew()
    skew_s = skew.seconds + skew.nanos * 1e-9
    req = [build_image_request(source, quality_percent=75)]
    last = None
    end = time.time() + seconds
    while time.time() < end:
        r = client.get_image(req)[0]
        out.requests += 1
        t = r.shot.acquisition_time.seconds + r.shot.acquisition_time.nanos * 1e-9 - skew_s
        if t != last:
            last = t
            out.stamps.append(t)
            out.latencies.append(time.time() - t)
        time.sleep(interval)


def repoll_process(sim: dict, source: str, start_at: float, seconds: float) -> Seen:
    """The re-poll baseline for one camera, in a process of its own (as six simple relays
    would be; one process for six would measure its own GIL, not the approach)."""
    robot = logged_in(sim["ca"], sim["port"], sim["username"], sim["password"], "bench-repoll")
    out = Seen()
    time.sleep(max(0.0, start_at - time.time()))
    repoll(robot, source, seconds, out)
    robot._shutdown()
    return out


def repoll_cameras(sim: SimProcess, sources: list[str], seconds: float) -> dict[str, Seen]:
    info = {"ca": sim.ca_path, "port": sim.port, "username": sim.username}
    info["password"] = sim.password
    start_at = time.time() + 8  # every process started and logged in
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(sources), mp_context=ctx) as pool:
        jobs = {s: pool.submit(repoll_process, info, s, start_at, seconds) for s in sources}
        return {s: job.result() for s, job in jobs.items()}


def sdk_sequential(robot, source: str, seconds: float) -> Seen:
    """The SDK examples' loop: one GetImage, wait for it, repeat."""
    out = Seen()
    repoll(robot, source, seconds, out, interval=0.0)
    return out


def in_threads(jobs: list[tuple], seconds: float) -> None:
    threads = [threading.Thread(target=fn, args=args, daemon=True) for fn, *args in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)


_DISCARD = """
import selectors, socket, sys, threading
port, path, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
for s in socks:
    s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: bench\\r\\n\\r\\n".encode())
    s.setblocking(False)
sel = selectors.DefaultSelector()
for s in socks:
    sel.register(s, selectors.EVENT_READ)
buf = bytearray(1 << 18)
threading.Thread(target=lambda: (sys.stdin.read(), sel.close()), daemon=True).start()
print("connected", flush=True)
try:
    while True:
        for key, _ in sel.select(timeout=1):
            if not key.fileobj.recv_into(buf):
                sel.unregister(key.fileobj)
except (OSError, ValueError, KeyError):
    pass
"""


class Discarders:
    """n clients on one path that read and throw away, in a process of their own: real work for
    the relay, none for the clients whose latency is being measured here."""

    def __init__(self, relay: Relay, path: str, n: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _DISCARD, str(relay.port), path, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout and self.proc.stdout.readline().strip() == "connected"

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(10)


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def row(self, name: str, baseline: str, relay: str, note: str = "") -> None:
        self.rows.append((name, baseline, relay, note))
        print(f"  {name}: {baseline} | {relay} {note}", flush=True)

    def table(self) -> str:
        head = ("measure", "baseline", "relay", "target / ratio")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def watch(relay: Relay, sources: list[str], seconds: float, query: str = "") -> dict[str, Seen]:
    """One client per source, each a thread of this process (the crowds that only add load for
    the relay are ``Discarders``, in a process of their own)."""
    seen = {s: Seen() for s in sources}

    def read(source: str) -> None:
        url = f"{relay.url}/stream/{source}{query}"
        seen[source].stamps, seen[source].latencies = stamps_and_latencies(url, seconds)

    in_threads([(read, s) for s in sources], seconds)
    return seen


def requests_per_frame(before: dict, after: dict, seen: dict[str, Seen]) -> tuple:
    frames = sum(s.frames for s in seen.values())
    calls = sum(after["get_image_calls"].values()) - sum(before["get_image_calls"].values())
    images = sum(
        after["images_requested"].get(s, 0) - before["images_requested"].get(s, 0) for s in seen
    )
    return calls / frames, images / frames


def scenario_six(report: Report, secs: float, rtt: float, jitter: float) -> None:
    label = "loopback" if rtt == 0 else f"RTT {rtt * 1e3:.0f}+-{jitter * 1e3:.0f} ms"
    print(f"six visual cameras, {label}", flush=True)
    sim = SimProcess(rtt, "--rpc-jitter", str(jitter))
    base = repoll_cameras(sim, VISUAL, secs)
    relay = Relay.for_sim(sim, "--sources", ",".join(VISUAL)).wait_ready()
    try:
        watch(relay, VISUAL, 3.0)  # warm up: every schedule locked
        before = sim.stats()
        seen = watch(relay, VISUAL, secs)
        after = sim.stats()
        rpcs, images = requests_per_frame(before, after, seen)
        crowd = None
        if rtt == 0:  # 50 clients on one camera, one on each of the others
            extra = Discarders(relay, f"/stream/{VISUAL[0]}", 49)
            crowd = watch(relay, VISUAL, secs)[VISUAL[0]]
            extra.close()
    finally:
        relay.stop()
        sim.stop()
    delivered = min(s.delivered(15) for s in seen.values())
    base_delivered = min(s.delivered(15) for s in base.values())
    base_req = sum(s.requests for s in base.values()) / sum(s.frames for s in base.values())
    want = 0.99 if rtt == 0 else 0.97
    report.row(
        f"six cameras, {label}: captures delivered (worst camera)",
        f"{base_delivered:.1%}",
        f"{delivered:.1%}",
        f"target >= {want:.0%}",
    )
    report.row(
        f"  GetImage RPCs per new frame ({label})",
        f"{base_req:.2f}",
        f"{rpcs:.2f}",
        f"target <= {1.2 if rtt == 0 else 1.3}; {rpcs / base_req:.2f}x the baseline's",
    )
    report.row(f"  image requests per new frame ({label})", f"{base_req:.2f}", f"{images:.2f}")
    lat = [x for s in seen.values() for x in s.latencies]
    blat = [x for s in base.values() for x in s.latencies]
    for q in (50, 95, 99):
        target = ""
        if rtt == 0 and q == 95:
            target = f"target <= {ms(AVAILABLE_AFTER + 0.012)} (availability + 12 ms)"
        report.row(
            f"  capture-to-client p{q}, ms ({label})", ms(pct(blat, q)), ms(pct(lat, q)), target
        )
    if crowd is not None:
        for q in (50, 95, 99):
            report.row(
                f"  p{q} with 50 clients on one camera, ms",
                ms(pct(blat, q)),
                ms(pct(crowd.latencies, q)),
                f"delivered {crowd.delivered(15):.1%}",
            )


def scenario_mixed(report: Report, secs: float) -> None:
    print("six visual cameras, a 5 Hz payload camera and a 60 Hz hand camera", flush=True)
    sim = SimProcess(0.0, "--payload-camera", "ok", "--hand-rate", "60")
    watched = [*VISUAL, "payload-thermal"]
    relay = Relay.for_sim(
        sim, "--image-services", "auto", "--sources", ",".join(watched)
    ).wait_ready()
    try:
        watch(relay, watched, 4.0)
        before = sim.stats()
        seen = watch(relay, watched, secs)
        after = sim.stats()
    finally:
        relay.stop()
        sim.stop()
    for source, rate in (("payload-thermal", 5), ("hand_color_image", 60)):
        images = after["images_requested"][source] - before["images_requested"][source]
        report.row(
            f"{source} at {rate} Hz beside six cameras: delivered, requests per frame",
            "",
            f"{seen[source].delivered(rate):.1%}, {images / seen[source].frames:.2f}",
            "target >= 97%, <= 1.3",
        )


def scenario_cpu(report: Report, secs: float) -> None:
    print("CPU: fan-out and re-encoding; every frame against the SDK loop", flush=True)
    sim = SimProcess(0.0)
    robot = logged_in(sim.ca_path, sim.port, sim.username, sim.password)
    try:
        loop = sdk_sequential(robot, "back_fisheye_image", secs)
    finally:
        robot._shutdown()
    relay = Relay.for_sim(sim, "--sources", ",".join(VISUAL)).wait_ready()

    def cpu(work) -> tuple[float, dict[str, Seen]]:
        before, t0 = cpu_seconds(relay.proc.pid), time.time()
        result = work()
        return (cpu_seconds(relay.proc.pid) - before) / (time.time() - t0), result

    try:
        watch(relay, VISUAL, 3.0, "?width=320")
        cpu1, one = cpu(lambda: watch(relay, VISUAL, secs, "?width=320"))
        extra = [Discarders(relay, f"/stream/{v}?width=320", 9) for v in VISUAL]
        cpu10, ten = cpu(lambda: watch(relay, VISUAL, secs, "?width=320"))
        for d in extra:
            d.close()
        cpu_pass, native = cpu(lambda: watch(relay, VISUAL, secs))
    finally:
        relay.stop()
        sim.stop()
    report.row(
        "distinct frames/s, one camera (baseline: SDK one-at-a-time loop)",
        f"{loop.frames / secs:.1f}",
        f"{native['back_fisheye_image'].frames / secs:.1f}",
    )
    report.row(
        "relay CPU, six cameras at 320 px: 1 vs 10 clients each",
        f"{cpu1:.0%}",
        f"{cpu10:.0%}",
        f"{cpu10 / cpu1:.2f}x; min delivered {min(s.delivered(15) for s in ten.values()):.1%}",
    )
    report.row(
        "relay CPU, six cameras: passthrough vs 320 px re-encode",
        f"{cpu_pass:.0%}",
        f"{cpu1:.0%}",
        f"{cpu1 / cpu_pass:.2f}x; min delivered {min(s.delivered(15) for s in one.values()):.1%}",
    )


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[str | None]:
    """The relay's package as it was at ``ref``, in a folder for ``Relay(code=...)``; None if
    this is not a git checkout that holds ``ref``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    archive = subprocess.run(
        ["git", "-C", root, "archive", ref, "extension/spotrelay"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        print(f"  (no baseline: git archive {ref}: {archive.stderr.decode().strip()})")
        yield None
        return
    folder = tempfile.mkdtemp(prefix="spotrelay-before-")
    try:
        subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
        yield os.path.join(folder, "extension")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Load:
    """The relay's CPU over one window with a set of viewers, and what they got."""

    cpu: float  # share of one core
    frames: int  # fresh frames the viewers received, all of them together
    fps_min: float  # the worst viewer's fresh frames per second
    delivered_min: float  # the worst viewer's captures received over those made
    latencies: list[float]  # capture to received, every fresh frame
    seconds: float  # the window

    @property
    def cpu_per_frame(self) -> float:
        """CPU seconds per fresh frame delivered."""
        return self.cpu * self.seconds / max(1, self.frames)


def load(
    sim: SimProcess,
    code: str | None,
    case: tuple,
    warmup: float,
    window: float,
    profile: str | None = None,
    options: tuple[str, ...] = (),
) -> Load:
    """A fresh relay (this checkout's, or the one in ``code``; ``options``: more of its
    command line) with one viewer per source; ``profile``: after the window, a py-spy
    recording of it under the same load, to that file."""
    sources, mode, query = case
    relay = Relay.for_sim(sim, "--sources", ",".join(sources), *options, code=code).wait_ready()
    viewers = None
    try:
        viewers = Viewers(relay.port, mode, query, sources)
        time.sleep(warmup)  # every schedule locked, every variant rendering
        viewers.reset()
        cpu0, t0 = cpu_seconds(relay.proc.pid), time.time()
        time.sleep(window)
        cpu1, t1 = cpu_seconds(relay.proc.pid), time.time()
        seen = viewers.report()
        if profile:
            _profile(relay.proc.pid, profile)
    finally:
        if viewers is not None:
            viewers.close()
        relay.stop()
    span = t1 - t0
    delivered = [
        v["distinct"] / (round(v["span"] * 15) + 1) if v["distinct"] > 1 else 0.0
        for v in seen.values()
    ]
    return Load(
        cpu=(cpu1 - cpu0) / span,
        frames=sum(v["distinct"] for v in seen.values()),
        fps_min=min(v["distinct"] for v in seen.values()) / span,
        delivered_min=min(delivered),
        latencies=[x for v in seen.values() for x in v["latencies"]],
        seconds=span,
    )


def _profile(pid: int, out: str, seconds: int = 10) -> None:
    """py-spy (``pip install py-spy``) on a running relay: Python stacks at 200 Hz, without
    pausing it, as a speedscope file (open in https://www.speedscope.app)."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        print("  (no profile: py-spy is not installed; .venv/bin/pip install py-spy)")
        return
    cmd = [spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "200", "--nonblocking"]
    subprocess.run([*cmd, "-f", "speedscope", "-o", out], capture_output=True, check=False)
    print(f"  profile: {out}", flush=True)


PASS_CASE = (VISUAL, "mjpeg", "")
TILES_CASE = (TILES, "ws", TILE_QUERY)
FREE = ("--free-running",)  # every body camera on its own phase: 12-15 GetImage a round
CASES = {  # name: (case, the simulated robot's options)
    "six cameras, one passthrough MJPEG viewer each": (PASS_CASE, ()),
    "the viewer page's 11 tiles (5 fisheye, 5 depth, hand colour) at 320 px q70": (TILES_CASE, ()),
    "the same six passthrough viewers, the body cameras free-running": (PASS_CASE, FREE),
    "the same 11 tiles, the body cameras free-running": (TILES_CASE, FREE),
}


def scenario_cases(
    report: Report, secs: float, rounds: int, ref: str, profile: str | None = None
) -> None:
    """Issue 20's two cases, this checkout against ``ref`` in the same run: each a fresh relay
    against the same simulated robot, in ABBA order so that drift on a shared machine cancels.
    Each twice: with the body's cameras on one trigger, as the SDK documents them, where one
    GetImage fetches all the body cameras due, and free-running, where each needs its own."""
    with checkout(ref) as before:
        arms = {"now": None} if before is None else {"before": before, "now": None}
        for name, (case, sim_args) in CASES.items():
            print(f"CPU: {name} ({', '.join(arms)}; {rounds} rounds)", flush=True)
            sim = SimProcess(0.0, *sim_args)
            runs: dict[str, list[Load]] = {arm: [] for arm in arms}
            try:
                for r in range(rounds):
                    order = list(arms) if r % 2 == 0 else list(arms)[::-1]
                    for arm in order:
                        out = None
                        if profile and r == 0:
                            os.makedirs(profile, exist_ok=True)
                            tag = "passthrough" if case[1] == "mjpeg" else "tiles"
                            tag += "-free" if sim_args else ""
                            out = os.path.join(profile, f"{tag}-{arm}.speedscope.json")
                        got = load(sim, arms[arm], case, 3.0, secs, out)
                        runs[arm].append(got)
                        print(
                            f"  {arm}: {got.cpu:.1%} of a core, worst viewer {got.fps_min:.1f} "
                            f"fps, delivered {got.delivered_min:.1%}",
                            flush=True,
                        )
            finally:
                sim.stop()
            _case_rows(report, name, runs, tiles=case[1] == "ws")


def scenario_fetch_raw(report: Report, secs: float, rounds: int) -> None:
    """The viewer page's 11 tiles with the five fisheyes fetched RAW (``--fetch-raw``) against
    the same relay fetching them as JPEG, in ABBA rounds: what skipping the JPEG decode saves,
    at four times the bytes on the robot's link."""
    name = "the viewer page's 11 tiles, the fisheyes fetched RAW (baseline: as JPEG)"
    print(f"CPU: {name} ({rounds} rounds)", flush=True)
    arms = {"before": (), "now": ("--fetch-raw", ",".join(FISHEYES))}
    sim = SimProcess(0.0)
    runs: dict[str, list[Load]] = {arm: [] for arm in arms}
    try:
        for r in range(rounds):
            for arm in list(arms) if r % 2 == 0 else list(arms)[::-1]:
                got = load(sim, None, TILES_CASE, 3.0, secs, options=arms[arm])
                runs[arm].append(got)
                label = "JPEG" if arm == "before" else "RAW"
                print(
                    f"  {label}: {got.cpu:.1%} of a core, worst viewer {got.fps_min:.1f} fps, "
                    f"delivered {got.delivered_min:.1%}",
                    flush=True,
                )
    finally:
        sim.stop()
    _case_rows(report, name, runs, tiles=True, targets=False)


def _case_rows(
    report: Report, name: str, runs: dict[str, list[Load]], tiles: bool, targets: bool = True
) -> None:
    """The rows of one case; ``targets``: issue 20's, which apply to its own cases only."""

    def med(arm: str, fn) -> float:
        return statistics.median(fn(x) for x in runs[arm]) if arm in runs else float("nan")

    def both(fn, fmt) -> tuple[str, str]:
        return (fmt(med("before", fn)) if "before" in runs else "", fmt(med("now", fn)))

    cpu_b, cpu_n = med("before", lambda x: x.cpu), med("now", lambda x: x.cpu)
    target = ("target <= 25 %" if tiles else "target <= 9 %") if targets else ""
    report.row(
        f"{name}: relay CPU, % of one core (median)",
        *both(lambda x: x.cpu, lambda v: f"{v:.1%}"),
        "; ".join(filter(None, [f"{cpu_n / cpu_b:.2f}x" if "before" in runs else "", target])),
    )
    what = "rendered frame" if tiles else "frame"
    report.row(
        f"  CPU per {what} delivered, ms",
        *both(lambda x: x.cpu_per_frame, lambda v: f"{v * 1e3:.2f}"),
    )
    report.row(
        "  worst viewer: fps, delivered (worst round)",
        *(
            f"{min(x.fps_min for x in runs[arm]):.1f}, "
            f"{min(x.delivered_min for x in runs[arm]):.1%}"
            if arm in runs
            else ""
            for arm in ("before", "now")
        ),
        ("target >= 14.5 fps" if tiles else "target 100 %") if targets else "",
    )
    for q in (50, 95):
        report.row(
            f"  capture-to-viewer p{q}, ms",
            *(
                ms(pct([v for x in runs[arm] for v in x.latencies], q)) if arm in runs else ""
                for arm in ("before", "now")
            ),
            "target <= before" if q == 95 and not tiles and targets else "",
        )


class Watcher:
    """One MJPEG viewer in a thread: every part's arrival, capture time and staleness."""

    def __init__(self, url: str):
        self.seen: list[tuple[float, float, bool]] = []  # (received, capture time, stale)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self._thread.start()

    def _read(self, url: str) -> None:
        with contextlib.suppress(Exception):
            for p in parts(url, timeout=60):
                self.seen.append((p.received, p.timestamp, p.stale))
                if self._stop.is_set():
                    return

    def fresh_after(self, t: float, newer_than: float) -> float | None:
        """When the first fresh frame captured after ``newer_than`` arrived after ``t``."""
        for received, capture, stale in list(self.seen):
            if received > t and not stale and capture > newer_than:
                return received
        return None

    def newest(self) -> float:
        return max((c for _, c, stale in self.seen if not stale), default=0.0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _outage(sim: SimProcess, watcher: Watcher, kind: str, seconds: float) -> float:
    """The robot away for ``seconds``: ``restart`` (its servers stop and come back on the same
    port) or ``hang`` (its process stopped: connections stay open, nothing answers). Returns how
    long after its return the viewer had its first new frame."""
    wait_until(lambda: watcher.newest() > time.time() - 0.5, 60, "frames flowing")
    last = watcher.newest()
    if kind == "restart":
        back = sim.command("restart", down=seconds)["up_at"]
    else:
        os.kill(sim.proc.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(sim.proc.pid, signal.SIGCONT)
        back = time.time()
    return wait_until(lambda: watcher.fresh_after(back, last), 60, "a new frame") - back


OUTAGES = (("restart", 3.0), ("hang", 8.0))


def scenario_reconnect(report: Report, ref: str, repeats: int) -> None:
    """Issue 19, item 6: the first new frame after the robot's return, this checkout against
    ``ref``, each outage ``repeats`` times on one stream."""
    source = "frontleft_fisheye_image"
    with checkout(ref) as before:
        arms = {"now": None} if before is None else {"before": before, "now": None}
        delays: dict[tuple[str, str], list[float]] = {}
        for arm, code in arms.items():
            print(f"reconnect: {arm}", flush=True)
            sim = SimProcess(0.0)
            relay = Relay.for_sim(sim, "--sources", source, code=code).wait_ready()
            watcher = Watcher(f"{relay.url}/stream/{source}")
            try:
                for kind, seconds in OUTAGES:
                    for _ in range(repeats):
                        took = _outage(sim, watcher, kind, seconds)
                        delays.setdefault((kind, arm), []).append(took)
                        print(f"  {kind} {seconds:.0f} s: back after {took:.2f} s", flush=True)
            finally:
                watcher.close()
                relay.stop()
                sim.stop()
    for kind, seconds in OUTAGES:
        row = [
            ", ".join(f"{d:.2f}" for d in delays[(kind, arm)]) if (kind, arm) in delays else ""
            for arm in ("before", "now")
        ]
        report.row(
            f"robot {kind} ({seconds:.0f} s away): first new frame after its return, s",
            *row,
            "target <= 1.0",
        )


# Each tile of the viewer page with the rate it shows under it ("12.3 fps · 40 ms").
_TILES_JS = """[...document.querySelectorAll('.tile')].map(t => {
  const info = t.querySelector('.info').textContent;
  return {name: t.dataset.source, fps: info.includes(' fps') ? parseFloat(info) : 0};
})"""


async def _tile_rates(ws_url: str, settle: float, samples: int) -> dict[str, list[float]]:
    """Every tile's frame rate as the page shows it, read ``samples`` times a second apart
    once every tile shows one and ``settle`` more seconds have passed."""
    from tests.browser import devtools

    async with devtools(ws_url) as page:
        await page.call("Runtime.enable")
        await page.until(_TILES_JS, "v.length >= 20 && v.every(t => t.fps > 0)", timeout=60)
        await asyncio.sleep(settle)
        rates: dict[str, list[float]] = {}
        for _ in range(samples):
            for tile in await page.eval(_TILES_JS):
                rates.setdefault(tile["name"], []).append(tile["fps"])
            await asyncio.sleep(1.0)
        return rates


def scenario_demo(report: Report, ref: str, secs: float) -> None:
    """Issue 20, item 3: ``make run`` (``--sim``) with the viewer page open in Chromium, every
    one of the simulated robot's 20 cameras in a tile: the rate each tile shows. Before, the
    simulated robot ran in the relay's process (one interpreter lock for both)."""
    from tests.browser import CHROMIUM, chromium

    if CHROMIUM is None:
        print("demo: chromium not installed, skipped")
        return
    with checkout(ref) as before:
        arms = {"now": None} if before is None else {"before": before, "now": None}
        worst: dict[str, tuple[float, float, float]] = {}
        for arm, code in arms.items():
            relay = Relay(["--sim"], code=code).wait_ready(60)
            try:
                # tall enough that all 20 tiles are on screen: the page pauses those out of sight
                with chromium(f"{relay.url}/", "--disable-quic", "--window-size=1400,1700") as ws:
                    rates = asyncio.run(_tile_rates(ws, 3.0, max(3, int(secs))))
            finally:
                relay.stop()
            per_tile = sorted(statistics.median(r) for r in rates.values())
            worst[arm] = (per_tile[0], statistics.median(per_tile), len(per_tile))
            print(f"  demo {arm}: worst tile {per_tile[0]:.1f} fps, median {worst[arm][1]:.1f}")
    report.row(
        "make run + viewer page in Chromium (20 tiles): worst tile fps, median tile fps",
        *(f"{worst[a][0]:.1f}, {worst[a][1]:.1f}" if a in worst else "" for a in ("before", "now")),
        "target >= 13 fps",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated scenarios: six,rtt,mixed,cpu,cases,raw,reconnect,demo",
    )
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds of the CPU cases")
    parser.add_argument("--repeats", type=int, default=3, help="each outage, per relay")
    parser.add_argument(
        "--profile", default=None, help="cases: a py-spy recording of each relay into this folder"
    )
    parser.add_argument(
        "--before", default=BEFORE, help=f"git ref of the 'before' relay (default {BEFORE})"
    )
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None

    def want(name: str) -> bool:
        return only is None or name in only

    report = Report()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or '?'}"
    print(f"bench on {machine}", flush=True)
    if want("six"):
        scenario_six(report, args.seconds, 0.0, 0.0)
    if want("rtt"):
        scenario_six(report, args.seconds, 0.100, 0.030)
    if want("mixed"):
        scenario_mixed(report, args.seconds)
    if want("cpu"):
        scenario_cpu(report, args.seconds / 2)
    if want("cases"):
        scenario_cases(report, args.seconds, args.rounds, args.before, args.profile)
    if want("raw"):
        scenario_fetch_raw(report, args.seconds, args.rounds)
    if want("reconnect"):
        scenario_reconnect(report, args.before, args.repeats)
    if want("demo"):
        scenario_demo(report, args.before, args.seconds)
    print("\n" + report.table())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "rows": report.rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
