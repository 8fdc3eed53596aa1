"""MJPEG-in-AVI, written while streaming, from JPEG bytes as they come (no decode, no re-encode).

OpenCV's ``VideoWriter`` only takes decoded pictures and would re-encode every frame; the robot's
own JPEGs are what a recording should keep. An MJPEG AVI is small enough to write by hand: a RIFF
``AVI `` file with one ``hdrl`` list (main header, one video stream of fourcc ``MJPG``), a ``movi``
list holding one ``00dc`` chunk per JPEG, and an ``idx1`` index that players (VLC, ffmpeg) use
to seek. Frame count, rate and the list sizes are only known at the end: ``close`` appends the
index and fixes the headers up. Until then the file is not a valid AVI, so the caller writes it
under a temporary name and renames it once closed (see ``captures.py``): a crash never leaves a
half-written clip under a real name.

Layout follows Microsoft's AVI RIFF reference (AVIMAINHEADER, AVISTREAMHEADER, BITMAPINFOHEADER,
AVIOLDINDEX). Files stay under 1 GiB, the AVI 1.0 limit every player handles.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

MAX_BYTES = 1 << 30  # AVI 1.0 (no OpenDML extension): every player reads files below 1 GiB
_AVIF_HASINDEX = 0x10
_AVIIF_KEYFRAME = 0x10
_AVIH = struct.Struct("<10I16x")  # 56 bytes; the last four reserved words are zero
_STRH = struct.Struct("<4s4sIHHIIIIIIII4h")  # 56 bytes
_STRF = struct.Struct("<IiiHH4sIiiII")  # BITMAPINFOHEADER, 40 bytes
_STRL_SIZE = 4 + (8 + _STRH.size) + (8 + _STRF.size)
_HDRL_SIZE = 4 + (8 + _AVIH.size) + (8 + _STRL_SIZE)
_MOVI_AT = 12 + 8 + _HDRL_SIZE  # where the 'LIST' of the movi list starts
_FIRST_CHUNK_AT = _MOVI_AT + 12


class ClipError(ValueError):
    """A frame this clip cannot take (not a JPEG, another size, past the size limit)."""


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's start-of-frame marker, without decoding it."""
    if data[:2] != b"\xff\xd8":
        raise ClipError("not a JPEG")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ClipError("corrupt JPEG marker")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        # SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC), which share the range
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    raise ClipError("JPEG without a frame header")


def frame_bytes(jpeg: bytes) -> int:
    """What one frame adds to the file: its chunk (padded to even) and its index entry."""
    return 8 + len(jpeg) + (len(jpeg) & 1) + 16


class AviWriter:
    """Append JPEG frames to ``fh`` (a new, seekable binary file); ``close(fps)`` finishes it."""

    def __init__(self, fh: BinaryIO, max_bytes: int = MAX_BYTES):
        self.fh = fh
        self.max_bytes = max_bytes
        self.size: tuple[int, int] | None = None
        self.frames = 0
        self.bytes = _FIRST_CHUNK_AT
        self._largest = 0
        self._index: list[bytes] = []
        fh.write(self._headers(0.0))

    def add(self, jpeg: bytes) -> None:
        """Append one frame (``frame_bytes(jpeg)`` more on disk once closed)."""
        size = jpeg_size(jpeg)
        if self.size is None:
            self.size = size
        elif size != self.size:
            raise ClipError(f"frame size changed from {self.size} to {size}")
        pad = len(jpeg) & 1
        if self.bytes + frame_bytes(jpeg) > self.max_bytes:
            raise ClipError(f"a clip is limited to {self.max_bytes / 2**20:.0f} MiB")
        offset = self.bytes - (_MOVI_AT + 8)  # idx1 offsets count from the 'movi' fourcc
        self.fh.write(b"00dc" + struct.pack("<I", len(jpeg)) + jpeg + b"\0" * pad)
        self._index.append(struct.pack("<4sIII", b"00dc", _AVIIF_KEYFRAME, offset, len(jpeg)))
        self.bytes += 8 + len(jpeg) + pad
        self.frames += 1
        self._largest = max(self._largest, len(jpeg))

    def close(self, fps: float) -> None:
        """Write the index and the final headers, and flush to disk (fsync)."""
        index = b"".join(self._index)
        self.fh.write(b"idx1" + struct.pack("<I", len(index)) + index)
        end = self.fh.tell()
        self.fh.seek(0)
        self.fh.write(self._headers(fps, riff_size=end - 8))
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def _headers(self, fps: float, riff_size: int = 0) -> bytes:
        width, height = self.size or (0, 0)
        fps = fps if fps > 0 else 15.0
        scale, rate = 1000, max(1, round(fps * 1000))
        avih = _AVIH.pack(
            round(1e6 / fps),  # microseconds per frame
            round(self._largest * fps),  # max bytes per second
            0,
            _AVIF_HASINDEX,
            self.frames,
            0,  # initial frames
            1,  # streams
            self._largest,  # suggested buffer size
            width,
            height,
        )
        strh = _STRH.pack(
            b"vids", b"MJPG", 0, 0, 0, 0, scale, rate, 0, self.frames, self._largest,
            0xFFFFFFFF, 0, 0, 0, width, height,
        )  # fmt: skip
        strf = _STRF.pack(40, width, height, 1, 24, b"MJPG", width * height * 3, 0, 0, 0, 0)
        strl = b"LIST" + struct.pack("<I", _STRL_SIZE) + b"strl"
        strl += b"strh" + struct.pack("<I", _STRH.size) + strh
        strl += b"strf" + struct.pack("<I", _STRF.size) + strf
        hdrl = b"LIST" + struct.pack("<I", _HDRL_SIZE) + b"hdrl"
        hdrl += b"avih" + struct.pack("<I", _AVIH.size) + avih + strl
        movi_size = self.bytes - _MOVI_AT - 8
        head = b"RIFF" + struct.pack("<I", riff_size) + b"AVI " + hdrl
        head += b"LIST" + struct.pack("<I", movi_size) + b"movi"
        assert len(head) == _FIRST_CHUNK_AT
        return head
