"""The base station's configuration generator (``spotrelay site-config``, or
``python -m spotrelay.site``): go2rtc and Prometheus configs for a fleet of relays. A program of
its own: it imports nothing of the relay."""

from spotrelay.site.cli import main

__all__ = ["main"]
