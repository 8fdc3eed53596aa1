"""The robot connection's account of why it is down, in-process: what the open /readyz may say
(the kind of trouble) follows what ended the session."""

from __future__ import annotations

from bosdyn.client.exceptions import UnableToConnectToRobotError, UnauthenticatedError

from spotrelay.robot.connection import (
    FAILURES_BEFORE_RECONNECT,
    RobotConnection,
    ServiceState,
    Target,
)


def connected() -> RobotConnection:
    conn = RobotConnection(Target("robot.example"), ["image"])
    conn.state = {"image": ServiceState("image", ok=True)}
    conn.connected.set()
    return conn


def test_a_rejected_token_is_a_login_problem_not_a_network_one():
    conn = connected()
    conn.report("image", UnauthenticatedError(None, "token expired"))
    status = conn.status()
    assert status["problem"] == "login" and "UnauthenticatedError" in status["last_error"]


def test_a_robot_that_stops_answering_is_unreachable():
    conn = connected()
    for _ in range(FAILURES_BEFORE_RECONNECT):
        assert conn.status()["problem"] is None
        conn.report("image", UnableToConnectToRobotError(None, "no route"))
    assert conn.status()["problem"] == "unreachable"
