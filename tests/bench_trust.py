"""Issue 19's rows rerun (`make bench-trust`): each attack on the Autowalk port and the captures
routes against a fresh relay (its real command line, ``--mission``) on the simulated robot (a
process of its own), six viewers watching, the attacker in a process of its own at lower priority
(``tests/callback_attacks.py``, ``os.nice``). For every row it measures what the issue's table did:
the relay's memory (peak and after), the viewers' frame rate, whether earlier captures are
intact, whether the robot's own session still works, tracebacks in the log, what the attacker
was told; and each row's own figure (reply sizes, snapshot latency, descriptors, CPU...).

Relays: ``--before PATH`` (another checkout's ``extension`` folder, e.g. today's main; the same
``RELAY_UNDER_TEST`` mechanism ``tests/relay.py`` has) and this checkout, in the same run, rows
interleaved so that both meet the same machine. This checkout is attacked twice: from the robot's
own address (127.0.0.1 here, so only the bounds stand between the attacker and the relay) and as a
stranger (127.0.0.2). Prints a Markdown table; ``--json FILE`` keeps every number.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from bosdyn.mission.remote_client import RemoteClient

from tests.bench import SimProcess, pct
from tests.callback_attacks import capture
from tests.procs import cpu_seconds
from tests.relay import Relay, free_port
from tests.soak import Viewers, usage

MIN_WINDOW = 15.0  # seconds the viewers are measured from the attack's start, however short
CALLBACK_ROWS = ("1", "2", "3", "4", "5", "8")
ROWS = ("1", "2", "3", "4", "5", "6", "7", "8", "10", "11")
TITLES = {
    "1": "5 ticks, every camera, 3.9 MB label",
    "2": "256 concurrent 3.9 MB ticks",
    "3": "100 ticks recording every camera for 300 s",
    "4": "128 sessions looping capture Tick/Stop",
    "5": "5,000 EstablishSession, then teardown of listed ids",
    "6": "1,100 idle connections (relay at 1,024 descriptors)",
    "7": "8 zip downloads that stop reading",
    "8": "NaN duration, NaN inputs",
    "10": "12 loops of the whole listing over 1,200 captures",
    "11": "a listed file swapped for a link",
}


class Sampler:
    """The relay's RSS (peak) and CPU, sampled every 0.1 s while it runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError, StopIteration):
                self.peak = max(self.peak, usage(self.pid)[0])
            time.sleep(0.1)

    def close(self) -> float:
        self.stop.set()
        self.thread.join(2)
        return self.peak


def seed(folder: Path, count: int, size: int, run: str = "walk") -> None:
    """Captures written as the relay writes them (data, thumbnail, sidecar), without a robot."""
    now = time.time() - 3600
    data = b"\xff\xd8" + b"\0" * (size - 4) + b"\xff\xd9"
    for i in range(count):
        stem = f"20260101-000000-{i:03d}_seed{i}"
        (folder / f"{stem}.jpg").write_bytes(data)
        (folder / f"{stem}.thumb.jpg").write_bytes(data[:200])
        meta = {
            "id": stem, "file": f"{stem}.jpg", "thumbnail": f"{stem}.thumb.jpg", "bytes": size,
            "source": "frontleft_fisheye_image", "kind": "still", "action": "capture",
            "label": f"gauge {i}", "width": 640, "height": 480, "media_type": "image/jpeg",
            "time": now + i, "time_utc": "2026-01-01T00:00:00Z", "written": now + i,
            "mission": {"run": run, "group_name": run, "node": f"node {i}", "inputs": {}},
        }  # fmt: skip
        (folder / f"{stem}.json").write_text(json.dumps(meta))


def http_get(url: str, timeout: float = 20.0) -> tuple[int, bytes, float]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(), time.monotonic() - started
    except urllib.error.HTTPError as err:
        return err.code, err.read(), time.monotonic() - started
    except OSError:
        return 0, b"", time.monotonic() - started


