"""The RTSP output: ``rtsp://HOST:PORT/<source>``, H.264 over RTP, from GStreamer's RTSP server.

What is the relay's and what is GStreamer's:

* **Frames** come from the hub like any output's (``Hub.frames``): one *feed* per running media
  takes the rendering the URL asks for (``width``, ``height``, ``rotate``, ``colormap``, ``fps``:
  ``spotrelay.query``) as JPEG and pushes it into the media's ``appsrc``; GStreamer decodes it
  (``jpegdec``, libjpeg-turbo, outside the interpreter lock), encodes it with x264 and sends it.
* **One encoder per (source, rendering, bitrate)**, shared by every client of it
  (``set_shared`` with a key of the parsed parameters: ``?width=320`` and ``?height=240`` of a
  640x480 camera are one), built on the first client's DESCRIBE and torn down after the last
  one leaves; at most ``max_encoders`` at once (503 past it).
* **Low latency:** x264 ``tune=zerolatency``, no B-frames, an IDR at least every second with
  SPS/PPS repeated (``config-interval=-1``), and one more the moment a client starts playing a
  running stream, so a late joiner starts at once; sent as soon as encoded (no clock sync).
* **Capture times:** the media's clock is the system's real-time clock and each buffer's time is
  the frame's capture time, so RTP timestamps follow the robot's capture clock, and RTCP sender
  reports (``rtcp-sync-send-time=false``, NTP from the wall clock) map them to the capture time:
  a client can measure latency from capture.
* **TCP only:** a CORE I/O admits inbound TCP on 21000-22000 only, so a UDP SETUP is answered
  461 at once and clients (ffmpeg, GStreamer, VLC with live555) retry over TCP on the same
  connection.
* **Bounds:** every client takes a slot of ``--max-clients`` (``slots.py``: per host too); a
  client whose link takes nothing, or falls further behind than ``LAG`` seconds of its stream,
  for ``--client-timeout`` is closed (GStreamer itself keeps a client that sends keep-alives but
  never reads, and drops a slow one only after 10 s *and* 100 queued messages); sessions time
  out after ``--client-timeout`` (GStreamer's default is 60 s).
* **Token:** with ``--token``, RTSP Basic or Digest (user ``spotrelay``, the token as password,
  as ``rtsp://spotrelay:TOKEN@HOST:PORT/source``), or ``?token=`` in the URL; asked before
  anything else is said about a DESCRIBE or SETUP (``Auth.do_check``).

GStreamer runs its own threads (a GLib main loop here, its clients' and its encoders'); the
hub and metrics belong to the event loop, and everything crossing over goes through
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from spotrelay.frames import RenderSpec
from spotrelay.hub import Client, Encoded, Hub
from spotrelay.metrics import Metrics
from spotrelay.plan import plan
from spotrelay.query import BadParam, int_param, parse_request
from spotrelay.rtsp.engine import Gst, offer_basic_and_digest
from spotrelay.slots import Slots

log = logging.getLogger("spotrelay.rtsp")

USER = "spotrelay"
BITRATE = 1400  # kbit/s: x264 overshoots its target by 3-7 %; this stays under 1.5 Mbit/s
BITRATES = (100, 8000)
LAG = 2.0  # seconds of its stream a client may fall behind (unsent) before it counts as slow
WATCH_EVERY = 0.5  # seconds between looks at every client's connection
ENCODE_SAMPLE_EVERY = 4  # looks between timings of one frame's encode, per encoder
SEND_BUFFER = 256 * 1024  # what the kernel may hold for a client (a few seconds of video)
RATE = 15  # Hz: Spot's body cameras; a stream's nominal rate unless it measures faster
MAX_RATE = 60  # Hz: the hand camera's fastest; a burst measured faster is not a rate
KEY_EVERY = 1.0  # seconds of stream between IDRs (with SPS/PPS): what a late joiner waits at most
KEY_INT_MAX = 4 * RATE  # x264's own keyframe interval, frames: only a backstop to KEY_EVERY
RATE_CHECK_EVERY = 45  # frames between looks at the camera's rate (3 s at 15 fps)
PRESET = "ultrafast"  # measured: 5.5-6.7 % of a core per 640x480@15 stream here; veryfast 8-10 %


@dataclass(frozen=True)
class Rendering:
    """What an RTSP URL asks for, parsed and checked; ``key`` names its encoder."""

    source: str
    spec: RenderSpec
    fps: float | None
    bitrate: int
    size: tuple[int, int]  # what the hub's rendering is (after rotation)

    @property
    def key(self) -> str:
        w, h = self.size
        spec = self.spec
        return (
            f"{self.source}|{w}x{h}|r{spec.rotate}|{spec.colormap}|{self.fps or 0:g}|{self.bitrate}"
        )


def rendering(hub: Hub, source: str, query: str | None) -> Rendering:
    """The URL's query as a Rendering (``token=`` aside). Raises BadParam."""
    q = dict(parse_qsl(query or "", keep_blank_values=True))
    q.pop("token", None)
    ask = parse_request(q, snapshot=False)
    bitrate = int_param(q, "bitrate", *BITRATES) or BITRATE
    the_plan = plan(source, hub.shape(source), ask.spec)
    return Rendering(source, ask.spec, ask.fps, bitrate, the_plan.out_size)


