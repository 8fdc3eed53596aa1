"""The captures folder: Autowalk evidence on disk, never half-written, within a size limit.

Each capture is one camera's picture (or clip) and three files sharing a stem: the data
(``.jpg`` the robot's own bytes, ``.png`` lossless or 16-bit depth, ``.avi`` MJPEG), a small
``.thumb.jpg`` for the viewer, and a ``.json`` sidecar saying what, when and for which mission.
A capture exists if and only if its sidecar does:

* every file is written as ``name.tmp`` in the same folder, fsynced, then renamed (atomic on
  POSIX), and the sidecar is written last; deleting removes the sidecar first;
* at start, leftover ``*.tmp`` files and data without a sidecar (a crash between the two) are
  deleted, so a crash or a full disk never leaves a partial file that looks like a capture.

The folder is kept under ``max_bytes``, and evidence is never lost to a burst of new work: room
is made only as the user chose (``delete_after``: captures written longer ago than that may be
deleted, oldest first; None: never), and work that would need more is refused (``Full``) before
anything is deleted. A clip reserves its worst case before its first frame (``Clip(reserve=)``).

The index is held in memory (built from the sidecars at start) so listings cost no disk reads,
but never a whole sidecar: each capture keeps a few short fields to filter and sort on, and its
listing entry already encoded as strict JSON (bounded fields, no NaN), so a listing only joins
bytes. Sidecars themselves are written as strict JSON too: a browser refuses ``NaN``.

Files are opened without following links, by name inside the folder's own descriptor
(``open_file``): a file swapped for a link, or anything that is not a plain file, is not served.

Every method that touches the disk blocks: call them from a worker thread. The index is shared
with the event loop's readers under a lock.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from spotrelay.autowalk.avi import AviWriter, frame_bytes

log = logging.getLogger("spotrelay.autowalk")

SIDECAR, THUMB, TMP = ".json", ".thumb.jpg", ".tmp"
DATA_SUFFIXES = (".jpg", ".png", ".avi")
MEDIA_TYPES = {
    ".jpg": "image/jpeg",
    ".png": "image/png",
    ".avi": "video/x-msvideo",
    ".json": "application/json",
}
# Longest first, so that "x.thumb.jpg" is not taken for data "x.thumb" + ".jpg".
_SUFFIXES = (THUMB, SIDECAR, *DATA_SUFFIXES)
UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")  # in names of files, and folders in zips


MAX_TEXT = 256  # characters of a text field in the index (labels are refused past it at a tick)
MAX_SIDECAR = 16 << 20  # a sidecar larger than this is not ours: its capture is not indexed
CLIP_OVERHEAD = 64 * 1024  # AVI headers and index slack, thumbnail, sidecar


class StorageError(Exception):
    """A capture that cannot be stored (size limit, disk full, I/O error); says why in words."""


class Full(StorageError):
    """No room, and nothing may be deleted to make it (the user's policy): refused, not lost."""


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None: what strict JSON can carry."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def strict_json(value: Any, **kw: Any) -> str:
    """JSON every parser reads: NaN and infinities become null (``allow_nan=False`` checks)."""
    return json.dumps(finite(value), allow_nan=False, **kw)


def _text(value: Any, limit: int = MAX_TEXT) -> str:
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def _write_all(fd: int, data: bytes) -> None:
    """os.write until done (a write may be short); tests replace it to fake a full disk."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` entirely, or does not exist: temp name, fsync, rename."""
    tmp = path.with_name(path.name + TMP)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def utc_iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _stem_of(name: str) -> tuple[str, str] | None:
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return None


@dataclass(frozen=True, slots=True)
class Capture:
    """One capture as indexed: what listings filter and sort on, its files, and its listing
    entry encoded once (the sidecar's fields, bounded; the full sidecar is on disk)."""

    stem: str
    time: float
    written: float
    run: str
    group_name: str
    source: str
    kind: str
    files: tuple[str, ...]  # data, thumbnail, sidecar
    bytes: int
    entry: bytes  # strict JSON of the listing entry

    @property
    def key(self) -> tuple[float, str]:
        return (self.time, self.stem)

    @property
    def meta(self) -> dict[str, Any]:
        """The listing entry as a dict (tests and the zip read it; listings join ``entry``)."""
        return json.loads(self.entry)


_ENTRY_FIELDS = (
    "source", "label", "action", "kind", "file", "thumbnail", "bytes", "media_type", "encoding",
    "width", "height", "time", "time_utc", "robot_time", "received", "seq", "depth_scale",
    "written",
)  # fmt: skip
_CLIP_FIELDS = ("frames", "fps", "duration", "end_time", "requested_duration", "complete")
_MISSION_FIELDS = ("run", "group_name", "node", "session", "client", "tick_started")


def index_entry(stem: str, meta: dict[str, Any], files: tuple[str, ...], size: int) -> Capture:
    """The index's record of a capture from its sidecar: short fields only, whatever the
    sidecar holds (a sidecar of an older version, or one written by hand)."""
    entry: dict[str, Any] = {"id": stem}
    for key in _ENTRY_FIELDS:
        if key in meta:
            value = meta[key]
            entry[key] = _text(value) if not isinstance(value, int | float) else _number(value)
    clip = meta.get("clip")
    if isinstance(clip, dict):
        entry["clip"] = {k: _number(clip.get(k)) for k in _CLIP_FIELDS if k != "complete"}
        entry["clip"]["complete"] = clip.get("complete") is True
        entry["clip"]["problem"] = _text(clip["problem"]) if clip.get("problem") else None
    mission = meta.get("mission")
    mission = mission if isinstance(mission, dict) else {}
    entry["mission"] = {
        k: (_number(mission[k]) if k == "tick_started" else _text(mission[k]))
        for k in _MISSION_FIELDS
        if k in mission
    }
    entry["mission"].setdefault("run", "")
    entry["bytes_total"] = size
    entry["url"] = "/captures/" + quote(str(meta.get("file", "")))
    entry["thumbnail_url"] = "/captures/" + quote(stem + THUMB)
    entry["sidecar_url"] = "/captures/" + quote(stem + SIDECAR)
    t = _number(meta.get("time")) or 0.0
    written = _number(meta.get("written")) or t
    return Capture(
        stem=stem,
        time=float(t),
        written=float(written),
        run=entry["mission"]["run"],
        group_name=entry["mission"].get("group_name", ""),
        source=entry.get("source", ""),
        kind=entry.get("kind", ""),
        files=files,
        bytes=size,
        entry=strict_json(entry, separators=(",", ":")).encode(),
    )


@dataclass
class Picture:
    """What to store for one still: data and thumbnail bytes, the sidecar's fields."""

    suffix: str  # ".jpg" or ".png"
    data: bytes
    thumbnail: bytes
    meta: dict[str, Any] = field(default_factory=dict)


class Store:
    def __init__(
        self,
        folder: str | os.PathLike,
        max_bytes: int,
        *,
        delete_after: float | None = 7 * 86400.0,
        on_deleted: Callable[[int], None] = lambda count: None,
        clock: Callable[[], float] = time.time,
    ):
        """``delete_after``: seconds after which a capture may be deleted to make room (oldest
        first); None: never delete, refuse new work instead."""
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.delete_after = delete_after
        self.on_deleted = on_deleted
        self.clock = clock
        self._lock = threading.Lock()
        self._captures: dict[str, Capture] = {}
        self._order: list[tuple[float, str]] = []  # (time, stem), oldest first
        self._pending: set[str] = set()  # stems being written
        self._total = 0  # bytes of listed captures
        self._reserved = 0  # bytes of clips still being written
        self._version = 0  # changes with every capture added or deleted
        self._runs: tuple[int, list[dict[str, Any]]] = (-1, [])

    # -- reading (any thread) -----------------------------------------------------------------

    @property
    def bytes_on_disk(self) -> int:
        return self._total + self._reserved

    def __len__(self) -> int:
        return len(self._captures)

    def captures(self, **filters: Any) -> list[Capture]:
        """Newest first; the filters of ``page``, without paging."""
        return self.page(**filters)[0]

    def page(
        self,
        *,
        run: str | None = None,
        mission: str | None = None,
        source: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before: tuple[float, str] | None = None,
        limit: int | None = None,
        scan: int | None = None,
    ) -> tuple[list[Capture], tuple[float, str] | None]:
        """Captures newest first, older than ``before`` (the key a previous page ended at), at
        most ``limit`` of them, looking at no more than ``scan`` (so a filter that matches
        little costs no more than that, whatever the folder holds); and the key to go on from,
        None when nothing is left. ``mission`` matches part of the group name, any case."""
        needle = mission.lower() if mission else None
        found: list[Capture] = []
        with self._lock:
            order, captures = self._order, self._captures
            hi = len(order)
            if until is not None:
                hi = bisect.bisect_right(order, (until, "\U0010ffff"), 0, hi)
            if before is not None:
                hi = bisect.bisect_left(order, before, 0, hi)
            lo = bisect.bisect_left(order, (since, ""), 0, hi) if since is not None else 0
            stop = max(lo, hi - scan) if scan is not None else lo
            i = hi
            while i > stop:
                i -= 1
                c = captures[order[i][1]]
                if (
                    (run is None or c.run == run)
                    and (needle is None or needle in c.group_name.lower())
                    and (source is None or c.source == source)
                    and (kind is None or c.kind == kind)
                ):
                    found.append(c)
                    if limit is not None and len(found) >= limit:
                        break
            more = i > lo
            next_key = order[i] if more else None
        return found, next_key

    def runs(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Every mission run in the folder, newest first: name, group name, count, bytes, first,
        last. Computed once per change of the folder, not per request."""
        version, cached = self._runs
        if version == self._version:
            return cached[:limit]
        with self._lock:
            version = self._version
            captures = list(self._captures.values())
        by_run: dict[str, dict[str, Any]] = {}
        for c in captures:
            r = by_run.get(c.run)
            if r is None:
                r = by_run[c.run] = {
                    "run": c.run, "group_name": c.group_name, "count": 0, "bytes": 0,
                    "first": c.time, "last": c.time,
                }  # fmt: skip
            r["count"] += 1
            r["bytes"] += c.bytes
            r["first"], r["last"] = min(r["first"], c.time), max(r["last"], c.time)
        out = sorted(by_run.values(), key=lambda r: r["last"], reverse=True)
        self._runs = (version, out)
        return out[:limit]

    def get(self, stem: str) -> Capture | None:
        with self._lock:
            return self._captures.get(stem)

    def file(self, name: str) -> Path | None:
        """The path of a file that belongs to a listed capture; None for anything else."""
        split = _stem_of(name)
        with self._lock:
            capture = self._captures.get(split[0]) if split else None
        if capture is None or name not in capture.files:
            return None
        return self.folder / name

    def open_file(self, name: str) -> tuple[int, int] | None:
        """(descriptor, size) of a listed capture's file, opened read-only by name inside the
        folder without following a link (O_NOFOLLOW), and only if it is a plain file with one
        name; None otherwise (not listed, gone, swapped for a link, a FIFO, a hard link)."""
        if self.file(name) is None or "/" in name:
            return None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            folder = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fd = os.open(name, flags, dir_fd=folder)
        except OSError:  # ELOOP: a link; ENOENT: deleted since
            return None
        finally:
            os.close(folder)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            return None
        return fd, st.st_size

    # -- start ----------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the folder, delete what a crash left, index the captures, apply the limit."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stems: dict[str, dict[str, os.DirEntry]] = {}
        leftovers = 0
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if entry.name.endswith(TMP):
                    Path(entry.path).unlink(missing_ok=True)
                    leftovers += 1
                elif split := _stem_of(entry.name):
                    stems.setdefault(split[0], {})[split[1]] = entry
        for stem, parts in stems.items():
            capture = self._load(stem, parts)
            if capture is None:
                for entry in parts.values():
                    Path(entry.path).unlink(missing_ok=True)
                    leftovers += 1
                continue
            self._add(capture)
        if leftovers:
            log.warning("captures: deleted %d partial files left by a crash", leftovers)
        with self._lock, contextlib.suppress(Full):  # over the limit already: refuse new work
            self._make_room(0)
        log.info(
            "captures in %s: %d, %.1f MB of %.0f MB",
            self.folder,
            len(self._captures),
            self._total / 1e6,
            self.max_bytes / 1e6,
        )

    def _load(self, stem: str, parts: dict[str, os.DirEntry]) -> Capture | None:
        sidecar = parts.get(SIDECAR)
        if sidecar is None:
            return None
        try:
            if sidecar.stat(follow_symlinks=False).st_size > MAX_SIDECAR:
                raise ValueError("too large")
            meta = json.loads(Path(sidecar.path).read_bytes())
            data = meta["file"]
            if not isinstance(data, str):
                raise TypeError(data)
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("captures: unreadable sidecar %s; deleting its capture", sidecar.name)
            return None
        if _stem_of(data) != (stem, Path(data).suffix) or Path(data).suffix not in parts:
            return None
        files = [e.name for e in parts.values()]
        size = sum(e.stat(follow_symlinks=False).st_size for e in parts.values())
        order = {data: 0, stem + THUMB: 1, stem + SIDECAR: 2}
        files.sort(key=lambda n: order.get(n, 3))
        return index_entry(stem, meta, tuple(files), size)

    def _add(self, capture: Capture) -> None:
        """List a capture (the lock held, or at start)."""
        self._captures[capture.stem] = capture
        bisect.insort(self._order, capture.key)
        self._total += capture.bytes
        self._version += 1

    # -- writing (worker thread) ----------------------------------------------------------------

    def new_stem(self, t: float, source: str) -> str:
        """A fresh, file-system safe stem for a capture of ``source`` taken at ``t``."""
        base = time.strftime("%Y%m%d-%H%M%S", time.localtime(t)) + f"-{int(t * 1000) % 1000:03d}"
        base += "_" + UNSAFE.sub("-", source)[:80]
        with self._lock:
            stem, n = base, 1
            while stem in self._captures or stem in self._pending:
                n += 1
                stem = f"{base}_{n}"
            self._pending.add(stem)
        return stem

    def write_pictures(self, items: list[tuple[str, Picture]]) -> list[Capture]:
        """Store (stem, picture) pairs as captures: all of them, or none (the ones written are
        removed again if a later one fails). Raises StorageError."""
        # + the sidecar: its fields, the names and times added when written
        need = sum(
            len(p.data) + len(p.thumbnail) + len(strict_json(p.meta)) + 512 for _, p in items
        )
        done: list[Capture] = []
        reserved = 0
        try:
            self._reserve(need)  # held while writing: concurrent writers cannot overshoot
            reserved = need
            for stem, picture in items:
                data_name = stem + picture.suffix
                meta = {**picture.meta, "file": data_name, "bytes": len(picture.data)}
                meta["thumbnail"] = stem + THUMB
                write_atomic(self.folder / data_name, picture.data)
                write_atomic(self.folder / (stem + THUMB), picture.thumbnail)
                done.append(self._commit(stem, meta, len(picture.data) + len(picture.thumbnail)))
            self._sync_folder()
        except (OSError, StorageError) as exc:
            for capture in done:
                with self._lock:
                    self._delete(capture)
            for stem, picture in items:
                for name in (stem + picture.suffix, stem + THUMB):
                    (self.folder / name).unlink(missing_ok=True)
            raise _storage_error(exc) from exc
        finally:
            self._release(reserved)
            with self._lock:
                self._pending.difference_update(stem for stem, _ in items)
        return done

    def clip(self, stem: str, reserve: int = 0) -> Clip:
        return Clip(self, stem, reserve)

    def _commit(self, stem: str, meta: dict[str, Any], data_bytes: int) -> Capture:
        """Write the sidecar (last, strict JSON), then list the capture."""
        meta = {"id": stem, **meta, "written": self.clock()}
        body = strict_json(meta, indent=1).encode()
        write_atomic(self.folder / (stem + SIDECAR), body)
        files = (meta["file"], stem + THUMB, stem + SIDECAR)
        capture = index_entry(stem, meta, files, data_bytes + len(body))
        with self._lock:
            self._add(capture)
        return capture

    def _reserve(self, nbytes: int) -> None:
        with self._lock:
            self._make_room(nbytes)
            self._reserved += nbytes

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes

    def _make_room(self, nbytes: int) -> None:
        """Make ``nbytes`` more fit under the limit, deleting only what the policy allows
        (captures older than ``delete_after``, oldest first), and only if that is enough:
        otherwise ``Full``, and nothing deleted."""
        used = self._total + self._reserved
        if used + nbytes <= self.max_bytes:
            return
        need = used + nbytes - self.max_bytes
        victims: list[Capture] = []
        if self.delete_after is not None:
            cutoff = self.clock() - self.delete_after
            freed = 0
            for _, stem in self._order:  # oldest first; sorted already
                if freed >= need:
                    break
                c = self._captures[stem]
                if c.written > cutoff:
                    continue
                victims.append(c)
                freed += c.bytes
            if freed < need:
                victims = []
        if not victims:
            raise Full(self._full_message(nbytes))
        for victim in victims:
            self._delete(victim)
        self.on_deleted(len(victims))
        log.info(
            "captures: deleted the %d oldest (older than %.3g days) to stay under the size limit",
            len(victims),
            (self.delete_after or 0) / 86400,
        )

    def _full_message(self, nbytes: int) -> str:
        kept = (
            "never deletes (--captures-full refuse)"
            if self.delete_after is None
            else f"keeps every capture younger than {self.delete_after / 86400:g} days "
            "(--captures-keep-days)"
        )
        return (
            f"captures folder full: {nbytes / 1e6:.1f} MB more would pass its limit "
            f"({self.bytes_on_disk / 1e6:.1f} of {self.max_bytes / 1e6:g} MB used, "
            f"--captures-max-mb) and it {kept}; download and delete captures, or raise the limit"
        )

    def _delete(self, capture: Capture) -> None:
        """Sidecar first: from then on the capture does not exist, whatever else happens."""
        if self._captures.pop(capture.stem, None) is None:
            return
        i = bisect.bisect_left(self._order, capture.key)
        if i < len(self._order) and self._order[i] == capture.key:
            del self._order[i]
        self._total -= capture.bytes
        self._version += 1
        for name in sorted(capture.files, key=lambda n: not n.endswith(SIDECAR)):
            with contextlib.suppress(OSError):
                (self.folder / name).unlink()

    def _sync_folder(self) -> None:
        """The renames themselves reach the disk (a crash right after keeps the files)."""
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _storage_error(exc: BaseException) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    assert isinstance(exc, OSError)
    return StorageError(f"cannot write the capture: {exc.strerror or exc}")


class Clip:
    """A clip being recorded: frames go to ``stem.avi.tmp``; ``finish`` makes it a capture,
    ``discard`` (or any failure) deletes it. Every method blocks.

    ``reserve``: the clip's worst case, reserved before the first frame (``Full`` at once if
    the folder cannot hold it); frames past it reserve more one by one."""

    def __init__(self, store: Store, stem: str, reserve: int = 0):
        self.store, self.stem = store, stem
        self.tmp = store.folder / (stem + ".avi" + TMP)
        self._reserved = 0  # bytes held in the store's reservation
        self._used = 0  # of which frames and headers take this much
        self._fh: BinaryIO | None = None
        # a Stop may finish the clip while the last frame is still being added in another thread
        self._lock = threading.Lock()
        try:
            self._reserve(CLIP_OVERHEAD + reserve)  # before the file: Full leaves nothing
            self._fh = open(self.tmp, "wb")  # noqa: SIM115 - closed by finish/discard
            self.avi = AviWriter(self._fh)
            self._used = self.avi.bytes + CLIP_OVERHEAD
            if self._used > self._reserved:
                self._reserve(self._used - self._reserved)
        except BaseException as exc:
            self.discard()
            if isinstance(exc, OSError):
                raise _storage_error(exc) from exc
            raise

    @property
    def frames(self) -> int:
        return self.avi.frames

    def _reserve(self, nbytes: int) -> None:
        self.store._reserve(nbytes)
        self._reserved += nbytes

    def add(self, jpeg: bytes) -> None:
        """Append one frame. Raises ClipError (a frame it cannot take) or StorageError."""
        with self._lock:
            try:
                need = frame_bytes(jpeg)
                if self._used + need > self._reserved:
                    self._reserve(self._used + need - self._reserved)
                self.avi.add(jpeg)
                self._used += need
            except OSError as exc:
                raise _storage_error(exc) from exc

    def finish(self, fps: float, thumbnail: bytes, meta: dict[str, Any]) -> Capture:
        """Close the AVI, rename it, write thumbnail and sidecar. Raises StorageError."""
        store, stem = self.store, self.stem
        assert self._fh is not None
        try:
            with self._lock:
                self.avi.close(fps)
                self._fh.close()
            size = self.tmp.stat().st_size
            os.replace(self.tmp, store.folder / (stem + ".avi"))
            write_atomic(store.folder / (stem + THUMB), thumbnail)
            self.store._release(self._reserved)
            self._reserved = 0
            meta = {**meta, "file": stem + ".avi", "thumbnail": stem + THUMB, "bytes": size}
            capture = store._commit(stem, meta, size + len(thumbnail))
            store._sync_folder()
            return capture
        except OSError as exc:
            self.discard()
            raise _storage_error(exc) from exc
        finally:
            with store._lock:
                store._pending.discard(stem)

    def discard(self) -> None:
        with self._lock, contextlib.suppress(OSError, AttributeError):
            self._fh.close()  # type: ignore[union-attr]
        for name in (self.stem + ".avi" + TMP, self.stem + ".avi", self.stem + THUMB):
            (self.store.folder / name).unlink(missing_ok=True)
        self.store._release(self._reserved)
        self._reserved = 0
        with self.store._lock:
            self.store._pending.discard(self.stem)
