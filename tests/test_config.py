"""Configuration in-process: flags, SPOTRELAY_* variables, and the one-line errors a user meets
first when something is mistyped in a compose file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from spotrelay import config
from spotrelay.config import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("SPOTRELAY_", "BOSDYN_")):
            monkeypatch.delenv(key)


LOGIN = {"BOSDYN_CLIENT_USERNAME": "u", "BOSDYN_CLIENT_PASSWORD": "p"}


def load(argv: list[str], env: dict[str, str] | None = None, monkeypatch=None):
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    return config.load(argv)


def test_defaults_and_flags(monkeypatch):
    cfg = load(["--robot", "10.0.0.3"], LOGIN, monkeypatch)
    assert (cfg.robot, cfg.robot_port, cfg.port, cfg.bind) == ("10.0.0.3", 443, 21080, "0.0.0.0")
    assert cfg.image_services == ("image",) and cfg.sources == ()
    assert cfg.login == "user" and cfg.username == "u"
    cfg = load(["--robot", "r", "--sources", " a, b,,", "--image-services", "auto"], None, None)
    assert cfg.sources == ("a", "b") and cfg.image_services == ("auto",)
    assert cfg.fetch_raw == ()
    cfg = load(["--robot", "r", "--fetch-raw", "left_fisheye_image,back_fisheye_image"], None, None)
    assert cfg.fetch_raw == ("left_fisheye_image", "back_fisheye_image")


def test_environment_is_read_with_the_flags_own_types_and_flags_win(monkeypatch):
    env = {**LOGIN, "SPOTRELAY_ROBOT": "env-robot", "SPOTRELAY_PORT": "21500"}
    env["SPOTRELAY_IDLE_FPS"] = "0.5"
    cfg = load([], env, monkeypatch)
    assert (cfg.robot, cfg.port, cfg.idle_fps) == ("env-robot", 21500, 0.5)
    assert load(["--port", "21600"], None, None).port == 21600
    monkeypatch.setenv("SPOTRELAY_SIM", "yes")
    assert load([], None, None).sim is True


def test_secrets_are_not_in_the_repr(monkeypatch, tmp_path):
    creds = tmp_path / "payload_guid_and_secret"
    creds.write_text("guid-123\n  s3cr3t-payload \n")
    cfg = load(["--robot", "r", "--payload-credentials-file", str(creds), "--token", "tkn"])
    assert (cfg.guid, cfg.secret, cfg.login) == ("guid-123", "s3cr3t-payload", "payload")
    assert "s3cr3t" not in repr(cfg) and "tkn" not in repr(cfg)


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["--port", "99999", "--sim"], {}, "--port must be in 1..65535"),
        (["--port", "abc", "--sim"], {}, "--port must be an integer"),
        (["--robot", "x"], {}, "BOSDYN_CLIENT_USERNAME"),
        ([], {}, "no robot"),
        ([], {"SPOTRELAY_PORT": "abc", "SPOTRELAY_SIM": "1"}, "SPOTRELAY_PORT"),
        ([], {"SPOTRELAY_SIM": "maybe"}, "SPOTRELAY_SIM"),
        (["--robot", "x", "--payload-credentials-file", "/nonexistent"], {}, "payload credentials"),
        (["--robot", "x", "--guid", "g"], {}, "--guid and --secret"),
        (["--sim", "--log-level", "chatty"], {}, "--log-level"),
        (["--sim", "--idle-fps", "100"], {}, "--idle-fps must be in"),
        (["--sim", "--mission", "--mission-port", "21080"], {}, "--mission-port 21080 is --port"),
        (["--sim", "--rtsp-port", "21080"], {}, "--rtsp-port 21080 is --port too"),
        (["--robot", "x", "--mission", "--mission-host", "127.0.0.1"], LOGIN, "cannot reach"),
        (["--robot", "x", "--mission", "--mission-host", "0.0.0.0"], LOGIN, "192.168.50.5"),
        (["--sim", "--mission-allow", "192.168.50.3,robot"], {}, "'robot' is not an address"),
        (["--sim", "--captures-full", "never"], {}, "delete-oldest, refuse"),
        (["--sim", "--captures-keep-days", "-1"], {}, "--captures-keep-days must be in"),
    ],
)
def test_bad_options_are_one_readable_error(argv, env, says, monkeypatch, capsys):
    with pytest.raises((ConfigError, SystemExit)) as info:
        load(argv, env, monkeypatch)
    # argparse's own errors exit 2 with one line on stderr; ours are ConfigErrors
    said = str(info.value) if isinstance(info.value, ConfigError) else capsys.readouterr().err
    assert says in said and len(said.strip().splitlines()) == 1


def test_the_autowalk_callback_options(monkeypatch):
    cfg = load(
        [], {**LOGIN, "SPOTRELAY_ROBOT": "192.168.50.3", "SPOTRELAY_MISSION": "1"}, monkeypatch
    )
    assert (cfg.mission, cfg.mission_port, cfg.mission_host) == (True, 21081, None)
    assert (cfg.captures_dir, cfg.captures_max_mb) == ("captures", 2048.0)
    # a robot on this very machine (the simulated one) is reached on loopback
    cfg = load(["--robot", "127.0.0.1", "--mission", "--mission-host", "localhost"], None, None)
    assert cfg.mission_host == "localhost"
    assert load(["--sim", "--mission", "--mission-host", "127.0.0.1"], None, None).mission
    assert (cfg.mission_bind, cfg.mission_allow) == (None, ())  # --bind's; the robot's address
    assert (cfg.captures_full, cfg.captures_keep_days) == ("delete-oldest", 7.0)
    cfg = load(
        ["--sim", "--mission-allow", " 192.168.50.3, 10.0.0.0/8", "--captures-full", "refuse"],
        {"SPOTRELAY_MISSION_BIND": "192.168.50.5"},
        monkeypatch,
    )
    assert cfg.mission_allow == ("192.168.50.3", "10.0.0.0/8") and cfg.captures_full == "refuse"
    assert cfg.mission_bind == "192.168.50.5"


@pytest.mark.e2e
def test_cli_error_is_one_line_on_stderr_and_exit_2():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPOTRELAY_", "BOSDYN_"))}
    out = subprocess.run(
        [sys.executable, "-m", "spotrelay", "--robot", "x", "--port", "99999"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--port must be in 1..65535" in lines[0], out.stderr


def test_tls_options_go_together_and_are_checked(tmp_path):
    from spotrelay import config as cfg_mod

    with pytest.raises(cfg_mod.ConfigError, match="--tls-cert and --tls-key go together"):
        cfg_mod.load(["--sim", "--tls-cert", "x.pem"])
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(cfg_mod.ConfigError, match=r"--tls-cert .*not a PEM certificate"):
        cfg_mod.load(["--sim", "--tls-cert", str(bad), "--tls-key", str(bad)])
    from spotrelay import tls

    cert, key = tls.ensure_certificate(tmp_path / "own", [])
    assert cfg_mod.load(["--sim", "--tls-cert", str(cert), "--tls-key", str(key)]).tls