def nominal_rate(asked: float | None, measured: float, current: int | None = None) -> int:
    """The frame rate x264 spreads its bitrate over.

    The camera's measured rate, but never under Spot's 15 Hz (a camera nobody watched was only
    refreshed about once a second, and a robot's hiccup can halve a rate for a moment, while a
    stream budgeted for 2 fps and sent at 15 takes seven times its bitrate: a shared link then
    starves every stream on it) nor over 60; the client's ``fps`` if it asked for fewer frames
    than that. While streaming (``current`` given) it changes once the measure is a quarter
    away: the hand camera runs at 15, 30 or 60 Hz."""
    now = max(RATE, min(MAX_RATE, round(measured)))
    if asked:
        now = max(1, min(now, round(asked)))
    if current is None or abs(now - current) > current / 4:
        return now
    return current


def pipeline(r: Rendering) -> str:
    """The media's launch line: JPEG in, H.264 RTP out, at the size the stream started with
    (x264 wants even sizes, 4:2:0). A camera that changes mode while clients watch (the gripper
    camera's 640x480 to 1280x720) is scaled into that size, with borders if its shape changed:
    a stream cannot change size under its clients, and a pipeline that could not negotiate the
    new size would end. ``videoscale`` passes frames of the right size through untouched."""
    w, h = r.size
    # square pixels: videoscale then keeps a new picture's shape with borders, not a pixel
    # aspect ratio that players which ignore it (OpenCV...) would show squashed
    size = (
        f"video/x-raw,format=I420,width={w // 2 * 2},height={max(2, h // 2 * 2)},"
        "pixel-aspect-ratio=1/1"
    )
    return (
        "( appsrc name=src is-live=true format=time do-timestamp=false block=false "
        "max-buffers=3 leaky-type=downstream caps=image/jpeg "
        f"! jpegdec ! videoconvert ! videoscale ! {size} "
        f"! x264enc name=enc tune=zerolatency speed-preset={PRESET} bitrate={r.bitrate} "
        f"key-int-max={KEY_INT_MAX} bframes=0 b-adapt=false threads=1 rc-lookahead=0 "
        "sync-lookahead=0 vbv-buf-capacity=1000 "
        "! video/x-h264,profile=constrained-baseline "
        # a queue before the payloader, or the stream's sink warns of an invalid pipeline
        "! queue max-size-buffers=3 max-size-time=0 max-size-bytes=0 "
        "! rtph264pay name=pay0 pt=96 config-interval=-1 aggregate-mode=zero-latency )"
    )


