"""The captures folder: Autowalk evidence on disk, never half-written, within a size limit.

Each capture is one camera's picture (or clip) and three files sharing a stem: the data
(``.jpg`` the robot's own bytes, ``.png`` lossless or 16-bit depth, ``.avi`` MJPEG), a small
``.thumb.jpg`` for the viewer, and a ``.json`` sidecar saying what, when and for which mission.
A capture exists if and only if its sidecar does:

* every file is written as ``name.tmp`` in the same folder, fsynced, then renamed (atomic on
  POSIX), and the sidecar is written last; deleting removes the sidecar first;
* at start, leftover ``*.tmp`` files and data without a sidecar (a crash between the two) are
  deleted, so a crash or a full disk never leaves a partial file that looks like a capture.

The folder is kept under ``max_bytes``: room for a new capture is made by deleting the oldest
captures first (``on_deleted`` counts them); a clip reserves its bytes frame by frame as it grows.
The index is held in memory (built from the sidecars at start) so listings cost no disk reads.

Every method that touches the disk blocks: call them from a worker thread. The index is shared
with the event loop's readers under a lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

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


class StorageError(Exception):
    """A capture that cannot be stored (size limit, disk full, I/O error); says why in words."""


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


@dataclass(frozen=True)
class Capture:
    """One capture as listed: its sidecar and the files that make it."""

    stem: str
    meta: dict[str, Any]
    files: tuple[str, ...]  # data, thumbnail, sidecar
    bytes: int

    @property
    def time(self) -> float:
        return float(self.meta.get("time", 0.0))

    @property
    def run(self) -> str:
        return str(self.meta.get("mission", {}).get("run", ""))


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
        on_deleted: Callable[[int], None] = lambda count: None,
    ):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.on_deleted = on_deleted
        self._lock = threading.Lock()
        self._captures: dict[str, Capture] = {}
        self._pending: set[str] = set()  # stems being written
        self._total = 0  # bytes of listed captures
        self._reserved = 0  # bytes of clips still being written

    # -- reading (any thread) -----------------------------------------------------------------

    @property
    def bytes_on_disk(self) -> int:
        return self._total + self._reserved

    def __len__(self) -> int:
        return len(self._captures)

    def captures(
        self,
        *,
        run: str | None = None,
        mission: str | None = None,
        source: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[Capture]:
        """Newest first. ``mission`` matches part of the mission's group name, any case."""
        with self._lock:
            found = list(self._captures.values())
        needle = mission.lower() if mission else None

        def wanted(c: Capture) -> bool:
            m = c.meta.get("mission", {})
            return (
                (run is None or c.run == run)
                and (needle is None or needle in str(m.get("group_name", "")).lower())
                and (source is None or c.meta.get("source") == source)
                and (kind is None or c.meta.get("kind") == kind)
                and (since is None or c.time >= since)
                and (until is None or c.time <= until)
            )

        return sorted(filter(wanted, found), key=lambda c: (c.time, c.stem), reverse=True)

    def file(self, name: str) -> Path | None:
        """The path of a file that belongs to a listed capture; None for anything else."""
        split = _stem_of(name)
        with self._lock:
            capture = self._captures.get(split[0]) if split else None
        if capture is None or name not in capture.files:
            return None
        return self.folder / name

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
            self._captures[stem] = capture
            self._total += capture.bytes
        if leftovers:
            log.warning("captures: deleted %d partial files left by a crash", leftovers)
        with self._lock:
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
            meta = json.loads(Path(sidecar.path).read_bytes())
            data = meta["file"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("captures: unreadable sidecar %s; deleting its capture", sidecar.name)
            return None
        if _stem_of(data) != (stem, Path(data).suffix) or Path(data).suffix not in parts:
            return None
        files = [e.name for e in parts.values()]
        size = sum(e.stat(follow_symlinks=False).st_size for e in parts.values())
        order = {data: 0, stem + THUMB: 1, stem + SIDECAR: 2}
        return Capture(stem, meta, tuple(sorted(files, key=lambda n: order.get(n, 3))), size)

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
        need = sum(len(p.data) + len(p.thumbnail) + 2048 for _, p in items)
        done: list[Capture] = []
        try:
            with self._lock:
                self._make_room(need)
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
            with self._lock:
                self._pending.difference_update(stem for stem, _ in items)
        return done

    def clip(self, stem: str) -> Clip:
        return Clip(self, stem)

    def _commit(self, stem: str, meta: dict[str, Any], data_bytes: int) -> Capture:
        """Write the sidecar (last), then list the capture."""
        meta = {"id": stem, **meta, "written": time.time()}
        body = json.dumps(meta, indent=1).encode()
        write_atomic(self.folder / (stem + SIDECAR), body)
        files = (meta["file"], stem + THUMB, stem + SIDECAR)
        capture = Capture(stem, meta, files, data_bytes + len(body))
        with self._lock:
            self._captures[stem] = capture
            self._total += capture.bytes
            with contextlib.suppress(StorageError):  # a guess was short: the oldest go
                self._make_room(0, keep=stem)
        return capture

    def _reserve(self, nbytes: int) -> None:
        with self._lock:
            self._make_room(nbytes)
            self._reserved += nbytes

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes

    def _make_room(self, nbytes: int, keep: str | None = None) -> None:
        """Delete the oldest captures until ``nbytes`` more fit; StorageError (and nothing
        deleted) if they would not fit even in an emptied folder."""
        kept = self._captures[keep].bytes if keep in self._captures else 0
        if self._reserved + kept + nbytes > self.max_bytes:
            raise StorageError(
                f"{nbytes / 1e6:.1f} MB more would pass the captures size limit "
                f"({self.max_bytes / 1e6:g} MB, --captures-max-mb)"
            )
        if self._total + self._reserved + nbytes <= self.max_bytes:
            return
        oldest_first = sorted(
            (c for c in self._captures.values() if c.stem != keep), key=lambda c: (c.time, c.stem)
        )
        deleted = 0
        for victim in oldest_first:  # sorted once: freeing k of n captures costs n log n, not n*k
            if self._total + self._reserved + nbytes <= self.max_bytes:
                break
            self._delete(victim)
            deleted += 1
        if deleted:
            self.on_deleted(deleted)
            log.info("captures: deleted the %d oldest to stay under the size limit", deleted)

    def _delete(self, capture: Capture) -> None:
        """Sidecar first: from then on the capture does not exist, whatever else happens."""
        self._captures.pop(capture.stem, None)
        self._total -= capture.bytes
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
    ``discard`` (or any failure) deletes it. Every method blocks."""

    def __init__(self, store: Store, stem: str):
        self.store, self.stem = store, stem
        self.tmp = store.folder / (stem + ".avi" + TMP)
        self._reserved = 0
        self._fh: BinaryIO | None = None
        # a Stop may finish the clip while the last frame is still being added in another thread
        self._lock = threading.Lock()
        try:
            self._fh = open(self.tmp, "wb")  # noqa: SIM115 - closed by finish/discard
            self.avi = AviWriter(self._fh)
            self._reserve(self.avi.bytes + 64 * 1024)  # headers, index, thumbnail, sidecar
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
                self._reserve(frame_bytes(jpeg))
                self.avi.add(jpeg)
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


def runs(captures: Iterable[Capture]) -> list[dict[str, Any]]:
    """Mission runs among ``captures``, newest first: name, group name, count, first, last."""
    by_run: dict[str, dict[str, Any]] = {}
    for c in captures:
        r = by_run.setdefault(
            c.run,
            {
                "run": c.run,
                "group_name": c.meta.get("mission", {}).get("group_name", ""),
                "count": 0,
                "bytes": 0,
                "first": c.time,
                "last": c.time,
            },
        )
        r["count"] += 1
        r["bytes"] += c.bytes
        r["first"], r["last"] = min(r["first"], c.time), max(r["last"], c.time)
    return sorted(by_run.values(), key=lambda r: r["last"], reverse=True)
