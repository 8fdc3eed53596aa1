"""Hostile and careless clients, in-process: every bound holds (clients, renderings, snapshots,
stalled viewers), pages from elsewhere are refused, logs carry no secret and do not flood, and a
background task that fails is restarted."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from aiohttp import http_exceptions

from spotrelay import logs
from spotrelay.metrics import Metrics
from spotrelay.process import supervise
from spotrelay.robot import session
from spotrelay.slots import Slots
from tests.inproc import GatedExecutor, counted, make_frame, relay_app
from tests.wait import async_wait_until

SECRET = "Hunter2-correct-horse"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyIn0.c2lnbmF0dXJlLWJ5dGVz"


REFUSED = "spotrelay_requests_refused_total"


def run(coro):
    return asyncio.run(coro)


# -- logs -----------------------------------------------------------------------------------------


def record(
    msg: str, *args, exc: BaseException | None = None, name="spotrelay"
) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc else None
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, exc_info)


def test_known_secrets_and_token_shapes_are_masked_everywhere():
    redactor = logs.Redactor([SECRET, None, ""])
    redactor.add("robot-issued-user-token")
    for text in (
        f"login with {SECRET} failed",
        f"GET /stream/x?width=3&token={SECRET[::-1]}&q=1",
        f"authorization: Bearer {JWT}",
        f"metadata: {JWT}",
        "password=swordfish&user=u",
        "token robot-issued-user-token expired",
    ):
        rec = record("%s", text)
        redactor.filter(rec)
        out = rec.getMessage()
        assert SECRET not in out and JWT not in out and "swordfish" not in out, out
        assert "robot-issued-user-token" not in out and SECRET[::-1] not in out, out
        assert logs.MASK in out
    try:
        raise ValueError(f"bad login {SECRET}")
    except ValueError as exc:
        rec = record("failed", exc=exc)
    redactor.filter(rec)
    assert SECRET not in logging.Formatter().format(rec)


def test_an_unparsable_request_is_one_line_without_the_request():
    exc = http_exceptions.BadHttpMessage(f"Bad status line 'GET /x?token={SECRET} HTTP/1.1'")
    rec = record("Error handling request", exc=exc, name="aiohttp.server")
    logs.BadRequestLine().filter(rec)
    text = logging.Formatter().format(rec)
    assert SECRET not in text and "token" not in text and "\n" not in text
    assert "BadHttpMessage" in text and rec.levelno == logging.INFO


def test_a_flood_of_one_failure_is_a_few_lines_and_a_count():
    repeats = logs.Repeats(every=60, burst=5)
    kept = [repeats.filter(record("accept failed: %s", i)) for i in range(1000)]
    assert sum(kept) == 5  # rare events are all seen; a flood is cut short
    repeats.every = 0
    last = record("accept failed: %s", 1000)
    assert repeats.filter(last) and "995 more" in last.getMessage()


# -- bounds -----------------------------------------------------------------------------------


def test_past_max_clients_a_503_but_health_and_metrics_always_answer():
    async def scenario():
        async with relay_app(max_clients=2) as (client, hub, metrics):
            streams = [await client.get("/stream/back_fisheye_image") for _ in range(2)]
            await async_wait_until(lambda: len(hub.viewers()) == 2)
            resp = await client.get("/stream/back_depth")
            assert resp.status == 503 and "--max-clients" in (await resp.json())["error"]
            assert (await client.get("/api/sources")).status == 503
            assert (await client.get("/healthz")).status == 200
            assert (await client.get("/metrics")).status == 200
            assert counted(metrics, REFUSED, reason="max_clients") == 2
            for s in streams:
                s.close()
            await async_wait_until(lambda: not hub.viewers())
            assert (await client.get("/api/sources")).status == 200

    run(scenario())


def test_past_max_variants_a_503_naming_the_renderings_served():
    async def scenario():
        async with relay_app(max_variants=2) as (client, hub, metrics):
            kept = [await client.get(f"/stream/back_fisheye_image?quality={q}") for q in (50, 60)]
            await async_wait_until(lambda: len(hub.viewers()) == 2)
            resp = await client.get("/stream/back_fisheye_image?quality=70")
            data = await resp.json()
            assert resp.status == 503 and {v["quality"] for v in data["served"]} == {50, 60}
            same = await client.get("/stream/back_fisheye_image?quality=60")  # shares one
            assert same.status == 200
            other_camera = await client.get("/stream/back_depth?width=100")
            assert other_camera.status == 200  # the cap is per camera
            assert counted(metrics, REFUSED, reason="max_variants") == 1
            for r in [*kept, same, other_camera]:
                r.close()

    run(scenario())


def test_a_snapshot_flood_waits_on_its_own_renderer_and_streams_go_on():
    async def scenario():
        renderer = GatedExecutor(open_=False)
        async with relay_app(snapshot_executor=renderer) as (client, hub, metrics):
            stream = await client.get("/stream/back_fisheye_image?width=320")
            floods = [
                asyncio.ensure_future(client.get("/snapshot/back_fisheye_image?width=100"))
                for _ in range(12)
            ]
            refused = await async_wait_until(
                lambda: counted(metrics, REFUSED, reason="snapshots_busy") >= 4,
                what="snapshots past the queue refused",
            )
            assert refused
            # streams render on their own pool: new frames keep coming while snapshots wait
            for seq in range(2, 6):
                hub.publish(make_frame("back_fisheye_image", seq))
                await async_wait_until(
                    lambda s=seq: any(
                        c.frames_sent >= s - 1 for c in hub.viewers() if c.kind == "mjpeg"
                    ),
                    what=f"frame {seq} streamed",
                )
            renderer.gate.set()
            statuses = sorted([(await f).status for f in floods])
            assert statuses.count(200) == 8 and statuses.count(503) == 4
            stream.close()

    run(scenario())


def _stalled_socket(port: int, path: str, upgrade: bool = False) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    extra = ""
    if upgrade:
        extra = (
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        )
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    return sock


@pytest.mark.parametrize(("path", "upgrade"), [("/stream/", False), ("/ws/", True)])
def test_a_viewer_that_never_reads_is_dropped_and_counted(path, upgrade):
    async def scenario():
        async with relay_app(client_timeout=0.5) as (client, hub, metrics):
            sock = _stalled_socket(client.port, path + "back_fisheye_image", upgrade)
            try:
                await async_wait_until(lambda: hub.viewers(), what="the viewer registered")
                seq = 1
                while hub.viewers():  # frames keep coming; its buffers fill, then it is dropped
                    seq += 1
                    hub.publish(make_frame("back_fisheye_image", seq, noise=True))
                    await asyncio.sleep(0.01)
                    assert seq < 1000, "never dropped"
                assert hub.watched("back_fisheye_image") == 0  # its camera is idle again
                assert counted(metrics, "spotrelay_clients_dropped_total", reason="stalled") == 1
            finally:
                sock.close()

    run(scenario())


def test_websockets_from_other_origins_are_refused_unless_allowed():
    async def scenario():
        async with relay_app() as (client, _, _):
            evil = {"Origin": "http://evil.example"}
            resp = await client.get("/ws/back_fisheye_image", headers={**evil, **_UPGRADE})
            assert resp.status == 403 and "allow-origin" in (await resp.json())["error"]
            own = {"Origin": f"http://{client.host}:{client.port}"}
            async with client.ws_connect("/ws/back_fisheye_image", headers=own) as ws:
                assert (await ws.receive(timeout=5)).type.name == "TEXT"
            plain = await client.get("/api/sources")
            assert "Access-Control-Allow-Origin" not in plain.headers
        async with relay_app(allow_origin="http://dash.example") as (client, _, _):
            ok = {"Origin": "http://dash.example"}
            async with client.ws_connect("/ws/back_fisheye_image", headers=ok) as ws:
                assert (await ws.receive(timeout=5)).type.name == "TEXT"
            resp = await client.get("/api/sources")
            assert resp.headers["Access-Control-Allow-Origin"] == "http://dash.example"

    run(scenario())


_UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def test_viewer_addresses_are_only_shown_behind_the_token():
    async def scenario():
        for token in (None, "t"):
            async with relay_app(token=token) as (client, hub, _):
                q = "?token=t" if token else ""
                stream = await client.get(f"/stream/back_fisheye_image{q}")
                await async_wait_until(lambda h=hub: h.viewers())
                state = await (await client.get(f"/api/state{q}")).json()
                assert ("peer" in state["clients"][0]) is bool(token)
                stream.close()

    run(scenario())


def test_a_background_task_that_fails_is_logged_counted_and_restarted(caplog):
    async def scenario() -> int:
        metrics = Metrics()
        calls = 0

        async def flaky() -> None:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise RuntimeError("unexpected")

        restarted = metrics.task_restarts.labels
        await supervise("connection", flaky, lambda task: restarted(task=task).inc(), pause=0.0)
        assert (
            metrics.registry.get_sample_value(
                "spotrelay_task_restarts_total", {"task": "connection"}
            )
            == 2
        )
        return calls

    with caplog.at_level(logging.ERROR, logger="spotrelay"):
        assert run(scenario()) == 3
    assert sum("restarting" in r.getMessage() for r in caplog.records) == 2
    assert all(r.exc_info for r in caplog.records)


def test_sdk_loggers_are_not_the_relays():
    """The SDK object's logger sits under bosdyn (pinned at WARNING), not under spotrelay."""
    redactor = logs.setup("DEBUG")
    try:
        assert logging.getLogger(logs.SDK_LOGGER).getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("spotrelay").getEffectiveLevel() == logging.DEBUG
        assert isinstance(redactor, logs.Redactor)
    finally:
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        root.setLevel(logging.WARNING)
        logging.getLogger("bosdyn").setLevel(logging.NOTSET)
    assert session.SDK_LOGGER == logs.SDK_LOGGER  # the name the session gives the SDK


