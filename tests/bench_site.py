"""Base-station benchmark (`make bench-site`): what go2rtc in front of the relay saves on the
robot's Wi-Fi link, and what it adds in latency. Every figure is reported against a baseline
measured in the same run (the machine is shared and noisy; absolute numbers vary).

The simulated robot runs in its own process, the relay in another, go2rtc (configured by
``spotrelay site-config --h264``) in a third; clients run here. For one camera:

1. robot-link bytes/s with one viewer: MJPEG as the robot sends it (baseline), ``quality=50``,
   ``width=320``; and the base station's H.264 for the same camera, per viewer;
2. robot-link bytes/s with 10 viewers straight at the relay (baseline) vs 10 through go2rtc
   (MJPEG, and RTSP H.264): the relay's ``spotrelay_bytes_sent_total`` for that camera;
3. capture-to-client latency, p50/p95: the capture time is the relay's ``X-Timestamp`` of the
   frame. A Python MJPEG client straight at the relay (baseline) vs through go2rtc's MJPEG (the
   same JPEG bytes, matched by hash); ffmpeg decoding the relay's MJPEG (baseline) vs ffmpeg
   decoding go2rtc's RTSP H.264 (each decoded picture matched to the nearest original by pixel
   difference), both with a low-latency player's flags.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from spotrelay import site
from tests.bench import SimProcess, pct
from tests.mjpeg import parts
from tests.procs import cpu_seconds, end_group, start
from tests.relay import Relay, free_port, sample
from tests.test_site import go2rtc_binary, wait_until

CAMERA = "frontleft_fisheye_image"
SMALL = (160, 120)  # pictures are compared at this size


class Station:
    """go2rtc from a generated config for one relay (robot "spot"), on loopback."""

    def __init__(self, relay: Relay, work: Path):
        self.api_port, self.rtsp_port = free_port(), free_port()
        code = site.main(
            [
                f"--robot=spot={relay.url}",
                f"--cameras={CAMERA}",
                "--h264",
                f"--out={work}",
                "--listen=127.0.0.1",
                f"--api-port={self.api_port}",
                f"--rtsp-port={self.rtsp_port}",
                f"--webrtc-port={free_port()}",
            ]
        )
        assert code == 0
        self.log = open(work / "go2rtc.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = start(
            [go2rtc_binary(), "-c", str(work / "go2rtc.yaml")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.name = f"spot_{CAMERA}"
        wait_until(lambda: self.streams(), 20, "go2rtc")

    def streams(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.api + "/api/streams", timeout=5) as resp:
            return json.load(resp)

    def bytes_out(self, protocol: str) -> int:
        """Bytes go2rtc sent to this camera's viewers of ``protocol`` (http: MJPEG, rtsp: RTSP),
        i.e. what crosses the site LAN. (Its own transcoder's input is an http viewer too, but
        runs only while RTSP viewers want H.264.)"""
        cons = self.streams().get(self.name, {}).get("consumers") or []
        return sum(c["bytes_send"] for c in cons if c.get("protocol", "").startswith(protocol))

    def cpu(self) -> float:
        """CPU seconds of go2rtc and its children (the ffmpeg transcoder)."""
        out = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True)
        pids = [int(p) for p in out.stdout.split()]
        total = 0.0
        for pid in pids:
            with contextlib.suppress(OSError):  # gone meanwhile
                total += cpu_seconds(pid)
        return total

    def stop(self) -> None:
        end_group(self.proc)
        self.log.close()


def relay_bytes(relay: Relay) -> float:
    return sample(relay.get("/metrics")[2].decode(), "spotrelay_bytes_sent_total", source=CAMERA)


def relay_clients(relay: Relay) -> int:
    sources = relay.json("/api/sources")["sources"]
    return next(s["clients"] for s in sources if s["name"] == CAMERA)


def drain(port: int, path: str, n: int) -> list[socket.socket]:
    """n raw HTTP clients that read and discard: cheap here, real work for the server."""
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        sock.setblocking(False)
        socks.append(sock)

    def run() -> None:
        sel = selectors.DefaultSelector()
        for sock in socks:
            sel.register(sock, selectors.EVENT_READ)
        while sel.get_map():
            for key, _ in sel.select(timeout=1):
                try:
                    if not key.fileobj.recv(1 << 16):  # type: ignore[union-attr]
                        sel.unregister(key.fileobj)
                except OSError:
                    sel.unregister(key.fileobj)

    threading.Thread(target=run, daemon=True).start()
    return socks


def rtsp_readers(station: Station, n: int) -> list[subprocess.Popen]:
    url = f"rtsp://127.0.0.1:{station.rtsp_port}/{station.name}"
    args = ["ffmpeg", "-v", "error", "-rtsp_transport", "tcp", "-i", url, "-c", "copy"]
    return [start([*args, "-f", "null", "-"]) for _ in range(n)]


def window(
    relay: Relay, station: Station, seconds: float, start, stop, protocol: str = "http"
) -> dict[str, float]:
    """Start viewers, let them settle, then measure robot-link and LAN bytes/s and base-station
    CPU over ``seconds``; stop the viewers and wait until the relay has none left."""
    handle = start()
    try:
        wait_until(lambda: relay_clients(relay) > 0, 20, "viewers")
        time.sleep(2)  # past start-up (go2rtc's transcoder, players' first keyframe)
        link, lan, cpu = relay_bytes(relay), station.bytes_out(protocol), station.cpu()
        t0 = time.time()
        time.sleep(seconds)
        dt = time.time() - t0
        return {
            "link": (relay_bytes(relay) - link) / dt,
            "lan": (station.bytes_out(protocol) - lan) / dt,
            "cpu": (station.cpu() - cpu) / dt,
        }
    finally:
        stop(handle)
        wait_until(lambda: relay_clients(relay) == 0, 20, "viewers gone")


def close_socks(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def stop_procs(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        end_group(p)


# -- latency -------------------------------------------------------------------------------------


def small_gray(jpeg: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    return cv2.resize(img, SMALL, interpolation=cv2.INTER_AREA).astype(np.int32)


def ffmpeg_pictures(url: str, end: float, out: list[tuple[np.ndarray, float]]) -> None:
    """Decode with ffmpeg as a low-latency player would (no probing, no buffering, no frame
    threads, no reordering wait); record each small grey picture and when it arrived."""
    w, h = SMALL
    args = ["ffmpeg", "-v", "error", "-probesize", "32", "-analyzeduration", "0"]
    args += ["-fflags", "nobuffer", "-flags", "low_delay", "-threads", "1"]
    args += ["-rtsp_transport", "tcp"] if url.startswith("rtsp:") else ["-f", "mpjpeg"]
    args += ["-i", url, "-fps_mode", "passthrough", "-vf", f"scale={w}:{h}", "-pix_fmt", "gray"]
    proc = start([*args, "-f", "rawvideo", "-flush_packets", "1", "-"], stdout=subprocess.PIPE)
    try:
        while time.time() < end:
            buf = proc.stdout.read(w * h)  # type: ignore[union-attr]
            if len(buf) < w * h:
                return
            out.append((np.frombuffer(buf, np.uint8).reshape(h, w).astype(np.int32), time.time()))
    finally:
        end_group(proc)


def latency(relay: Relay, station: Station, seconds: float) -> dict[str, list[float]]:
    """Four viewers at once; capture-to-arrival of every frame each got after a settling time."""
    direct: list[tuple[bytes, float, float]] = []  # (jpeg, capture, arrival)
    via_mjpeg: list[tuple[bytes, float]] = []
    decoded: dict[str, list[tuple[np.ndarray, float]]] = {"ffmpeg": [], "h264": []}
    end = time.time() + seconds + 3

    def read_direct() -> None:
        for p in parts(f"{relay.url}/stream/{CAMERA}"):
            direct.append((p.body, p.timestamp, p.received))
            if p.received > end:
                return

    def read_mjpeg() -> None:
        for p in parts(f"{station.api}/api/stream.mjpeg?src={station.name}"):
            via_mjpeg.append((p.body, p.received))
            if p.received > end:
                return

    rtsp = f"rtsp://127.0.0.1:{station.rtsp_port}/{station.name}"
    threads = [
        threading.Thread(target=read_direct),
        threading.Thread(target=read_mjpeg),
        threading.Thread(
            target=ffmpeg_pictures, args=(f"{relay.url}/stream/{CAMERA}", end, decoded["ffmpeg"])
        ),
        threading.Thread(target=ffmpeg_pictures, args=(rtsp, end, decoded["h264"])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    settle = end - seconds  # skip the first seconds (connections, first keyframe)
    # The sim's pictures repeat every 3 s: match only originals captured in the second before.
    by_hash: dict[bytes, list[float]] = {}
    for jpeg, cap, _ in direct:
        by_hash.setdefault(hashlib.sha1(jpeg).digest(), []).append(cap)
    out: dict[str, list[float]] = {"direct": [rx - cap for _, cap, rx in direct if rx > settle]}
    out["mjpeg"] = [
        rx - max(c for c in by_hash[hashlib.sha1(jpeg).digest()] if c < rx)
        for jpeg, rx in via_mjpeg
        if rx > settle
    ]
    originals = [(cap, small_gray(jpeg)) for jpeg, cap, _ in direct]
    for key, pictures in decoded.items():
        out[key] = []
        for pic, rx in pictures:
            near = [
                (float(np.mean((o - pic) ** 2)), cap) for cap, o in originals if 0 < rx - cap < 1
            ]
            if rx > settle and near:
                out[key].append(rx - min(near)[1])
    return out


# -- the run -------------------------------------------------------------------------------------


def mbit(bps: float) -> str:
    return f"{bps * 8 / 1e6:.2f} Mbit/s"


Row = tuple[str, str, str]


def link_rows(relay: Relay, station: Station, secs: float) -> list[Row]:
    port, path = relay.port, f"/stream/{CAMERA}"
    rows, one = [], {}
    for label, query in (
        ("native", ""),
        ("quality=50", "?quality=50"),
        ("width=320", "?width=320"),
    ):
        one[label] = window(
            relay, station, secs, lambda q=query: drain(port, path + q, 1), close_socks
        )["link"]
    for label, bps in one.items():
        ratio = f"{bps / one['native']:.2f}x"
        rows.append((f"robot link, 1 viewer, MJPEG {label}", mbit(bps), ratio))

    direct = window(relay, station, secs, lambda: drain(port, path, 10), close_socks)["link"]
    mjpeg_path = f"/api/stream.mjpeg?src={station.name}"
    mjpeg = window(
        relay, station, secs, lambda: drain(station.api_port, mjpeg_path, 10), close_socks
    )
    h264 = window(relay, station, secs, lambda: rtsp_readers(station, 10), stop_procs, "rtsp")
    each = h264["lan"] / 10
    rows.append(("base station H.264 out, per viewer", mbit(each), f"{each / one['native']:.2f}x"))
    rows.append(("robot link, 10 viewers direct", mbit(direct), "baseline"))
    for label, got in (("MJPEG", mjpeg), ("RTSP H.264", h264)):
        ratio = f"{got['link'] / direct:.2f}x"
        rows.append((f"robot link, 10 viewers via go2rtc {label}", mbit(got["link"]), ratio))
        cpu = f"go2rtc+ffmpeg CPU {got['cpu']:.0%}"
        rows.append(("  base station LAN out to those 10", mbit(got["lan"]), cpu))
    return rows


def latency_rows(relay: Relay, station: Station, secs: float) -> list[Row]:
    lat, rows = latency(relay, station, secs), []
    for base, key, label in (
        ("direct", "mjpeg", "MJPEG client"),
        ("ffmpeg", "h264", "ffmpeg decoding"),
    ):
        b50, b95 = pct(lat[base], 50) * 1e3, pct(lat[base], 95) * 1e3
        p50, p95 = pct(lat[key], 50) * 1e3, pct(lat[key], 95) * 1e3
        via = "go2rtc MJPEG" if key == "mjpeg" else "go2rtc RTSP H.264"
        rows.append((f"capture->{label}, from the relay", f"{b50:.0f} / {b95:.0f} ms", "baseline"))
        added = f"+{p50 - b50:.0f} / +{p95 - b95:.0f} ms (n={len(lat[key])})"
        rows.append((f"capture->{label}, via {via}", f"{p50:.0f} / {p95:.0f} ms", added))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    if not shutil.which("ffmpeg"):
        sys.exit("bench-site needs ffmpeg")
    secs = args.seconds
    sim = SimProcess()
    relay = Relay.for_sim(sim)
    work = Path(tempfile.mkdtemp(prefix="spotrelay-bench-site-"))
    station = None
    rows: list[Row] = []
    try:
        relay.wait_ready()
        station = Station(relay, work)
        print(f"camera {CAMERA}, {secs:g} s windows; robot link = relay bytes for this camera")

        rows += link_rows(relay, station, secs)
        rows += latency_rows(relay, station, secs)
    finally:
        if station:
            station.stop()
        relay.stop()
        sim.stop()
        shutil.rmtree(work, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'measure':<{width}} | value | vs baseline |\n|{'-' * (width + 2)}|---|---|")
    for r in rows:
        print(f"| {r[0]:<{width}} | {r[1]} | {r[2]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
