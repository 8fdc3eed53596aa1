"""A TLS router: one public port, a backend per authority, chosen by the TLS server name (SNI).

Spot serves every service on port 443 and tells them apart by authority: the SDK opens one channel
per authority with ``grpc.ssl_target_name_override`` set to it, so both the TLS server name and
HTTP/2's ``:authority`` carry it (bosdyn/client/channel.py, create_secure_channel). gRPC's Python
server cannot see either, so the simulated robot runs one gRPC server per group of authorities and
this router peeks at each connection's ClientHello (without consuming it) and splices the TCP
stream to the right one. TLS ends at the backend, exactly as if it listened on the public port.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

PEEK = 4096


def server_name(hello: bytes) -> str | None:
    """The SNI host name of a TLS ClientHello record, or None."""
    try:
        if hello[0] != 0x16 or hello[5] != 0x01:  # handshake record, ClientHello
            return None
        i = 5 + 4 + 2 + 32  # handshake header, client version, random
        i += 1 + hello[i]  # session id
        i += 2 + int.from_bytes(hello[i : i + 2], "big")  # cipher suites
        i += 1 + hello[i]  # compression methods
        end = i + 2 + int.from_bytes(hello[i : i + 2], "big")
        i += 2
        while i + 4 <= end:
            kind, size = (
                int.from_bytes(hello[i : i + 2], "big"),
                int.from_bytes(hello[i + 2 : i + 4], "big"),
            )
            if kind == 0:  # server_name: list length, type 0 (host name), name length, name
                n = int.from_bytes(hello[i + 7 : i + 9], "big")
                return hello[i + 9 : i + 9 + n].decode("ascii", "replace")
            i += 4 + size
    except IndexError:
        return None
    return None


class Router:
    """Listens on ``host:port``; ``backend(name) -> port`` picks where each connection goes."""

    def __init__(self, host: str, port: int, backend: Callable[[str | None], int]):
        self.backend = backend
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.port = self.sock.getsockname()[1]
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, name="sim-router", daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._route, args=(client,), daemon=True).start()

    def _route(self, client: socket.socket) -> None:
        try:
            client.settimeout(5)
            hello = b""
            for _ in range(1000):  # the ClientHello is almost always one segment
                hello = client.recv(PEEK, socket.MSG_PEEK)
                whole = len(hello) >= 9 and len(hello) >= 5 + int.from_bytes(hello[3:5], "big")
                if not hello or whole or len(hello) >= PEEK:
                    break
                time.sleep(0.001)
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.backend(server_name(hello))))
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._conns |= {client, upstream}
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if not n:
                    break
                dst.sendall(view[:n])
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self._lock:
                self._conns.discard(src)
            with contextlib.suppress(OSError):
                src.close()

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):  # wakes the accept (a close alone leaves it
            self.sock.shutdown(socket.SHUT_RDWR)  # listening until it returns: no restart)
        with contextlib.suppress(OSError):
            self.sock.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
