"""Stills: one-off renderings (snapshots, Autowalk pictures, thumbnails) on bounded pools.

Streams are rendered in the hub's workers, once per frame whatever the number of viewers. A
still is rendered per request instead, so a flood of requests could take every core and queue
without end. Each kind of still gets a pool of its own (one thread) and at most ``max_waiting``
jobs waiting; past that the caller is told at once (``Busy``) rather than queued. Snapshots and
Autowalk evidence have separate pools, so a snapshot flood can neither delay nor fail a mission's
pictures, and a mission cannot starve the snapshots either.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class Busy(Exception):
    """More stills of this kind are waiting than the pool queues."""


class Stills:
    def __init__(self, name: str, max_waiting: int, executor: Executor | None = None):
        """``executor``: the thread(s) to render in; by default one thread of the pool's own."""
        self.name, self.max_waiting = name, max_waiting
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.waiting = 0

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in this pool's thread; raises Busy at once when the pool is full."""
        if self.waiting >= self.max_waiting:
            raise Busy(self.name)
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self.waiting -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
