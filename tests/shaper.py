"""A slow shared link on loopback, in user space (no root): a TCP proxy whose server-to-client
direction drains every connection through ONE token bucket, as viewers behind the robot's Wi-Fi
share one radio link.

What makes it behave like a real bottleneck rather than a rate limiter in front of a big buffer:

* Backpressure, not buffering. Bytes are read from the upstream (the relay) only while that
  connection's queue here is below ``queue_bytes`` (one quantum), and the upstream socket's
  SO_RCVBUF is small, so the relay's TCP is acknowledged at the drain rate and its own send
  buffer fills, exactly where a relay can see (and must manage) the queue. A proxy that read
  eagerly would hide the queue in its own memory and the relay could never do better.
* Fair sharing. ``discipline="fair"`` (the default) serves the connections that have data round
  robin, ``quantum`` bytes (1500, one Ethernet frame) a turn: a per-flow fair queue like fq /
  fq_codel, the default qdisc of most Linux distributions and what Linux's Wi-Fi stack uses for
  its transmit queues. Each of three backlogged viewers gets a third of the link; a viewer that
  needs less gets what it needs and does not wait behind the others' bursts.
  ``discipline="fifo"`` serves bytes in the order they were read instead, from one queue shared
  by every connection and bounded at ``fifo_bytes`` (50 ms of the link, like the tbf link that
  tests/netlink.py makes; no connection may take more than an equal share of it).
* Small buffers. Whatever sits in the upstream socket's receive buffer is acknowledged to the
  relay already, so it is a queue the relay cannot see: with 4 KB (BUFFER) about 4.5 KB a
  connection waits behind the bucket (proxy queue included; ``queued()`` measures it), with
  16 KB about 20 KB, which on a 2 Mbit/s link shared by eleven viewers is most of a second per
  viewer. The cost of so small a window: the relay's TCP sends 2 KB segments instead of 8 KB,
  so its 512 KB send buffer holds ~25 % fewer payload bytes (Send-Q ~360 KB instead of ~470 KB)
  and today's queue shows as ~1.2 s instead of ~1.4 s. The downstream (client) socket's
  SO_SNDBUF is as small, so a client that stops reading stops only its own share.
* Optional one-way ``delay``, applied to both directions (a delay line after the bucket, and
  before the upstream write). The client-to-server direction is not rate limited.

The proxy runs an asyncio loop in a thread of its own on raw non-blocking sockets (readers and
writers, no streams), so the clients being measured in other threads or processes do not slow
the link down, and the few syscalls per quantum stay cheap. ``stats()`` tells the bytes forwarded
per connection, and how many sit queued (in the proxy and in its upstream receive buffers).

    with Shaper("127.0.0.1", relay_port, mbit=10) as link:
        urlopen(f"http://127.0.0.1:{link.port}/stream/...")
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import itertools
import socket
import termios
import threading
import time
from dataclasses import dataclass, field
from typing import Any

QUANTUM = 1500  # bytes a connection may send per round-robin turn: one Ethernet frame
BUFFER = 4 * 1024  # SO_RCVBUF upstream / SO_SNDBUF downstream; the kernel doubles it
_READ = 64 * 1024  # largest single read (client to server direction, and FIFO fills)
_AGAIN = (BlockingIOError, InterruptedError)


def bucket_bytes(mbit: float) -> int:
    """The token bucket's depth: two quanta or 4 ms of the link, whichever is larger. Deep
    enough that a late timer tick (two busy cores) does not cost link rate, shallow enough that
    the link never bursts much above its rate (tests/netlink.py gives tbf the same burst)."""
    return max(2 * QUANTUM, int(mbit * 1e6 / 8 * 0.004))


def fifo_queue_bytes(mbit: float) -> int:
    """The shared FIFO's bound: 50 ms of the link, like ``tbf ... latency 50ms``."""
    return max(2 * QUANTUM, int(mbit * 1e6 / 8 * 0.050))


@dataclass
class ConnStats:
    """What crossed the link for one connection (bytes on the wire: headers and framing too)."""

    id: int
    client: str  # the client's address as the proxy saw it, "host:port"
    opened: float  # epoch seconds
    closed: float | None = None
    down_bytes: int = 0  # server -> client, delivered to the client's socket
    up_bytes: int = 0  # client -> server


@dataclass
class _Conn:
    stats: ConnStats
    down: socket.socket  # the accepted client
    up: socket.socket  # to the upstream server
    queue: bytearray = field(default_factory=bytearray)  # server bytes waiting for tokens
    out: bytearray = field(default_factory=bytearray)  # due for the client, not yet taken
    up_out: bytearray = field(default_factory=bytearray)  # due for the server, not yet taken
    connected: bool = False
    up_eof: bool = False  # the server closed: close the client once everything is delivered
    reading_up: bool = False
    writing_down: bool = False
    writing_up: bool = False
    active: bool = False  # in the round-robin list
    in_flight: int = 0  # bytes in the delay line towards the client
    closed: bool = False


