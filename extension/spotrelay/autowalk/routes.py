"""Autowalk captures over HTTP: the list, each capture's files, one mission run as a zip.

* ``GET /api/captures``: newest first, filtered by ``run`` (exact), ``mission`` (part of the
  mission's group name), ``source``, ``kind`` (``still``/``clip``), ``since``/``until`` (local
  epoch seconds), at most ``limit``; each entry is the capture's sidecar plus its URLs.
* ``GET /captures/{file}``: a file of a listed capture (data, thumbnail or sidecar); nothing else
  in the folder is reachable.
* ``GET /api/captures.zip?run=R``: every capture of one run, streamed as it is zipped (stored, not
  compressed: JPEG, PNG and MJPEG are compressed already), so memory stays flat whatever its size.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import logging
import re
import threading
import zipfile
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from aiohttp import web

from spotrelay.autowalk.store import MEDIA_TYPES, SIDECAR, THUMB, UNSAFE, Capture, Store, runs
from spotrelay.http.outputs.common import BadParam, int_param, json_error, json_response

log = logging.getLogger("spotrelay.autowalk")
MAX_LIMIT = 10000
_NUMBER = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
_ZIP_CHUNK = 256 * 1024


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


def entry(capture: Capture) -> dict[str, Any]:
    """The sidecar, and where to fetch the capture's files."""
    meta = capture.meta
    out = {**meta, "id": capture.stem, "bytes_total": capture.bytes}
    out["url"] = "/captures/" + quote(str(meta.get("file", "")))
    out["thumbnail_url"] = "/captures/" + quote(capture.stem + THUMB)
    out["sidecar_url"] = "/captures/" + quote(capture.stem + SIDECAR)
    return out


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
        if len(self._buf) >= _ZIP_CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buf:
            chunk, self._buf = bytes(self._buf), bytearray()
            self.put(chunk)

    def put(self, item: bytes | None) -> None:
        """A chunk; b"" at the end, None if the zip failed half way."""
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
    ok = False
    try:
        with zipfile.ZipFile(pipe, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for capture in reversed(captures):  # oldest first, as the mission went
                for name in capture.files:
                    path = store.file(name)
                    if path is None or name.endswith(THUMB):
                        continue  # deleted since (size limit), or only for the viewer
                    with contextlib.suppress(FileNotFoundError):
                        zf.write(path, f"{folder}/{name}")
        pipe.flush()
        ok = True
    except OSError as exc:
        if not pipe.abort.is_set():
            log.warning("cannot zip captures: %s", exc)
    finally:
        if not pipe.abort.is_set():
            with contextlib.suppress(OSError):
                pipe.put(b"" if ok else None)


def add_routes(app: web.Application, store: Store | None) -> None:
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
        limit = int_param(request.query, "limit", 1, MAX_LIMIT) or 500
        found = s.captures(**wanted)
        return json_response(
            {
                "captures": [entry(c) for c in found[:limit]],
                "matched": len(found),
                "runs": runs(found),
                "bytes_on_disk": s.bytes_on_disk,
                "limit_bytes": s.max_bytes,
            }
        )

    async def file(request: web.Request) -> web.StreamResponse:
        s = need_store()
        name = request.match_info["name"]
        path = s.file(name)
        if path is None:
            json_error(web.HTTPNotFound, {"error": f"no capture file {name!r}", "file": name})
        headers = {  # a thumbnail's suffix is .jpg too
            "Content-Type": MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
            "Content-Disposition": f'inline; filename="{name}"',
            "Cache-Control": "private, max-age=3600",  # a capture never changes
        }
        return web.FileResponse(path, headers=headers)

    async def zipped(request: web.Request) -> web.StreamResponse:
        s = need_store()
        run = request.query.get("run")
        if not run:
            raise BadParam("run", "run is required: the mission run to zip", "see /api/captures")
        found = s.captures(run=run)
        if not found:
            json_error(web.HTTPNotFound, {"error": f"no captures in run {run!r}", "run": run})
        folder = UNSAFE.sub("-", run).strip("-.") or "run"
        resp = web.StreamResponse(
            headers={
                "Content-Type": "application/zip",
                "Content-Disposition": f'attachment; filename="spotrelay-{folder}.zip"',
            }
        )
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)
        pipe = _Pipe(queue, loop)
        worker = loop.run_in_executor(None, _zip, pipe, s, found, folder)
        try:
            while chunk := await queue.get():
                await resp.write(chunk)
            if chunk is None:  # a broken zip must not look complete
                if request.transport is not None:
                    request.transport.abort()
                return resp
            await resp.write_eof()
        finally:
            pipe.abort.set()
            while not queue.empty():  # unblock a writer waiting on a full queue
                queue.get_nowait()
            await worker
        return resp

    app.router.add_get("/api/captures", listing)
    app.router.add_get("/api/captures.zip", zipped)
    app.router.add_get("/captures/{name}", file)
