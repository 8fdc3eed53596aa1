"""Autowalk: camera evidence kept at a mission's waypoints.

The robot's mission service calls the relay's ``RemoteMissionService`` (``service``: protocol,
parameters, sessions), which it finds in the robot's directory (``registration``). A run takes
stills or clips of the hub's frames (``jobs``) into the captures folder (``store``: atomic files,
the size limit; clips as MJPEG AVI, ``avi``), which the HTTP API lists and serves (``routes``).
"""
