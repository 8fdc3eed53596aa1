"""GStreamer, loaded from the system: its RTSP server and x264, through PyGObject (``gi``).

None of it is on PyPI for both amd64 and arm64 (PyGObject needs a compiler, PyAV has no RTSP
server), so the engine comes from Debian's packages (python3-gi, gir1.2-gst-rtsp-server-1.0,
gstreamer1.0-plugins-{base,good,ugly}) and the relay's venv sees Debian's ``gi`` through a folder
holding only a link to it (``make setup``, the Dockerfile; see packaging/link-gi.sh), so no other
Debian module shadows a pinned wheel. Without them the relay runs without RTSP and says why in one
line (``Unavailable``).

GStreamer logs to stderr by itself, and its RTSP server prints whole requests (an Authorization
header included) with ``g_print`` at high debug levels, and always for a SETUP with an
Accept-Ranges header (rtsp-client.c, 1.22): both are routed into Python's logging here, where the
relay's secret filter applies.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from types import ModuleType
from typing import Any

log = logging.getLogger("spotrelay.rtsp")
GST_LOG = logging.getLogger("spotrelay.rtsp.gst")

# element -> the Debian package that ships it
ELEMENTS = {
    "appsrc": "gstreamer1.0-plugins-base",
    "jpegdec": "gstreamer1.0-plugins-good",
    "videoconvert": "gstreamer1.0-plugins-base",
    "videoscale": "gstreamer1.0-plugins-base",
    "x264enc": "gstreamer1.0-plugins-ugly",
    "rtph264pay": "gstreamer1.0-plugins-good",
    "rtpbin": "gstreamer1.0-plugins-good",
}
PACKAGES = "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-{base,good,ugly}"


class Unavailable(RuntimeError):
    """RTSP is off; ``str()`` says why in one line, and what to install."""


class Gst:
    """The GObject modules the RTSP output uses, loaded once."""

    def __init__(self, modules: dict[str, ModuleType]):
        self.Gio = modules["Gio"]
        self.GLib = modules["GLib"]
        self.Gst = modules["Gst"]
        self.GstRtsp = modules["GstRtsp"]
        self.GstRtspServer = modules["GstRtspServer"]


_loaded: Gst | None = None


def load() -> Gst:
    """Import and initialise GStreamer and its RTSP server, or raise Unavailable."""
    global _loaded
    if _loaded is not None:
        return _loaded
    try:
        import gi
    except ImportError as exc:
        raise Unavailable(f"PyGObject is not importable ({exc}); install {PACKAGES}") from None
    try:
        for name in ("Gst", "GstRtsp", "GstRtspServer"):
            gi.require_version(name, "1.0")
        from gi.repository import Gio, GLib, GstRtsp, GstRtspServer
        from gi.repository import Gst as gst
    except (ValueError, ImportError) as exc:  # "Namespace GstRtspServer not available"
        raise Unavailable(f"{exc}; install {PACKAGES}") from None
    if os.environ.get("HOME") in (None, "", "/") and "GST_REGISTRY" not in os.environ:
        # no home (the container's user): the plugin registry goes with the temporary files
        os.environ["GST_REGISTRY"] = os.path.join(
            os.environ.get("TMPDIR", "/tmp"), f"spotrelay-gst-registry-{os.getuid()}.bin"
        )
    ok, _ = gst.init_check(None)
    if not ok:
        raise Unavailable("GStreamer did not initialise (Gst.init_check)")
    missing = sorted({pkg for el, pkg in ELEMENTS.items() if gst.ElementFactory.find(el) is None})
    if missing:
        raise Unavailable(f"GStreamer elements missing; install {' '.join(missing)}")
    _route_log(gst)
    modules = {"Gio": Gio, "GLib": GLib, "Gst": gst, "GstRtsp": GstRtsp}
    _loaded = Gst({**modules, "GstRtspServer": GstRtspServer})
    return _loaded


def _route_log(gst: Any) -> None:
    """GStreamer's log into Python's (so through the secret filter); WARNING and up unless
    GST_DEBUG says otherwise. What its RTSP server says of clients (a refused login, a wrong
    path, a client gone: "Connection reset by peer") is the clients' business, at DEBUG."""
    gst.debug_remove_log_function(None)  # the default handler, which writes to stderr
    levels = {gst.DebugLevel.ERROR: logging.ERROR, gst.DebugLevel.WARNING: logging.WARNING}

    def write(category, level, file, function, line, obj, message, *user_data):
        name = category.get_name()
        py_level = levels.get(level, logging.DEBUG)
        if name.startswith("rtsp") or name == "default":
            py_level = logging.DEBUG
        GST_LOG.log(py_level, "%s: %s", name, message.get())

    gst.debug_add_log_function(write, None)
    if not os.environ.get("GST_DEBUG"):
        gst.debug_set_default_threshold(gst.DebugLevel.WARNING)
    _capture_g_print()


_KEEP: list[Any] = []  # ctypes callbacks must outlive every call


def _capture_g_print() -> None:
    """GLib's g_print, which the RTSP server dumps requests with, into the log (at DEBUG, and
    through the secret filter). g_set_print_handler is not in the typelib: ctypes."""
    with contextlib.suppress(OSError, AttributeError):
        glib = ctypes.CDLL("libglib-2.0.so.0")
        handler = ctypes.CFUNCTYPE(None, ctypes.c_char_p)

        def printed(text: bytes) -> None:
            GST_LOG.debug("g_print: %s", text.decode(errors="replace").rstrip())

        callback = handler(printed)
        _KEEP.append(callback)
        glib.g_set_print_handler.restype = ctypes.c_void_p
        glib.g_set_print_handler.argtypes = [handler]
        glib.g_set_print_handler(callback)


def offer_basic_and_digest(gst: Gst, auth: Any) -> None:
    """Challenge for both Basic and Digest: ffmpeg and GStreamer pick Digest, some players only
    do Basic. PyGObject takes GstRTSPAuthMethod as an enum, not the bit mask the C function
    wants (``invalid enum value: 3``), so the mask is set through ctypes; Digest alone if that
    fails (credentials of either kind are checked whatever the challenge says)."""
    auth.set_supported_methods(gst.GstRtsp.RTSPAuthMethod.DIGEST)
    try:
        capsule = ctypes.pythonapi.PyCapsule_GetPointer
        capsule.restype, capsule.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        lib = ctypes.CDLL("libgstrtspserver-1.0.so.0")
        lib.gst_rtsp_auth_set_supported_methods.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.gst_rtsp_auth_set_supported_methods(capsule(auth.__gpointer__, None), 3)
    except (OSError, AttributeError, ValueError) as exc:
        log.info("RTSP: offering Digest only (%s)", exc)
