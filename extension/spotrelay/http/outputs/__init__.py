"""Outputs: one module per way of serving frames over HTTP, each adding its own routes.

A new output (an HLS or WebRTC endpoint) is one new module with an ``add_routes`` that takes what
main gives it (``common.Streams``: the hub, metrics, bounds) and consumes frames through
``Hub.frames``; ``main.build_relay_app`` puts it on the app.
"""
