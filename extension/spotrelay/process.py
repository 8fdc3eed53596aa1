"""The process the relay runs in: its event loop, memory and descriptor limits, the user it runs
as, and supervision of background tasks. Operating-system details, kept out of the wiring."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import resource
import socket
from collections.abc import Awaitable, Callable

log = logging.getLogger("spotrelay")

GRPC_EXPERIMENTS = "-event_engine_client"


def tune_grpc() -> None:
    """Before gRPC's core starts: client calls on gRPC's classic I/O instead of its EventEngine.

    With the EventEngine (grpc 1.85's default), each reply is read on one of its threads, handed
    to the completion queue's poller thread, then to the event loop: three threads and about
    five futex waits a frame. On the classic path the poller thread reads the socket itself.
    Measured with six passthrough viewers: futex calls 4,400 -> 400 and context switches
    8,000 -> 4,100 in 10 s, CPU -7 to -10 %. The two experiments that build on it (the callback
    completion queue and EventEngine endpoints) go off with it, which was gRPC's default for
    many releases; servers keep the EventEngine listener. Calls, statuses and errors are the
    same (the whole test suite runs on it). A gRPC without this experiment logs "Unknown
    experiment" and runs as before. An operator's own ``GRPC_EXPERIMENTS`` wins (empty:
    gRPC's default).

    gRPC reads the variable when it is imported, so this runs from the package's
    ``__init__``, which imports nothing that imports grpc (tested)."""
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    restarted: Callable[[str], None],
    pause: float = 1.0,
) -> None:
    """Run a background task for ever: an unexpected error is logged with its traceback,
    counted (``restarted(name)``), and the task started again after a pause, instead of ending
    it silently while the relay looks healthy."""
    while True:
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            restarted(name)
            log.exception("%s stopped on an unexpected error; restarting in %.0f s", name, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 30.0)


def usable_cores() -> int:
    """The cores this process may run on (a container's cpuset), not the host's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 2


def call_soon_from_thread(
    loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args
) -> None:
    """``fn(*args)`` on ``loop``, from a worker thread; nothing if the loop has closed (a job
    finishing at shutdown: nobody is left to tell)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


class EventLoop(asyncio.SelectorEventLoop):
    """asyncio's loop, accepting one connection per turn of the loop.

    When descriptors run out, CPython 3.11's accept loop (selector_events._accept_connection)
    goes on calling accept() for the rest of its batch after EMFILE, logging a traceback and
    scheduling one more retry each time; the retries compound every second until the process
    spends all its time logging. One accept per turn stops at the first EMFILE: one log line
    and one retry a second, and the listening socket, still readable, is served again on the
    very next turn when descriptors are free.
    """

    def __init__(self) -> None:
        super().__init__()
        self.set_exception_handler(_loop_errors)

    def _accept_connection(self, protocol_factory, sock, sslcontext=None, server=None, *args):
        rest = args[1:]  # the batch size is the first of the remaining arguments
        super()._accept_connection(protocol_factory, sock, sslcontext, server, 1, *rest)


def _loop_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Running out of descriptors is a state, not a bug: one line, no traceback."""
    exc = context.get("exception")
    if isinstance(exc, OSError) and "accept" in context.get("message", ""):
        log.warning("cannot accept connections: %s; retrying each second", exc.strerror)
        return
    loop.default_exception_handler(context)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives every thread that allocates under contention an arena of its own and seldom
    returns their memory; with codec, gRPC and SDK threads all handling frames, RSS grew from
    135 to 250 MB in a soak without any leak. Two arenas keep it flat (measured in
    tests/soak.py). Must run before the threads start; a no-op where libc has no mallopt."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX


def raise_file_limit(wanted: int = 65536) -> None:
    """Up to the hard limit: every viewer is a socket, and running out of descriptors is what
    made the accept loop spin before."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def drop_privileges(uid: int, gid: int) -> None:
    """Become an unprivileged user for good (the container starts as root only so that the
    payload credentials, root's 0600 file on a CORE I/O, can be read first)."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise SystemExit("spotrelay: error: could not drop root privileges")


def own_folder(path: str, uid: int, gid: int) -> None:
    """Create a folder and give it (and what it holds) to the user the relay goes on as: a fresh
    volume is root's, and the relay no longer is once it has read the credentials.

    Links are never followed: a link planted in the folder must not make root hand the file it
    points to (anywhere on the machine) to the relay's user. Every change is made through the
    descriptor of the folder that holds the name (``os.fwalk``, ``dir_fd``, no following), so a
    folder swapped for a link while we walk cannot redirect a change either; a folder that is
    itself a link is left alone."""
    with contextlib.suppress(OSError):  # if this fails, opening the store says why
        os.makedirs(path, exist_ok=True)
        if os.path.islink(path):
            return
        for _root, dirs, files, fd in os.fwalk(path, follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.chown(fd, uid, gid)  # the folder itself, through its descriptor
            for name in (*files, *dirs):
                with contextlib.suppress(OSError):
                    os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)


def check_port(host: str, port: int, option: str) -> None:
    """Raise OSError with a sentence naming ``option`` if ``host:port`` cannot be listened on.

    For servers whose own failure is unhelpful: gRPC prints a C-core error line of its own
    (``E... add_port.cc``) and raises a bare RuntimeError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise OSError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; give another with {option}"
        ) from None
