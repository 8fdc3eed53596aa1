"""spotrelay: relay Spot's image services to the LAN as MJPEG, snapshots and a viewer."""

__version__ = "0.1.0"
