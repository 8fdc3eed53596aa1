"""The RTSP output end to end: the relay as a process with --rtsp-port, real RTSP clients (ffprobe,
ffmpeg, GStreamer's rtspsrc through OpenCV-free tools, VLC where it can), real H.264.

Needs GStreamer's RTSP server and x264 from the system (.ci/run installs them); without them the
relay runs without RTSP and these tests skip, except in CI, where they fail.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from spotrelay.rtsp import engine
from tests.procs import spawn
from tests.relay import Relay, free_port, sample
from tests.wait import wait_until

FFPROBE, FFMPEG, CVLC = shutil.which("ffprobe"), shutil.which("ffmpeg"), shutil.which("cvlc")


def _gstreamer_reason() -> str | None:
    try:
        engine.load()
    except engine.Unavailable as exc:
        return str(exc)
    return None


REASON = _gstreamer_reason()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        (REASON is not None or FFPROBE is None) and not os.environ.get("CI"),
        reason=f"RTSP needs GStreamer and ffprobe (.ci/run installs them): {REASON}",
    ),
]
TOKEN = "rtsp-token-5c1e9a"
CAMERA = "frontleft_fisheye_image"
TCP_TRANSPORT = "Transport: RTP/AVP/TCP;unicast;interleaved=0-1"  # a SETUP's, interleaved


@pytest.fixture(scope="module")
def rtsp(sim):
    port = free_port()
    r = Relay.for_sim(
        sim,
        *("--rtsp-port", str(port), "--token", TOKEN),
        *("--client-timeout", "3", "--idle-timeout", "3"),
        covered=True,
    ).wait_ready()
    r.rtsp = f"rtsp://127.0.0.1:{port}"  # type: ignore[attr-defined]
    r.headers = {"Authorization": f"Bearer {TOKEN}"}  # type: ignore[attr-defined]
    yield r
    r.stop()


def probe(url: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    cmd = [FFPROBE or "ffprobe", "-v", "error", *args, "-of", "json", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def packets(url: str, seconds: float) -> list[dict]:
    """Video packets of ``seconds`` of stream read over TCP (what a player receives)."""
    out = probe(
        url,
        "-rtsp_transport",
        "tcp",
        "-select_streams",
        "v",
        "-read_intervals",
        f"%+{seconds}",
        "-show_entries",
        "packet=size,pts_time,flags",
        timeout=seconds + 30,
    )
    assert out.returncode == 0, out.stderr
    return [p for p in json.loads(out.stdout)["packets"] if "pts_time" in p]


def metric(relay: Relay, name: str, **labels: str) -> float:
    text = relay.get("/metrics", headers=relay.headers)[2].decode()  # type: ignore[attr-defined]
    return sample(text, name, **labels)


def state(relay: Relay) -> dict:
    status, _, body = relay.get("/api/state", headers=relay.headers)  # type: ignore[attr-defined]
    assert status == 200
    return json.loads(body)


def test_ten_seconds_are_h264_640x480_at_the_cameras_rate_within_the_bitrate(rtsp):
    url = f"rtsp://spotrelay:{TOKEN}@127.0.0.1:{rtsp.rtsp.split(':')[-1]}/{CAMERA}"
    stream = probe(url, "-rtsp_transport", "tcp", "-show_entries", "stream=codec_name,width,height")
    assert json.loads(stream.stdout)["streams"][0] == {
        "codec_name": "h264",
        "width": 640,
        "height": 480,
    }, stream.stderr
    got = packets(url, 10)
    times = [float(p["pts_time"]) for p in got]
    span = max(times) - min(times)
    mbit = sum(int(p["size"]) for p in got) * 8 / span / 1e6
    keys = sum("K" in p["flags"] for p in got)
    print(f"{len(got)} frames over {span:.2f} s, {mbit:.2f} Mbit/s, {keys} key frames")
    # 150 at the camera's rate; >= 120 leaves a busy machine's poller room to miss some
    # captures, while an encoder at a rate of its own (10 fps) or halving it still fails
    assert len(got) >= 120 and mbit <= 1.5, (len(got), mbit)
    assert keys >= span - 1  # an IDR at least every second: a late joiner starts at once


def test_a_camera_nobody_watched_streams_within_its_bitrate(rtsp):
    """Unwatched, a camera is refreshed about once a second; the stream that starts then is
    still budgeted for the frames it will send, not for the rate it had."""
    source = "right_fisheye_image"
    wait_until(
        lambda: 0 < metric(rtsp, "spotrelay_source_fps", source=source) < 3, 30, "an idle camera"
    )
    got = packets(f"rtsp://spotrelay:{TOKEN}@127.0.0.1:{rtsp.rtsp.split(':')[-1]}/{source}", 6)
    times = [float(p["pts_time"]) for p in got]
    mbit = sum(int(p["size"]) for p in got) * 8 / (max(times) - min(times)) / 1e6
    assert len(got) >= 60 and mbit <= 1.5, (len(got), mbit)  # 90 at the camera's rate


def test_a_rendering_from_the_query_and_the_token_in_the_url(rtsp):
    url = f"{rtsp.rtsp}/hand_color_image?width=320&fps=5&bitrate=300&token={TOKEN}"
    stream = probe(url, "-show_entries", "stream=codec_name,width,height")
    assert stream.returncode == 0, stream.stderr  # no -rtsp_transport: UDP refused, TCP taken
    assert json.loads(stream.stdout)["streams"][0]["width"] == 320
    got = packets(url, 4)
    assert 12 <= len(got) <= 26, len(got)  # 5 fps


def test_without_the_token_or_with_a_bad_parameter_it_says_no(rtsp):
    refused = probe(f"{rtsp.rtsp}/{CAMERA}", "-rtsp_transport", "tcp")
    assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr
    wrong = probe(f"rtsp://spotrelay:wrong@127.0.0.1:{rtsp.rtsp.split(':')[-1]}/{CAMERA}")
    assert wrong.returncode != 0 and "401" in wrong.stderr, wrong.stderr
    bad = probe(f"{rtsp.rtsp}/{CAMERA}?width=5&token={TOKEN}", "-rtsp_transport", "tcp")
    assert bad.returncode != 0 and "400" in bad.stderr, bad.stderr
    unknown = probe(f"{rtsp.rtsp}/no_such_camera?token={TOKEN}", "-rtsp_transport", "tcp")
    assert unknown.returncode != 0 and "404" in unknown.stderr, unknown.stderr
    assert TOKEN not in rtsp.log()


def test_a_udp_setup_is_answered_461_at_once(rtsp):
    """A CORE I/O admits only inbound TCP: clients that start with UDP must switch at once."""
    port = int(rtsp.rtsp.split(":")[-1])
    url = f"{rtsp.rtsp}/{CAMERA}?token={TOKEN}"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        describe = f"DESCRIBE {url} RTSP/1.0\r\nCSeq: 1\r\nAccept: application/sdp\r\n\r\n"
        sock.sendall(describe.encode())
        reply = _rtsp_reply(sock)
        assert reply.startswith("RTSP/1.0 200"), reply
        base = _header(reply, "content-base")
        setup = (
            f"SETUP {base}stream=0 RTSP/1.0\r\nCSeq: 2\r\n"
            "Transport: RTP/AVP;unicast;client_port=40000-40001\r\n\r\n"
        )
        start = time.monotonic()
        sock.sendall(setup.encode())
        answer = _rtsp_reply(sock)
        assert answer.startswith("RTSP/1.0 461"), answer
        assert time.monotonic() - start < 1.0


def _header(reply: str, name: str) -> str:
    """The value of header ``name`` (any case) in an RTSP reply."""
    return next(
        line.split(":", 1)[1].strip()
        for line in reply.splitlines()
        if line.lower().startswith(name.lower() + ":")
    )


def _rtsp_reply(sock: socket.socket) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        0,
    )
    while len(rest) < length:
        rest += sock.recv(4096)
    return (head + b"\r\n\r\n" + rest).decode(errors="replace")


def test_ten_clients_of_one_camera_are_one_encoder(rtsp):
    url = f"{rtsp.rtsp}/back_fisheye_image?token={TOKEN}"
    cmd = [FFMPEG or "ffmpeg", "-v", "error", "-rtsp_transport", "tcp", "-i", url]
    cmd += ["-t", "20", "-c", "copy", "-f", "null", "-"]
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(spawn(cmd)) for _ in range(10)]

        def playing() -> dict | None:  # ten clients, each a good part of a second in
            s = state(rtsp)["rtsp"]
            mine = [c for c in s["clients"] if c["source"] == "back_fisheye_image"]
            return s if len(mine) == 10 and all(c["bytes_sent"] > 50_000 for c in mine) else None

        seen = wait_until(playing, 30, "ten RTSP clients playing")
        encoders = [e for e in seen["encoders"] if e.startswith("back_fisheye_image|")]
        assert len(encoders) == 1, seen
        assert metric(rtsp, "spotrelay_rtsp_clients", source="back_fisheye_image") == 10
        assert all(p.poll() is None for p in procs)

    def encoding() -> bool:
        return any(e.startswith("back_fisheye_image|") for e in state(rtsp)["rtsp"]["encoders"])

    wait_until(lambda: not encoding(), 15, "the encoder gone with its last viewer")
    assert metric(rtsp, "spotrelay_rtsp_bytes_sent_total", source="back_fisheye_image") > 500_000


def test_a_client_that_stops_reading_is_dropped_within_the_client_timeout(rtsp):
    """It sends nothing more and reads nothing: GStreamer alone would keep it for a minute or
    more; the relay closes it within --client-timeout (3 s here) of falling behind."""
    port = int(rtsp.rtsp.split(":")[-1])
    url = f"{rtsp.rtsp}/left_fisheye_image?token={TOKEN}"
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    try:
        sock.settimeout(10)
        sock.sendall(f"DESCRIBE {url} RTSP/1.0\r\nCSeq: 1\r\n\r\n".encode())
        reply = _rtsp_reply(sock)
        base = _header(reply, "content-base")
        sock.sendall(
            f"SETUP {base}stream=0 RTSP/1.0\r\nCSeq: 2\r\n{TCP_TRANSPORT}\r\n\r\n".encode()
        )
        setup = _rtsp_reply(sock)
        session = _header(setup, "session").split(";")[0]
        sock.sendall(f"PLAY {base} RTSP/1.0\r\nCSeq: 3\r\nSession: {session}\r\n\r\n".encode())
        started = time.monotonic()
        wait_until(
            lambda: (
                not any(c["source"] == "left_fisheye_image" for c in state(rtsp)["rtsp"]["clients"])
            ),
            20,
            "the stalled client closed",
        )
        took = time.monotonic() - started
    finally:
        sock.close()
    print(f"closed {took:.1f} s after PLAY")
    assert took < 3 + 6  # --client-timeout, plus the seconds its buffers take to fill


def _send(sock: socket.socket, line: str, cseq: int, *headers: str, token: bool = True) -> None:
    """One request, with the token as Basic credentials unless ``token=False``; its reply is
    left unread."""
    if token:
        basic = base64.b64encode(f"spotrelay:{TOKEN}".encode()).decode()
        headers = (f"Authorization: Basic {basic}", *headers)
    head = "".join(f"{h}\r\n" for h in (f"CSeq: {cseq}", *headers))
    sock.sendall(f"{line} RTSP/1.0\r\n{head}\r\n".encode())


def _request(sock: socket.socket, line: str, cseq: int, *headers: str) -> str:
    _send(sock, line, cseq, *headers)
    return _rtsp_reply(sock)


def test_without_the_token_nothing_is_learnt_about_cameras_or_parameters(rtsp):
    """A stranger on the LAN gets the same 401 (with the Basic and Digest challenges, so a
    player that has the token still logs in) whether the camera exists, the parameters are
    bad or the path is empty: names and limits are told only to a client with the token."""
    port = int(rtsp.rtsp.split(":")[-1])
    base = f"rtsp://127.0.0.1:{port}"
    asked = [
        f"DESCRIBE {base}/{CAMERA}",
        f"DESCRIBE {base}/no_such_camera",
        f"DESCRIBE {base}/{CAMERA}?width=5",
        f"DESCRIBE {base}/",
        f"SETUP {base}/no_such_camera/stream=0",
        f"SETUP {base}/{CAMERA}/stream=0?width=5",
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for cseq, line in enumerate(asked, start=1):
            _send(sock, line, cseq, TCP_TRANSPORT, token=False)
            reply = _rtsp_reply(sock)
            assert reply.startswith("RTSP/1.0 401"), (line, reply)
            assert _header(reply, "cseq") == str(cseq), (line, reply)  # one reply a request
            challenges = [x for x in reply.split("\r\n") if x.lower().startswith("www-auth")]
            assert any("Digest" in c for c in challenges), reply
            assert any("Basic" in c for c in challenges), reply
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # with the token
        unknown = _request(sock, f"DESCRIBE {base}/no_such_camera", 1)
        assert unknown.startswith("RTSP/1.0 404"), unknown
        bad = _request(sock, f"DESCRIBE {base}/{CAMERA}?width=5", 2)
        assert bad.startswith("RTSP/1.0 400"), bad


def test_a_setup_without_describe_is_admitted_like_any_client_and_counted_once(rtsp):
    """RTSP does not require a DESCRIBE: a client that goes straight to SETUP meets the same
    limits and shows in the state and metrics; pausing and playing again (a player's pause
    button) is still one client."""
    port = int(rtsp.rtsp.split(":")[-1])
    source = "frontright_fisheye_image"
    media = f"rtsp://127.0.0.1:{port}/{source}"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        bad = _request(sock, f"SETUP {media}/stream=0?width=5", 1, TCP_TRANSPORT)
        assert bad.startswith("RTSP/1.0 400"), bad
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        setup = _request(sock, f"SETUP {media}/stream=0", 1, TCP_TRANSPORT)
        assert setup.startswith("RTSP/1.0 200"), setup
        session = _header(setup, "session").split(";")[0]
        for cseq, method in enumerate(("PLAY", "PAUSE", "PLAY"), start=2):
            _send(sock, f"{method} {media}", cseq, f"Session: {session}")

        def encoding() -> dict | None:
            s = state(rtsp)
            fed = [c for c in s["clients"] if c["kind"] == "rtsp" and c["source"] == source]
            mine = [c for c in s["rtsp"]["clients"] if c["source"] == source]
            return s if mine and fed and fed[0]["frames_sent"] > 15 else None

        wait_until(encoding, 20, "the client listed, its encoder fed")
        assert metric(rtsp, "spotrelay_rtsp_clients", source=source) == 1
    wait_until(lambda: metric(rtsp, "spotrelay_rtsp_clients", source=source) == 0, 20, "it left")
    assert "Traceback" not in rtsp.log()


def test_a_connection_that_never_plays_is_closed_and_its_slot_given_back(rtsp):
    """Connected and silent, or a DESCRIBE and nothing more: GStreamer alone keeps it for ever,
    holding a slot of --max-clients (and any encoder the DESCRIBE started)."""
    port = int(rtsp.rtsp.split(":")[-1])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as idle:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as described:
            reply = _request(described, f"DESCRIBE {rtsp.rtsp}/back_depth?width=200", 1)
            assert reply.startswith("RTSP/1.0 200"), reply
            started = time.monotonic()
            assert described.recv(1024) == b""  # closed by the relay
            assert idle.recv(1024) == b""
        took = time.monotonic() - started
    assert took < 3 + 2, took  # --idle-timeout, and the watch's half-second look


def test_vlc_plays_it(rtsp):
    """VLC opens RTSP through its live555 module, which Debian does not ship (liblivemedia is
    not in Debian): there, this cannot be tested, and VLC users get ffplay or OpenCV instead."""
    if CVLC is None:
        pytest.skip("VLC not installed (.ci/run installs vlc-bin)")
    modules = subprocess.run(
        [CVLC, "--list"],
        capture_output=True,
        text=True,
        timeout=30,
        user="nobody" if os.geteuid() == 0 else None,
    )
    if "live555" not in modules.stdout:
        pytest.skip("this VLC has no live555 module (Debian's): it cannot open RTSP at all")
    out = Path(tempfile.mkdtemp(prefix="spotrelay-vlc-rtsp-"))
    out.chmod(0o777)
    url = f"rtsp://spotrelay:{TOKEN}@127.0.0.1:{rtsp.rtsp.split(':')[-1]}/{CAMERA}?width=320"
    cmd = [CVLC, "-I", "dummy", "--no-audio", "--vout=dummy", "--video-filter=scene"]
    cmd += [f"--scene-path={out}", "--scene-format=png", "--scene-ratio=1", "--rtsp-tcp", url]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "nobody", "--", *cmd]
    try:
        with spawn(cmd):
            wait_until(lambda: len(list(out.glob("*.png"))) >= 12, 30, "VLC decoding 12 pictures")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_the_api_says_each_cameras_rtsp_address(rtsp):
    status, _, body = rtsp.get("/api/sources", headers=rtsp.headers)
    assert status == 200
    port = rtsp.rtsp.split(":")[-1]
    for source in json.loads(body)["sources"]:
        assert source["rtsp"] == f"rtsp://127.0.0.1:{port}/{source['name']}", source
