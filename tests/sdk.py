"""The official SDK pointed at a simulated robot, as a client on the robot's network would be."""

from __future__ import annotations

import bosdyn.client


def sdk_robot(ca_path: str, port: int, name: str = "spotrelay-test") -> bosdyn.client.Robot:
    """An SDK Robot for the simulated robot at 127.0.0.1:``port``; not logged in yet."""
    sdk = bosdyn.client.create_standard_sdk(name)
    sdk.load_robot_cert(ca_path)
    robot = sdk.create_robot("127.0.0.1")
    robot.update_secure_channel_port(port)
    return robot
