"""Shared fixtures: one simulated robot (real gRPC over TLS) and one relay process per session.

Tests that change the robot (faults, latency, outages) must undo it; the ``clean_sim`` fixture
does that for them.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc loads: no GOAWAY chatter

import pytest

from spotrelay.sim import SimRobot
from tests.relay import Relay


@pytest.fixture(scope="session")
def sim(tmp_path_factory):
    robot = SimRobot(cert_dir=str(tmp_path_factory.mktemp("sim-certs"))).start()
    yield robot
    robot.stop()


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