class _DelayLine:
    """Items delivered ``delay`` seconds after they were put in, in order (a constant delay keeps
    arrival order, so one deque and one timer suffice)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, deliver) -> None:
        self.loop, self.delay, self.deliver = loop, delay, deliver
        self.items: collections.deque[tuple[float, _Conn, bytes]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None

    def put(self, conn: _Conn, data: bytes) -> None:
        self.items.append((time.monotonic() + self.delay, conn, data))
        if self.timer is None:
            self.timer = self.loop.call_at(self._loop_time(self.items[0][0]), self._fire)

    def _loop_time(self, due: float) -> float:
        return self.loop.time() + max(0.0, due - time.monotonic())

    def _fire(self) -> None:
        self.timer = None
        now = time.monotonic()
        while self.items and self.items[0][0] <= now:
            _, conn, data = self.items.popleft()
            self.deliver(conn, data)
        if self.items:
            self.timer = self.loop.call_at(self._loop_time(self.items[0][0]), self._fire)


class Shaper:
    """A shaped TCP link from 127.0.0.1:``port`` to ``upstream_host:upstream_port``.

    ``mbit`` is the server-to-client rate shared by every connection; ``delay`` the one-way delay
    in seconds, both directions; ``buffer_bytes`` the SO_RCVBUF of upstream sockets and
    SO_SNDBUF of client sockets; ``discipline`` "fair" (round robin in ``quantum`` bytes) or
    "fifo" (one shared queue of ``fifo_bytes``, by default 50 ms of the link).
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        mbit: float,
        delay: float = 0.0,
        buffer_bytes: int = BUFFER,
        *,
        discipline: str = "fair",
        quantum: int = QUANTUM,
        queue_bytes: int = QUANTUM,
        fifo_bytes: int | None = None,
        burst_bytes: int | None = None,
    ) -> None:
        if mbit <= 0:
            raise ValueError("mbit must be positive")
        if discipline not in ("fair", "fifo"):
            raise ValueError(f"discipline must be 'fair' or 'fifo', not {discipline!r}")
        self.upstream = (upstream_host, upstream_port)
        self.mbit, self.delay, self.buffer_bytes = mbit, delay, buffer_bytes
        self.discipline, self.quantum, self.queue_bytes = discipline, quantum, queue_bytes
        self.fifo_bytes = fifo_bytes or fifo_queue_bytes(mbit)
        self.rate = mbit * 1e6 / 8  # bytes per second
        self.burst = max(burst_bytes or bucket_bytes(mbit), quantum)
        self.port = 0
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._conns: dict[int, _Conn] = {}
        self._history: list[ConnStats] = []
        self._ids = itertools.count(1)
        self._active: collections.deque[_Conn] = collections.deque()  # fair: round robin
        self._fifo: collections.deque[list[Any]] = collections.deque()  # fifo: [conn, n] runs
        self._fifo_total = 0
        self._tokens = float(self.burst)
        self._refilled = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._scheduled = False
        self._down_line: _DelayLine | None = None
        self._up_line: _DelayLine | None = None
        self._stopping = False

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> Shaper:
        """Listen on an ephemeral port of 127.0.0.1 and serve from a thread of our own."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.setblocking(False)
        self._listener, self.port = listener, listener.getsockname()[1]
        loop = self._loop = asyncio.new_event_loop()
        if self.delay > 0:
            self._down_line = _DelayLine(loop, self.delay, self._arrive_down)
            self._up_line = _DelayLine(loop, self.delay, self._arrive_up)
        loop.add_reader(listener, self._accept)
        self._thread = threading.Thread(target=loop.run_forever, name="shaper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every socket (listener and both sides of each connection) and end the thread.
        Stopping twice is fine."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or self._stopping:
            return
        self._stopping = True
        if thread.is_alive():

            def shutdown() -> None:
                self._close_all()
                loop.stop()

            loop.call_soon_threadsafe(shutdown)
            thread.join(10)
        if thread.is_alive():
            raise RuntimeError("shaper thread did not stop")
        self._close_all()  # a no-op unless the loop had ended already
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Shaper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- what it measured ------------------------------------------------------------------------

    def stats(self) -> list[ConnStats]:
        """Every connection so far, open or closed, in accept order (copies: safe from any
        thread; the counters are ints the loop thread updates under the GIL)."""
        conns = list(self._history)
        return [ConnStats(**vars(c)) for c in conns]

    def down_bytes(self) -> int:
        """Server-to-client bytes delivered so far, every connection together."""
        return sum(c.down_bytes for c in list(self._history))

    def queued(self) -> int:
        """Server bytes between the relay's socket and the client right now: the proxy's own
        queues plus what the kernel holds in the upstream sockets' receive buffers (acknowledged
        to the relay already, so invisible to it; small buffers keep this small)."""
        total = 0
        for conn in list(self._conns.values()):
            total += len(conn.queue) + len(conn.out) + conn.in_flight
            with contextlib.suppress(OSError, ValueError):
                buf = bytearray(4)
                fcntl.ioctl(conn.up.fileno(), termios.FIONREAD, buf)
                total += int.from_bytes(buf, "little")
        return total

    # -- connections -----------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        while True:
            try:
                down, addr = self._listener.accept()
            except _AGAIN:
                return
            except OSError:
                return
            down.setblocking(False)
            down.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            down.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.buffer_bytes)
            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # Before connect, so the window it advertises (and its scale) is small from the start.
            up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.buffer_bytes)
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up.setblocking(False)
            stats = ConnStats(next(self._ids), f"{addr[0]}:{addr[1]}", time.time())
            conn = _Conn(stats, down, up)
            self._conns[stats.id] = conn
            self._history.append(stats)
            err = up.connect_ex(self.upstream)
            if err not in (0, errno.EINPROGRESS):
                self._close(conn)
                continue
            self._loop.add_writer(up, self._connected, conn)

    def _connected(self, conn: _Conn) -> None:
        assert self._loop is not None
        self._loop.remove_writer(conn.up)
        if conn.up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._close(conn)
            return
        conn.connected = True
        self._loop.add_reader(conn.down, self._read_down, conn)
        self._want_up(conn)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.stats.closed = time.time()
        self._conns.pop(conn.stats.id, None)
        loop = self._loop
        for sock in (conn.down, conn.up):
            if loop is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(sock)
                with contextlib.suppress(Exception):
                    loop.remove_writer(sock)
            sock.close()
        conn.queue.clear()
        conn.out.clear()
        conn.up_out.clear()
        if conn.active:
            conn.active = False
            with contextlib.suppress(ValueError):
                self._active.remove(conn)
        if self._fifo_total:
            kept = [run for run in self._fifo if run[0] is not conn]
            self._fifo = collections.deque(kept)
            self._fifo_total = sum(run[1] for run in kept)

    def _close_all(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn)
        if self._timer is not None:
            self._timer.cancel()
        for line in (self._down_line, self._up_line):
            if line is not None and line.timer is not None:
                line.timer.cancel()
        if self._listener is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._listener)
            self._listener.close()
            self._listener = None

    # -- server to client: shaped ----------------------------------------------------------------

    def _room(self, conn: _Conn) -> int:
        """How many more bytes may be read from this connection's server now. FIFO: room in the
        shared queue, but no connection more than an equal share of it, as TCP's congestion
        control shares a drop-tail queue on average (without the cap, whichever socket the loop
        polls first would fill the queue every time and starve the others)."""
        if self.discipline == "fifo":
            senders = sum(1 for c in self._conns.values() if c.connected and not c.up_eof)
            share = self.fifo_bytes // max(1, senders)
            return min(self.fifo_bytes - self._fifo_total, share - len(conn.queue))
        return self.queue_bytes - len(conn.queue)

    def _want_up(self, conn: _Conn) -> None:
        """Read from the server while there is room: the only place the relay's bytes enter."""
        if self._loop is None or conn.closed or conn.up_eof or not conn.connected:
            return
        if self.discipline == "fifo":
            for other in list(self._conns.values()):
                self._set_reading(other, self._room(other) > 0)
        else:
            self._set_reading(conn, self._room(conn) > 0)

    def _set_reading(self, conn: _Conn, on: bool) -> None:
        assert self._loop is not None
        on = on and conn.connected and not conn.up_eof and not conn.closed
        if on and not conn.reading_up:
            self._loop.add_reader(conn.up, self._read_up, conn)
        elif not on and conn.reading_up:
            self._loop.remove_reader(conn.up)
        conn.reading_up = on

    def _read_up(self, conn: _Conn) -> None:
        room = self._room(conn)
        if room <= 0:
            self._want_up(conn)
            return
        try:
            data = conn.up.recv(min(room, _READ))
        except _AGAIN:
            return
        except OSError:
            data = b""
        if not data:
            conn.up_eof = True
            self._set_reading(conn, False)
            self._maybe_finish(conn)
            return
        conn.queue += data
        if self.discipline == "fifo":
            self._fifo.append([conn, len(data)])
            self._fifo_total += len(data)
        self._want_up(conn)
        self._make_active(conn)

    def _eligible(self, conn: _Conn) -> bool:
        """Has bytes waiting and a client that takes them (a full client socket pauses only its
        own connection: the link goes on serving the others)."""
        return bool(conn.queue) and not conn.out and not conn.closed

    def _make_active(self, conn: _Conn) -> None:
        if self.discipline == "fair" and not conn.active and self._eligible(conn):
            conn.active = True
            self._active.append(conn)
        self._schedule(0.0)

    def _schedule(self, after: float) -> None:
        if self._loop is None or self._scheduled or self._stopping:
            return
        self._scheduled = True
        if after <= 0:
            self._loop.call_soon(self._drain)
        else:
            self._timer = self._loop.call_later(after, self._drain)

    def _drain(self) -> None:
        """Spend the tokens earned since the last call on the next bytes of the discipline."""
        self._scheduled, self._timer = False, None
        if self._stopping:
            return
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        while True:
            picked = self._next_chunk()
            if picked is None:
                return
            conn, n = picked
            if self._tokens < n:
                self._schedule((n - self._tokens) / self.rate)
                return
            self._tokens -= n
            self._take(conn, n)

    def _next_chunk(self) -> tuple[_Conn, int] | None:
        """(connection, bytes) to send next, without taking them; None if nothing is eligible."""
        if self.discipline == "fifo":
            while self._fifo:
                conn, n = self._fifo[0]
                if not conn.closed:
                    if conn.out:  # head of line blocked by a client that does not read
                        return None
                    return conn, min(n, self.quantum)
                self._fifo.popleft()
            return None
        while self._active:
            conn = self._active[0]
            if self._eligible(conn):
                return conn, min(self.quantum, len(conn.queue))
            self._active.popleft()
            conn.active = False
        return None

    def _take(self, conn: _Conn, n: int) -> None:
        chunk = bytes(conn.queue[:n])
        del conn.queue[:n]
        if self.discipline == "fifo":
            run = self._fifo[0]
            run[1] -= n
            self._fifo_total -= n
            if run[1] == 0:
                self._fifo.popleft()
        else:
            self._active.rotate(-1)  # its turn is over; the next connection goes first
            if not self._eligible(conn):
                self._active.remove(conn)
                conn.active = False
        if self._down_line is not None:
            conn.in_flight += n
            self._down_line.put(conn, chunk)
        else:
            self._arrive_down(conn, chunk)
        self._want_up(conn)

    def _arrive_down(self, conn: _Conn, chunk: bytes) -> None:
        """The chunk reaches the client's end of the link (after the delay, if any)."""
        if self._down_line is not None:
            conn.in_flight -= len(chunk)
        if conn.closed:
            return
        conn.out += chunk
        self._write_down(conn)

    def _write_down(self, conn: _Conn) -> None:
        assert self._loop is not None
        try:
            while conn.out:
                sent = conn.down.send(conn.out)
                conn.stats.down_bytes += sent
                del conn.out[:sent]
        except _AGAIN:
            pass
        except OSError:
            self._close(conn)
            return
        if conn.out and not conn.writing_down:
            self._loop.add_writer(conn.down, self._write_down, conn)
            conn.writing_down = True
        elif not conn.out:
            if conn.writing_down:
                self._loop.remove_writer(conn.down)
                conn.writing_down = False
            self._make_active(conn)
            self._maybe_finish(conn)

    def _maybe_finish(self, conn: _Conn) -> None:
        """The server has closed and every byte it sent has been delivered: close the client."""
        if conn.up_eof and not conn.queue and not conn.out and not conn.in_flight:
            self._close(conn)

    # -- client to server: not shaped, only delayed ----------------------------------------------

    def _read_down(self, conn: _Conn) -> None:
        try:
            data = conn.down.recv(_READ)
        except _AGAIN:
            return
        except OSError:
            data = b""
        if not data:  # the client hung up: nobody is left to deliver to
            self._close(conn)
            return
        conn.stats.up_bytes += len(data)
        if self._up_line is not None:
            self._up_line.put(conn, data)
        else:
            self._arrive_up(conn, data)

    def _arrive_up(self, conn: _Conn, data: bytes) -> None:
        if conn.closed:
            return
        conn.up_out += data
        self._write_up(conn)

    def _write_up(self, conn: _Conn) -> None:
        assert self._loop is not None
        try:
            while conn.up_out:
                sent = conn.up.send(conn.up_out)
                del conn.up_out[:sent]
        except _AGAIN:
            pass
        except OSError:
            self._close(conn)
            return
        if conn.up_out and not conn.writing_up:
            self._loop.add_writer(conn.up, self._write_up, conn)
            conn.writing_up = True
        elif not conn.up_out and conn.writing_up:
            self._loop.remove_writer(conn.up)
            conn.writing_up = False
