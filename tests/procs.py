"""Child programs (VLC, Chromium, Prometheus, ffmpeg...) started in a process group of their own and
ended with every process they started, so no test leaves a browser renderer or a player behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator

from tests.wait import wait_until


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def end_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the whole group, SIGKILL what is left after ``grace`` seconds, reap the leader."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
        try:
            wait_until(lambda: not group_alive(proc.pid), wait, f"process group {proc.pid} gone")
            return
        except AssertionError:
            continue


def start(cmd: list[str], **kw) -> subprocess.Popen:
    """A process in a group of its own, so that ``end_group`` ends every child it starts."""
    return subprocess.Popen(cmd, start_new_session=True, **kw)


@contextlib.contextmanager
def spawn(cmd: list[str], **kw) -> Iterator[subprocess.Popen]:
    """``start`` for the length of a ``with`` block, output discarded unless redirected."""
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    proc = start(cmd, **kw)
    try:
        yield proc
    finally:
        end_group(proc)
