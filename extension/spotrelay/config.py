"""Configuration: command-line options, each also read from a ``SPOTRELAY_<NAME>`` variable.

A container on the robot is configured through its environment, an operator at a shell through
flags; both go through the same parser so they cannot drift apart. Flags win over the environment.
Errors end the process with one readable line, never a traceback: this is the first thing a user
meets when something is mistyped in a compose file.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import sys
from dataclasses import dataclass, field
from typing import NoReturn

from cryptography import x509

from spotrelay import __version__

ENV_PREFIX = "SPOTRELAY_"
DEFAULT_PORT = 21080


class ConfigError(ValueError):
    """A configuration problem worth one line on stderr."""


@dataclass(frozen=True)
class Config:
    robot: str | None = None
    robot_port: int = 443
    robot_cert: str | None = None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    guid: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    sources: tuple[str, ...] = ()  # empty: every source the image services list
    fetch_raw: tuple[str, ...] = ()  # cameras to ask the robot for uncompressed
    image_services: tuple[str, ...] = ("image",)  # ("auto",): every ImageService in the directory
    sim: bool = False
    token: str | None = field(default=None, repr=False)
    allow_origin: str | None = None
    robot_quality: int = 75
    small_robot_quality: int = 50
    idle_fps: float = 1.0
    stale_after: float = 2.0
    rediscover: float = 10.0
    max_clients: int = 200
    max_clients_per_host: int | None = None  # None: half of max_clients
    client_timeout: float = 10.0
    idle_timeout: float = 10.0
    max_variants: int = 16
    no_queue_control: bool = False
    rtsp_port: int | None = None
    tls: bool = False
    tls_dir: str = "tls"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_names: tuple[str, ...] = ()
    rtsp_max_encoders: int = 8
    mission: bool = False
    mission_port: int = 21081
    mission_host: str | None = None
    # -- trust on the LAN (issue 19): who may call the callback, what the folder may delete --
    mission_bind: str | None = None  # None: --bind
    mission_allow: tuple[str, ...] = ()  # empty: the robot's address (loopback for a local one)
    captures_dir: str = "captures"
    captures_max_mb: float = 2048.0
    captures_full: str = "delete-oldest"  # or "refuse"
    captures_keep_days: float = 7.0
    run_as: tuple[int, int] | None = None
    log_level: str = "INFO"

    @property
    def login(self) -> str:
        """Which way we log in, "payload" or "user"; decided here so the connection never
        guesses."""
        if self.guid and self.secret:
            return "payload"
        return "user"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _key(flag: str) -> str:
    """``--robot-port`` -> ``robot_port``: the Config field, and (upper case) the variable."""
    return flag.lstrip("-").replace("-", "_")


def _env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def _env(key: str) -> str | None:
    value = os.environ.get(_env_name(key))
    return value if value not in (None, "") else None


def _truthy(name: str, value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{_env_name(name)} must be 1/0/true/false, not {value!r}")


def _number_in(name: str, kind: type[int] | type[float], lo: float, hi: float):
    """An argparse type: a number of ``kind`` within lo..hi, with a message naming the option."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {noun}, not {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{name} must be in {lo:g}..{hi:g}, not {value:g}")
        return value

    return parse


def _user(text: str) -> tuple[int, int]:
    """UID or UID:GID (numbers: a minimal image may have no user database)."""
    uid, _, gid = text.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise argparse.ArgumentTypeError(f"--run-as must be UID or UID:GID, not {text!r}")
    return int(uid), int(gid or uid)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _networks(text: str) -> tuple[str, ...]:
    """Comma-separated addresses or networks (``192.168.50.3``, ``10.0.0.0/8``), checked."""
    nets = _csv(text)
    for net in nets:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--mission-allow: {net!r} is not an address or network (a.b.c.d or a.b.c.d/n)"
            ) from None
    return nets


def _choice(name: str, allowed: tuple[str, ...]):
    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"{name} must be one of {', '.join(allowed)}")
        return text

    return parse


