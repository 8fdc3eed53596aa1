"""Stills: one-off renderings (snapshots, Autowalk pictures, thumbnails) on bounded pools.

Streams are rendered in the hub's workers, once per frame whatever the number of viewers. A
still is rendered per request instead, so a flood of requests could take every core and queue
without end. Each kind of still gets a pool of its own (one thread) and at most ``max_waiting``
jobs waiting; past that the caller is told at once (``Busy``) rather than queued. Snapshots and
Autowalk evidence have separate pools, so a snapshot flood can neither delay nor fail a mission's
pictures, and a mission cannot starve the snapshots either.

A job counts as waiting until its thread has finished it, not until its caller stops waiting: a
caller that gives up (a client gone, a mission's Stop cancelling a capture) leaves the rendering
running, and counting it out early let a Tick/Stop loop queue renderings without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TypeVar

from spotrelay.process import call_soon_from_thread

T = TypeVar("T")


class Busy(Exception):
    """More stills of this kind are waiting than the pool queues."""


class Stills:
    def __init__(
        self, name: str, max_waiting: int, executor: Executor | None = None, *, nice: int = 0
    ):
        """``executor``: the thread(s) to render in; by default one thread of the pool's own,
        ``nice`` steps below the relay's other threads (work nobody watches live yields the
        processor to the streams)."""
        self.name, self.max_waiting = name, max_waiting
        self._executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name, initializer=_lower_priority, initargs=(nice,)
        )
        self.waiting = 0

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in this pool's thread; raises Busy at once when the pool is full."""
        if self.waiting >= self.max_waiting:
            raise Busy(self.name)
        loop = asyncio.get_running_loop()
        work = self._executor.submit(fn, *args)
        self.waiting += 1
        work.add_done_callback(lambda _: call_soon_from_thread(loop, self._finished))
        return await asyncio.wrap_future(work, loop=loop)  # cancelled: cancels it if not started

    def _finished(self) -> None:
        self.waiting -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _lower_priority(nice: int) -> None:
    """In the pool's thread: Linux schedules threads on their own, so this thread alone yields."""
    if nice:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
