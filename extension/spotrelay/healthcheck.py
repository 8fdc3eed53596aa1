"""The container's HEALTHCHECK: is the relay answering ``/healthz`` on its own port?

It reads the same ``SPOTRELAY_*`` variables as the relay, so that a relay serving HTTPS
(``SPOTRELAY_TLS``, or a certificate of one's own) is asked over HTTPS: asked in plain HTTP it
would be marked unhealthy for good and restarted by Docker every half minute. The certificate is
not checked: the question is only whether this very process answers, on loopback.

    python -m spotrelay.healthcheck     # exit 0 healthy, 1 not (with the reason on stderr)
"""

from __future__ import annotations

import http.client
import os
import ssl
import sys
import urllib.request
from collections.abc import Mapping

# Where a relay bound to every address answers: "::" is IPv6 only (asyncio sets IPV6_V6ONLY).
LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def url(env: Mapping[str, str]) -> str:
    """Where the relay configured by ``env`` answers its health check."""
    port = env.get("SPOTRELAY_PORT") or "21080"
    bind = env.get("SPOTRELAY_BIND", "")
    host = LOOPBACK.get(bind, bind)
    if ":" in host:
        host = f"[{host}]"
    tls = env.get("SPOTRELAY_TLS", "").lower() in ("1", "true", "yes", "on")
    scheme = "https" if tls or env.get("SPOTRELAY_TLS_CERT") else "http"
    return f"{scheme}://{host}:{port}/healthz"


def check(address: str, timeout: float = 2.0) -> str | None:
    """None if healthy, else why not."""
    context = None
    if address.startswith("https"):  # this process's own certificate, possibly self-made
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(address, timeout=timeout, context=context) as resp:
            return None if resp.status == 200 else f"{address}: HTTP {resp.status}"
    except (OSError, http.client.HTTPException) as exc:  # refused, timeouts, errors, garbage
        return f"{address}: {exc or type(exc).__name__}"


def main() -> int:
    problem = check(url(os.environ))
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
