"""The container's HEALTHCHECK asks the relay the way the relay was configured to answer."""

from __future__ import annotations

import socket
import threading

import pytest

from spotrelay import healthcheck


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "http://127.0.0.1:21080/healthz"),
        ({"SPOTRELAY_PORT": "21290"}, "http://127.0.0.1:21290/healthz"),
        ({"SPOTRELAY_TLS": "1"}, "https://127.0.0.1:21080/healthz"),
        ({"SPOTRELAY_TLS": "On"}, "https://127.0.0.1:21080/healthz"),
        ({"SPOTRELAY_TLS": "0"}, "http://127.0.0.1:21080/healthz"),
        ({"SPOTRELAY_TLS_CERT": "/tls/mine.pem"}, "https://127.0.0.1:21080/healthz"),
        ({"SPOTRELAY_BIND": "0.0.0.0"}, "http://127.0.0.1:21080/healthz"),
        ({"SPOTRELAY_BIND": "10.0.0.7"}, "http://10.0.0.7:21080/healthz"),
        ({"SPOTRELAY_BIND": "fd00::7"}, "http://[fd00::7]:21080/healthz"),
        ({"SPOTRELAY_BIND": "::"}, "http://[::1]:21080/healthz"),
    ],
)
def test_it_asks_where_and_how_the_relay_answers(env, expected):
    assert healthcheck.url(env) == expected


def test_nothing_listening_is_unhealthy_with_the_reason():
    from tests.relay import free_port

    address = f"http://127.0.0.1:{free_port()}/healthz"
    problem = healthcheck.check(address, timeout=2)
    assert problem is not None and address in problem and "refused" in problem.lower()


def test_a_server_that_answers_garbage_is_unhealthy_with_the_reason():
    """Something else on the port (not HTTP): a reason, not a traceback."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"SSH-2.0-OpenSSH\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        problem = healthcheck.check(f"http://127.0.0.1:{server.getsockname()[1]}/healthz")
        thread.join(5)
    assert problem is not None and "/healthz" in problem
