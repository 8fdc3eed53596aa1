"""``spotrelay mission-demo``: what an Autowalk mission does at a waypoint, without a tablet.

It calls the relay's callback exactly as the robot's mission service would, through the SDK's own
``RemoteClient`` (bosdyn/mission/remote_client.py): a session, ticks until the action is done (a
capture of stills, then a short clip), teardown; then it lists what the relay kept. Against
``make run`` (the simulated robot) it needs no option: ``make mission-demo``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import grpc
from bosdyn.api.mission import remote_pb2
from bosdyn.mission.remote_client import RemoteClient

from spotrelay.autowalk.jobs import CAPTURE, RECORD, Job
from spotrelay.autowalk.service import job_params

RUNNING = remote_pb2.TickResponse.STATUS_RUNNING
TICK_EVERY = 0.1  # the mission service ticks a running node about this often


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spotrelay mission-demo", description=__doc__.split("\n\n")[0].strip("`")
    )
    p.add_argument("--callback", default="127.0.0.1:21081", help="the callback's HOST:PORT")
    p.add_argument("--relay", default="http://127.0.0.1:21080", help="the relay's HTTP address")
    p.add_argument(
        "--cameras",
        default="frontleft_fisheye_image,frontleft_depth",
        help="comma-separated cameras to keep",
    )
    p.add_argument("--clip-seconds", type=float, default=3.0, help="length of the clip (1-300)")
    p.add_argument("--token", default=None, help="the relay's access token, to list captures")
    return p


def _tick(client: RemoteClient, session: str, job: Job, run: str) -> remote_pb2.TickResponse:
    """Tick until the job is no longer RUNNING, as the robot does."""
    while True:
        resp = client.tick(session, lease_resources=(), params=job_params(job), group_name=run)
        if resp.status != RUNNING:
            return resp
        time.sleep(TICK_EVERY)


def _captures(relay: str, run: str, token: str | None) -> list[dict[str, Any]]:
    query = {"run": run, **({"token": token} if token else {})}
    url = f"{relay}/api/captures?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)["captures"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cameras = tuple(c.strip() for c in args.cameras.split(",") if c.strip())
    run = f"mission-demo {time.strftime('%Y-%m-%dT%H:%M:%S')}"  # Autowalk's group name
    client = RemoteClient()
    client.channel = grpc.insecure_channel(args.callback)
    status_name = remote_pb2.TickResponse.Status.Name
    try:
        info = client.get_service_info(timeout=5)
        print(f"callback at {args.callback}: parameters {', '.join(info.custom_params.specs)}")
        session = client.establish_session(lease_resources=(), timeout=5)
        for job in (
            Job(CAPTURE, cameras, 0.0, "mission-demo stills"),
            Job(RECORD, cameras[:1], args.clip_seconds, "mission-demo clip"),
        ):
            started = time.monotonic()
            resp = _tick(client, session, job, run)
            took = time.monotonic() - started
            outcome = status_name(resp.status).removeprefix("STATUS_")
            said = f": {resp.error_message}" if resp.error_message else ""
            print(f"{job.action} {','.join(job.cameras)}: {outcome} in {took:.1f} s{said}")
            client.stop(session)
        client.teardown_session(session)
    except grpc.RpcError as exc:
        sys.stderr.write(
            f"spotrelay mission-demo: error: the callback at {args.callback} did not answer "
            f"({exc.code().name}); is the relay running with --mission (make run)?\n"
        )
        return 1
    finally:
        client.channel.close()
    try:
        kept = _captures(args.relay.rstrip("/"), run, args.token)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        sys.stderr.write(f"spotrelay mission-demo: cannot list captures at {args.relay}: {exc}\n")
        return 1
    print(f"kept for run {run!r}:")
    for c in reversed(kept):
        print(f"  {c['kind']:5} {c['source']:28} {args.relay.rstrip('/')}{c['url']}")
    return 0 if kept else 1
