"""RTSP benchmark (`make bench-rtsp`): H.264 from the relay against MJPEG passthrough, in one run.

The simulated robot in its own process (the realistic profile of tests/bench.py), the relay in
another with --rtsp-port, clients here:

* **Latency, capture to decoded picture:** a GStreamer client (rtspsrc over TCP, jitter buffer
  off: latency=0, one decoding thread) reads each frame's capture time from the relay's RTCP
  sender reports (the RTP clock is the capture clock), against an MJPEG client that decodes each
  JPEG (OpenCV) as it arrives: both measured to the moment the picture exists at the client.
* **Encode cost:** the relay's CPU with one RTSP viewer of a 640x480 camera against one MJPEG
  passthrough viewer of it (the difference is decode + x264), and x264's own time per frame
  (spotrelay_encode_seconds{kind="h264"}); ten RTSP viewers of that camera against one (one
  encoder).
* **Five cameras through 10 Mbit/s** (tests/shaper.py): frames per second of each as RTSP, and
  as MJPEG passthrough for comparison.

``--json FILE`` also writes the rows. About two minutes.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from tests.bench import SimProcess, pct
from tests.mjpeg import parts
from tests.procs import cpu_seconds, end_group
from tests.procs import start as start_group
from tests.relay import Relay, free_port, sample
from tests.shaper import Shaper

CAMERA = "frontleft_fisheye_image"
FIVE = [
    "frontleft_fisheye_image",
    "frontright_fisheye_image",
    "left_fisheye_image",
    "right_fisheye_image",
    "back_fisheye_image",
]
NTP_UNIX = 2208988800


def rtsp_latencies(url: str, seconds: float) -> list[float]:
    """Capture-to-decoded latency (s) of each frame an RTSP client decodes in ``seconds``."""
    import gi

    gi.require_version("Gst", "1.0")
    from gi.repository import Gst

    Gst.init(None)
    pipe = Gst.parse_launch(
        "rtspsrc name=src protocols=tcp latency=0 add-reference-timestamp-meta=true "
        "! rtph264depay name=depay ! avdec_h264 max-threads=1 name=dec ! fakesink sync=false"
    )
    pipe.get_by_name("src").set_property("location", url)
    caps = Gst.Caps.from_string("timestamp/x-ntp")
    by_pts: dict[int, int] = {}
    out: list[float] = []

    def depayed(pad, info):  # the decoder may not keep the meta: remember it by PTS
        buf = info.get_buffer()
        meta = buf.get_reference_timestamp_meta(caps)
        if meta is not None:
            by_pts[buf.pts] = meta.timestamp
        return Gst.PadProbeReturn.OK

    def decoded(pad, info):
        now = time.time()
        buf = info.get_buffer()
        meta = buf.get_reference_timestamp_meta(caps)
        ntp = meta.timestamp if meta is not None else by_pts.pop(buf.pts, None)
        if ntp is not None:
            out.append(now - (ntp / 1e9 - NTP_UNIX))
        return Gst.PadProbeReturn.OK

    depay = pipe.get_by_name("depay").get_static_pad("src")
    depay.add_probe(Gst.PadProbeType.BUFFER, depayed)
    pipe.get_by_name("dec").get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, decoded)
    pipe.set_state(Gst.State.PLAYING)
    time.sleep(seconds)  # the measuring window: GStreamer's threads do the work
    pipe.set_state(Gst.State.NULL)
    return out[15:]  # the first second waits for a sender report


def mjpeg_latencies(url: str, seconds: float) -> list[float]:
    """Capture-to-decoded latency (s) of each MJPEG part, decoded as it arrives."""
    out: list[float] = []
    end = time.time() + seconds
    for part in parts(url, timeout=20):
        cv2.imdecode(np.frombuffer(part.body, np.uint8), cv2.IMREAD_UNCHANGED)
        if not part.stale:
            out.append(time.time() - part.timestamp)
        if time.time() > end:
            break
    return out[15:]


def cpu_while(relay: Relay, seconds: float) -> float:
    """The relay's CPU (share of one core) over ``seconds``."""
    start, t = cpu_seconds(relay.proc.pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(relay.proc.pid) - start) / (time.monotonic() - t)


def readers(cmd: list[str], n: int) -> list[subprocess.Popen]:
    return [
        start_group(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)
    ]


def ffmpeg_rtsp(url: str, seconds: float) -> list[str]:
    return ["ffmpeg", "-v", "error", "-rtsp_transport", "tcp", "-i", url, "-t", f"{seconds}"]


