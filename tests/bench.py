"""Benchmarks (`make bench`): frames, latency and CPU against the simulated robot, as ratios against
baselines measured in the same run (the machine is shared and noisy; absolute numbers vary).

The robot runs in its own process (``python -m spotrelay.sim``) like a real robot would, the relay
in another; clients run here. Scenarios:

1. every frame: distinct frames/s of one source, the SDK examples' one-request-at-a-time loop
   (baseline) vs the relay's pipelined poller, on loopback and with 40 ms of robot latency;
2. added latency: capture-to-client through the relay vs capture-to-reply of a direct GetImage;
3. fan-out: relay CPU with 1 vs 10 clients on each of six cameras (encode once, share);
4. cost of work: relay CPU for passthrough vs 320-wide re-encode on six cameras.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc loads

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

import bosdyn.client
from bosdyn.client.image import build_image_request

from tests.mjpeg import parts
from tests.relay import Relay

VISUAL = [
    "frontleft_fisheye_image",
    "frontright_fisheye_image",
    "left_fisheye_image",
    "right_fisheye_image",
    "back_fisheye_image",
    "hand_color_image",
]
TICKS = os.sysconf("SC_CLK_TCK")


class SimProcess:
    def __init__(self, rpc_latency: float = 0.0):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spotrelay.sim", "--rpc-latency", str(rpc_latency)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        info = json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]
        self.port, self.ca_path = info["port"], info["ca"]
        self.username, self.password = info["username"], info["password"]
        self.payload_guid, self.payload_secret = info["guid"], info["secret"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def sdk_robot(sim: SimProcess):
    sdk = bosdyn.client.create_standard_sdk("spotrelay-bench")
    sdk.load_robot_cert(sim.ca_path)
    robot = sdk.create_robot("127.0.0.1")
    robot.update_secure_channel_port(sim.port)
    robot.authenticate(sim.username, sim.password)
    robot.time_sync.wait_for_sync()
    return robot


def sdk_sequential(robot, source: str, seconds: float) -> tuple[float, list[float]]:
    """The SDK examples' loop: one GetImage, wait for it, repeat. (distinct fps, latencies)."""
    client = robot.ensure_client("image")
    skew = robot.time_sync.get_robot_clock_skew()
    skew_s = skew.seconds + skew.nanos * 1e-9
    req = [build_image_request(source, quality_percent=75)]
    seen, latencies = set(), []
    end = time.time() + seconds
    while time.time() < end:
        r = client.get_image(req)[0]
        t = r.shot.acquisition_time.seconds + r.shot.acquisition_time.nanos * 1e-9
        if t not in seen:
            seen.add(t)
            latencies.append(time.time() - (t - skew_s))
    return len(seen) / seconds, latencies


def read_stream(url: str, seconds: float, out: list) -> None:
    got = []
    end = None
    for p in parts(url, timeout=20):
        got.append((p.timestamp, p.received))
        end = end or time.time() + seconds
        if time.time() > end:
            break
    out.extend(got)


def relay_fps(relay: Relay, sources: list[str], query: str, seconds: float, copies: int = 1):
    """Distinct fps per source (first client of each) and capture-to-client latencies."""
    results: dict[tuple[str, int], list] = {}
    threads = []
    for s in sources:
        for i in range(copies):
            results[(s, i)] = []
            threads.append(
                threading.Thread(
                    target=read_stream,
                    args=(f"{relay.url}/stream/{s}{query}", seconds, results[(s, i)]),
                )
            )
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    fps, latency = {}, []
    for s in sources:
        got = results[(s, 0)]
        stamps = {ts for ts, _ in got}
        span = got[-1][1] - got[0][1] if len(got) > 1 else 1
        fps[s] = (len(stamps) - 1) / span
        latency += [rx - ts for ts, rx in got]
    return fps, latency


