"""spotrelay: relay Spot's image services to the LAN as MJPEG, snapshots and a viewer."""

__version__ = "0.1.0"

# Before any module of the relay (or a test) imports grpc, whatever the entry point: the
# ``spotrelay`` console script, ``python -m spotrelay``, the container's command.
from spotrelay import process as _process

_process.tune_grpc()