# (flag, type, default, help). The env var name is derived from the flag.
_OPTIONS: list[tuple[str, object, object, str]] = [
    ("--robot", str, None, "robot address (e.g. 192.168.80.3; 192.168.50.3 from a CORE I/O)"),
    ("--robot-port", _number_in("--robot-port", int, 1, 65535), 443, "robot gRPC port"),
    ("--robot-cert", str, None, "CA certificate (PEM) to trust instead of the SDK's bundled one"),
    ("--payload-credentials-file", str, None, "file with two lines: payload GUID, then secret"),
    ("--guid", str, None, "payload GUID (with --secret), instead of a user login"),
    ("--secret", str, None, "payload secret (with --guid)"),
    (
        "--port",
        _number_in("--port", int, 1, 65535),
        DEFAULT_PORT,
        "HTTP port (CORE I/O admits 21000-22000)",
    ),
    ("--bind", str, "0.0.0.0", "address the HTTP server (and the Autowalk callback) listen on"),
    ("--sources", _csv, (), "comma-separated image sources to relay (default: all)"),
    (
        "--fetch-raw",
        _csv,
        (),
        "comma-separated cameras to ask the robot for uncompressed (RAW): no JPEG to decode "
        "for resized views, four times the bytes on the robot's link",
    ),
    ("--image-services", _csv, ("image",), "image services to poll, or 'auto' for every one"),
    ("--token", str, None, "require this access token on every request but /healthz and /readyz"),
    (
        "--allow-origin",
        str,
        None,
        "let web pages from this origin read the cameras (CORS, WebSocket); '*' for any",
    ),
    (
        "--robot-quality",
        _number_in("--robot-quality", int, 1, 100),
        75,
        "JPEG quality asked of the robot",
    ),
    (
        "--small-robot-quality",
        _number_in("--small-robot-quality", int, 1, 100),
        50,
        "JPEG quality asked of the robot for a camera only small views watch (half size or "
        "less, quality 70 or less: the viewer page's tiles); at least --robot-quality: never",
    ),
    (
        "--idle-fps",
        _number_in("--idle-fps", float, 0.0, 15.0),
        1.0,
        "poll rate of unwatched sources",
    ),
    (
        "--stale-after",
        _number_in("--stale-after", float, 0.2, 60.0),
        2.0,
        "seconds before a stream is stale",
    ),
    (
        "--rediscover",
        _number_in("--rediscover", float, 1.0, 3600.0),
        10.0,
        "with --image-services auto: seconds between listings of the robot's directory",
    ),
    (
        "--max-clients",
        _number_in("--max-clients", int, 1, 100000),
        200,
        "requests served at once, each stream one; more get 503 (health, metrics always answer)",
    ),
    (
        "--max-clients-per-host",
        _number_in("--max-clients-per-host", int, 1, 100000),
        None,
        "of those, at most this many from one address (default: half of --max-clients)",
    ),
    (
        "--rtsp-port",
        _number_in("--rtsp-port", int, 1, 65535),
        None,
        "serve RTSP (H.264) on this port too; off unless given (needs GStreamer, see README)",
    ),
    (
        "--tls-dir",
        str,
        "tls",
        "with --tls: where the self-made certificate is kept (made on first start, reused)",
    ),
    ("--tls-cert", str, None, "with --tls: your own certificate (PEM), instead of a self-made one"),
    ("--tls-key", str, None, "with --tls-cert: its private key (PEM)"),
    (
        "--tls-names",
        _csv,
        (),
        "more names and addresses for a self-made certificate (e.g. 192.168.80.3,spot-1.lan); "
        "it always names spotrelay, this host and loopback",
    ),
    (
        "--rtsp-max-encoders",
        _number_in("--rtsp-max-encoders", int, 1, 100),
        8,
        "H.264 encoders running at once (one per camera and rendering, shared by its viewers)",
    ),
    (
        "--client-timeout",
        _number_in("--client-timeout", float, 1.0, 3600.0),
        10.0,
        "seconds a viewer may make no progress (nor read a frame) before it is dropped",
    ),
    (
        "--idle-timeout",
        _number_in("--idle-timeout", float, 0.5, 3600.0),
        10.0,
        "seconds a connection may take to send its request, or stay idle between requests",
    ),
    (
        "--max-variants",
        _number_in("--max-variants", int, 1, 1000),
        16,
        "different renderings (size, quality, rotation...) served or reserved at once per camera "
        "(an adaptive viewer reserves its ladder, up to 6)",
    ),
    (
        "--mission-port",
        _number_in("--mission-port", int, 1, 65535),
        21081,
        "Autowalk callback port (plaintext gRPC; a CORE I/O admits 21000-22000)",
    ),
    (
        "--mission-host",
        str,
        None,
        "address the robot reaches the Autowalk callback at (default: ours on the route to the "
        "robot; in a container give the host's, e.g. 192.168.50.5 on a CORE I/O)",
    ),
    (
        "--mission-bind",
        str,
        None,
        "address the Autowalk callback listens on (default: --bind's)",
    ),
    (
        "--mission-allow",
        _networks,
        (),
        "addresses (or networks, a.b.c.d/n) allowed to call the Autowalk callback, "
        "comma-separated (default: the robot's address; loopback for a local robot)",
    ),
    ("--captures-dir", str, "captures", "folder for Autowalk pictures and clips (with --mission)"),
    (
        "--captures-max-mb",
        _number_in("--captures-max-mb", float, 1.0, 10_000_000.0),
        2048.0,
        "size limit of the captures folder (see --captures-full)",
    ),
    (
        "--captures-full",
        _choice("--captures-full", ("delete-oldest", "refuse")),
        "delete-oldest",
        "when the folder is full: delete-oldest (only captures older than --captures-keep-days) "
        "or refuse (never delete); new work that does not fit is refused",
    ),
    (
        "--captures-keep-days",
        _number_in("--captures-keep-days", float, 0.0, 36500.0),
        7.0,
        "captures younger than this are never deleted to make room",
    ),
    (
        "--run-as",
        _user,
        None,
        "started as root: read the credentials, then go on as this UID[:GID]",
    ),
    ("--log-level", str, "INFO", "DEBUG, INFO, WARNING or ERROR"),
]
# (flag, help): on/off switches, also 1/0/true/false in the environment.
_SWITCHES: list[tuple[str, str]] = [
    ("--sim", "use the built-in simulated robot"),
    ("--mission", "serve the Autowalk camera callback and register it in the robot's directory"),
    ("--tls", "serve HTTPS (and WSS, RTSPS): your certificate, or one made and kept in --tls-dir"),
    (
        "--no-queue-control",
        "write viewers' frames as fast as their sockets take them, without waiting for their "
        "links to deliver each (only to compare: make bench-link's baseline)",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="spotrelay",
        description="Relay Spot's cameras over HTTP (MJPEG, snapshots, viewer, metrics). "
        "Every option can also be set as SPOTRELAY_<OPTION> (e.g. SPOTRELAY_ROBOT). "
        "Robot login: BOSDYN_CLIENT_USERNAME / BOSDYN_CLIENT_PASSWORD, or payload credentials.",
    )
    for flag, kind, default, help_text in _OPTIONS:
        env_name = _env_name(_key(flag))
        value = ",".join(default) if isinstance(default, tuple) else default
        shown = "" if default in (None, ()) else f" (default {value})"
        parser.add_argument(flag, type=kind, default=None, help=f"{help_text}{shown} [{env_name}]")
    for flag, help_text in _SWITCHES:
        env_name = _env_name(_key(flag))
        parser.add_argument(
            flag, action="store_true", default=None, help=f"{help_text} [{env_name}]"
        )
    parser.add_argument("--version", action="version", version=f"spotrelay {__version__}")
    return parser


def _resolve(ns: argparse.Namespace) -> dict[str, object]:
    """Flag, else environment (parsed with the flag's own type), else default."""
    values: dict[str, object] = {}
    for flag, kind, default, _ in _OPTIONS:
        key = _key(flag)
        value = getattr(ns, key)
        if value is None and (env := _env(key)) is not None:
            try:
                value = kind(env)  # type: ignore[operator]
            except argparse.ArgumentTypeError as exc:
                raise ConfigError(f"{_env_name(key)}: {exc}") from None
        values[key] = default if value is None else value
    for flag, _ in _SWITCHES:
        key = _key(flag)
        flagged = getattr(ns, key)
        values[key] = flagged if flagged is not None else _truthy(key, _env(key) or "0")
    return values


def _read_payload_credentials(path: str) -> tuple[str, str]:
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line.strip() for line in fh.read().splitlines() if line.strip()]
    except OSError as exc:
        raise ConfigError(f"cannot read payload credentials file {path}: {exc.strerror}") from None
    if len(lines) != 2:
        raise ConfigError(
            f"payload credentials file {path} must hold two lines (GUID, then secret), "
            f"found {len(lines)}"
        )
    return lines[0], lines[1]