class Prober:
    """GET ``path`` every ``every`` seconds: latency of each (None: failed or timed out)."""

    def __init__(self, url: str, every: float = 0.25):
        self.url, self.every = url, every
        self.times: list[tuple[float, float | None]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            status, _, took = http_get(self.url, timeout=5)
            self.times.append((time.time(), took if status == 200 else None))
            time.sleep(self.every)

    def between(self, a: float, b: float) -> tuple[list[float], int]:
        inside = [t for at, t in self.times if a <= at < b]
        return [t for t in inside if t is not None], sum(t is None for t in inside)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(6)


def robot_client(port: int) -> RemoteClient:
    c = RemoteClient()
    c.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return c


def robot_capture(c: RemoteClient, session: str, timeout: float = 15.0) -> str:
    """A capture of two cameras as the robot asks it: its final status (or the error)."""
    p = capture(["frontleft_fisheye_image", "back_fisheye_image"], "earlier evidence")
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            resp = c.tick(session, lease_resources=(), params=p, timeout=10, group_name="robot")
            if resp.status != resp.STATUS_RUNNING:
                name = resp.Status.Name(resp.status).removeprefix("STATUS_")
                return name + (f" ({resp.error_message[:80]})" if resp.error_message else "")
            time.sleep(0.05)
        return "still RUNNING"
    except Exception as exc:
        return f"{type(exc).__name__}"


def folder_bytes(folder: Path, suffix: str = "") -> int:
    total = 0
    for p in folder.iterdir():
        if p.name.endswith(suffix):
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                total += p.stat().st_size
    return total


def written(pid: int) -> int:
    """Bytes the process has written to storage so far (its /proc io counters)."""
    with open(f"/proc/{pid}/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("write_bytes:"))


def strict(body: bytes) -> str:
    def refuse(c: str) -> None:
        raise ValueError(c)

    try:
        json.loads(body, parse_constant=refuse)
        return "strict JSON"
    except ValueError as exc:
        return f"not JSON a browser reads ({exc})"


def whole_listing(base: str) -> tuple[int, float]:
    """Bytes of the whole listing (limit=10000, or every page), and seconds taken."""
    status, body, took = http_get(f"{base}/api/captures?limit=10000", 60)
    if status != 400:
        return len(body), took
    total, after, started = 0, "", time.monotonic()
    while True:
        status, body, _ = http_get(f"{base}/api/captures?limit=1000{after}", 60)
        total += len(body)
        page = json.loads(body)
        if not page.get("next"):
            return total, time.monotonic() - started
        after = "&after=" + page["next"]


def run(row: str, variant: str, before: str | None, sim: SimProcess, tmp: Path) -> dict[str, Any]:
    folder = tmp / f"row{row}-{variant}"
    folder.mkdir()
    if row == "7":
        seed(folder, 40, 1_500_000)
    elif row == "10":
        seed(folder, 1200, 2000)
    elif row == "11":
        seed(folder, 1, 2000)
    if variant == "before":
        os.environ["RELAY_UNDER_TEST"] = before or ""
    else:
        os.environ.pop("RELAY_UNDER_TEST", None)
    mission_port = free_port()
    args = ["--mission", "--mission-port", str(mission_port), "--captures-dir", str(folder)]
    # row 6: the container's descriptor limit as the issue measured it
    nofile = 1024 if row == "6" else None
    relay = Relay.for_sim(sim, *args, nofile=nofile).wait_ready()
    out: dict[str, Any] = {"row": row, "variant": variant}
    robot = robot_client(mission_port)
    viewers = None
    try:
        s = robot.establish_session(lease_resources=(), timeout=10)
        out["earlier_capture"] = robot_capture(robot, s)
        earlier = {p.name for p in folder.iterdir()}
        own = robot.establish_session(lease_resources=(), timeout=10)  # the robot's, kept
        viewers = Viewers(relay)
        probe = None
        if row in ("4", "6"):
            probe = Prober(f"{relay.url}/snapshot/frontleft_depth?format=png")
        health = Prober(f"{relay.url}/healthz") if row == "6" else None
        time.sleep(3)
        base_start = time.time()
        time.sleep(3)
        rss0, fds0 = usage(relay.proc.pid)
        cpu0, t0 = cpu_seconds(relay.proc.pid), time.time()
        written0 = written(relay.proc.pid)
        sampler = Sampler(relay.proc.pid)
        cmd = [sys.executable, "-m", "tests.callback_attacks", row]
        cmd += ["--mission-port", str(mission_port), "--http-port", str(relay.port)]
        cmd += ["--seconds", "15" if row in ("6", "7") else "20"]
        if variant == "stranger":
            cmd += ["--source", "127.0.0.2"]
        attack_start = time.time()
        attacker = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        if row == "7":  # while the zips are stalled: a capture's file, then a whole new zip
            time.sleep(3)
            status, body, took = http_get(f"{relay.url}/captures/20260101-000000-000_seed0.jpg")
            out["file_during"] = f"{status}, {took:.1f} s"
            status, body, took = http_get(f"{relay.url}/api/captures.zip?run=walk", 20)
            out["zip_during"] = f"{status}, {len(body) / 1e6:.0f} MB, {took:.1f} s"
        if row == "6":
            time.sleep(4)
            out["fds_during"] = usage(relay.proc.pid)[1]
        stdout, _ = attacker.communicate(timeout=600)
        time.sleep(max(0.0, attack_start + MIN_WINDOW - time.time()))  # viewers over >= 15 s
        attack_end = time.time()
        cpu1 = cpu_seconds(relay.proc.pid)
        out["cpu_percent"] = round(100 * (cpu1 - cpu0) / (attack_end - t0), 0)
        out["attacker"] = json.loads(stdout.strip().splitlines()[-1])["seen"] if stdout else {}
        out["written_mb"] = round((written(relay.proc.pid) - written0) / 1e6, 1)
        fps, lat = viewers.between(attack_start, attack_end, [])
        out["fps_min"] = round(fps, 1)
        out["latency_p95_ms"] = round(pct(lat, 95) * 1e3, 0)
        base_fps, _ = viewers.between(base_start, attack_start, [])
        out["fps_before_attack"] = round(base_fps, 1)
        if probe is not None:
            during, failed = probe.between(attack_start, attack_end)
            calm, _ = probe.between(base_start, attack_start)
            out["snapshot_ms_calm"] = round(statistics.median(calm) * 1e3) if calm else None
            out["snapshot_ms_p50"] = round(statistics.median(during) * 1e3) if during else None
            out["snapshot_ms_p95"] = round(pct(during, 95) * 1e3) if len(during) > 2 else None
            out["snapshot_failed"] = failed
            probe.close()
        if health is not None:
            during, failed = health.between(attack_start, attack_end)
            out["healthz_ms_max"] = round(max(during) * 1e3) if during else None
            out["healthz_failed"] = failed
            health.close()
        time.sleep(3)
        out["rss_mb_before"] = round(rss0, 0)
        out["rss_mb_peak"] = round(sampler.close(), 0)
        out["rss_mb_after"], fds_after = usage(relay.proc.pid)
        out["rss_mb_after"] = round(out["rss_mb_after"], 0)
        out["fds"] = f"{fds0} -> {fds_after}"
        out["robot_session"] = robot_capture(robot, own)
        out["earlier_intact"] = all((folder / n).exists() for n in earlier)
        out["deleted"] = relay.metric("spotrelay_captures_deleted_total", 0.0)
        out["sidecars_mb"] = round(folder_bytes(folder, ".json") / 1e6, 1)
        status, body, took = http_get(f"{relay.url}/api/captures", 30)
        out["listing"] = f"{status}, {strict(body)}"
        if row == "7":
            status, body, took = http_get(f"{relay.url}/api/captures.zip?run=walk", 30)
            out["zip_after"] = f"{status}, {len(body) / 1e6:.0f} MB, {took:.1f} s"
        if row == "11":
            secret = tmp / f"secret-{variant}"
            secret.write_text("root's secret")
            name = "20260101-000000-000_seed0.jpg"
            (folder / name).unlink()
            (folder / name).symlink_to(secret)
            status, body, _ = http_get(f"{relay.url}/captures/{name}")
            out["swapped_file"] = f"{status}" + (
                ", the link's target served" if b"secret" in body else ""
            )
    finally:
        if viewers is not None:
            viewers.stop.set()
        robot.channel.close()
        relay.stop()
    out["tracebacks"] = relay.log().count("Traceback")
    if row == "1":  # a restart on what the attack left, and one whole listing
        again = Relay.for_sim(sim, *args).wait_ready()
        try:
            time.sleep(3)
            out["rss_mb_restarted"] = round(usage(again.proc.pid)[0], 0)
            sampler = Sampler(again.proc.pid)
            size, took = whole_listing(again.url)
            out["listing_reply_mb"] = round(size / 1e6, 1)
            out["listing_rss_peak_mb"] = round(sampler.close(), 0)
        finally:
            again.stop()
    shutil.rmtree(folder, ignore_errors=True)
    return out


def table(results: list[dict[str, Any]]) -> str:
    by = {(r["row"], r["variant"]): r for r in results}
    variants = [v for v in ("before", "robot", "stranger") if any(k[1] == v for k in by)]
    head = {"before": "before (main)", "robot": "after, from the robot's address",
            "stranger": "after, from 127.0.0.2"}  # fmt: skip
    lines = ["| row | measure | " + " | ".join(head[v] for v in variants) + " |"]
    lines.append("|---|---|" + "---|" * len(variants))
    keys = [
        ("rss_mb_peak", "RSS peak, MB"), ("rss_mb_after", "RSS after, MB"),
        ("fps_before_attack", "viewers before the attack, worst fps"),
        ("fps_min", "viewers, worst fps"), ("earlier_intact", "earlier captures intact"),
        ("robot_session", "robot's own session"), ("tracebacks", "tracebacks"),
        ("attacker", "the attacker was told"), ("sidecars_mb", "sidecars, MB"),
        ("rss_mb_restarted", "RSS after a restart, MB"), ("listing_reply_mb", "whole listing, MB"),
        ("listing_rss_peak_mb", "RSS peak building it, MB"), ("written_mb", "written, MB"),
        ("deleted", "captures deleted"), ("snapshot_ms_calm", "PNG snapshot p50 calm, ms"),
        ("snapshot_ms_p50", "PNG snapshot p50, ms"), ("snapshot_ms_p95", "PNG snapshot p95, ms"),
        ("snapshot_failed", "snapshots failed"), ("healthz_ms_max", "/healthz worst, ms"),
        ("healthz_failed", "/healthz failed"), ("fds", "descriptors"),
        ("fds_during", "descriptors during"), ("file_during", "a file meanwhile"),
        ("zip_during", "a new zip meanwhile"), ("zip_after", "a zip after"),
        ("listing", "/api/captures"), ("cpu_percent", "relay CPU %"),
        ("swapped_file", "GET of the swapped file"),
    ]  # fmt: skip
    for row in ROWS:
        if not any(k[0] == row for k in by):
            continue
        lines.append(f"| {row} | **{TITLES[row]}** |" + " |" * len(variants))
        for key, name in keys:
            cells = []
            for v in variants:
                r = by.get((row, v), {})
                value = r.get(key, "")
                if key == "attacker" and isinstance(value, dict):
                    top = sorted(value.items(), key=lambda kv: -kv[1])[:2]
                    value = "; ".join(f"{n}x {w}" for w, n in top).replace("|", "/")
                cells.append(str(value))
            if any(cells):
                lines.append(f"| | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="another checkout's extension folder (e.g. main's)")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="spotrelay-trust-"))
    sim = SimProcess(0.0)
    results = []
    try:
        for row in args.rows.split(","):
            variants = (["before"] if args.before else []) + ["robot"]
            if row in CALLBACK_ROWS:
                variants.append("stranger")
            for variant in variants:
                print(f"row {row} ({TITLES[row]}), {variant}...", flush=True)
                for attempt in range(3):  # a port taken meanwhile by another program: again
                    try:
                        result = run(row, variant, args.before, sim, tmp)
                        break
                    except AssertionError as exc:
                        print(f"  relay did not start ({str(exc)[-120:]}); again", flush=True)
                        shutil.rmtree(tmp / f"row{row}-{variant}", ignore_errors=True)
                        if attempt == 2:
                            raise
                print(json.dumps(result), flush=True)
                results.append(result)
    finally:
        sim.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
