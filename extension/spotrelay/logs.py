"""Logging that never carries a secret and never floods, whatever the level.

* The SDK logs whole requests at DEBUG, logins included. Its loggers hang under the SDK object's
  name, so the relay gives that object a name under ``bosdyn`` (``SDK_LOGGER``), which is pinned
  at WARNING, instead of letting it inherit the relay's level.
* Every record passes a redacting filter: the secrets the relay knows (robot password, payload
  secret, access token, the user token the robot issued) and anything shaped like a token (JWTs,
  ``token=``/``password=``/``Bearer`` values) become ``***``.
* aiohttp logs a malformed request with its raw request line (and so its ``?token=``): such
  records become one line naming the error class and the peer, without the request.
* A message repeated (descriptors exhausted, a flood of bad requests) is written at most
  ``REPEAT_BURST`` times per ``REPEAT_EVERY`` seconds; the next one says how many were left out.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Iterable

SDK_LOGGER = "bosdyn.spotrelay"  # the SDK object's logger; bosdyn.* is pinned at WARNING
REPEAT_EVERY = 10.0
REPEAT_BURST = 5
MASK = "***"
_SHAPES = re.compile(
    r"eyJ[\w-]{6,}\.[\w-]{6,}\.[\w-]{6,}"  # a JWT (Spot's tokens are JWTs)
    r"|(?<=token=)[^&\s'\"]+"
    r"|(?<=password=)[^&\s'\"]+"
    r"|(?<=secret=)[^&\s'\"]+"
    r"|(?<=Bearer )[^\s'\"]+",
    re.IGNORECASE,
)


class Redactor(logging.Filter):
    """Replaces known secrets and token-shaped text in every record, message and traceback."""

    def __init__(self, secrets: Iterable[str | None] = ()):
        super().__init__()
        self._secrets: set[str] = set()
        self._lock = threading.Lock()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        """A secret learnt at run time (the robot-issued token after each login)."""
        if secret and len(secret) >= 4:
            with self._lock:
                self._secrets.add(secret)

    def redact(self, text: str) -> str:
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return _SHAPES.sub(MASK, text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        clean = self.redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


class BadRequestLine(logging.Filter):
    """aiohttp.server's 'Error handling request' for a request it could not parse: one line,
    the error's class and the peer, never the request line (it may carry ``?token=``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__module__.startswith("aiohttp.http_exceptions"):
            status = getattr(exc, "code", 400)
            record.msg, record.args = (
                "bad HTTP request (%s, answered %s)",
                (
                    type(exc).__name__,
                    status,
                ),
            )
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


class Repeats(logging.Filter):
    """At most ``burst`` warnings of one (logger, message template) per ``every`` seconds."""

    def __init__(self, every: float = REPEAT_EVERY, burst: int = REPEAT_BURST):
        super().__init__()
        self.every, self.burst = every, burst
        self._seen: dict[tuple[str, str], tuple[float, int, int]] = {}  # start, written, left out
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg).split("\n", 1)[0])
        now = time.monotonic()
        with self._lock:
            start, written, left_out = self._seen.get(key, (now, 0, 0))
            if now - start >= self.every:
                start, written = now, 0
            if written >= self.burst:
                self._seen[key] = (start, written, left_out + 1)
                return False
            self._seen[key] = (start, written + 1, 0)
            if len(self._seen) > 1000:  # a bound, whatever messages come
                self._seen.clear()
        if left_out:
            record.msg = f"{record.msg} (and {left_out} more like it left out)"
        return True


def setup(level: str, secrets: Iterable[str | None] = ()) -> Redactor:
    """Configure the root logger once; returns the redactor, to which new secrets are added."""
    redactor = Redactor(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(BadRequestLine())
    handler.addFilter(Repeats())
    handler.addFilter(redactor)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("bosdyn").setLevel(logging.WARNING)
    logging.getLogger("grpc").setLevel(logging.WARNING)
    return redactor
