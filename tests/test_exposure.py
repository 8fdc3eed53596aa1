"""The relay process against hostile and careless clients, end to end: no secret in any log line at
any level, no 500 from any request, slow and silent connections closed, descriptors running out
without a flood of log lines."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from tests.mjpeg import parts
from tests.procs import cpu_seconds
from tests.relay import Relay
from tests.wait import wait_until

pytestmark = pytest.mark.e2e
PASSWORD = "MARKER-pw-7d1f0c"
PAYLOAD_SECRET = "MARKER-payload-93ab2e"
TOKEN = "MARKER-token-5e8a41"


@pytest.fixture(scope="module")
def marked_sim(module_robots):
    return module_robots(password=PASSWORD, payload_secret=PAYLOAD_SECRET)


def raw(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are; the status line of the answer (or b'' if the relay hung up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        try:
            return sock.recv(4096).split(b"\r\n", 1)[0]
        except OSError:
            return b""


@pytest.mark.parametrize("payload", [False, True], ids=["user login", "payload login"])
def test_no_secret_reaches_the_log_at_debug(marked_sim, payload):
    sim = marked_sim
    r = Relay.for_sim(sim, "--log-level", "DEBUG", "--token", TOKEN, payload=payload)
    try:
        r.wait_ready()
        # streams and snapshots, with the token in the query as players send it
        next(parts(r.url + f"/stream/back_fisheye_image?token={TOKEN}"))
        assert r.get(f"/snapshot/back_depth?width=100&token={TOKEN}")[0] == 200
        # malformed requests carrying the token: a bad byte, an overlong line, bad headers
        raw(r.port, f"GET /stream/x?token={TOKEN}\x01 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        long_url = f"/api/sources?token={TOKEN}&pad={'a' * 9000}"
        raw(r.port, f"GET {long_url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        raw(r.port, f"GET /?token={TOKEN} HTTP/1.1\r\nHost x\r\n\r\n".encode())
        bad_bearer = b"GET /api/state HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n"
        assert raw(r.port, bad_bearer).startswith(b"HTTP/1.1 401")
        # expired tokens: a new login, with the secrets, and the streams go on
        logins = r.log().count("connected to robot")
        sim.expire_tokens()
        wait_until(lambda: r.log().count("connected to robot") > logins, 15, "a new login")
        assert "UnauthenticatedError" in r.log()
        # the new login serves new pictures, not the last one from before it
        stream = parts(r.url + f"/stream/back_depth?width=212&token={TOKEN}")
        first, second = next(stream), next(stream)
        stream.close()
        assert second.body.startswith(b"\xff\xd8") and second.timestamp > first.timestamp
        if not payload:  # once is enough: the way back keeps the login (no new secret used)
            losses = r.log().count("lost robot")
            sim.set_available(False)
            wait_until(lambda: r.log().count("lost robot") > losses, 15, "the robot lost")
            sim.set_available(True)
            r.wait_ready(30)
    finally:
        sim.clear_faults()
        r.stop()
    log = r.log()
    # it logged, at DEBUG, everything above: the logins, the loss and return, the bad requests
    assert "DEBUG" in log and log.count("connected to robot") >= 2
    assert payload or ("lost robot" in log and "answers again" in log)
    assert "bad HTTP request" in log
    for marker in (PASSWORD, PAYLOAD_SECRET, TOKEN, *sim.issued):
        assert marker not in log, f"{marker[:12]}... in the log"
    assert "Traceback" not in log


def test_no_request_gets_a_500(relay):
    requests = [
        b"GET /api/state HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xc3\xa9\xff\r\n\r\n",
        b"GET /stream/back_fisheye_image?width=%FF%FE HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /stream/%00%ff HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /snapshot/back_depth?width=99999999999999999999 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /stream/back_depth HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /ws/back_depth HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
        b"BREW /coffee HTCPCP/1.0\r\n\r\n",
    ]
    for request in requests:
        status = raw(relay.port, request)
        assert status and b" 500 " not in status, (request, status)
    # the router's own errors are JSON like every other
    for method, path, code in (("GET", "/nope", 404), ("POST", "/healthz", 405)):
        conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=5)
        conn.request(method, path)
        resp = conn.getresponse()
        assert resp.status == code and resp.getheader("Content-Type").startswith("application/json")
        assert json.loads(resp.read())["error"]
        conn.close()


def test_head_of_a_stream_is_headers_only(relay):
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=5)
    conn.request("HEAD", "/stream/back_fisheye_image")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("multipart/")
    assert resp.read() == b"" and time.monotonic() - start < 2
    conn.close()


@pytest.fixture(scope="module")
def strict_relay(sim):
    r = Relay.for_sim(sim, "--idle-timeout", "1", "--client-timeout", "1.5").wait_ready()
    yield r
    r.stop()


def test_slow_headers_and_idle_connections_are_closed(strict_relay):
    port = strict_relay.port
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    idle = socket.create_connection(("127.0.0.1", port))  # says nothing at all
    start = time.monotonic()
    for sock in (slow, idle):
        sock.settimeout(5)
        assert sock.recv(100) == b""  # hung up by the relay
        sock.close()
    assert time.monotonic() - start < 3


def test_a_viewer_that_stops_reading_is_dropped(strict_relay):
    r = strict_relay
    before = r.metric("spotrelay_clients_dropped_total", reason="stalled")
    silent = socket.create_connection(("127.0.0.1", r.port))
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    silent.sendall(b"GET /stream/hand_color_image HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        wait_until(lambda: r.json("/api/sources") and _viewers(r, "hand_color_image") == 1, 5)
        wait_until(lambda: _viewers(r, "hand_color_image") == 0, 20, "the silent viewer dropped")
        assert r.metric("spotrelay_clients_dropped_total", reason="stalled") == before + 1
    finally:
        silent.close()


def _viewers(r: Relay, source: str) -> int:
    return next(s["clients"] for s in r.json("/api/sources")["sources"] if s["name"] == source)


def test_out_of_descriptors_the_log_stays_short_and_the_relay_recovers(sim):
    r = Relay.for_sim(sim, "--idle-timeout", "2", nofile=96).wait_ready()
    socks = []
    try:
        for _ in range(150):  # more than the relay has descriptors for
            try:
                socks.append(socket.create_connection(("127.0.0.1", r.port), timeout=2))
            except OSError:
                break
        cpu, t = cpu_seconds(r.proc.pid), time.monotonic()
        wait_until(lambda: time.monotonic() > t + 2, what="two seconds out of descriptors")
        busy = (cpu_seconds(r.proc.pid) - cpu) / (time.monotonic() - t)
        for s in socks:
            s.close()
        wait_until(lambda: r.get("/healthz", timeout=2)[0] == 200, 15, "the relay answering")
    finally:
        for s in socks:
            s.close()
        r.stop()
    log = r.log()
    assert "cannot accept connections" in log  # it did run out
    assert len(log.splitlines()) < 20 and "Traceback" not in log, log[-2000:]
    assert busy < 0.3, f"{busy:.0%} of a core while out of descriptors"
