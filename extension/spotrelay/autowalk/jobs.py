"""What a callback run does: stills and clips of the relay's cameras, kept in the captures folder.

Frames come from the hub, as every output's do: ``capture`` takes the newest frame each camera
delivered after the tick began (``Hub.next_frame``, which polls the camera at full rate while it
waits); ``record`` follows a camera's stream like a viewer (``Hub.frames``) and appends the
robot's JPEG bytes to an MJPEG AVI as they come. Nothing is re-encoded but depth (lossless 16-bit
PNG for stills, colour-mapped JPEG in clips), cameras fetched uncompressed (``--fetch-raw``: PNG
stills, JPEG in clips) and the thumbnails. Disk work runs in the ``io``
threads, rendering on the evidence's own bounded pool (``stills``, apart from snapshots); the
event loop only waits.

A failure raises ``JobFailed`` with the sentence the operator reads on the tablet; work refused to
keep evidence (a full folder whose captures are all younger than the user allows deleting)
raises ``Refused``, which is counted apart. A recording's worst case (duration x the camera's
measured rate x its frames' measured size, within the AVI's 1 GiB) is reserved before it starts,
so a burst of recordings is refused at once instead of filling the folder frame by frame.

A job ends only once the threads it started have finished (a cancelled job waits for them), so
the service's bound on running jobs bounds the work, not just the tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from spotrelay import codec
from spotrelay.autowalk import avi
from spotrelay.autowalk.avi import ClipError
from spotrelay.autowalk.store import (
    MEDIA_TYPES,
    Capture,
    Clip,
    Full,
    Picture,
    StorageError,
    Store,
    utc_iso,
)
from spotrelay.frames import DEPTH16, GREY16, JPEG, Frame, RenderSpec, Shape
from spotrelay.hub import Client, Hub
from spotrelay.plan import DEFAULT_QUALITY, plan
from spotrelay.stills import Busy, Stills

CAPTURE, RECORD = "capture", "record"
FRAME_DEADLINE = 5.0  # seconds a camera may take to deliver a frame before the run fails
THUMB_WIDTH = 320
MAX_PENDING = 150  # frames waiting for the disk (10 s at 15 Hz) before a recording gives up


CLIP_MARGIN = 1.25  # frames vary in size: the reservation allows this much more than measured
DEFAULT_RATE = 15.0  # Hz, Spot's cameras, when the camera's rate is not known yet


class JobFailed(Exception):
    """A capture or recording that could not be done; the message goes to the operator."""


class Refused(JobFailed):
    """Work not started to stay bounded (``reason``: the metric's label), said to the operator."""

    def __init__(self, message: str, reason: str = "captures_full"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Job:
    """One run of the callback, as its parameters asked."""

    action: str  # CAPTURE | RECORD
    cameras: tuple[str, ...]
    duration: float  # seconds of capture time, for RECORD
    label: str


class Evidence:
    """Carries out jobs: from the hub to the store."""

    def __init__(
        self,
        hub: Hub,
        store: Store,
        io: Executor,
        stills: Stills,
        *,
        robot_clock: Callable[[float], float] = lambda local: local,
        capture_rate: Callable[[str], float | None] = lambda source: None,
        deadline: float = FRAME_DEADLINE,
    ):
        self.hub, self.store, self.io, self.stills = hub, store, io, stills
        self.robot_clock = robot_clock  # local epoch seconds -> robot clock
        self.capture_rate = capture_rate  # a camera's learnt capture rate (Hz), None if unknown
        self.deadline = deadline

    async def run(self, job: Job, context: dict[str, Any]) -> None:
        """``context``: the mission's names and inputs for the sidecars, ``tick_started`` (local
        epoch) and ``tick_clock`` (hub clock) of the tick that started the job."""
        if job.action == CAPTURE:
            await self.capture(job, context)
        else:
            await self.record(job, context)

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn`` in an io thread. Cancelled, it still waits for the thread to finish before
        ending (then re-raises): a stopped job holds its place until its work is done."""
        work = asyncio.get_running_loop().run_in_executor(self.io, fn, *args)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await work
            raise

    def clip_reserve(self, source: str, duration: float) -> int:
        """A recording's worst case in bytes: ``duration`` x the camera's rate x its newest
        frame's size (what a frame adds to the AVI), with a margin, within the AVI's limit.
        Sized on a full-quality frame: the recording makes the robot send those."""
        rate = self.capture_rate(source) or max(self.hub.fps(source), DEFAULT_RATE)
        frame = self.hub.frame(source, fine=True)
        if frame is None:
            per_frame = 0
        elif frame.image.format == JPEG:
            per_frame = avi.frame_bytes(frame.image.data)
        else:  # colour-mapped JPEG of depth: two bits a pixel is generous for it
            per_frame = frame.image.rows * frame.image.cols // 4
        worst = math.ceil(duration * rate * per_frame * CLIP_MARGIN)
        return min(worst, avi.MAX_BYTES)

    def _meta(self, job: Job, context: dict[str, Any], source: str) -> dict[str, Any]:
        mission = {k: v for k, v in context.items() if k != "tick_clock"}
        return {"action": job.action, "source": source, "label": job.label, "mission": mission}

    # capture ---------------------------------------------------------------------------------

    async def capture(self, job: Job, context: dict[str, Any]) -> list[Capture]:
        """The newest frame each camera delivered after the tick began, stored all or none."""
        frames = await asyncio.gather(
            *(
                self.hub.next_frame(s, after=context["tick_clock"], timeout=self.deadline)
                for s in job.cameras
            ),
            return_exceptions=True,
        )
        silent = [s for s, f in zip(job.cameras, frames, strict=True) if not isinstance(f, Frame)]
        if silent:
            raise JobFailed(
                f"no frame from {', '.join(silent)} within {self.deadline:g} s "
                "(camera stopped, or the robot is not connected)"
            )
        pictures = []
        for frame in frames:
            assert isinstance(frame, Frame)
            try:
                picture = await self.stills.run(_still, frame)
            except codec.CodecError as exc:
                raise JobFailed(f"cannot decode the frame of {frame.source}: {exc}") from exc
            except Busy:
                raise JobFailed(
                    "too many pictures waiting to be encoded (other missions' captures); try again"
                ) from None
            picture.meta = {**self._meta(job, context, frame.source), **picture.meta}
            pictures.append((frame, picture))
        items = [(self.store.new_stem(f.acquired, f.source), p) for f, p in pictures]
        try:
            return await self._io(self.store.write_pictures, items)
        except Full as exc:
            raise Refused(str(exc)) from exc
        except StorageError as exc:
            raise JobFailed(str(exc)) from exc

    # record ----------------------------------------------------------------------------------

    async def record(self, job: Job, context: dict[str, Any]) -> None:
        """Every camera's clip, each reserved before any starts: all start, or none."""
        clips: dict[str, Clip] = {}
        try:
            for source in job.cameras:
                clips[source] = await self._open_clip(job, source)
        except BaseException:
            for clip in clips.values():
                await self._io(clip.discard)
            raise
        results = await asyncio.gather(
            *(self._record_one(job, context, s, clips[s]) for s in job.cameras),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _open_clip(self, job: Job, source: str) -> Clip:
        stem = self.store.new_stem(time.time(), source)
        reserve = self.clip_reserve(source, job.duration)
        try:
            return await self._io(self.store.clip, stem, reserve)
        except Full as exc:
            raise Refused(
                f"recording {source} for {job.duration:g} s needs up to {reserve / 1e6:.0f} MB: "
                f"{exc}"
            ) from exc
        except (OSError, StorageError) as exc:
            raise JobFailed(f"cannot start recording {source}: {exc}") from exc

    async def _record_one(self, job: Job, context: dict[str, Any], source: str, clip: Clip) -> None:
        """Frames captured from the first after the tick for ``duration`` seconds of capture
        time, the robot's JPEG bytes as they come (the relay's JPEG for depth, colour-mapped, and
        for a camera fetched uncompressed).

        Reading and writing are apart: frames wait in a queue for the writer, so that the
        reader is ready for the hub's next frame at once and a slow disk costs no frame."""
        pending: asyncio.Queue[bytes | None] = asyncio.Queue()
        writer = asyncio.create_task(self._write(clip, pending))
        state = _Recording(start=context["tick_started"])
        try:
            problem = await self._follow(source, job.duration, state, pending, writer)
            try:
                await self._written(writer, pending)
            except (ClipError, Full) as exc:  # another size, a broken JPEG; past the worst case
                problem = str(exc)
        except asyncio.CancelledError:
            with contextlib.suppress(ClipError, StorageError):
                await self._written(writer, pending)
            await self._close_clip(clip, job, context, source, state, "stopped by the mission")
            raise
        except StorageError as exc:
            await self._io(clip.discard)
            raise JobFailed(f"recording {source}: {exc}") from exc
        if clip.frames == 0:
            await self._io(clip.discard)
            if problem not in (None, "timeout", "stopped"):
                raise JobFailed(f"cannot record {source}: {problem}")
            raise JobFailed(f"no frame from {source} within {self.deadline:g} s")
        if problem in ("timeout", "stopped"):
            problem = (
                f"camera {source} stopped sending frames after {state.span:.1f} s "
                f"of the {job.duration:g} s asked"
            )
        await self._close_clip(clip, job, context, source, state, problem)
        if problem:
            raise JobFailed(f"{problem} (kept the {clip.frames} frames recorded)")

    async def _follow(
        self,
        source: str,
        duration: float,
        state: _Recording,
        pending: asyncio.Queue[bytes | None],
        writer: asyncio.Task,
    ) -> str | None:
        """Queue the camera's frames for the clip; why it ended early, or None."""
        spec = RenderSpec()
        frames = self.hub.frames(Client("record", source, spec, "mission", None))
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.deadline  # for the first frame
        async with contextlib.aclosing(frames):
            while not writer.done():  # the writer stops on a storage error: so do we
                try:
                    async with asyncio.timeout_at(give_up):
                        enc = await anext(frames)
                except TimeoutError:
                    return "timeout"
                except StopAsyncIteration:  # the hub ends streams only when closing
                    return "the relay is shutting down"
                if enc.stale:
                    if state.count:  # no new frame for --stale-after seconds
                        return "stopped"
                    continue
                if enc.acquired < state.start or enc.seq == state.last_seq:
                    continue
                if state.first is None:
                    state.first, state.first_jpeg = enc.acquired, enc.data
                    give_up = loop.time() + duration + self.deadline
                if enc.acquired >= state.first + duration:
                    return None
                if pending.qsize() >= MAX_PENDING:
                    return "the disk cannot keep up with the camera"
                pending.put_nowait(enc.data)
                state.note(enc.acquired, enc.seq)
        return None

    async def _write(self, clip: Clip, pending: asyncio.Queue[bytes | None]) -> None:
        while (data := await pending.get()) is not None:
            await self._io(clip.add, data)

    @staticmethod
    async def _written(writer: asyncio.Task, pending: asyncio.Queue[bytes | None]) -> None:
        """Every queued frame on disk (or the writer's error raised)."""
        pending.put_nowait(None)
        await writer

    async def _close_clip(
        self,
        clip: Clip,
        job: Job,
        context: dict[str, Any],
        source: str,
        state: _Recording,
        problem: str | None,
    ) -> None:
        if clip.frames == 0:
            await self._io(clip.discard)
            return
        assert state.first is not None and state.first_jpeg is not None
        meta = self._meta(job, context, source)
        try:
            thumb = await self.stills.run(codec.thumbnail_of_jpeg, state.first_jpeg, THUMB_WIDTH)
        except Busy:  # a thumbnail never fails a clip
            thumb = codec.stale_picture(None, (THUMB_WIDTH, THUMB_WIDTH * 3 // 4), 70, "")
        width, height = clip.avi.size or (0, 0)
        meta.update(
            kind="clip",
            media_type=MEDIA_TYPES[".avi"],
            encoding=_clip_encoding(self.hub.shape(source)),
            width=width,
            height=height,
            time=state.first,
            time_utc=utc_iso(state.first),
            robot_time=self.robot_clock(state.first),
            clip={
                "frames": clip.frames,
                "fps": round(state.fps, 3),
                "duration": round(state.span + 1 / state.fps, 3),
                "end_time": state.last,
                "requested_duration": job.duration,
                "complete": problem is None,
                "problem": problem,
            },
        )
        try:
            await self._io(clip.finish, state.fps, thumb, meta)
        except StorageError as exc:
            raise JobFailed(f"recording {source}: {exc}") from exc


@dataclass
class _Recording:
    start: float  # local epoch: frames captured before the tick are not part of the clip
    first: float | None = None
    first_jpeg: bytes | None = None
    last: float = 0.0
    last_seq: int = -1
    count: int = 0

    def note(self, acquired: float, seq: int) -> None:
        self.last, self.last_seq, self.count = acquired, seq, self.count + 1

    @property
    def span(self) -> float:
        return self.last - self.first if self.first is not None else 0.0

    @property
    def fps(self) -> float:
        """Measured from capture times: what the camera delivered, for the AVI's frame rate."""
        return (self.count - 1) / self.span if self.count > 1 and self.span > 0 else 15.0


def _clip_encoding(shape: Shape) -> str:
    """What a clip's frames are, for its sidecar: the robot's own JPEG bytes, unless the camera
    sends something else (depth, a camera fetched uncompressed), which the relay encodes."""
    if shape.format == JPEG:
        return "MJPEG in AVI (the robot's JPEG bytes)"
    if shape.pixel_format == DEPTH16:
        return "MJPEG in AVI (colour-mapped depth)"
    return f"MJPEG in AVI (JPEG of the robot's uncompressed pixels, quality {DEFAULT_QUALITY})"


def _still(frame: Frame) -> Picture:
    """The robot's JPEG as it sent it, else lossless PNG (16-bit for depth); and a thumbnail."""
    image = frame.image
    shape = image.shape
    small = plan(frame.source, shape, RenderSpec(width=THUMB_WIDTH))
    if image.format == JPEG:
        data, suffix, encoding = image.data, ".jpg", "robot JPEG"
        thumb = codec.render(image, small)
    else:
        lossless = plan(frame.source, shape, RenderSpec(format="png"))
        out = codec.render_many(image, [lossless, small])  # one decode for both
        data, thumb = codec.render_result(out[lossless]), codec.render_result(out[small])
        suffix = ".png"
        encoding = "16-bit PNG, depth units" if image.is_depth else "PNG"
        if image.pixel_format == GREY16:
            encoding = "16-bit PNG"
    meta: dict[str, Any] = {
        "kind": "still",
        "media_type": MEDIA_TYPES[suffix],
        "encoding": encoding,
        "width": image.cols,
        "height": image.rows,
        "time": frame.acquired,
        "time_utc": utc_iso(frame.acquired),
        "robot_time": frame.robot_time,
        "received": frame.received,
        "seq": frame.seq,
    }
    if image.is_depth:
        meta["depth_scale"] = image.depth_scale  # PNG value / depth_scale = metres
    return Picture(suffix, data, thumb, meta)
