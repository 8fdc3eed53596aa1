"""Shared fixtures: one simulated robot (real gRPC over TLS) and one relay process per session,
and a check that the whole run leaves no process, listening port or temporary folder behind.

Tests that change the robot (faults, latency, outages) must undo it; the ``clean_sim`` fixture
does that for them.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc loads: no GOAWAY chatter

import shutil
import tempfile
from typing import Any

import pytest

# Every temporary file of this run (ours, the relays', the sims', the tools') goes in one folder
# of its own, so the check below sees this run only, whatever else runs on the machine.
_TMP = tempfile.mkdtemp(prefix="spotrelay-tests-")
os.chmod(_TMP, 0o711)  # tools run as another user (VLC refuses root) may reach their own folders
os.environ["TMPDIR"] = tempfile.tempdir = _TMP

from spotrelay.sim import SimRobot
from tests.relay import Relay


def _descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (from /proc), zombies excluded."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _listening_ports() -> set[int]:
    """TCP ports this process listens on."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _temp_entries() -> set[str]:
    return {n for n in os.listdir(_TMP) if not n.startswith("pytest-of-")}


@pytest.fixture(scope="session", autouse=True)
def leaves_nothing_behind():
    """Session-wide: every test cleans up what it starts. Checked after all other fixtures."""
    before_ports = _listening_ports()
    yield
    left = {
        "processes": sorted(_descendants(os.getpid())),
        "listening ports": sorted(_listening_ports() - before_ports),
        "temporary files": sorted(_temp_entries()),
    }
    left = {k: v for k, v in left.items() if v}
    shutil.rmtree(_TMP, ignore_errors=True)
    assert not left, f"the tests left behind: {left}"


class Robots:
    """Makes simulated robots (each with its own CA in a folder of the run's) and stops every
    one it made. The one way tests get a robot: ``robots(**options)`` takes SimRobot's options;
    ``start=False`` for one that only answers to its knobs."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory):
        self._tmp = tmp_path_factory
        self._made: list[SimRobot] = []

    def __call__(self, *, start: bool = True, **options: Any) -> SimRobot:
        robot = SimRobot(cert_dir=str(self._tmp.mktemp("sim")), **options)
        self._made.append(robot)
        return robot.start() if start else robot

    def stop_all(self) -> None:
        for robot in self._made:
            robot.stop()


def _robots(tmp_path_factory):
    made = Robots(tmp_path_factory)
    yield made
    made.stop_all()


# The same factory for one test, for a module's tests (a module that restarts or stalls its
# robot), and for the whole session.
robots = pytest.fixture(name="robots")(_robots)
module_robots = pytest.fixture(name="module_robots", scope="module")(_robots)
session_robots = pytest.fixture(name="session_robots", scope="session")(_robots)


@pytest.fixture(scope="session")
def sim(session_robots):
    """The robot most tests share; ``clean_sim`` for tests that change it."""
    return session_robots()


@pytest.fixture
def clean_sim(sim):
    """The shared robot, with every fault cleared after the test."""
    yield sim
    sim.clear_faults()


@pytest.fixture(scope="session")
def relay(sim):
    r = Relay.for_sim(sim).wait_ready()
    yield r
    r.stop()
