"""RTSP: H.264 over RTP from GStreamer's RTSP server (``server``), with GStreamer loaded from the
system and its logs routed through the relay's (``engine``)."""
