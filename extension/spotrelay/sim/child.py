"""The simulated robot in a process of its own, for ``--sim`` (``make run``, the image's demo).

In the relay's own process the simulated robot shared the interpreter lock with the relay: with
the viewer page open the process sat at a whole core, tiles showed 4-9 fps and half a second of
lag, and a newcomer read that as the relay being slow. As a child process it costs the relay
nothing but the gRPC traffic a real robot would cause, so the demo shows the relay's own speed.

It dies with the relay: it reads its standard input (``python -m spotrelay.sim --control``) and
ends when that closes, which the kernel does for any end of the relay, a SIGKILL or an
out-of-memory kill included. It is started after the relay dropped its privileges, so it runs as
the same user, and writes nothing but its certificates (a few kB, in ``$TMPDIR``: the container's
small ``/tmp``), removed when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass

log = logging.getLogger("spotrelay")

START_TIMEOUT = 60.0  # the first start imports OpenCV and gRPC: slow on a busy CORE I/O
MALLOC_ARENAS = 2


@dataclass
class SimChild:
    """A running ``python -m spotrelay.sim``: where it listens and how to log in."""

    proc: asyncio.subprocess.Process
    port: int
    ca_path: str
    username: str
    password: str

    def __post_init__(self) -> None:
        self.where = f"process {self.proc.pid}"
        self._watch = asyncio.create_task(self._watch_exit(), name="sim")

    async def _watch_exit(self) -> None:
        """An exit we did not ask for is worth one line: the relay now sees no robot."""
        code = await self.proc.wait()
        log.error("the simulated robot exited (code %s); restart spotrelay to get it back", code)

    @classmethod
    async def start(cls, *args: str) -> SimChild:
        """Start one and wait until it serves (its first line says where). ``args``: more of
        ``python -m spotrelay.sim``'s options."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "spotrelay.sim",
            "--control",  # commands on stdin: the end of stdin (the relay gone) ends it
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # its 64 server threads would each get a glibc arena of their own: 540 MB with the
            # viewer page open, over the container's 512 MB for both processes (2 arenas: see
            # process.limit_malloc_arenas)
            env={**os.environ, "MALLOC_ARENA_MAX": str(MALLOC_ARENAS)},
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(START_TIMEOUT):
                line = await proc.stdout.readline()
            info = json.loads(line)
        except (TimeoutError, ValueError):
            await _end(proc)
            raise RuntimeError(
                f"the simulated robot did not start (exit code {proc.returncode})"
            ) from None
        return cls(proc, info["port"], info["ca"], info["username"], info["password"])

    async def stop(self, timeout: float = 5.0) -> None:
        """Close its stdin (it stops at once), then SIGTERM, then SIGKILL if it must."""
        self._watch.cancel()
        await _end(self.proc, timeout)


async def _end(proc: asyncio.subprocess.Process, timeout: float = 5.0) -> None:
    if proc.returncode is not None:
        return
    if proc.stdin is not None:
        proc.stdin.close()
    for last_resort in (proc.terminate, proc.kill):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await proc.wait()
            return
        with contextlib.suppress(ProcessLookupError):
            last_resort()
    await proc.wait()


class InProcess:
    """The simulated robot inside the relay's process, as before: only where a child cannot be
    started (say the interpreter is not executable for the user the relay dropped to)."""

    def __init__(self) -> None:
        from spotrelay.sim.robot import SimRobot

        self.sim = SimRobot().start()
        self.port, self.ca_path = self.sim.port, self.sim.ca_path
        self.username, self.password = self.sim.username, self.sim.password
        self.where = "inside the relay's process"

    async def stop(self, timeout: float = 5.0) -> None:
        await asyncio.to_thread(self.sim.stop)


async def start_sim() -> SimChild | InProcess:
    """The simulated robot for ``--sim``: a child process, or in ours if that cannot start."""
    try:
        return await SimChild.start()
    except OSError as exc:
        log.warning(
            "cannot start the simulated robot as a process of its own (%s); running it inside "
            "the relay, which then shares its interpreter with it",
            exc,
        )
        return InProcess()
