"""Child programs (VLC, Chromium, Prometheus, ffmpeg...) started in a process group of their own and
ended with every process they started, so no test leaves a browser renderer or a player behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator

from tests.wait import wait_until


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


@contextlib.contextmanager
def spawn(cmd: list[str], **kw) -> Iterator[subprocess.Popen]:
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    try:
        yield proc
    finally:
        end_group(proc)
