"""The shaped link of tests/shaper.py made by the kernel instead (needs root): a network namespace
of our own joined to this one by a veth pair, with ``tbf`` on the relay-to-client direction.

    host namespace                              namespace spotrelay-link-<pid>-<n>
    relay binds 10.201.X.Y+1  [veth slh<id>] ==== [veth sln<id>]  10.201.X.Y+2  clients
                              egress: tbf rate N mbit burst B latency 50ms

Why both: the user-space proxy needs no privileges and runs in any test, but acknowledges the
relay's bytes itself; the kernel link is a real bottleneck the relay's TCP sees end to end
(drops at the tbf queue, congestion control, acknowledgements from the client's own stack). tbf
queues in one FIFO (bfifo, ``latency`` worth of bytes); this kernel has no fair-queue qdisc (no
fq, fq_codel, sfq) and no netem, so the kernel link is FIFO and has no added delay.

Every name carries our pid, addresses come from a /30 of 10.201.0.0/16 that no interface here
uses, and ``stop()`` (also at exit, and from a ``with`` block) deletes the veth and the namespace
even after a failure half-way through ``start()``. ``remove_stale()`` deletes what a killed run
left behind (namespaces whose pid is gone).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from tests.shaper import bucket_bytes

PREFIX = "spotrelay-link-"
LATENCY_MS = 50  # tbf queue bound, as time at the link rate (the user-space FIFO uses the same)
_COUNTER = itertools.count()


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why a kernel link cannot be made here (None if it can): tests skip with this reason."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no {tool} command (iproute2)"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete the namespaces (and with them their veth) of runs whose process is gone."""
    removed = []
    out = _run("ip", "netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)-\d+", name)
        if m and not _pid_alive(int(m.group(1))):
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network some interface of this namespace has an address in."""
    out = _run("ip", "-j", "-4", "addr", "show", check=False).stdout or "[]"
    nets = []
    for link in json.loads(out):
        for addr in link.get("addr_info", []):
            with contextlib.suppress(KeyError, ValueError):
                nets.append(ipaddress.ip_network(f"{addr['local']}/{addr['prefixlen']}", False))
    return nets


@dataclass
class QdiscStats:
    sent_bytes: int
    sent_packets: int
    drops: int
    overlimits: int
    backlog_bytes: int


class NetLink:
    """A namespace, a veth pair and (after ``shape()``) a tbf on the relay's side. ``host_addr``
    is where the relay binds; ``exec_argv()`` runs a command inside the namespace."""

    def __init__(self) -> None:
        n = next(_COUNTER)
        pid = os.getpid()
        self.ns = f"{PREFIX}{pid}-{n}"
        tag = f"{pid % 100000}{n}"[-9:]  # interface names are at most 15 characters
        self.host_dev, self.ns_dev = f"slh{tag}", f"sln{tag}"
        self.host_addr = self.ns_addr = ""
        self.mbit: float | None = None
        self._made: list[str] = []  # what exists, for teardown: "ns", "veth"

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> NetLink:
        reason = unavailable()
        if reason:
            raise RuntimeError(f"kernel link: {reason}")
        atexit.register(self.stop)
        try:
            self._make()
        except BaseException:
            self.stop()
            raise
        return self

    def _pick_subnet(self) -> tuple[str, str]:
        """A /30 in 10.201.0.0/16 that no interface here has an address in, starting from one
        derived from our pid (so two runs at once pick different ones)."""
        used = _used_networks()
        start = os.getpid() * 7 + next(_COUNTER)
        for i in range(16384):  # 16384 /30s in a /16
            k = (start + i) % 16384
            net = ipaddress.ip_network(f"10.201.{k // 64}.{k % 64 * 4}/30")
            if not any(net.overlaps(u) for u in used):
                host, ns = list(net.hosts())
                return str(host), str(ns)
        raise RuntimeError("no free /30 in 10.201.0.0/16")

    def _make(self) -> None:
        _run("ip", "netns", "add", self.ns)
        self._made.append("ns")
        _run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev,
             "netns", self.ns)  # fmt: skip
        self._made.append("veth")
        self.host_addr, self.ns_addr = self._pick_subnet()
        _run("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_dev)
        _run("ip", "link", "set", self.host_dev, "up")
        _run("ip", "-n", self.ns, "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_dev)
        _run("ip", "-n", self.ns, "link", "set", self.ns_dev, "up")
        _run("ip", "-n", self.ns, "link", "set", "lo", "up")

    def stop(self) -> None:
        """Delete the veth (both ends) and the namespace; safe to call twice or half-made."""
        if "veth" in self._made:
            _run("ip", "link", "del", self.host_dev, check=False)
        if "ns" in self._made:
            _run("ip", "netns", "del", self.ns, check=False)
        self._made.clear()
        atexit.unregister(self.stop)

    def __enter__(self) -> NetLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def exists(self) -> bool:
        """Whether the namespace or the host end of the veth is still there (for checks)."""
        in_ns = self.ns in _run("ip", "netns", "list", check=False).stdout.split()
        dev = _run("ip", "link", "show", self.host_dev, check=False).returncode == 0
        return in_ns or dev

    # -- the bottleneck --------------------------------------------------------------------------

    def shape(self, mbit: float, burst: int | None = None, latency_ms: int = LATENCY_MS) -> None:
        """tbf on the relay side's egress (relay -> clients), replacing any before. The burst is
        the user-space shaper's bucket depth, so the two links burst alike."""
        burst = burst or bucket_bytes(mbit)
        _run("tc", "qdisc", "replace", "dev", self.host_dev, "root", "tbf", "rate", f"{mbit}mbit",
             "burst", str(burst), "latency", f"{latency_ms}ms")  # fmt: skip
        self.mbit = mbit

    def unshape(self) -> None:
        _run("tc", "qdisc", "del", "dev", self.host_dev, "root", check=False)
        self.mbit = None

    def qdisc(self) -> QdiscStats | None:
        """The tbf's counters (None without one): what it sent, dropped and holds now."""
        out = _run("tc", "-s", "-j", "qdisc", "show", "dev", self.host_dev, check=False).stdout
        for q in json.loads(out or "[]"):
            if q.get("kind") == "tbf":
                return QdiscStats(
                    q.get("bytes", 0),
                    q.get("packets", 0),
                    q.get("drops", 0),
                    q.get("overlimits", 0),
                    q.get("backlog", 0),
                )
        return None

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]


@contextlib.contextmanager
def kernel_link(mbit: float | None = None):
    """A started NetLink (shaped if ``mbit``), stopped at the end of the block."""
    link = NetLink().start()
    try:
        if mbit:
            link.shape(mbit)
        yield link
    finally:
        link.stop()
