"""Outputs: one module per way of serving frames, each adding its own routes to the app.

A new output (a recording, an HLS or WebRTC endpoint) is one new module with an ``add_routes``
that takes what it needs (usually the hub) and consumes frames through ``Hub.frames``.
"""
