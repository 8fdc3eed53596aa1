"""HTTPS (and WSS, and RTSPS): the relay's certificate, made once and kept, or the user's own.

Everything the relay serves crosses the robot's Wi-Fi, the token included, and the robot's web
views expect HTTPS. With ``--tls`` and no certificate given, the relay makes a self-signed one on
first start and keeps it in ``--tls-dir`` (in the extension, a folder kept across upgrades), so
clients that pinned or trusted it keep working after a restart or an update. A certificate made
on a robot cannot know every address it is reached at (Wi-Fi, the robot's network, a site's
NAT), so it always names ``spotrelay`` (clients give that as the server name, e.g. Prometheus'
``server_name``, curl's ``--resolve``) plus whatever ``--tls-names`` adds (addresses or names).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger("spotrelay")

NAME = "spotrelay"  # the name every certificate the relay makes carries
CERT, KEY = "spotrelay.crt", "spotrelay.key"
VALID_DAYS = 3650


def default_names() -> list[str]:
    """What a self-made certificate names besides ``spotrelay``: this machine's name, and
    loopback (for the container's health check and a local proxy)."""
    return [NAME, socket.gethostname(), "localhost", "127.0.0.1", "::1"]


def ensure_certificate(folder: str | os.PathLike, names: list[str]) -> tuple[Path, Path]:
    """The certificate and key in ``folder``, made now if there are none (kept otherwise, even if
    ``names`` changed: a certificate clients trust must not change under them)."""
    folder = Path(folder)
    cert, key = folder / CERT, folder / KEY
    if cert.exists() and key.exists():
        return cert, key
    folder.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in dict.fromkeys([NAME, *names]):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(private, hashes.SHA256())
    )
    _write(
        key,
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    _write(cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info(
        "made a self-signed TLS certificate in %s for %s",
        folder,
        ", ".join(dict.fromkeys([NAME, *names])),
    )
    return cert, key


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def server_context(cert: str | os.PathLike, key: str | os.PathLike) -> ssl.SSLContext:
    """TLS 1.2 and up, the default ciphers: what browsers, curl, Prometheus and Go accept."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def fingerprint(cert: str | os.PathLike) -> str:
    """SHA-256 of the certificate, as browsers show it (to check it out of band)."""
    data = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    return data.fingerprint(hashes.SHA256()).hex(":").upper()