def discard_clients(relay: Relay, sources: list[str], query: str, n: int) -> list[socket.socket]:
    """n raw clients per source that read and discard: cheap here, real work for the relay."""
    socks = []
    for s in sources:
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", relay.port))
            sock.sendall(f"GET /stream/{s}{query} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            socks.append(sock)

    def drain() -> None:
        import selectors

        sel = selectors.DefaultSelector()
        for sock in socks:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        while sel.get_map():
            for key, _ in sel.select(timeout=1):
                try:
                    if not key.fileobj.recv(1 << 16):  # type: ignore[union-attr]
                        sel.unregister(key.fileobj)
                except OSError:
                    sel.unregister(key.fileobj)

    threading.Thread(target=drain, daemon=True).start()
    return socks


def measure_cpu(relay: Relay, seconds: float, work) -> tuple[float, object]:
    before, t0 = cpu_seconds(relay.proc.pid), time.time()
    result = work()
    return (cpu_seconds(relay.proc.pid) - before) / (time.time() - t0), result


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 2 else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args(argv)
    secs = args.seconds
    report: dict[str, object] = {}
    rows: list[tuple[str, str, str, str]] = []

    for latency in (0.0, 0.1):  # 100 ms: a round trip longer than the 67 ms frame period
        sim = SimProcess(rpc_latency=latency)
        relay = Relay.for_sim(sim).wait_ready()
        robot = sdk_robot(sim)
        try:
            base_fps, base_lat = sdk_sequential(robot, "back_fisheye_image", secs)
            fps, lat = relay_fps(relay, ["back_fisheye_image"], "", secs)
            name = f"frames/s, one camera, robot RPC +{latency * 1000:.0f} ms"
            rows.append(
                (
                    name,
                    f"{base_fps:.1f}",
                    f"{fps['back_fisheye_image']:.1f}",
                    f"{fps['back_fisheye_image'] / base_fps:.2f}x",
                )
            )
            if latency == 0.0:
                rows.append(
                    (
                        "capture-to-client p50 (ms)",
                        f"{statistics.median(base_lat) * 1e3:.1f}",
                        f"{statistics.median(lat) * 1e3:.1f}",
                        f"+{(statistics.median(lat) - statistics.median(base_lat)) * 1e3:.1f} ms",
                    )
                )
                rows.append(
                    (
                        "capture-to-client p95 (ms)",
                        f"{pct(base_lat, 95) * 1e3:.1f}",
                        f"{pct(lat, 95) * 1e3:.1f}",
                        f"+{(pct(lat, 95) - pct(base_lat, 95)) * 1e3:.1f} ms",
                    )
                )
                # fan-out and cost of work, same robot and relay
                cpu1, (fps1, _) = measure_cpu(
                    relay, secs, lambda r=relay: relay_fps(r, VISUAL, "?width=320", secs)
                )
                extra = discard_clients(relay, VISUAL, "?width=320", 9)
                time.sleep(1)
                cpu10, (fps10, _) = measure_cpu(
                    relay, secs, lambda r=relay: relay_fps(r, VISUAL, "?width=320", secs)
                )
                for s in extra:
                    s.close()
                rows.append(
                    (
                        "relay CPU, 6 cameras 320 px: 1 vs 10 clients each",
                        f"{cpu1 * 100:.0f}%",
                        f"{cpu10 * 100:.0f}%",
                        f"{cpu10 / cpu1:.2f}x",
                    )
                )
                rows.append(
                    (
                        "  min distinct fps per camera, 1 vs 10 clients",
                        f"{min(fps1.values()):.1f}",
                        f"{min(fps10.values()):.1f}",
                        "",
                    )
                )
                time.sleep(1)
                cpu_pass, (fps_pass, _) = measure_cpu(
                    relay, secs, lambda r=relay: relay_fps(r, VISUAL, "", secs)
                )
                rows.append(
                    (
                        "relay CPU, 6 cameras: passthrough vs 320 px re-encode",
                        f"{cpu_pass * 100:.0f}%",
                        f"{cpu1 * 100:.0f}%",
                        f"{cpu1 / cpu_pass:.2f}x",
                    )
                )
                rows.append(
                    (
                        "  min distinct fps per camera, passthrough",
                        f"{min(fps_pass.values()):.1f}",
                        "",
                        "",
                    )
                )
        finally:
            robot._shutdown()
            relay.stop()
            sim.stop()

    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'baseline':>10}  {'relay':>10}  {'ratio':>10}")
    for name, a, b, c in rows:
        print(f"{name:{width}}  {a:>10}  {b:>10}  {c:>10}")
    report["rows"] = rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
