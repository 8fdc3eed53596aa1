"""``python -m spotrelay.sim``: a simulated Spot in its own process, for demos and benchmarks.

Prints one JSON line (port, CA, logins) when serving; ends at SIGINT or SIGTERM. With
``--control`` it also reads commands, one JSON object a line, on stdin and answers each with one
JSON line: ``{"cmd": "stats"}`` (GetImage calls per service, image requests per source, logins
asked), ``{"cmd": "set_rate", "source": S, "rate": R}``, ``{"cmd": "set_resolution", ...}``,
``{"cmd": "set_fault", "source": S, "kind": K}``, ``{"cmd": "set_available", "value": V}``,
``{"cmd": "expire_tokens"}``, ``{"cmd": "issued"}`` (every token issued, to grep logs for),
``{"cmd": "restart", "down": S}`` (the servers go for S seconds and come back on the same port,
tokens still valid; answered once back, with when it went and came back); then the end of stdin
ends it too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from spotrelay.sim.robot import PAYLOAD_STATES, SimRobot


def _range(text: str) -> float | tuple[float, float]:
    """'0.025' or '0.01-0.06' (spread over the cameras)."""
    if "-" in text.strip("-"):
        lo, hi = text.split("-", 1)
        return float(lo), float(hi)
    return float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spotrelay.sim", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cert-dir", default=None)
    p.add_argument("--clock-skew", type=float, default=2.5, help="robot clock minus ours (s)")
    p.add_argument("--jitter", type=float, default=0.002, help="capture jitter, +- seconds")
    p.add_argument(
        "--availability",
        type=_range,
        default=0.025,
        help="capture to available, seconds; LO-HI spreads it over the cameras (one value for "
        "the cameras on one trigger)",
    )
    p.add_argument("--hand-rate", type=float, default=15.0, help="hand camera rate (Hz)")
    p.add_argument(
        "--free-running",
        action="store_true",
        help="every body camera on its own phase, not on one trigger (worst case for batching)",
    )
    p.add_argument("--rpc-latency", type=float, default=0.0, help="round trip (s)")
    p.add_argument("--rpc-jitter", type=float, default=0.0, help="+- on the round trip (s)")
    p.add_argument("--image-cost", type=float, default=0.0, help="server time per image (s)")
    p.add_argument("--spot-cam", action="store_true", help="a Spot CAM-like image service")
    p.add_argument("--payload-camera", choices=PAYLOAD_STATES, default=None)
    p.add_argument("--payload-rate", type=float, default=5.0)
    p.add_argument("--payload-unauthorised", action="store_true", help="payload login refused")
    p.add_argument("--control", action="store_true", help="take commands on stdin (benchmarks)")
    p.add_argument("--password", default="password", help="the robot user's password")
    p.add_argument("--payload-secret", default="sim-payload-secret")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.cert_dir:
        os.makedirs(args.cert_dir, exist_ok=True)
    sim = SimRobot(
        host=args.host,
        port=args.port,
        clock_skew=args.clock_skew,
        cert_dir=args.cert_dir,
        jitter=args.jitter,
        available_after=args.availability,
        hand_rate=args.hand_rate,
        free_running=args.free_running,
        rpc_latency=args.rpc_latency,
        rpc_jitter=args.rpc_jitter,
        image_cost=args.image_cost,
        spot_cam=args.spot_cam,
        payload_camera=args.payload_camera,
        payload_rate=args.payload_rate,
        payload_authorised=not args.payload_unauthorised,
        password=args.password,
        payload_secret=args.payload_secret,
    ).start()
    info = {
        "port": sim.port,
        "ca": sim.ca_path,
        "username": sim.username,
        "password": sim.password,
        "guid": sim.payload_guid,
        "secret": sim.payload_secret,
    }
    print(json.dumps(info), flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())

    def commands() -> None:
        for line in sys.stdin:
            try:
                cmd = json.loads(line)
                print(json.dumps(_command(sim, cmd)), flush=True)
            except (ValueError, KeyError, AssertionError) as exc:
                print(json.dumps({"error": str(exc)}), flush=True)
        done.set()

    if args.control:
        threading.Thread(target=commands, daemon=True).start()
    done.wait()
    sim.stop()


def _command(sim: SimRobot, cmd: dict) -> dict:
    what = cmd["cmd"]
    if what == "stats":
        return {
            "get_image_calls": dict(sim.get_image_calls),
            "images_requested": dict(sim.images_requested),
            "auth_requests": len(sim.auth_requests),
        }
    if what == "set_rate":
        sim.set_rate(cmd["source"], float(cmd["rate"]))
    elif what == "set_resolution":
        sim.set_resolution(cmd["source"], int(cmd["cols"]), int(cmd["rows"]))
    elif what == "set_fault":
        sim.set_fault(cmd["source"], cmd.get("kind"))
    elif what == "set_available":
        sim.set_available(bool(cmd["value"]))
    elif what == "expire_tokens":
        sim.expire_tokens()
    elif what == "issued":
        return {"tokens": list(sim.issued)}
    elif what == "restart":
        went, back = sim.restart(float(cmd["down"]))
        return {"ok": True, "down_at": went, "up_at": back}
    else:
        raise KeyError(f"unknown command {what!r}")
    return {"ok": True}


if __name__ == "__main__":
    main()
