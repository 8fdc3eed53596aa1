"""The captures folder and the AVI writer, on real files: what ffprobe and OpenCV read back, what a
crash or a full disk leaves (nothing that looks like a capture), the size limit (oldest first)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import zipfile

import aiohttp
import cv2
import numpy as np
import pytest
from aiohttp import web

from spotrelay.autowalk import routes
from spotrelay.autowalk import store as captures
from spotrelay.autowalk.avi import AviWriter, ClipError, jpeg_size
from spotrelay.autowalk.store import Picture, StorageError, Store
from spotrelay.http.app import build_app

FFPROBE = shutil.which("ffprobe")
FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(
    (FFPROBE is None or FFMPEG is None) and not os.environ.get("CI"),
    reason="ffmpeg not installed (.ci/run installs it)",
)


def jpeg(i: int, w: int = 320, h: int = 240) -> bytes:
    img = np.random.default_rng(i).integers(0, 256, (h, w), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def probe(path) -> dict:
    cmd = [FFPROBE or "ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json"]
    out = subprocess.run(
        [*cmd, path],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert out.stderr == "", out.stderr  # no complaint about the container
    return json.loads(out.stdout)["streams"][0]


@needs_ffmpeg
def test_avi_holds_the_jpeg_bytes_untouched_and_plays(tmp_path):
    frames = [jpeg(i) for i in range(20)]
    frames.append(frames[0] + b"\0")  # an odd length: the chunk is padded, the frame is not
    path = tmp_path / "clip.avi"
    with open(path, "wb") as fh:
        avi = AviWriter(fh)
        for f in frames:
            avi.add(f)
        avi.close(12.5)
    stream = probe(path)
    assert (stream["codec_name"], stream["width"], stream["height"]) == ("mjpeg", 320, 240)
    assert int(stream["nb_read_frames"]) == 21 and stream["r_frame_rate"] == "25/2"
    copied = subprocess.run(
        [FFMPEG or "ffmpeg", "-v", "error", "-i", path, "-c", "copy", "-f", "image2pipe", "-"],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    assert copied == b"".join(frames)  # the robot's bytes, demuxed as they went in
    cap = cv2.VideoCapture(str(path))
    read = 0
    while cap.read()[0]:
        read += 1
    cap.release()
    assert read == 21


def test_avi_refuses_what_it_cannot_hold(tmp_path):
    with open(tmp_path / "x.avi", "wb") as fh:
        avi = AviWriter(fh, max_bytes=300_000)
        avi.add(jpeg(1))
        with pytest.raises(ClipError, match="size changed"):
            avi.add(jpeg(2, 160, 120))
        with pytest.raises(ClipError, match="not a JPEG"):
            avi.add(b"PNG....")
        with pytest.raises(ClipError, match="limited"):
            for i in range(10):
                avi.add(jpeg(i))
    assert jpeg_size(jpeg(3, 64, 48)) == (64, 48)
    with pytest.raises(ClipError):
        jpeg_size(b"\xff\xd8\xff\xd9")


def picture(i: int, size: int = 1000, **meta) -> Picture:
    return Picture(".jpg", bytes([i % 256]) * size, b"thumb", {"time": 1000.0 + i, **meta})


def files(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_a_capture_exists_iff_its_sidecar_does_and_leftovers_go_at_start(tmp_path):
    store = Store(tmp_path, 10**6)
    store.open()
    stem = store.new_stem(1000.0, "front/left camera")
    assert "/" not in stem and " " not in stem
    [capture] = store.write_pictures([(stem, picture(0, source="cam", mission={"run": "r1"}))])
    assert files(tmp_path) == {stem + ".jpg", stem + ".thumb.jpg", stem + ".json"}
    meta = json.loads((tmp_path / (stem + ".json")).read_text())
    assert meta["file"] == stem + ".jpg" and meta["bytes"] == 1000 and meta["id"] == stem
    assert store.file(stem + ".jpg") == tmp_path / (stem + ".jpg")
    assert store.file("../" + stem + ".jpg") is None and store.file("other.jpg") is None
    # what a crash leaves: temp files, data whose sidecar was never written, a broken sidecar
    (tmp_path / "x.jpg.tmp").write_bytes(b"half")
    (tmp_path / "20260101-000000-000_cam.avi").write_bytes(b"no sidecar")
    (tmp_path / "20260101-000000-001_cam.json").write_text("{not json")
    (tmp_path / "20260101-000000-001_cam.jpg").write_bytes(b"x")
    (tmp_path / "20260101-000000-002_cam.json").write_text(json.dumps({"file": "gone.jpg"}))
    (tmp_path / "notes.txt").write_text("not ours: left alone")
    again = Store(tmp_path, 10**6)
    again.open()
    assert files(tmp_path) == {stem + ".jpg", stem + ".thumb.jpg", stem + ".json", "notes.txt"}
    [found] = again.captures()
    assert found.stem == stem and found.bytes == capture.bytes and found.run == "r1"


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


DAY = 86400.0


def test_the_size_limit_deletes_only_captures_older_than_the_users_choice(tmp_path):
    """Old captures make room, oldest first; young ones never do: new work is refused instead,
    before anything is deleted, and counted."""
    clock, deleted = Clock(), []
    store = Store(tmp_path, 12_000, delete_after=7 * DAY, on_deleted=deleted.append, clock=clock)
    store.open()
    clock.t -= 10 * DAY  # three captures from ten days ago
    old = [store.write_pictures([(store.new_stem(1000.0 + i, "cam"), picture(i, 2500))])[0].stem
           for i in range(3)]  # fmt: skip
    clock.t += 10 * DAY
    young = []
    for i in range(3, 6):
        young.append(
            store.write_pictures([(store.new_stem(1000.0 + i, "cam"), picture(i, 2500))])[0].stem
        )
        assert store.bytes_on_disk <= 12_000
    kept = [c.stem for c in store.captures()]
    assert set(young) <= set(kept) and old[0] not in kept  # the oldest went first
    assert sum(deleted) == 6 - len(kept) and not any(old[0] in n for n in files(tmp_path))
    while any(s in kept for s in old):  # use up the old ones
        store.write_pictures([(store.new_stem(2000.0, "cam"), picture(9, 2500))])
        kept = [c.stem for c in store.captures()]
    before, on_disk = [c.stem for c in store.captures()], files(tmp_path)
    with pytest.raises(captures.Full, match="--captures-keep-days"):
        store.write_pictures([(store.new_stem(3000.0, "cam"), picture(9, 2500))])
    assert [c.stem for c in store.captures()] == before and files(tmp_path) == on_disk
    # a week later the same captures may go
    clock.t += 8 * DAY
    store.write_pictures([(store.new_stem(3000.0, "cam"), picture(9, 2500))])
    assert len(store.captures()) <= len(before)


def test_refuse_never_deletes_and_a_capture_larger_than_the_folder_deletes_nothing(tmp_path):
    store = Store(tmp_path, 10_000, delete_after=None)
    store.open()
    [first] = store.write_pictures([(store.new_stem(1.0, "cam"), picture(1, 4000))])
    with pytest.raises(captures.Full, match="refuse"):
        store.write_pictures([(store.new_stem(2.0, "cam"), picture(2, 7000))])
    assert [c.stem for c in store.captures()] == [first.stem]
    ages = Store(tmp_path / "b", 10_000, delete_after=0.0)  # anything may go, but in vain
    ages.open()
    ages.write_pictures([(ages.new_stem(1.0, "cam"), picture(1, 4000))])
    with pytest.raises(captures.Full):
        ages.write_pictures([(ages.new_stem(2.0, "cam"), picture(2, 20_000))])
    assert len(ages.captures()) == 1


def test_a_clip_reserves_its_worst_case_before_its_first_frame(tmp_path):
    store = Store(tmp_path, 1_000_000, delete_after=None)
    store.open()
    first = store.clip(store.new_stem(1.0, "a"), reserve=600_000)
    held = store.bytes_on_disk
    assert held >= 600_000
    for i in range(3):
        first.add(jpeg(i))  # inside its reservation: nothing more is held
    assert store.bytes_on_disk == held
    with pytest.raises(captures.Full, match="captures folder full"):
        store.clip(store.new_stem(2.0, "b"), reserve=600_000)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == [first.tmp.name]
    capture = first.finish(15.0, b"thumb", {"time": 1.0, "source": "a"})
    assert store.bytes_on_disk == capture.bytes  # the rest of the reservation is given back
    store.clip(store.new_stem(3.0, "b"), reserve=600_000).discard()
    assert store.bytes_on_disk == capture.bytes


def test_the_index_keeps_short_strict_fields_whatever_a_sidecar_holds(tmp_path):
    """A sidecar of megabytes (an old version's 3.9 MB label) or with NaN costs the index a
    few hundred bytes, and listings stay strict JSON."""
    store = Store(tmp_path, 10**8)
    store.open()
    stem = store.new_stem(1000.0, "cam")
    inputs = {"n": float("inf"), "big": "y" * 100_000}
    meta = {"source": "cam", "label": "x" * 3_900_000, "width": float("nan")}
    meta["mission"] = {"run": "r", "inputs": inputs}
    [capture] = store.write_pictures([(stem, picture(1, **meta))])
    sidecar = (tmp_path / (stem + ".json")).read_text()
    strict = {"parse_constant": lambda c: pytest.fail(f"{c} in strict JSON")}
    assert json.loads(sidecar, **strict)["width"] is None  # written strict: no NaN
    again = Store(tmp_path, 10**8)
    again.open()
    [found] = again.captures()
    for c in (capture, found):
        assert len(c.entry) < 2000, len(c.entry)
        entry = json.loads(c.entry, **strict)
        assert len(entry["label"]) == captures.MAX_TEXT and "inputs" not in entry["mission"]
        assert entry["url"] == "/captures/" + stem + ".jpg"


def test_pages_go_through_every_capture_once_newest_first(tmp_path):
    store = Store(tmp_path, 10**8)
    store.open()
    for i in range(25):
        store.write_pictures([(store.new_stem(1000.0 + i // 2, "cam"), picture(i, 10))])
    seen, before = [], None
    while True:
        page, before = store.page(limit=10, before=before)
        seen += page
        if before is None:
            break
    assert len(seen) == 25 and len({c.stem for c in seen}) == 25
    assert [c.key for c in seen] == sorted((c.key for c in seen), reverse=True)
    # a filter that matches nothing looks at no more than `scan` captures, and says where it
    # stopped
    page, where = store.page(source="nothing", scan=5)
    assert page == [] and where == seen[4].key  # the last one looked at


def test_a_file_swapped_for_a_link_or_a_fifo_is_not_opened(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("root's")
    folder = tmp_path / "captures"
    store = Store(folder, 10**6)
    store.open()
    stem = store.new_stem(1.0, "cam")
    store.write_pictures([(stem, picture(1))])
    fd, size = store.open_file(stem + ".jpg")
    os.close(fd)
    assert size == 1000
    (folder / (stem + ".jpg")).unlink()
    (folder / (stem + ".jpg")).symlink_to(secret)
    assert store.open_file(stem + ".jpg") is None
    (folder / (stem + ".jpg")).unlink()
    os.mkfifo(folder / (stem + ".jpg"))
    assert store.open_file(stem + ".jpg") is None  # and it did not block
    (folder / (stem + ".jpg")).unlink()
    os.link(secret, folder / (stem + ".jpg"))
    assert store.open_file(stem + ".jpg") is None  # a second name of another file
    assert store.open_file("../secret") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_the_start_up_chown_never_follows_a_link(tmp_path):
    """--run-as: root gives the captures folder to the relay's user, but a link the relay's user
    planted there (to a root 0600 file, to a folder) hands nothing else over."""
    from spotrelay.process import own_folder

    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "shadow"
    secret.write_text("root only")
    secret.chmod(0o600)
    folder = tmp_path / "captures"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"x")
    (folder / "sub" / "b.jpg").write_bytes(b"y")
    (folder / "link.jpg").symlink_to(secret)
    (folder / "linkdir").symlink_to(outside)
    own_folder(str(folder), 12345, 12346)
    for path in (folder, folder / "a.jpg", folder / "sub", folder / "sub" / "b.jpg"):
        assert (path.stat().st_uid, path.stat().st_gid) == (12345, 12346), path
    for path in (secret, outside):
        assert (path.stat().st_uid, path.stat().st_gid) == (0, 0), path
    assert secret.stat().st_mode & 0o777 == 0o600
    # a captures folder that is itself a link is left alone
    own_folder(str(folder / "linkdir"), 12345, 12346)
    assert outside.stat().st_uid == 0


def test_a_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    store = Store(tmp_path, 10**6)
    store.open()
    real = captures._write_all
    writes = []

    def full(fd, data):
        writes.append(len(data))
        if len(writes) == 3:  # the second picture's data: the first is already complete
            real(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(captures, "_write_all", full)
    items = [(store.new_stem(1000.0, "a"), picture(1)), (store.new_stem(1000.0, "b"), picture(2))]
    with pytest.raises(StorageError, match="No space left on device"):
        store.write_pictures(items)
    assert files(tmp_path) == set() and store.captures() == [] and store.bytes_on_disk == 0


def test_a_clip_is_renamed_only_once_closed_and_a_failure_removes_it(tmp_path, monkeypatch):
    store = Store(tmp_path, 10**6)
    store.open()
    clip = store.clip(store.new_stem(1000.0, "cam"))
    clip.add(jpeg(1))
    assert [p.suffix for p in tmp_path.iterdir()] == [".tmp"]  # not a clip until finished
    capture = clip.finish(15.0, b"thumb", {"time": 1000.0, "source": "cam"})
    assert capture.meta["file"].endswith(".avi") and store.file(capture.meta["file"])
    assert not any(p.suffix == ".tmp" for p in tmp_path.iterdir())

    clip = store.clip(store.new_stem(1001.0, "cam"))
    clip.add(jpeg(2))

    def enospc(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(StorageError, match="No space"):
        clip.finish(15.0, b"thumb", {"time": 1001.0})
    monkeypatch.undo()
    assert len(store.captures()) == 1 and not any(p.suffix == ".tmp" for p in tmp_path.iterdir())
    # past the size limit while recording: refused, and the clip gives its reservation back
    small = Store(tmp_path / "small", 150_000, delete_after=None)
    small.open()
    clip = small.clip(small.new_stem(1.0, "cam"))
    with pytest.raises(StorageError, match="captures folder full"):
        for i in range(100):
            clip.add(jpeg(i))
    clip.discard()
    assert small.bytes_on_disk == 0 and list((tmp_path / "small").iterdir()) == []


# -- the captures routes, over real sockets ---------------------------------------------------


@contextlib.asynccontextmanager
async def serving(store: Store, client_timeout: float = 10.0):
    """The captures routes on 127.0.0.1 (real sockets: a client that stops reading is real)."""
    app = build_app([lambda app: routes.add_routes(app, store, client_timeout=client_timeout)])
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        await runner.cleanup()


def test_zips_that_stop_reading_are_dropped_and_never_block_other_downloads(tmp_path, caplog):
    store = Store(tmp_path, 10**9)
    store.open()
    for i in range(24):  # 36 MB in one run: more than socket buffers hold
        stem = store.new_stem(1000.0 + i, "cam")
        store.write_pictures([(stem, picture(i, 1_500_000, mission={"run": "walk"}))])
    one = store.captures()[0]

    async def scenario():
        async with (
            serving(store, client_timeout=1.0) as (url, port),
            aiohttp.ClientSession() as http,
        ):
            stalled = []
            for _ in range(8):  # ask for the zip, then never read
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_RCVBUF, 4096
                )
                writer.write(b"GET /api/captures.zip?run=walk HTTP/1.1\r\nHost: t\r\n\r\n")
                stalled.append((reader, writer))
            started = time.monotonic()
            async with http.get(f"{url}/captures/{one.files[0]}") as resp:  # a file meanwhile
                assert resp.status == 200 and len(await resp.read()) == 1_500_000
            assert time.monotonic() - started < 1.0
            refused = 0
            for reader, _ in stalled:  # past the zips at once: told so at once
                head = await asyncio.wait_for(reader.readline(), 5)
                refused += b" 503 " in head
            assert refused == 8 - routes.MAX_ZIPS
            # the stalled ones are dropped after --client-timeout: a new zip is served whole
            deadline = time.monotonic() + 10
            while True:
                async with http.get(f"{url}/api/captures.zip?run=walk") as resp:
                    if resp.status == 200:
                        body = await resp.read()
                        break
                assert time.monotonic() < deadline, "the stalled zips were never dropped"
                await asyncio.sleep(0.2)
            for _, writer in stalled:
                writer.close()
            return body

    with caplog.at_level(logging.DEBUG):
        body = asyncio.run(scenario())
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert zf.testzip() is None and len(zf.namelist()) == 48  # data and sidecar each
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_the_listing_is_strict_json_in_pages_and_a_swapped_file_is_not_served(tmp_path):
    store = Store(tmp_path, 10**8)
    store.open()
    for i in range(7):
        stem = store.new_stem(1000.0 + i, "cam")
        meta = {"source": "cam", "width": float("nan"), "mission": {"run": "r"}}
        store.write_pictures([(stem, picture(i, 10, **meta))])
    newest = store.captures()[0]
    secret = tmp_path.parent / f"{tmp_path.name}-secret"
    secret.write_text("not a capture")
    os.unlink(tmp_path / newest.files[0])
    os.symlink(secret, tmp_path / newest.files[0])
    strict = {"parse_constant": lambda c: pytest.fail(f"{c} in strict JSON")}

    async def scenario():
        async with serving(store) as (url, _), aiohttp.ClientSession() as http:
            seen, after = [], ""
            while True:
                async with http.get(f"{url}/api/captures?limit=3{after}") as resp:
                    page = json.loads(await resp.read(), **strict)
                seen += [c["id"] for c in page["captures"]]
                if page["next"] is None:
                    break
                after = "&after=" + page["next"]
            assert page["total"] == 7 and page["runs"][0]["count"] == 7
            async with http.get(f"{url}/api/captures?after=garbage") as resp:
                assert resp.status == 400 and (await resp.json())["parameter"] == "after"
            async with http.get(f"{url}/captures/{newest.files[0]}") as resp:
                assert resp.status == 404  # a link now: not followed
            return seen

    try:
        seen = asyncio.run(scenario())
    finally:
        secret.unlink()
    assert seen == [c.stem for c in store.captures()]