def frames_read(url: str, seconds: float) -> float:
    """Frames per second an RTSP reader got over ``seconds`` (after its first)."""
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-rtsp_transport",
            "tcp",
            "-select_streams",
            "v",
            "-read_intervals",
            f"%+{seconds + 2}",
            "-show_entries",
            "packet=pts_time",
            "-of",
            "csv=p=0",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    # after the first sender report, each line also ends with a comma (a packet's side data)
    values = (x.strip(",") for x in out.stdout.split())
    times = sorted(float(x) for x in values if x.replace(".", "").isdigit())
    times = [t for t in times if t >= times[0] + 2] if times else []
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def mjpeg_fps(url: str, seconds: float) -> float:
    got = []
    end = None
    for part in parts(url, timeout=20):
        got.append(part.timestamp)
        end = end or time.time() + 2 + seconds
        if time.time() > end:
            break
    got = [t for t in got if t >= got[0] + 2]
    return (len(set(got)) - 1) / (got[-1] - got[0]) if len(got) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench_rtsp", description=__doc__.split("\n")[0]
    )
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows: list[tuple[str, str, str, str]] = []
    sim = SimProcess(0.0)
    rtsp_port = free_port()
    relay = Relay.for_sim(sim, "--rtsp-port", str(rtsp_port)).wait_ready()
    rtsp = f"rtsp://127.0.0.1:{rtsp_port}"
    try:
        # latency, side by side, to the decoded picture
        with ThreadPoolExecutor(2) as pool:
            r = pool.submit(rtsp_latencies, f"{rtsp}/{CAMERA}", args.seconds)
            m = pool.submit(mjpeg_latencies, f"{relay.url}/stream/{CAMERA}", args.seconds)
            rl, ml = r.result(), m.result()
        for q in (50, 95, 99):
            rows.append(
                (
                    f"capture to decoded p{q}, ms",
                    f"{pct(ml, q) * 1e3:.1f}",
                    f"{pct(rl, q) * 1e3:.1f}",
                    f"{(pct(rl, q) - pct(ml, q)) * 1e3:+.1f} ms"
                    + ("; target <= +60" if q == 95 else ""),
                )
            )
        # encode cost: one MJPEG passthrough viewer vs one RTSP viewer of the camera
        with_mjpeg = _with(
            readers(["curl", "-s", "-o", "/dev/null", f"{relay.url}/stream/{CAMERA}"], 1),
            lambda: cpu_while(relay, args.seconds),
        )
        before = _h264(relay)
        one = _with(
            readers([*ffmpeg_rtsp(f"{rtsp}/{CAMERA}", 60), "-f", "null", "-"], 1),
            lambda: cpu_while(relay, args.seconds),
        )
        after = _h264(relay)
        ten = _with(
            readers([*ffmpeg_rtsp(f"{rtsp}/{CAMERA}", 60), "-f", "null", "-"], 10),
            lambda: cpu_while(relay, args.seconds),
        )
        x264 = (after[1] - before[1]) / max(1.0, after[0] - before[0])
        rows.append(
            (
                "relay CPU, one 640x480@15 viewer: MJPEG passthrough vs RTSP",
                f"{with_mjpeg:.1%}",
                f"{one:.1%}",
                f"RTSP costs +{one - with_mjpeg:.1%} of a core (target <= 8 %); x264 "
                f"{x264 * 1e3:.1f} ms a frame",
            )
        )
        rows.append(
            (
                "relay CPU, RTSP: 1 vs 10 viewers of one camera",
                f"{one:.1%}",
                f"{ten:.1%}",
                f"{ten / one:.2f}x: one encoder",
            )
        )
        # five cameras through 10 Mbit/s
        with Shaper("127.0.0.1", rtsp_port, mbit=10) as link, ThreadPoolExecutor(5) as pool:
            rtsp_fps = list(
                pool.map(
                    lambda s: frames_read(f"rtsp://127.0.0.1:{link.port}/{s}", args.seconds), FIVE
                )
            )
        with Shaper("127.0.0.1", relay.port, mbit=10) as link, ThreadPoolExecutor(5) as pool:
            mjpeg = list(
                pool.map(
                    lambda s: mjpeg_fps(f"http://127.0.0.1:{link.port}/stream/{s}", args.seconds),
                    FIVE,
                )
            )
        print("five cameras through 10 Mbit/s, fps: RTSP", [round(f, 1) for f in rtsp_fps])
        print("  MJPEG", [round(f, 1) for f in mjpeg], flush=True)
        rows.append(
            (
                "five cameras through 10 Mbit/s: worst camera fps (MJPEG vs RTSP)",
                f"{min(mjpeg):.1f}",
                f"{min(rtsp_fps):.1f}",
                "target RTSP >= 14",
            )
        )
    finally:
        relay.stop()
        sim.stop()
    print("\n| measure | MJPEG | RTSP (H.264) | note |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


def _with(procs: list[subprocess.Popen], measure):
    try:
        time.sleep(3)  # connected and warm
        return measure()
    finally:
        for proc in procs:
            end_group(proc)


def _h264(relay: Relay) -> tuple[float, float]:
    text = relay.get("/metrics")[2].decode()
    count = sample(text, "spotrelay_encode_seconds_count", kind="h264")
    total = sample(text, "spotrelay_encode_seconds_sum", kind="h264")
    return count, total


if __name__ == "__main__":
    sys.exit(main())
