"""Blocking SDK work off the event loop, in threads that cannot hold up shutdown."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

from spotrelay.process import call_soon_from_thread

T = TypeVar("T")


def in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run ``fn`` in a daemon thread; an asyncio future of its result.

    Not ``run_in_executor``: a robot that never answers would hold a pool thread, and the
    interpreter waits for pool threads at exit, so a lost robot could keep the relay from
    stopping."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if fut.cancelled():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            result, exc = fn(), None
        except BaseException as error:
            result, exc = None, error
        call_soon_from_thread(loop, settle, result, exc)

    threading.Thread(target=body, name="spotrelay-sdk", daemon=True).start()
    return fut


def failed(exc: BaseException) -> asyncio.Future:
    """An awaitable that raises ``exc``: for calls that return one and could not start."""
    fut = asyncio.get_running_loop().create_future()
    fut.set_exception(exc)
    return fut
