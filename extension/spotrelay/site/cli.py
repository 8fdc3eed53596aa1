"""``spotrelay site-config``: configuration for a base station that re-serves a fleet's cameras.

The relay on each robot stays the single puller of its cameras; a base station on the site LAN runs
go2rtc (fan-out to many viewers, RTSP/WebRTC/HLS) and Prometheus (one place to watch every robot).
This command asks each relay's ``/api/sources`` and writes, into one directory:

* ``go2rtc.yaml``: one go2rtc stream per robot camera, named ``ROBOT_SOURCE``, pulling the relay's
  MJPEG once. With ``--h264`` each stream also gets an ffmpeg producer that transcodes to H.264
  (started by go2rtc only while someone wants H.264: WebRTC, HLS, RTSP).
* ``targets.json``: Prometheus ``file_sd`` targets, one per robot, labelled ``robot``.
* ``prometheus.yml``: a scrape job reading those targets, and the rules linked beside it.
* ``site.json``: what was generated, so the next run knows what changed.

Re-running it after a robot or camera change updates both engines without restarting them:
Prometheus re-reads ``targets.json`` by itself, and streams that are new or changed are pushed to a
running go2rtc through its API (``PUT``/``DELETE /api/streams``), so viewers of the other streams
keep playing.

The relay's token never lands in a generated file: go2rtc's config says ``${SPOTRELAY_TOKEN}``,
which go2rtc resolves from ``credentials/SPOTRELAY_TOKEN`` (a link to the token file, read through
``$CREDENTIALS_DIRECTORY``) and masks in its API and logs; Prometheus reads the same file through
``credentials_file``. go2rtc.yaml is still written 0600, because go2rtc's own API writes the
resolved sources into it when streams are added at run time (we rewrite it right after).

Standard library only: the relay's image must not grow for a command that runs elsewhere.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

TOKEN_VAR = "SPOTRELAY_TOKEN"
CA_FILE = "relay-ca.crt"  # in credentials/: what run.sh gives go2rtc as SSL_CERT_FILE
# go2rtc substitutes the token as is into source URLs (``?token=``); a character that needs
# escaping in a URL would break them, and whitespace is refused by go2rtc's API.
TOKEN_RE = re.compile(r"[A-Za-z0-9._~-]+")
# Streams are named ROBOT_SOURCE; no "_" in robot names keeps that split unambiguous.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# ffmpeg reads go2rtc's MJPEG as multipart (each JPEG delimited by its Content-Length, so no
# parser holds a frame back until the next one starts: one frame period less latency than
# `-f mjpeg`), starting at once instead of probing for seconds.
FFMPEG_INPUT = (
    "-f mpjpeg -probesize 32 -analyzeduration 0 -fflags +nobuffer+noparse+nofillin "
    "-flags low_delay -i {input}"
)
# go2rtc's h264 preset, plus: each frame stamped with the wall clock when decoded, at 1/90000 s
# (MJPEG carries no timestamps, and ffmpeg's guess is a 25 fps grid); frames passed through at
# the camera's own rate instead of duplicated to 25 fps; a keyframe a second (a new viewer waits
# at most that long) and no B-frames.
FFMPEG_H264 = (
    "-vf settb=1/90000,setpts=(RTCTIME-RTCSTART)/(TB*1000000) -fps_mode passthrough "
    "-enc_time_base:v 1:90000 -c:v libx264 -g 15 -bf 0 -profile:v high -level:v 4.1 "
    "-preset:v superfast -tune:v zerolatency -pix_fmt:v yuv420p"
)


class SiteError(Exception):
    """A problem worth one line on stderr."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump, like the relay
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="spotrelay site-config",
        description="Write go2rtc and Prometheus configuration for a base station serving the "
        "cameras of several robots' relays. Re-run after a change: running engines are updated.",
    )
    p.add_argument(
        "--robot",
        action="append",
        required=True,
        metavar="NAME=URL",
        help="a robot's name and its relay, e.g. spot-1=http://192.168.80.3:21080 (repeat)",
    )
    p.add_argument("--cameras", metavar="A,B", help="only these sources (default: every one)")
    p.add_argument("--h264", action="store_true", help="transcode to H.264 for RTSP/WebRTC/HLS")
    p.add_argument(
        "--from-rtsp",
        action="store_true",
        help="take each camera as H.264 from the relay's own RTSP output (relays started with "
        "--rtsp-port): no re-encode at the base, a sixth of MJPEG's bytes on the robot's link",
    )
    p.add_argument("--token-file", metavar="PATH", help="file holding the relays' access token")
    p.add_argument(
        "--ca-file",
        metavar="PATH",
        help="relays with --tls (https:// URLs): the certificate to trust (the relay's "
        "spotrelay.crt); Prometheus checks it for the name spotrelay, go2rtc for the URL's "
        "address (add it to the relay's --tls-names)",
    )
    p.add_argument("--out", default="spotrelay-site", help="output directory (default %(default)s)")
    p.add_argument("--listen", default="", help="go2rtc's address (default: every interface)")
    p.add_argument("--api-port", type=int, default=1984, help="go2rtc web page and API")
    p.add_argument("--rtsp-port", type=int, default=8554, help="go2rtc RTSP server")
    p.add_argument("--webrtc-port", type=int, default=8555, help="go2rtc WebRTC (TCP and UDP)")
    p.add_argument("--scrape-interval", default="5s", help="Prometheus scrape and rule interval")
    return p


