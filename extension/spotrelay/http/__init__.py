"""The HTTP side: the app and what applies to every request (``app``), and one module per way
of serving frames (``outputs/``)."""