def _tcp_info(fd: int) -> tuple[int, int, int] | None:
    """(bytes acknowledged, bytes not yet sent, segments unacknowledged) of a TCP socket."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:  # closes only the dup
            raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 152)
    except OSError:
        return None
    if len(raw) < 152:
        return None
    (unacked,) = struct.unpack_from("I", raw, 24)
    (acked,) = struct.unpack_from("Q", raw, 120)
    (notsent,) = struct.unpack_from("I", raw, 144)
    return acked, notsent, unacked


@dataclass
class Viewer:
    """One RTSP connection, as the watchdog and /api/state see it."""

    id: int
    host: str
    fd: int
    since: float = field(default_factory=time.time)
    source: str | None = None  # after its DESCRIBE
    rendering: Rendering | None = None
    refused: str | None = None  # a slot was not given: answered 503
    played: bool = False  # it sent a PLAY: a connection that never does is closed in time
    token_ok: bool = False  # gave ?token= (only DESCRIBE carries the query)
    acked: int = 0
    progress_at: float = field(default_factory=time.monotonic)
    behind_since: float | None = None
    client: Any = None
    handlers: list[int] = field(default_factory=list)


class Feed:
    """One running media (one encoder): the hub's renderings pushed into its appsrc."""

    def __init__(self, gst: Gst, r: Rendering, media: Any, observe: Callable[[float], None]):
        self.gst, self.r, self.media = gst, r, media
        element = media.get_element()
        self.appsrc = element.get_by_name("src")
        self.encoder = element.get_by_name("enc")
        self.pipeline = element.get_parent()
        self.last_pts = -1
        self.key_pts = -(1 << 62)  # the stream's last IDR asked for (the first frame is one)
        self.pushed = 0
        self.task: asyncio.Task | None = None
        self._observe = observe

    def sample_encode(self) -> None:
        """Time x264 on the next frame (its input to its output: with no B-frames and zero
        latency it encodes a frame within the call that hands it over). One frame now and
        then, so Python, and its lock, stay out of the encoder's thread the rest of the time."""
        g = self.gst.Gst
        if self.encoder is None:
            return
        sink, src = self.encoder.get_static_pad("sink"), self.encoder.get_static_pad("src")
        began: list[float] = []

        def took_in(pad, info, *_):
            began.append(time.perf_counter())
            return g.PadProbeReturn.REMOVE

        def took_out(pad, info, *_):
            if not began:
                return g.PadProbeReturn.OK  # the frame before ours: wait for ours
            self._observe(time.perf_counter() - began[0])
            return g.PadProbeReturn.REMOVE

        src.add_probe(g.PadProbeType.BUFFER, took_out)
        sink.add_probe(g.PadProbeType.BUFFER, took_in)

    def set_rate(self, fps: int) -> None:
        """The stream's nominal frame rate, before its first frame and when the camera's
        changes. Without one (JPEG caps carry none) x264 takes the input as variable-rate and
        holds every frame until the next one arrives: a frame's interval (67 ms at 15 fps) added
        to every frame's latency. With one, it encodes each frame as it comes; the rate is also
        what its bitrate is spread over, and each frame keeps its capture time."""
        g = self.gst.Gst
        if self.appsrc is not None:
            self.appsrc.set_property("caps", g.Caps.from_string(f"image/jpeg,framerate={fps}/1"))

    def push(self, enc: Encoded) -> bool:
        """One rendering into the encoder (event loop thread; appsrc is thread-safe); False if
        it was skipped."""
        g = self.gst.Gst
        appsrc, pipeline = self.appsrc, self.pipeline
        if appsrc is None or pipeline is None:
            return False
        if pipeline.get_state(0)[1] != g.State.PLAYING:
            return False  # the base time is not known yet
        if appsrc.get_property("current-level-buffers") >= 2:
            return False  # nobody is playing it yet, or the encoder is behind: skip, never queue
        base = pipeline.get_base_time()
        # a STALE repeat carries an old capture time: shown now, its banner says how old
        pts = int((time.time() if enc.stale else enc.acquired) * 1e9) - base
        if pts <= self.last_pts:
            return False
        if pts - self.key_pts >= KEY_EVERY * 1e9:  # by the clock, whatever the camera's rate
            self.key_pts = pts
            self.key_frame()
        self.last_pts = pts
        buf = g.Buffer.new_wrapped(enc.data)
        buf.pts = pts
        appsrc.emit("push-buffer", buf)
        self.pushed += 1
        return True

    def key_frame(self) -> None:
        """An IDR (with SPS/PPS) for the next frame: every second, and when a viewer joins a
        running stream (any thread)."""
        g = self.gst.Gst
        if self.encoder is not None:
            s = g.Structure.new_from_string("GstForceKeyUnit, all-headers=(boolean)true")
            self.encoder.get_static_pad("src").send_event(
                g.Event.new_custom(g.EventType.CUSTOM_UPSTREAM, s)
            )

    def close(self) -> None:
        self.media = self.appsrc = self.encoder = self.pipeline = None


