"""A simulated Spot for tests, benchmarks and the demo (``spotrelay --sim``); see ``robot.py``."""

from spotrelay.sim.robot import PAYLOAD, PAYLOAD_STATES, SPOT_CAM, SimRobot

__all__ = ["PAYLOAD", "PAYLOAD_STATES", "SPOT_CAM", "SimRobot"]
