"""Autowalk captures over HTTP: the list, each capture's files, one mission run as a zip.

* ``GET /api/captures``: newest first, filtered by ``run`` (exact), ``mission`` (part of the
  mission's group name), ``source``, ``kind`` (``still``/``clip``), ``since``/``until`` (local
  epoch seconds), at most ``limit`` a page; ``next`` is an opaque cursor for the page after
  (``after=``). Each entry is the capture's index record (the sidecar's fields, bounded) plus
  its URLs, pre-encoded by the store: a listing joins bytes, whatever the folder holds.
* ``GET /captures/{file}``: a file of a listed capture (data, thumbnail or sidecar); nothing else
  in the folder is reachable, and a file swapped for a link is not served (``Store.open_file``).
* ``GET /api/captures.zip?run=R``: every capture of one run, streamed as it is zipped (stored, not
  compressed: JPEG, PNG and MJPEG are compressed already), so memory stays flat whatever its size.

Downloads are bounded like streams: files are read on a small pool of their own and zips made
on another (never the default executor, which the SDK and aiohttp share), at most
``MAX_DOWNLOADS`` files and ``MAX_ZIPS`` zips at once (past it 503), and a client that takes
nothing for ``client_timeout`` is dropped, so stalled downloads free their threads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import io
import json
import logging
import os
import re
import threading
import zipfile
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from spotrelay.autowalk.store import MEDIA_TYPES, THUMB, UNSAFE, Capture, Store, strict_json
from spotrelay.http.outputs.common import BadParam, int_param, json_error

log = logging.getLogger("spotrelay.autowalk")
MAX_LIMIT = 1000  # captures a page
DEFAULT_LIMIT = 300
SCAN = 20000  # captures looked at for one page at most (a filter that matches little)
MAX_DOWNLOADS = 32  # files served at once
MAX_ZIPS = 4  # zips made at once (each holds a thread while its client reads)
_NUMBER = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
_CHUNK = 256 * 1024
_DISCONNECTED = (ConnectionError, asyncio.TimeoutError, TimeoutError)


def _number(q: Mapping[str, str], name: str) -> float | None:
    if name not in q:
        return None
    if not _NUMBER.fullmatch(q[name]):
        raise BadParam(name, f"{name} must be a time in epoch seconds", "e.g. 1767225600.5")
    return float(q[name])


def filters(q: Mapping[str, str]) -> dict[str, Any]:
    kind = q.get("kind")
    if kind is not None and kind not in ("still", "clip"):
        raise BadParam("kind", f"kind={kind!r} is not allowed", "still, clip")
    return {
        "run": q.get("run"),
        "mission": q.get("mission") or None,
        "source": q.get("source") or None,
        "kind": kind,
        "since": _number(q, "since"),
        "until": _number(q, "until"),
    }


def cursor(key: tuple[float, str]) -> str:
    """An opaque token for 'the captures older than this one'."""
    return base64.urlsafe_b64encode(json.dumps([key[0], key[1]]).encode()).decode().rstrip("=")


def _after(q: Mapping[str, str]) -> tuple[float, str] | None:
    text = q.get("after")
    if not text:
        return None
    try:
        t, stem = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        if isinstance(t, int | float) and isinstance(stem, str):
            return (float(t), stem)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        pass
    raise BadParam("after", "after must be the 'next' of a previous page", "see /api/captures")


def entry(capture: Capture) -> dict[str, Any]:
    """The listing entry of a capture (its index record), as a dict."""
    return capture.meta


class _Pipe(io.RawIOBase):
    """What zipfile writes to, in a worker thread: chunks handed to the event loop's queue,
    waiting while the client is slow; fails once the client is gone (``abort``)."""

    def __init__(self, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop):
        self.queue, self.loop = queue, loop
        self.abort = threading.Event()
        self._buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self._buf += data
        if len(self._buf) >= _CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buf:
            chunk, self._buf = bytes(self._buf), bytearray()
            self.put(chunk)

    def put(self, item: bytes | None) -> None:
        """A chunk; b"" at the end, None if the zip failed half way."""
        if self.abort.is_set():
            raise OSError("client went away")
        put = asyncio.run_coroutine_threadsafe(self.queue.put(item), self.loop)
        while True:
            try:
                put.result(timeout=0.5)
                return
            except concurrent.futures.TimeoutError:
                if self.abort.is_set():
                    put.cancel()
                    raise OSError("client went away") from None


def _zip(pipe: _Pipe, store: Store, captures: list[Capture], folder: str) -> None:
    """Every data file and sidecar of ``captures``, each opened as ``Store.open_file`` does."""
    ok = False
    try:
        with zipfile.ZipFile(pipe, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for capture in reversed(captures):  # oldest first, as the mission went
                for name in capture.files:
                    if name.endswith(THUMB):
                        continue  # only for the viewer
                    opened = store.open_file(name)
                    if opened is None:
                        continue  # deleted since, or not a plain file any more
                    fd, size = opened
                    with os.fdopen(fd, "rb") as src:
                        info = zipfile.ZipInfo(f"{folder}/{name}")
                        info.file_size = size
                        with zf.open(info, "w", force_zip64=size > 2**31) as dst:
                            while chunk := src.read(_CHUNK):
                                dst.write(chunk)
        pipe.flush()
        ok = True
    except OSError as exc:
        if not pipe.abort.is_set():
            log.warning("cannot zip captures: %s", exc)
    finally:
        if not pipe.abort.is_set():
            with contextlib.suppress(OSError):
                pipe.put(b"" if ok else None)


class Downloads:
    """The pools and limits of captures downloads, and how long a client may take nothing."""

    def __init__(self, client_timeout: float, refused: Callable[[str], None]):
        self.client_timeout = client_timeout
        self.refused = refused
        self.files = ThreadPoolExecutor(max_workers=2, thread_name_prefix="captures-files")
        self.zips = ThreadPoolExecutor(max_workers=MAX_ZIPS, thread_name_prefix="captures-zip")
        self.serving = {"files": 0, "zips": 0}

    def admit(self, kind: str, most: int) -> None:
        if self.serving[kind] >= most:
            self.refused("downloads_busy")
            json_error(
                web.HTTPServiceUnavailable,
                {"error": f"{most} {kind} are being downloaded, the most at once; retry"},
                headers={"Retry-After": "5"},
            )

    async def write(self, request: web.Request, resp: web.StreamResponse, data: bytes) -> None:
        """Write, or drop the client if it takes nothing for client_timeout (TimeoutError)."""
        try:
            async with asyncio.timeout(self.client_timeout):
                await resp.write(data)
        except TimeoutError:
            if request.transport is not None:
                request.transport.abort()
            raise

    def close(self) -> None:
        self.files.shutdown(wait=False, cancel_futures=True)
        self.zips.shutdown(wait=False, cancel_futures=True)


def add_routes(
    app: web.Application,
    store: Store | None,
    *,
    client_timeout: float = 10.0,
    refused: Callable[[str], None] = lambda reason: None,
) -> None:
    downloads = Downloads(client_timeout, refused)

    async def close(app: web.Application) -> None:
        downloads.close()

    app.on_cleanup.append(close)

    def need_store() -> Store:
        if store is None:
            json_error(
                web.HTTPNotFound,
                {"error": "Autowalk captures are off: start the relay with --mission"},
            )
        return store

    async def listing(request: web.Request) -> web.Response:
        s = need_store()
        wanted = filters(request.query)
        limit = int_param(request.query, "limit", 1, MAX_LIMIT) or DEFAULT_LIMIT
        page, next_key = s.page(**wanted, before=_after(request.query), limit=limit, scan=SCAN)
        head = {
            "next": cursor(next_key) if next_key else None,
            "total": len(s),
            "runs": s.runs(),
            "bytes_on_disk": s.bytes_on_disk,
            "limit_bytes": s.max_bytes,
        }
        body = b'{"captures":[' + b",".join(c.entry for c in page) + b"],"
        body += strict_json(head, separators=(",", ":")).encode()[1:]
        return web.Response(body=body, content_type="application/json")

    async def served(kind: str, most: int, send: Callable[[], Awaitable[Any]]) -> Any:
        downloads.admit(kind, most)
        downloads.serving[kind] += 1
        try:
            return await send()
        finally:
            downloads.serving[kind] -= 1

    def gone(request: web.Request) -> None:
        """The client left or stalled: nothing to tell anyone, no traceback."""
        log.debug("captures download %s ended: client gone or stalled", request.path)

    async def file(request: web.Request) -> web.StreamResponse:
        s = need_store()
        name = request.match_info["name"]
        loop = asyncio.get_running_loop()

        async def send() -> web.StreamResponse:
            opened = await loop.run_in_executor(downloads.files, s.open_file, name)
            if opened is None:
                json_error(web.HTTPNotFound, {"error": f"no capture file {name!r}", "file": name})
            fd, size = opened
            resp = web.StreamResponse(
                headers={  # a thumbnail's suffix is .jpg too
                    "Content-Type": MEDIA_TYPES.get(os.path.splitext(name)[1], "text/plain"),
                    "Content-Disposition": f'inline; filename="{name}"',
                    "Cache-Control": "private, max-age=3600",  # a capture never changes
                }
            )
            resp.content_length = size
            try:
                await resp.prepare(request)
                offset = 0
                while request.method != "HEAD" and offset < size:
                    n = min(_CHUNK, size - offset)
                    chunk = await loop.run_in_executor(downloads.files, os.pread, fd, n, offset)
                    if not chunk:  # shorter than it was: the connection must not look complete
                        if request.transport is not None:
                            request.transport.abort()
                        return resp
                    await downloads.write(request, resp, chunk)
                    offset += len(chunk)
                await resp.write_eof()
            except _DISCONNECTED:
                gone(request)
            finally:
                os.close(fd)
            return resp

        return await served("files", MAX_DOWNLOADS, send)

    async def zipped(request: web.Request) -> web.StreamResponse:
        s = need_store()
        run = request.query.get("run")
        if not run:
            raise BadParam("run", "run is required: the mission run to zip", "see /api/captures")
        found = s.captures(run=run)
        if not found:
            json_error(web.HTTPNotFound, {"error": f"no captures in run {run!r}", "run": run})
        folder = UNSAFE.sub("-", run).strip("-.")[:100] or "run"

        async def send() -> web.StreamResponse:
            resp = web.StreamResponse(
                headers={
                    "Content-Type": "application/zip",
                    "Content-Disposition": f'attachment; filename="spotrelay-{folder}.zip"',
                }
            )
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)
            pipe = _Pipe(queue, loop)
            worker = None
            try:
                await resp.prepare(request)
                worker = loop.run_in_executor(downloads.zips, _zip, pipe, s, found, folder)
                while chunk := await queue.get():
                    await downloads.write(request, resp, chunk)
                if chunk is None:  # a broken zip must not look complete
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                await resp.write_eof()
            except _DISCONNECTED:
                gone(request)
            finally:
                pipe.abort.set()
                while not queue.empty():  # unblock a writer waiting on a full queue
                    queue.get_nowait()
                if worker is not None:
                    await worker
            return resp

        return await served("zips", MAX_ZIPS, send)

    app.router.add_get("/api/captures", listing)
    app.router.add_get("/api/captures.zip", zipped)
    app.router.add_get("/captures/{name}", file)