class RtspOutput:
    def __init__(
        self,
        gst: Gst,
        hub: Hub,
        metrics: Metrics,
        slots: Slots,
        *,
        bind: str,
        port: int,
        token: str | None,
        client_timeout: float,
        max_encoders: int,
        idle_timeout: float | None = None,
        tls_files: tuple[Any, Any] | None = None,
    ):
        """``tls_files``: (certificate, key): RTSPS (``rtsps://``) instead of RTSP."""
        self.gst, self.hub, self.metrics, self.slots = gst, hub, metrics, slots
        self.tls_files = tls_files
        self.bind, self.port, self.token = bind, port, token
        self.client_timeout, self.max_encoders = client_timeout, max_encoders
        # a connection that has not played after this long is closed (--idle-timeout, as HTTP)
        self.idle_after = idle_timeout or client_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.feeds: dict[str, Feed] = {}  # media key -> feed (GLib threads write, under lock)
        self.viewers: dict[int, Viewer] = {}
        self._lock = threading.Lock()
        self._ids = 0
        self._ticks = 0
        self._glib_loop: Any = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._mounted: set[str] = set()
        self._pending: dict[str, Rendering] = {}  # element name -> its rendering

    # -- lifecycle (event loop) -----------------------------------------------------------------

    async def start(self) -> None:
        """Listen; OSError (naming --rtsp-port) if the port is taken."""
        from spotrelay.process import check_port

        self.loop = asyncio.get_running_loop()
        check_port(self.bind, self.port, "--rtsp-port")
        g = self.gst
        server = self._server = g.GstRtspServer.RTSPServer()
        server.set_address(self.bind)
        server.set_service(str(self.port))
        self._viewer_token = g.GstRtspServer.RTSPToken()
        self._viewer_token.set_string("media.factory.role", "viewer")
        if self.token or self.tls_files:
            server.set_auth(self._auth())
        server.connect("client-connected", self._connected)
        context = g.GLib.MainContext.new()
        if server.attach(context) == 0:
            raise OSError(
                f"cannot listen on {self.bind}:{self.port}; give another with --rtsp-port"
            )
        timer = g.GLib.timeout_source_new(int(WATCH_EVERY * 1000))
        timer.set_callback(self._watch)
        timer.attach(context)
        self._glib_loop = g.GLib.MainLoop(context)
        self._thread = threading.Thread(target=self._glib_loop.run, name="rtsp", daemon=True)
        self._thread.start()
        self.mount(list(self.hub.sources))
        scheme = "rtsps" if self.tls_files else "rtsp"
        log.info("RTSP on %s://%s:%d/<source> (H.264, TCP)", scheme, self.bind, self.port)

    def mount(self, sources: list[str]) -> None:
        """A factory per source (new sources appear when the robot lists them)."""
        g = self.gst
        if self._server is None:
            return
        mounts = self._server.get_mount_points()
        roles = g.Gst.Structure.new_from_string(
            "viewer, media.factory.access=(boolean)true, media.factory.construct=(boolean)true"
        )
        for source in sources:
            if source in self._mounted:
                continue
            factory = _factory_class(g)(self, source)
            factory.set_shared(True)
            factory.set_protocols(g.GstRtsp.RTSPLowerTrans.TCP)  # UDP SETUP: 461 at once
            factory.set_clock(g.Gst.SystemClock(clock_type=g.Gst.ClockType.REALTIME))
            factory.set_media_gtype(_media_class(g).__gtype__)
            factory.set_latency(0)
            factory.set_suspend_mode(g.GstRtspServer.RTSPSuspendMode.NONE)
            factory.set_eos_shutdown(False)
            factory.set_stop_on_disconnect(True)
            if self.token or self.tls_files:  # an RTSPAuth checks every factory's roles
                factory.add_role_from_structure(roles)
            factory.connect("media-configure", self._configured)
            mounts.add_factory(f"/{source}", factory)
            self._mounted.add(source)

    def close(self) -> None:
        if self._glib_loop is not None:
            self._glib_loop.quit()
        if self._thread is not None:
            self._thread.join(2)
        for feed in list(self.feeds.values()):
            if feed.task is not None:
                feed.task.cancel()
            feed.close()
        self.feeds.clear()

    def status(self) -> dict[str, Any]:
        """For /api/state: running encoders and every RTSP viewer."""
        now = time.time()
        with self._lock:
            viewers = list(self.viewers.values())
            encoders = sorted(self.feeds)
        return {
            "port": self.port,
            "scheme": "rtsps" if self.tls_files else "rtsp",
            "encoders": encoders,
            "clients": [
                {
                    "id": v.id,
                    "source": v.source,
                    "rendering": v.rendering.key if v.rendering else None,
                    "bytes_sent": v.acked,
                    "connected_for": round(now - v.since, 1),
                }
                for v in viewers
                if v.refused is None
            ],
        }

    # -- GStreamer's side (its threads) ---------------------------------------------------------

    def _auth(self) -> Any:
        g = self.gst
        output = self
        guarded = g.GstRtsp.RTSPMethod.DESCRIBE | g.GstRtsp.RTSPMethod.SETUP
        url_check = g.GstRtspServer.RTSP_AUTH_CHECK_URL
        client_check = g.GstRtspServer.RTSP_AUTH_CHECK_TRANSPORT_CLIENT_SETTINGS

        class Auth(g.GstRtspServer.RTSPAuth):
            """Basic or Digest (user ``spotrelay``, the token as password), or ``?token=``."""

            def do_authenticate(self, ctx):
                if not output.token:
                    return g.GstRtspServer.RTSPAuth.do_authenticate(self, ctx)
                viewer = output._viewer_of(ctx.client)
                query = ctx.uri.query if ctx.uri is not None else None
                if viewer is not None and query:
                    given = dict(parse_qsl(query)).get("token", "")
                    viewer.token_ok = viewer.token_ok or _same(given, output.token or "")
                if viewer is not None and viewer.token_ok:
                    ctx.set_token(output._viewer_token)
                    return True
                return g.GstRtspServer.RTSPAuth.do_authenticate(self, ctx)

            def do_check(self, ctx, check):
                """DESCRIBE and SETUP without the token: 401 with the challenges, before the
                hooks that admit them (``_connected``) can answer 404 for a name that is not a
                camera or 400 for a bad parameter: without the token nothing is learnt."""
                base = g.GstRtspServer.RTSPAuth
                if check == url_check and output.token and ctx.method & guarded:
                    if ctx.token is None:
                        self.do_authenticate(ctx)  # sets the token if the request has it
                    # GStreamer's own 401 and challenges: this check starts by requiring an
                    # authenticated request, and answers 401 when it is not (were it ever to
                    # pass, the request goes on as before rather than wait for a reply)
                    if ctx.token is None and not base.do_check(self, ctx, client_check):
                        return False
                return base.do_check(self, ctx, check)

        auth = Auth()
        if self.tls_files:  # RTSPS on the same port: the RTSP session itself is encrypted
            cert, key = (str(f) for f in self.tls_files)
            auth.set_tls_certificate(g.Gio.TlsCertificate.new_from_files(cert, key))
        if not self.token:
            auth.set_default_token(self._viewer_token)  # TLS only: everyone may watch
            return auth
        basic = g.GstRtspServer.RTSPAuth.make_basic(USER, self.token)
        auth.add_basic(basic, self._viewer_token)
        auth.add_digest(USER, self.token, self._viewer_token)
        auth.set_realm("spotrelay")
        offer_basic_and_digest(g, auth)
        return auth

    def _viewer_of(self, client: Any) -> Viewer | None:
        with self._lock:
            return next((v for v in self.viewers.values() if v.client is client), None)

    def _connected(self, server: Any, client: Any) -> None:
        g = self.gst
        conn = client.get_connection()
        fd = conn.get_write_socket().get_fd()
        with self._lock:
            self._ids += 1
            viewer = Viewer(self._ids, conn.get_ip() or "?", fd, client=client)
            self.viewers[viewer.id] = viewer
        viewer.refused = self.slots.take(viewer.host)
        if viewer.refused:
            self._count_refusal(viewer.refused)
        # close the connection 2 s after its last session went (0 would also close it after a
        # refused UDP SETUP, and the client could not retry over TCP)
        client.set_property("post-session-timeout", 2)
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)

        def describing(client: Any, ctx: Any) -> Any:
            return admit(*_target(ctx))

        def setting_up(client: Any, ctx: Any) -> Any:
            """RTSP does not require a DESCRIBE first: a SETUP without one is admitted here
            (its URL is the media's, ``/<source>/stream=0``), or it would pass every limit."""
            if viewer.source is not None:
                return g.GstRtsp.RTSPStatusCode.OK  # admitted at its DESCRIBE
            path, query = _target(ctx)
            return admit(path.split("/")[0], query)

        def admit(source: str, query: str | None) -> Any:
            """A slot, a camera, good parameters, an encoder: or the status that says which not."""
            codes = g.GstRtsp.RTSPStatusCode
            if viewer.refused:
                return codes.SERVICE_UNAVAILABLE
            if source not in self.hub.sources:
                return codes.NOT_FOUND
            try:
                r = rendering(self.hub, source, query)
            except BadParam as exc:
                log.info("RTSP: %s", exc.message)
                return codes.BAD_REQUEST
            with self._lock:
                new = r.key not in self.feeds
                if new and len(self.feeds) >= self.max_encoders:
                    self._count_refusal("max_encoders")
                    return codes.SERVICE_UNAVAILABLE
            viewer.source, viewer.rendering = source, r
            return codes.OK

        def session(client: Any, session: Any) -> None:
            session.set_timeout(max(1, round(self.client_timeout)))
            session.set_property("extra-timeout", 0)

        def playing(client: Any, ctx: Any) -> None:
            viewer.played = True
            with self._lock:
                feed = self.feeds.get(viewer.rendering.key) if viewer.rendering else None
            if feed is not None:
                feed.key_frame()
            # counted once per connection (a player's pause sends PLAY again to resume)
            if viewer.source and self.loop is not None and -1 not in viewer.handlers:
                self.loop.call_soon_threadsafe(self._gauge, viewer.source, +1)
                viewer.handlers.append(-1)  # marks it counted in the gauge

        def closed(client: Any) -> None:
            with self._lock:
                self.viewers.pop(viewer.id, None)
            if viewer.refused is None:
                self.slots.give(viewer.host)
            if -1 in viewer.handlers and viewer.source and self.loop is not None:
                self.loop.call_soon_threadsafe(self._gauge, viewer.source, -1)
            # PyGObject closures hold the client: without this, one socket leaks a connection
            for handler in viewer.handlers:
                if handler >= 0:
                    client.disconnect(handler)
            viewer.handlers.clear()
            viewer.client = None

        viewer.handlers = [
            client.connect("pre-describe-request", describing),
            client.connect("pre-setup-request", setting_up),
            client.connect("new-session", session),
            client.connect("play-request", playing),
            client.connect("closed", closed),
        ]

    def _configured(self, factory: Any, media: Any) -> None:
        """A new media (encoder) is built: feed it from the hub until it is torn down."""
        element = media.get_element()
        r = self._pending.pop(element.get_name(), None)
        if r is None:
            return
        media.set_rate_control(False)  # send each frame as soon as it is encoded
        observe = self.metrics.encode_seconds.labels(kind="h264").observe
        feed = Feed(self.gst, r, media, observe)
        with self._lock:
            self.feeds[r.key] = feed
        log.info("RTSP encoder for %s started (%d running)", r.key, len(self.feeds))
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._start_feed, feed)
        handler: list[int] = []

        def unprepared(media: Any) -> None:
            with self._lock:
                if self.feeds.get(r.key) is feed:
                    del self.feeds[r.key]
            log.info("RTSP encoder for %s stopped (%d frames)", r.key, feed.pushed)
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self._stop_feed, feed)
            media.disconnect(handler[0])  # the closure holds the media: break the cycle

        handler.append(media.connect("unprepared", unprepared))

    def _create(self, factory: Any, url: Any) -> Any:
        """The media's pipeline for this URL (do_create_element)."""
        r = rendering(self.hub, factory.source, url.query)
        element = self.gst.Gst.parse_launch(pipeline(r))
        with self._lock:
            self._ids += 1
            name = f"rtsp-media-{self._ids}"
        element.set_name(name)
        self._pending[name] = r
        return element

    def _watch(self, *_: object) -> bool:
        """Every WATCH_EVERY s (GLib thread): expire sessions, count bytes, close stalled or
        slow clients."""
        if self._server is not None:
            self._server.get_session_pool().cleanup()  # nothing else expires sessions
        self._ticks += 1
        if self._ticks % ENCODE_SAMPLE_EVERY == 0:
            with self._lock:
                feeds = list(self.feeds.values())
            for feed in feeds:
                feed.sample_encode()
        now = time.monotonic()
        with self._lock:
            viewers = list(self.viewers.values())
        for v in viewers:
            if v.client is not None and not v.played and time.time() - v.since > self.idle_after:
                # never played (idle, or a DESCRIBE and nothing more): GStreamer keeps such a
                # connection for ever, with its slot and any encoder its DESCRIBE started
                log.info("RTSP client %d: closing, nothing played in %.0f s", v.id, self.idle_after)
                v.client.close()
                continue
            info = _tcp_info(v.fd) if v.client is not None else None
            if info is None:
                continue
            acked, notsent, unacked = info
            if acked > v.acked:
                if v.source and self.loop is not None:
                    self.loop.call_soon_threadsafe(self._bytes, v.source, acked - v.acked)
                v.acked, v.progress_at = acked, now
            waiting = notsent or unacked
            lag = (v.rendering.bitrate * 125 * LAG) if v.rendering else 1 << 30
            if notsent <= lag:
                v.behind_since = None
            elif v.behind_since is None:
                v.behind_since = now
            stalled = waiting and now - v.progress_at > self.client_timeout
            slow = v.behind_since is not None and now - v.behind_since > self.client_timeout
            if (stalled or slow) and v.client is not None:
                log.info(
                    "RTSP client %d of %s %s: closing",
                    v.id,
                    v.source,
                    "stalled" if stalled else "too slow for the stream",
                )
                if self.loop is not None:
                    self.loop.call_soon_threadsafe(self._dropped)
                v.progress_at, v.behind_since = now, None
                v.client.close()
        return True

    # -- the event loop's side -------------------------------------------------------------------

    def _start_feed(self, feed: Feed) -> None:
        feed.task = asyncio.create_task(self._feed(feed), name=f"rtsp-{feed.r.source}")

    async def _feed(self, feed: Feed) -> None:
        r = feed.r
        rate = nominal_rate(r.fps, self.hub.fps(r.source))
        feed.set_rate(rate)
        client = Client("rtsp", r.source, r.spec, "rtsp encoder", r.fps)
        with contextlib.suppress(asyncio.CancelledError):
            async with contextlib.aclosing(self.hub.frames(client)) as frames:
                async for enc in frames:
                    if not feed.push(enc):
                        continue
                    self.hub.sent(client, enc, 0)  # its frames and rate in /api/state
                    if feed.pushed % RATE_CHECK_EVERY == 0:
                        now = nominal_rate(r.fps, self.hub.fps(r.source), rate)
                        if now != rate:
                            log.info("RTSP encoder for %s: %d fps now (was %d)", r.key, now, rate)
                            rate = now
                            feed.set_rate(rate)

    def _stop_feed(self, feed: Feed) -> None:
        if feed.task is not None:
            feed.task.cancel()
        feed.close()

    def _gauge(self, source: str, delta: int) -> None:
        self.metrics.rtsp_clients.labels(source=source).inc(delta)

    def _bytes(self, source: str, nbytes: int) -> None:
        self.metrics.rtsp_bytes_sent.labels(source=source).inc(nbytes)

    def _dropped(self) -> None:
        self.metrics.clients_dropped.labels(reason="stalled").inc()

    def _count_refusal(self, reason: str) -> None:
        if self.loop is not None:
            refused = self.metrics.requests_refused.labels(reason=reason)
            self.loop.call_soon_threadsafe(refused.inc)


