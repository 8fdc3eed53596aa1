"""What an SDK error means for the relay: one table, consulted by login, discovery and GetImage.

Each entry says which metric label it counts as, whether the login is gone (log in again now),
which kind of trouble the open ``/readyz`` may name, whether it was a refusal by the robot's
login services (those count towards the robot's lockout, so they are rate-limited and retried
slowly), and the least wait before the next login. Nothing else in the relay decides what an
exception means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bosdyn.client.auth import InvalidLoginError, TemporarilyLockedOutError
from bosdyn.client.exceptions import Error as SdkError
from bosdyn.client.exceptions import (
    InvalidRequestError,
    PermissionDeniedError,
    ResponseError,
    RetryableRpcError,
    RpcError,
    ServiceUnavailableError,
    TimedOutError,
    TooManyRequestsError,
    UnauthenticatedError,
)
from bosdyn.client.payload_registration import InvalidPayloadCredentialsError

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 15.0
PAYLOAD_WAIT = 3.0  # between asks while an operator has not yet authorised the payload


class PayloadNotAuthorised(Exception):
    """The robot knows the payload, but nobody has authorised it in the admin console yet."""


@dataclass(frozen=True, slots=True)
class Failure:
    """What one error means. ``kind`` is the metric label (spotrelay_rpc_errors_total)."""

    kind: str
    relogin: bool = False  # the login is gone: connect again now
    problem: str = "unreachable"  # for /readyz: "login" (the robot said no) or "unreachable"
    refused: bool = False  # refused by the login services: counts towards the robot's lockout
    wait: float = 0.0  # the least wait before logging in again
    expected: bool = True  # False: a bug of ours or the SDK's, worth a traceback


_LOGIN_REFUSED = Failure("other", problem="login", refused=True, wait=BACKOFF_MAX)

# Most specific first.
_TABLE: tuple[tuple[type[BaseException], Failure], ...] = (
    (PayloadNotAuthorised, Failure("other", problem="login", wait=PAYLOAD_WAIT)),
    (
        UnauthenticatedError,
        Failure("unauthenticated", relogin=True, problem="login"),
    ),
    (InvalidLoginError, _LOGIN_REFUSED),
    (TemporarilyLockedOutError, _LOGIN_REFUSED),
    (InvalidPayloadCredentialsError, _LOGIN_REFUSED),
    (InvalidRequestError, _LOGIN_REFUSED),
    # 5 logins a second (HTTP 429): something else is logging in too; soon again
    (TooManyRequestsError, Failure("rate_limited", problem="login", refused=True, wait=1.0)),
    (PermissionDeniedError, Failure("permission_denied")),
    (TimedOutError, Failure("timeout")),
    (ServiceUnavailableError, Failure("unavailable")),
    (RetryableRpcError, Failure("unavailable")),
    (ConnectionError, Failure("unavailable")),
    (ResponseError, Failure("other")),
    (SdkError, Failure("other")),
    (OSError, Failure("other")),
    (ValueError, Failure("other")),
)
_UNEXPECTED = Failure("other", expected=False)

# gRPC's words for a TLS handshake that failed: the robot answered, but its certificate is not
# one we trust (wrong --robot-cert) or not for this name. The SDK reports it as any other
# UnableToConnectToRobotError, "robot may be offline", which sends people to check cables.
_TLS = re.compile(
    r"(Tls|Ssl) handshake failed|CERTIFICATE_VERIFY_FAILED|not in peer certificate", re.IGNORECASE
)


def classify(exc: BaseException) -> Failure:
    for kind, failure in _TABLE:
        if isinstance(exc, kind):
            return failure
    return _UNEXPECTED


def tls_failure(exc: BaseException) -> bool:
    """A connection refused at the TLS handshake (certificate not trusted, or for another name)."""
    if not isinstance(exc, RpcError):
        return False
    details = getattr(exc.error, "details", None)
    text = details() if callable(details) else str(exc.error or "")
    return bool(_TLS.search(text or ""))


def describe_error(exc: BaseException) -> str:
    """One line for the log: the SDK's exception class says more than its long message."""
    if tls_failure(exc):
        return (
            "TLS handshake with the robot failed: its certificate is not signed by the CA we "
            "trust, or not for this address (check --robot-cert)"
        )
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if isinstance(exc, SdkError) and getattr(exc, "error_message", None):
        text = str(exc.error_message).strip().splitlines()[0]
    return f"{name}: {text}" if text else name
