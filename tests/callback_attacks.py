"""Issue 19's attacks on the Autowalk callback's port and the captures routes, each as a user
would mount it: the SDK's RemoteClient over plaintext gRPC (the way the robot calls), raw sockets,
plain HTTP. Run in a process of its own at lower priority (``os.nice``), so the attacker's CPU is
held apart from the relay's:

    python -m tests.callback_attacks ROW --mission-port P --http-port H [--source 127.0.0.2]

prints one JSON line: what the attacker saw (calls made, the errors it was given, in a few
words each). ``--source``: the address to call from (through ``tests.forward``); the robot's own
address (127.0.0.1 here) when absent. ``tests/bench_trust.py`` runs every row against two relays;
``tests/soak.py`` runs some of them for the length of a soak.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import collections
import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from bosdyn.api import service_customization_pb2 as sc
from bosdyn.api.mission import util_pb2
from bosdyn.mission.remote_client import RemoteClient

from tests.forward import Forwarder

BIG_LABEL = 3_900_000  # characters: just under gRPC's default 4 MiB message


class Seen:
    """Outcomes by kind, counted (thread-safe), and the first words of each error."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def add(self, what: str) -> None:
        with self.lock:
            self.counts[what[:140]] += 1

    def error(self, exc: BaseException) -> None:
        err = getattr(exc, "error", exc)
        if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
            self.add(f"{err.code().name}: {err.details()}")
        else:
            self.add(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


@contextlib.contextmanager
def channel_to(port: int, source: str | None) -> Iterator[str]:
    """The address to dial for ``port`` as seen from ``source``."""
    if source is None or source == "127.0.0.1":
        yield f"127.0.0.1:{port}"
        return
    with Forwarder(("127.0.0.1", port), source) as fwd:
        yield fwd.address


def client(address: str) -> RemoteClient:
    c = RemoteClient()
    c.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
    return c


def capture(cameras: list[str], label: str = "", action: str = "capture", **kw: Any):
    p = sc.DictParam()
    p.values["action"].one_of_value.key = action
    if action == "record":
        dur = p.values["action"].one_of_value.values["record"].values["duration"]
        dur.double_value.value = kw.get("duration", 300.0)
    for cam in cameras:
        p.values["cameras"].list_value.values.add().string_value.value = cam
    p.values["label"].string_value.value = label
    return p


def cameras_of(http_port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/sources", timeout=10) as r:
        return [s["name"] for s in json.load(r)["sources"]]


def tick_until(c: RemoteClient, session: str, p, seen: Seen, timeout: float = 10.0, **kw) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        resp = c.tick(session, lease_resources=(), params=p, timeout=10, **kw)
        if resp.status != resp.STATUS_RUNNING:
            seen.add(f"tick {resp.Status.Name(resp.status)}: {resp.error_message}")
            return
        time.sleep(0.1)
    seen.add("tick still RUNNING")


def _guarded(seen: Seen, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as exc:  # every refusal is an outcome to report
        seen.error(exc)


# -- the rows --------------------------------------------------------------------------------


def row1(a: argparse.Namespace, seen: Seen) -> None:
    """5 ticks capturing every camera with a 3.9 MB label."""
    cams = cameras_of(a.http_port)
    with channel_to(a.mission_port, a.source) as addr:
        c = client(addr)
        for _ in range(5):

            def one() -> None:
                s = c.establish_session(lease_resources=(), timeout=10)
                tick_until(c, s, capture(cams, "x" * BIG_LABEL), seen, 30)
                c.teardown_session(s, timeout=10)

            _guarded(seen, one)


def row2(a: argparse.Namespace, seen: Seen) -> None:
    """256 concurrent 3.9 MB ticks, each on a session of its own (16 connections)."""
    cams = cameras_of(a.http_port)[:1]
    p = capture(cams, "y" * BIG_LABEL)
    with channel_to(a.mission_port, a.source) as addr:
        clients = [client(addr) for _ in range(16)]
        sessions: list[str] = []
        for i in range(256):
            try:
                sessions.append(clients[i % 16].establish_session(lease_resources=(), timeout=10))
            except Exception as exc:
                seen.error(exc)
                sessions.append("x" * 32)
        go = threading.Barrier(256)

        def one(i: int) -> None:
            c = clients[i % 16]
            go.wait()
            _guarded(seen, lambda: tick_until(c, sessions[i], p, seen, 30))

        with ThreadPoolExecutor(256) as pool:
            list(pool.map(one, range(256)))


def row3(a: argparse.Namespace, seen: Seen) -> None:
    """100 ticks, each recording every camera for 300 s; ticked for ``seconds``, then stopped."""
    cams = cameras_of(a.http_port)
    p = capture(cams, action="record", duration=300.0)
    with channel_to(a.mission_port, a.source) as addr:
        c = client(addr)
        sessions = []
        for _ in range(100):
            try:
                sessions.append(c.establish_session(lease_resources=(), timeout=10))
            except Exception as exc:
                seen.error(exc)
        end = time.monotonic() + a.seconds
        first = True
        while time.monotonic() < end:
            for s in sessions:
                if time.monotonic() >= end:
                    break
                try:
                    resp = c.tick(s, lease_resources=(), params=p, timeout=5)
                    if first or resp.status != resp.STATUS_RUNNING:
                        seen.add(f"tick {resp.Status.Name(resp.status)}: {resp.error_message}")
                except Exception as exc:
                    seen.error(exc)
            first = False
            time.sleep(1)
        for s in sessions:
            with contextlib.suppress(Exception):
                c.teardown_session(s, timeout=2)


def row4(a: argparse.Namespace, seen: Seen) -> None:
    """128 sessions looping a capture of every camera: Tick, Stop, Tick, Stop..."""
    cams = cameras_of(a.http_port)
    p = capture(cams)
    end = time.monotonic() + a.seconds
    with channel_to(a.mission_port, a.source) as addr:
        clients = [client(addr) for _ in range(8)]

        def loop(i: int) -> None:
            c = clients[i % 8]
            try:
                s = c.establish_session(lease_resources=(), timeout=10)
            except Exception as exc:
                seen.error(exc)
                return
            while time.monotonic() < end:
                try:
                    resp = c.tick(s, lease_resources=(), params=p, timeout=10)
                    seen.add(f"tick {resp.Status.Name(resp.status)}: {resp.error_message}")
                    c.stop(s, timeout=10)
                except Exception as exc:
                    seen.error(exc)
                    time.sleep(0.1)
            with contextlib.suppress(Exception):
                c.teardown_session(s, timeout=10)

        with ThreadPoolExecutor(128) as pool:
            list(pool.map(loop, range(128)))


def row5(a: argparse.Namespace, seen: Seen) -> None:
    """TeardownSession with every session id the captures listing shows, then 5,000
    EstablishSession calls."""
    with channel_to(a.mission_port, a.source) as addr:
        c = client(addr)
        try:
            url = f"http://127.0.0.1:{a.http_port}/api/captures"
            with urllib.request.urlopen(url, timeout=30) as r:
                listed = json.load(r)["captures"]
        except (OSError, ValueError) as exc:
            seen.error(exc)
            listed = []
        ids = {str(x["mission"].get("session", "")) for x in listed} - {""}
        seen.add(f"session values listed: {len(ids)}")
        for session in ids:
            try:
                c.teardown_session(session, timeout=10)
                seen.add("teardown of a listed session: OK")
            except Exception as exc:
                seen.error(exc)
        for _ in range(5000):
            try:
                c.establish_session(lease_resources=(), timeout=10)
                seen.add("session established")
            except Exception as exc:
                seen.error(exc)


def row6(a: argparse.Namespace, seen: Seen) -> None:
    """1,100 connections to the callback's port that never speak, held for ``seconds``."""
    held = []
    for i in range(1100):
        s = socket.socket()
        try:
            s.bind((f"127.0.0.{2 + i % 8}", 0))
            s.connect(("127.0.0.1", a.mission_port))
            held.append(s)
        except OSError as exc:
            seen.error(exc)
            s.close()
    seen.add(f"connections opened: {len(held)}")
    time.sleep(a.seconds)
    closed = 0
    for s in held:
        s.setblocking(False)
        try:
            while data := s.recv(1 << 16):  # what the server said (its settings), then?
                del data
            closed += 1  # the end of the stream: closed by the relay
        except BlockingIOError:
            pass  # still open
        except OSError:
            closed += 1
        s.close()
    seen.add(f"closed by the relay within {a.seconds:g} s: {closed}")


def row7(a: argparse.Namespace, seen: Seen) -> None:
    """8 zip downloads that stop reading, held for ``seconds``."""
    held = []
    for _ in range(8):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", a.http_port))
        s.sendall(b"GET /api/captures.zip?run=walk HTTP/1.1\r\nHost: a\r\n\r\n")
        held.append(s)
    time.sleep(a.seconds)
    dropped = 0
    for s in held:
        s.settimeout(0.5)
        try:
            while s.recv(1 << 20):
                pass
            dropped += 1
        except TimeoutError:
            pass
        except OSError:
            dropped += 1
        s.close()
    seen.add(f"stalled zips dropped by the relay: {dropped} of 8")


def row8(a: argparse.Namespace, seen: Seen) -> None:
    """A NaN duration, and NaN inputs."""
    cams = cameras_of(a.http_port)[:1]
    with channel_to(a.mission_port, a.source) as addr:
        c = client(addr)
        nan_input = util_pb2.KeyValue(key="reading")
        nan_input.value.constant.float_value = float("nan")

        def one() -> None:
            s = c.establish_session(lease_resources=(), timeout=10)
            p = capture(cams, action="record", duration=float("nan"))
            tick_until(c, s, p, seen, 10)
            c.stop(s, timeout=10)
            tick_until(c, s, capture(cams), seen, 10, inputs=[nan_input])
            c.teardown_session(s, timeout=10)

        _guarded(seen, one)


def row10(a: argparse.Namespace, seen: Seen) -> None:
    """12 loops fetching the whole listing (limit=10000; or every page where that is refused)."""

    def loop() -> None:
        end = time.monotonic() + a.seconds
        while time.monotonic() < end:
            after = ""
            try:
                while True:
                    url = f"http://127.0.0.1:{a.http_port}/api/captures?limit=10000{after}"
                    try:
                        with urllib.request.urlopen(url, timeout=30) as r:
                            body = json.load(r)
                    except urllib.error.HTTPError as err:
                        if err.code != 400:
                            raise
                        url = url.replace("limit=10000", "limit=1000")
                        with urllib.request.urlopen(url, timeout=30) as r:
                            body = json.load(r)
                    if not body.get("next"):
                        break
                    after = "&after=" + body["next"]
                seen.add("listing fetched whole")
            except (OSError, ValueError) as exc:
                seen.error(exc)

    threads = [threading.Thread(target=loop) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def row11(a: argparse.Namespace, seen: Seen) -> None:
    """Nothing over the network: the bench itself swaps a listed file for a link afterwards."""
    seen.add("(the link is planted by the bench)")


ROWS = {"1": row1, "2": row2, "3": row3, "4": row4, "5": row5, "6": row6, "7": row7, "8": row8}
ROWS["10"], ROWS["11"] = row10, row11


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("row", choices=sorted(ROWS))
    parser.add_argument("--mission-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--source", default=None)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--nice", type=int, default=10)
    a = parser.parse_args(argv)
    os.nice(a.nice)
    seen = Seen()
    started = time.monotonic()
    ROWS[a.row](a, seen)
    print(json.dumps({"took": round(time.monotonic() - started, 1), "seen": dict(seen.counts)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