def _target(ctx: Any) -> tuple[str, str | None]:
    """The path (without its slashes) and the query a request's URL names."""
    if ctx.uri is None:
        return "", None
    return ctx.uri.abspath.strip("/"), ctx.uri.query


def _same(given: str, token: str) -> bool:
    import hmac

    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


_classes: dict[str, type] = {}


def _factory_class(g: Gst) -> type:
    """GstRTSPMediaFactory per source: the encoder key and pipeline come from the URL's query."""
    if "factory" not in _classes:

        class Factory(g.GstRtspServer.RTSPMediaFactory):
            def __init__(self, output: RtspOutput, source: str):
                super().__init__()
                self.output, self.source = output, source

            def do_gen_key(self, url):
                try:
                    return rendering(self.output.hub, self.source, url.query).key
                except (BadParam, KeyError):
                    return None  # not shared; its DESCRIBE is refused anyway

            def do_create_element(self, url):
                try:
                    return self.output._create(self, url)
                except (BadParam, KeyError):  # refused at DESCRIBE or SETUP already
                    return None

        _classes["factory"] = Factory
    return _classes["factory"]


def _media_class(g: Gst) -> type:
    """GstRTSPMedia whose RTCP sender reports map RTP time to the *capture* time (the buffers'
    time), with NTP from the wall clock: ``clock-time`` would put the real-time clock in the
    report without the 1900 epoch, 70 years off."""
    if "media" not in _classes:

        class Media(g.GstRtspServer.RTSPMedia):
            def do_setup_rtpbin(self, rtpbin):
                rtpbin.set_property("rtcp-sync-send-time", False)
                rtpbin.set_property("ntp-time-source", "ntp")
                return True

        _classes["media"] = Media
    return _classes["media"]
