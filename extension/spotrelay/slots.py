"""Slots: how many clients the relay serves at once, and how many of them one address may hold.

``--max-clients`` bounds what the relay holds (descriptors, memory, encodes); every output takes
a slot for each client (an HTTP request in progress, each stream being one; an RTSP connection)
and gives it back when the client leaves. One address may hold at most ``per_host`` of them
(``--max-clients-per-host``), so a single host that opens streams and never reads them cannot
take every slot and lock everyone else out. It is a share, not a small number, because one
address is often many people: a base station's go2rtc, a NAT, a reverse proxy.
"""

from __future__ import annotations

import threading
from collections import Counter


class Slots:
    def __init__(self, total: int, per_host: int):
        self.total, self.per_host = total, per_host
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()  # RTSP takes slots from GStreamer's threads

    @property
    def busy(self) -> int:
        return sum(self._held.values())

    def take(self, host: str) -> str | None:
        """Take a slot for a client from ``host``: None if taken, else why not (the reason
        label: ``max_clients`` or ``max_clients_per_host``)."""
        with self._lock:
            if sum(self._held.values()) >= self.total:
                return "max_clients"
            if self._held[host] >= self.per_host:
                return "max_clients_per_host"
            self._held[host] += 1
            return None

    def give(self, host: str) -> None:
        with self._lock:
            self._held[host] -= 1
            if self._held[host] <= 0:
                del self._held[host]
