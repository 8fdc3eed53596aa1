"""The captures folder and the AVI writer, on real files: what ffprobe and OpenCV read back, what a
crash or a full disk leaves (nothing that looks like a capture), the size limit (oldest first)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess

import cv2
import numpy as np
import pytest

from spotrelay.autowalk import store as captures
from spotrelay.autowalk.avi import AviWriter, ClipError, jpeg_size
from spotrelay.autowalk.store import Picture, StorageError, Store

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


def test_oldest_captures_go_first_to_stay_under_the_limit(tmp_path):
    deleted = []
    store = Store(tmp_path, 10_000, on_deleted=deleted.append)
    store.open()
    stems = []
    for i in range(6):
        stem = store.new_stem(1000.0 + i, "cam")
        store.write_pictures([(stem, picture(i, size=2500, source="cam"))])
        stems.append(stem)
        assert store.bytes_on_disk <= 10_000
    kept = [c.stem for c in store.captures()]
    assert kept == stems[::-1][: len(kept)] and len(kept) == 3  # newest first
    assert sum(deleted) == 3
    assert not any(s in name for s in stems[:3] for name in files(tmp_path))
    with pytest.raises(StorageError, match="size limit"):
        store.write_pictures([(store.new_stem(2000.0, "cam"), picture(9, size=20_000))])
    assert len(store.captures()) == 3  # a capture that cannot fit deletes nothing... in vain


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
    small = Store(tmp_path / "small", 150_000)
    small.open()
    clip = small.clip(small.new_stem(1.0, "cam"))
    with pytest.raises(StorageError, match="size limit"):
        for i in range(100):
            clip.add(jpeg(i))
    clip.discard()
    assert small.bytes_on_disk == 0 and list((tmp_path / "small").iterdir()) == []