# -- asking the relays ----------------------------------------------------------------------------


def parse_robot(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not NAME_RE.fullmatch(name):
        raise SiteError(f"--robot {text!r}: expected NAME=URL, NAME of letters, digits and -")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SiteError(f"--robot {text!r}: the URL must be http(s)://HOST:PORT of the relay")
    return name, url.rstrip("/")


def read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise SiteError(f"--token-file {path}: {exc.strerror}") from None
    if not TOKEN_RE.fullmatch(token):
        raise SiteError(
            f"--token-file {path}: the token must be letters, digits and . _ ~ - only "
            "(go2rtc puts it into URLs as is); e.g. make one with `openssl rand -hex 16`"
        )
    return token


def fetch_sources(url: str, token: str | None) -> list[dict[str, Any]]:
    req = urllib.request.Request(url + "/api/sources")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.load(resp)["sources"]
    except urllib.error.HTTPError as exc:
        raise SiteError(f"{url}/api/sources answered {exc.code} {exc.reason}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise SiteError(f"{url}/api/sources: {getattr(exc, 'reason', exc)}") from None


# -- what to write --------------------------------------------------------------------------------


def stream_sources(
    name: str,
    relay: str,
    path: str,
    *,
    token: bool,
    h264: bool,
    api: str,
    rtsp: str | None = None,
) -> list[str]:
    """go2rtc sources of one stream: the relay's MJPEG, then (``--h264``) ffmpeg's transcode;
    or (``--from-rtsp``, ``rtsp`` the relay's RTSP URL of the camera) the relay's own H.264,
    which go2rtc re-serves as it is (RTSP, WebRTC, HLS; MJPEG viewers then cost go2rtc a
    decode).

    ffmpeg reads go2rtc's own MJPEG output of the stream, not the relay: the relay is pulled once
    whoever watches, and the token never reaches ffmpeg's command line. (Not go2rtc's usual
    ``ffmpeg:NAME`` shortcut: that goes through RTSP, whose JPEG payload format cannot carry the
    greyscale JPEGs of Spot's fisheye cameras.)
    """
    if rtsp is not None:  # go2rtc's RTSP client uses TCP, as the relay wants
        return [rtsp + (f"?token=${{{TOKEN_VAR}}}" if token else "")]
    mjpeg = relay + path + (f"?token=${{{TOKEN_VAR}}}" if token else "")
    if not h264:
        return [mjpeg]
    own = f"{api}/api/stream.mjpeg?src={urllib.parse.quote(name)}"
    return [mjpeg, f"ffmpeg:{own}#input=spotrelay/input#video=spotrelay/h264"]


def _q(value: str) -> str:
    """A YAML scalar: JSON's double-quoted strings are valid YAML."""
    return json.dumps(value)


def go2rtc_yaml(
    streams: dict[str, list[str]], args: argparse.Namespace, token: bool, h264: bool
) -> str:
    """go2rtc's config in block YAML, written by hand (no YAML library in the relay's image)."""

    def section(name: str, **keys: str) -> list[str]:
        return [f"{name}:"] + [f"  {k}: {_q(v)}" for k, v in keys.items()]

    # With a token, go2rtc asks the same of LAN viewers (user "spotrelay", password = the token);
    # otherwise it would open up what the relay protects. go2rtc exempts localhost by design.
    auth = {"username": "spotrelay", "password": f"${{{TOKEN_VAR}}}"} if token else {}
    rtsp = {"default_query": "video=h264"} if h264 else {}  # else RTSP viewers get what comes
    lines = [
        "# Written by `spotrelay site-config`: re-run it instead of editing (see deploy/site).",
        *section("api", listen=f"{args.listen}:{args.api_port}", **auth),
        *section("rtsp", listen=f"{args.listen}:{args.rtsp_port}", **rtsp, **auth),
        *section("webrtc", listen=f"{args.listen}:{args.webrtc_port}"),
        *section("log", format="text"),
    ]
    if h264:
        lines += section(
            "ffmpeg", **{"spotrelay/input": FFMPEG_INPUT, "spotrelay/h264": FFMPEG_H264}
        )
    lines.append("streams:")
    for name, sources in streams.items():
        lines += [f"  {_q(name)}:"] + [f"    - {_q(s)}" for s in sources]
    return "\n".join(lines) + "\n"


def file_sd(relays: dict[str, str]) -> list[dict[str, Any]]:
    """One target group per robot; scheme and path ride along as the special labels."""
    groups = []
    for robot, url in relays.items():
        parts = urllib.parse.urlsplit(url)
        labels = {"robot": robot, "__scheme__": parts.scheme}
        labels["__metrics_path__"] = parts.path + "/metrics"
        groups.append({"targets": [parts.netloc], "labels": labels})
    return groups


def prometheus_yml(interval: str, token: bool, ca: bool = False) -> str:
    auth = (
        f"    authorization:\n      type: Bearer\n      credentials_file: credentials/{TOKEN_VAR}\n"
        if token
        else ""
    )
    if ca:  # relays' self-made certificates name "spotrelay", not the address they are reached at
        auth += (
            f"    tls_config:\n      ca_file: credentials/{CA_FILE}\n      server_name: spotrelay\n"
        )
    return (
        "# Written by `spotrelay site-config`. Paths are relative to this file. Robots come and\n"
        "# go through targets.json, which Prometheus re-reads by itself.\n"
        f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n"
        'rule_files:\n  - "*.rules.yml"\n'
        "scrape_configs:\n  - job_name: spotrelay\n" + auth + "    file_sd_configs:\n"
        '      - files: ["targets.json"]\n'
    )


def write(path: Path, text: str, mode: int = 0o644) -> None:
    """Atomically (readers such as Prometheus' file_sd never see half a file), with ``mode``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_token(out: Path, token_file: str | None) -> None:
    """credentials/SPOTRELAY_TOKEN -> the token file: both engines read the secret from there."""
    creds = out / "credentials"
    creds.mkdir(mode=0o700, exist_ok=True)
    creds.chmod(0o700)
    link = creds / TOKEN_VAR
    link.unlink(missing_ok=True)
    if token_file:
        link.symlink_to(Path(token_file).resolve())


# -- updating a running go2rtc --------------------------------------------------------------------


def _go2rtc(
    api: str, token: str | None, method: str, query: list[tuple[str, str]] | None = None
) -> bytes:
    """One call to go2rtc's stream API, with its login when there is one (go2rtc waives it for
    localhost, but not when it listens on a LAN address only)."""
    url = f"{api}/api/streams" + ("?" + urllib.parse.urlencode(query) if query else "")
    req = urllib.request.Request(url, method=method)
    if token:
        login = base64.b64encode(f"spotrelay:{token}".encode()).decode()
        req.add_header("Authorization", f"Basic {login}")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.read()


def update_go2rtc(
    api: str, old: dict[str, list[str]], new: dict[str, list[str]], token: str | None
) -> list[str] | None:
    """Push new, changed and removed streams to a running go2rtc; None if none is running.

    Streams that did not change are not touched, so their viewers keep playing.
    """
    try:
        running = set(json.loads(_go2rtc(api, token, "GET")))
    except (OSError, ValueError):
        return None
    changes = []
    try:
        for name, sources in new.items():
            if name not in running or old.get(name) != sources:
                resolved = [s.replace(f"${{{TOKEN_VAR}}}", token or "") for s in sources]
                _go2rtc(api, token, "PUT", [("name", name)] + [("src", s) for s in resolved])
                changes.append(f"+{name}")
        for name in sorted((set(old) & running) - set(new)):
            _go2rtc(api, token, "DELETE", [("src", name)])
            changes.append(f"-{name}")
    except urllib.error.HTTPError as exc:
        raise SiteError(f"go2rtc refused {changes}: {exc.read().decode().strip()}") from None
    except OSError as exc:
        raise SiteError(f"go2rtc at {api}: {exc}") from None
    return changes


# -- the command ----------------------------------------------------------------------------------


def generate(args: argparse.Namespace) -> str:
    relays = dict(parse_robot(r) for r in args.robot)
    if len(relays) != len(args.robot):
        raise SiteError("--robot: each robot needs its own name")
    if args.h264 and args.from_rtsp:
        raise SiteError("--h264 (re-encode at the base) or --from-rtsp (the relay's H.264): one")
    token = read_token(args.token_file) if args.token_file else None
    wanted = [c.strip() for c in args.cameras.split(",") if c.strip()] if args.cameras else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "site.json"
    previous = json.loads(state_path.read_text()) if state_path.exists() else {}

    host = args.listen if args.listen not in ("", "0.0.0.0", "::") else "127.0.0.1"
    api = f"http://{host}:{args.api_port}"
    streams: dict[str, list[str]] = {}
    cameras: dict[str, list[str]] = {}
    notes = []
    for robot, url in relays.items():
        try:
            listed = fetch_sources(url, token)
            sources = {s["name"]: s["stream"] for s in listed}
            rtsp_of = {s["name"]: s.get("rtsp") for s in listed}
        except SiteError as exc:
            kept = previous.get("cameras", {}).get(robot)
            if previous.get("relays", {}).get(robot) != url or not kept:
                raise SiteError(f"robot {robot}: {exc}") from None
            notes.append(f"robot {robot} did not answer ({exc}): keeping its cameras from last run")
            sources = {name: f"/stream/{name}" for name in kept}
            rtsp_of = {  # the last run's RTSP addresses, from the streams it wrote
                name: previous["streams"][f"{robot}_{name}"][0].split("?")[0]
                for name in kept
                if previous.get("streams", {}).get(f"{robot}_{name}", [""])[0].startswith("rtsp")
            }
        if wanted:
            missing = [c for c in wanted if c not in sources]
            if missing:
                have = ", ".join(sorted(sources))
                raise SiteError(f"robot {robot} has no {', '.join(missing)}; it has {have}")
            sources = {c: sources[c] for c in wanted}
        if args.from_rtsp and not all(rtsp_of.get(c) for c in sources):
            raise SiteError(
                f"robot {robot}'s relay serves no RTSP: start it with --rtsp-port "
                "(SPOTRELAY_RTSP_PORT; 21082 in the extension), or use --h264"
            )
        cameras[robot] = sorted(sources)
        for source in cameras[robot]:
            name = f"{robot}_{source}"
            streams[name] = stream_sources(
                name,
                url,
                sources[source],
                token=bool(token),
                h264=args.h264,
                api=api,
                rtsp=rtsp_of[source] if args.from_rtsp else None,
            )

    settings = {
        "token": bool(token),
        "h264": args.h264,
        "from_rtsp": args.from_rtsp,
        "listen": [args.listen, args.api_port, args.rtsp_port, args.webrtc_port],
        "scrape_interval": args.scrape_interval,
    }
    link_token(out, args.token_file)
    changes = update_go2rtc(api, previous.get("streams", {}), streams, token)
    write(out / "go2rtc.yaml", go2rtc_yaml(streams, args, bool(token), args.h264), 0o600)
    write(out / "targets.json", json.dumps(file_sd(relays), indent=1) + "\n")
    if args.ca_file:
        try:
            ca = Path(args.ca_file).read_text()
        except OSError as exc:
            raise SiteError(f"--ca-file {args.ca_file}: {exc.strerror}") from None
        if "BEGIN CERTIFICATE" not in ca:
            raise SiteError(f"--ca-file {args.ca_file}: not a PEM certificate")
        write(out / "credentials" / CA_FILE, ca)
    else:
        (out / "credentials" / CA_FILE).unlink(missing_ok=True)
    write(
        out / "prometheus.yml",
        prometheus_yml(args.scrape_interval, bool(token), bool(args.ca_file)),
    )
    state = {"relays": relays, "cameras": cameras, "streams": streams, "settings": settings}
    write(out / "site.json", json.dumps(state, indent=1) + "\n")

    if changes is None:
        notes.append(f"go2rtc is not running at {api}: start it with `make site`")
    else:
        notes.append(f"go2rtc at {api} updated: {' '.join(changes) or 'no stream changed'}")
        if previous.get("settings", settings) != settings:
            notes.append("token, ports, --h264 or interval changed: restart `make site` for them")
    total = sum(len(c) for c in cameras.values())
    return "\n".join(
        [
            f"wrote {out}/: {_count(total, 'stream')} from {_count(len(relays), 'robot')} "
            f"({', '.join(relays)})",
            *notes,
        ]
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(generate(args))
    except SiteError as exc:
        sys.stderr.write(f"spotrelay site-config: error: {exc}\n")
        return 1
    return 0