def load(argv: list[str] | None = None) -> Config:
    """Parse argv and the environment into a validated Config, or raise ConfigError."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    v = _resolve(ns)
    guid, secret = v.pop("guid"), v.pop("secret")
    creds_file = v.pop("payload_credentials_file")
    if creds_file:
        guid, secret = _read_payload_credentials(str(creds_file))
    if bool(guid) != bool(secret):
        raise ConfigError("--guid and --secret go together")
    level = str(v["log_level"]).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"--log-level must be DEBUG, INFO, WARNING or ERROR, not {level!r}")
    v["log_level"] = level
    username = os.environ.get("BOSDYN_CLIENT_USERNAME") or None
    password = os.environ.get("BOSDYN_CLIENT_PASSWORD") or None
    cfg = Config(guid=guid, secret=secret, username=username, password=password, **v)  # type: ignore[arg-type]
    _check_ports(cfg)
    cfg = _check_tls(cfg)
    if cfg.mission:
        _check_mission(cfg)
    if cfg.sim:
        return cfg
    if not cfg.robot:
        raise ConfigError("no robot: give --robot HOST (or SPOTRELAY_ROBOT), or --sim")
    if cfg.login == "user" and not (cfg.username and cfg.password):
        raise ConfigError(
            "no robot login: set BOSDYN_CLIENT_USERNAME and BOSDYN_CLIENT_PASSWORD, "
            "or give --payload-credentials-file / --guid and --secret"
        )
    if cfg.robot_cert:
        _check_certificate(cfg.robot_cert)
    return cfg


def _local_only(host: str) -> bool:
    """Loopback or unspecified (literal addresses and ``localhost``; names are not resolved)."""
    if host.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_loopback or addr.is_unspecified


def _check_tls(cfg: Config) -> Config:
    """``--tls-cert`` and ``--tls-key`` go together and mean ``--tls``; both must be readable
    PEM (a typo would otherwise only show as handshakes failing)."""
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if cfg.tls_cert:
        _check_certificate(cfg.tls_cert, "--tls-cert")
        try:
            with open(str(cfg.tls_key), "rb") as fh:
                if b"PRIVATE KEY" not in fh.read():
                    raise ConfigError(f"--tls-key {cfg.tls_key}: not a PEM private key")
        except OSError as exc:
            raise ConfigError(f"--tls-key {cfg.tls_key}: {exc.strerror}") from None
        return dataclasses.replace(cfg, tls=True)
    return cfg


def _check_ports(cfg: Config) -> None:
    """Every port the relay listens on is its own."""
    used = {"--port": cfg.port}
    if cfg.mission:
        used["--mission-port"] = cfg.mission_port
    if cfg.rtsp_port is not None:
        used["--rtsp-port"] = cfg.rtsp_port
    seen: dict[int, str] = {}
    for option, port in used.items():
        if port in seen:
            raise ConfigError(f"{option} {port} is {seen[port]} too: every port must differ")
        seen[port] = option


def _check_mission(cfg: Config) -> None:
    """The robot must be able to reach the callback: its own port, at an address of ours."""
    robot_here = cfg.sim or (cfg.robot is not None and _local_only(cfg.robot))
    if cfg.mission_host and _local_only(cfg.mission_host) and not robot_here:
        raise ConfigError(
            f"--mission-host {cfg.mission_host}: the robot cannot reach this computer there; "
            "give its address on the robot's network (192.168.50.5 for a CORE I/O)"
        )


def _check_certificate(path: str, option: str = "--robot-cert") -> None:
    """A CA file that is not a PEM certificate would only show as a TLS failure retried for
    ever, with the SDK blaming the network; say so at start."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"{option} {path}: {exc.strerror}") from None
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(
            f"{option} {path}: not a PEM certificate (expected -----BEGIN CERTIFICATE-----)"
        ) from None


def load_or_exit(argv: list[str] | None = None) -> Config:
    try:
        return load(argv)
    except ConfigError as exc:
        sys.stderr.write(f"spotrelay: error: {exc}\n")
        raise SystemExit(2) from None