def test_one_address_cannot_take_every_client_slot():
    """Non-reading streams from one host hold at most their share of --max-clients; another
    host still gets in (several 127.0.0.x addresses stand for several hosts)."""

    async def scenario():
        async with relay_app(max_clients=6, max_clients_per_host=3) as (client, hub, metrics):
            host, port = client.server.host, client.server.port
            held = []
            for _ in range(3):
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=("127.0.0.2", 0)
                )
                writer.write(b"GET /stream/back_fisheye_image HTTP/1.1\r\nHost: x\r\n\r\n")
                held.append((reader, writer))
                assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            await async_wait_until(lambda: len(hub.viewers()) == 3)
            reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
            writer.write(b"GET /api/sources HTTP/1.1\r\nHost: x\r\n\r\n")
            refused = await reader.read(4096)
            writer.close()
            other = await asyncio.open_connection(host, port, local_addr=("127.0.0.3", 0))
            other[1].write(b"GET /api/sources HTTP/1.1\r\nHost: x\r\n\r\n")
            served = await other[0].readline()
            other[1].close()
            for _, w in held:
                w.close()
            return refused, served, counted(metrics, REFUSED, reason="max_clients_per_host")

    refused, served, counted_ = run(scenario())
    assert refused.startswith(b"HTTP/1.1 503") and b"--max-clients-per-host" in refused, refused
    assert served.startswith(b"HTTP/1.1 200"), served
    assert counted_ == 1


def test_slots_bound_the_total_and_each_host():
    slots = Slots(total=4, per_host=2)
    assert [slots.take("a"), slots.take("a"), slots.take("a")] == [
        None,
        None,
        "max_clients_per_host",
    ]
    assert [slots.take("b"), slots.take("b"), slots.take("c")] == [None, None, "max_clients"]
    slots.give("a")
    assert slots.take("c") is None and slots.busy == 4
