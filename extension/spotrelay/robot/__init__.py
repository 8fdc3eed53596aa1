"""The robot side: one logged-in SDK session kept alive (``connection``), what an SDK error
means (``errors``), the session itself (``session``) and the threads blocking SDK calls run in
(``threads``)."""

from spotrelay.robot.connection import RobotConnection
from spotrelay.robot.session import Target

__all__ = ["RobotConnection", "Target"]
