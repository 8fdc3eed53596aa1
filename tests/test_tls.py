"""HTTPS end to end: the certificate the relay makes and keeps, the user's own, plain HTTP on the
TLS port, and real clients over TLS: curl, Chromium (the page and its live tiles over WSS) and a
Prometheus server scraping with the relay's certificate as CA and ``server_name: spotrelay``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from spotrelay import tls
from tests.browser import CHROMIUM, chromium, devtools
from tests.procs import spawn
from tests.relay import Relay, free_port
from tests.wait import wait_until

pytestmark = pytest.mark.e2e
PROMETHEUS, CURL = shutil.which("prometheus"), shutil.which("curl")


def served_certificate(port: int) -> bytes:
    """The certificate a TLS client gets from 127.0.0.1:``port`` (DER)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), 5) as raw,
        ctx.wrap_socket(raw, server_hostname="spotrelay") as conn,
    ):
        return conn.getpeercert(binary_form=True)


def https_get(relay: Relay, path: str, ca: Path) -> bytes:
    """GET over TLS, checking the certificate against ``ca`` for the name ``spotrelay``."""
    ctx = ssl.create_default_context(cafile=str(ca))
    request = f"GET {path} HTTP/1.1\r\nHost: spotrelay\r\nConnection: close\r\n\r\n"
    with (
        socket.create_connection(("127.0.0.1", relay.port), 5) as raw,
        ctx.wrap_socket(raw, server_hostname="spotrelay") as conn,
    ):
        conn.sendall(request.encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data


@pytest.fixture(scope="module")
def tls_relay(sim, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    r = Relay.for_sim(
        sim,
        "--tls",
        "--tls-dir",
        str(folder),
        "--sources",
        "left_fisheye_image,back_depth",
        covered=True,
    )
    r.url = f"https://127.0.0.1:{r.port}"
    r.folder = folder  # type: ignore[attr-defined]
    wait_until(lambda: (folder / tls.CERT).exists(), 20, "the certificate made")
    wait_until(
        lambda: b"200 OK" in https_get(r, "/readyz", folder / tls.CERT).split(b"\r\n")[0],
        30,
        "the relay ready over HTTPS",
        ignore=(OSError,),
    )
    yield r
    r.stop()


def test_https_with_a_certificate_made_once_and_kept(sim, tls_relay):
    folder = tls_relay.folder
    cert = folder / tls.CERT
    assert (folder / tls.KEY).stat().st_mode & 0o077 == 0  # the key is the relay's only
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    names = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "spotrelay" in names.get_values_for_type(x509.DNSName)
    first = served_certificate(tls_relay.port)
    reply = https_get(tls_relay, "/api/sources", cert)
    assert reply.startswith(b"HTTP/1.1 200") and b"left_fisheye_image" in reply
    # a restart keeps it: clients that trust it go on trusting it
    again = Relay.for_sim(sim, "--tls", "--tls-dir", str(folder))
    try:
        wait_until(lambda: served_certificate(again.port), 30, "HTTPS again", ignore=(OSError,))
        assert served_certificate(again.port) == first
    finally:
        again.stop()


def test_plain_http_on_the_tls_port_gets_no_camera_data(tls_relay):
    with socket.create_connection(("127.0.0.1", tls_relay.port), 5) as sock:
        sock.sendall(b"GET /snapshot/left_fisheye_image HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except OSError:
            pass
    assert b"\xff\xd8" not in got and b"200 OK" not in got, got[:200]


def test_the_users_own_certificate(sim, tmp_path):
    own = tmp_path / "own"
    cert, key = tls.ensure_certificate(own, ["relay.example"])
    relay = Relay.for_sim(sim, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        wait_until(lambda: served_certificate(relay.port), 30, "HTTPS", ignore=(OSError,))
        pem = x509.load_pem_x509_certificate(cert.read_bytes())
        assert served_certificate(relay.port) == pem.public_bytes(serialization.Encoding.DER)
    finally:
        relay.stop()


@pytest.mark.skipif(CURL is None, reason="curl not installed")
def test_curl_over_tls_with_the_certificate_as_ca(tls_relay):
    cert = tls_relay.folder / tls.CERT
    port = tls_relay.port
    cmd = [CURL or "curl", "-sS", "--cacert", str(cert), "--resolve", f"spotrelay:{port}:127.0.0.1"]
    cmd += ["-o", "/dev/null", "-w", "%{http_code} %{content_type}"]
    cmd += [f"https://spotrelay:{port}/snapshot/left_fisheye_image"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.stdout == "200 image/jpeg", out.stdout + out.stderr


def _spki(cert: Path) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list takes: base64 SHA-256 of the key."""
    key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium")
def test_the_viewer_page_and_its_live_tiles_over_https_and_wss(tls_relay):
    trust = f"--ignore-certificate-errors-spki-list={_spki(tls_relay.folder / tls.CERT)}"
    with chromium(tls_relay.url + "/", "--disable-quic", trust) as ws_url:
        tiles = asyncio.run(_tiles(ws_url))
    assert len(tiles) == 2 and all(t["fps"] > 2 for t in tiles), tiles
    assert all(t["scheme"] == "https:" for t in tiles), tiles


async def _tiles(ws_url: str) -> list[dict]:
    async with devtools(ws_url) as page:
        return await page.until(
            "[...document.querySelectorAll('.tile')].map(t => ({scheme: location.protocol,"
            " fps: parseFloat(t.querySelector('.info').textContent) || 0}))",
            "v.length == 2 && v.every(t => t.fps > 2)",
            timeout=30,
        )


@pytest.mark.skipif(PROMETHEUS is None and not os.environ.get("CI"), reason="no prometheus")
def test_prometheus_scrapes_over_tls_with_the_certificate_and_server_name(tls_relay):
    work = Path(tempfile.mkdtemp(prefix="spotrelay-prom-tls-"))
    cert = tls_relay.folder / tls.CERT
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 500ms}\n"
        "scrape_configs:\n"
        "  - job_name: spotrelay\n"
        "    scheme: https\n"
        f"    tls_config: {{ca_file: {json.dumps(str(cert))}, server_name: spotrelay}}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{tls_relay.port}']}}]\n"
    )
    port = free_port()
    try:
        cmd = [PROMETHEUS or "prometheus", f"--config.file={work / 'prometheus.yml'}"]
        cmd += [f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"]
        with spawn(cmd):
            query = f"http://127.0.0.1:{port}/api/v1/query?query=up"

            def up() -> bool:
                with urllib.request.urlopen(query, timeout=2) as resp:
                    result = json.load(resp)["data"]["result"]
                return bool(result) and result[0]["value"][1] == "1"

            wait_until(up, 30, "Prometheus scraping over TLS", ignore=(OSError, KeyError))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_containers_health_check_asks_over_https(tls_relay):
    """Docker's HEALTHCHECK runs this command; asked in plain HTTP, a TLS relay would look dead
    and be restarted for ever."""
    env = {"SPOTRELAY_PORT": str(tls_relay.port), "PATH": os.environ["PATH"]}
    cmd = [sys.executable, "-m", "spotrelay.healthcheck"]
    healthy = subprocess.run(
        cmd, env={**env, "SPOTRELAY_TLS": "1"}, capture_output=True, timeout=30
    )
    assert healthy.returncode == 0, healthy.stderr
    plain = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    assert plain.returncode == 1 and "/healthz" in plain.stderr, plain.stderr
