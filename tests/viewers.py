"""Viewers in a process of their own, so that their CPU is not counted as the relay's: one per
source, MJPEG (``/stream``, every part parsed: headers, Content-Length, SOI/EOI) or the viewer
page's WebSocket (``/ws``: a JSON text, then the JPEG it describes).

    python -m tests.viewers PORT MODE QUERY SOURCE...      (MODE: mjpeg | ws)

Prints ``connected`` once every viewer has its first frame, then takes commands on stdin, one a
line: ``reset`` forgets what was counted, ``report`` prints one JSON line (per source: frames,
distinct capture stamps, their span, stale repeats, bytes, and the capture-to-received latency of
each fresh frame) and resets. The end of stdin ends it. ``Viewers`` drives it from a benchmark.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Count:
    """What one viewer got since the last reset."""

    frames: int = 0
    stale: int = 0
    bytes: int = 0
    stamps: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def reset(self) -> None:
        self.frames = self.stale = self.bytes = 0
        self.stamps, self.latencies = [], []

    def add(self, stamp: float, nbytes: int, stale: bool) -> None:
        self.frames += 1
        self.bytes += nbytes
        if stale:
            self.stale += 1
        else:
            self.stamps.append(stamp)
            self.latencies.append(time.time() - stamp)

    def summary(self) -> dict:
        s = sorted(set(self.stamps))
        return {
            "frames": self.frames,
            "distinct": len(s),
            "span": (s[-1] - s[0]) if len(s) > 1 else 0.0,
            "stale": self.stale,
            "bytes": self.bytes,
            "latencies": [round(x, 5) for x in self.latencies],
        }


async def mjpeg(session: aiohttp.ClientSession, url: str, count: Count) -> None:
    async with session.get(url) as resp:
        assert resp.status == 200, resp.status
        content = resp.content
        while True:
            head = await content.readuntil(b"\r\n\r\n")
            headers = {}
            for line in head.decode("latin-1").split("\r\n"):
                k, _, v = line.partition(":")
                if v:
                    headers[k.strip().lower()] = v.strip()
            n = int(headers["content-length"])
            body = await content.readexactly(n + 2)
            assert body[:2] == b"\xff\xd8" and body[-4:] == b"\xff\xd9\r\n", "not a JPEG part"
            count.add(float(headers["x-timestamp"]), n, headers.get("x-stale") == "1")


async def ws(session: aiohttp.ClientSession, url: str, count: Count) -> None:
    async with session.ws_connect(url, max_msg_size=0) as sock:
        meta = None
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT:
                meta = json.loads(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                assert meta is not None and meta["bytes"] == len(msg.data), "unannounced frame"
                assert msg.data[:2] == b"\xff\xd8", "not a JPEG"
                count.add(meta["t"], len(msg.data), bool(meta["stale"]))
                meta = None
            else:
                break


async def main(argv: list[str]) -> None:
    port, mode, query, *sources = argv
    counts = {s: Count() for s in sources}
    path, reader = ("/stream/", mjpeg) if mode == "mjpeg" else ("/ws/", ws)
    base = f"http://127.0.0.1:{port}"
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = [
            asyncio.create_task(reader(session, f"{base}{path}{s}{query}", counts[s]))
            for s in sources
        ]
        deadline = time.monotonic() + 30
        while not all(c.stamps for c in counts.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        print("connected", flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            failed = [t for t in tasks if t.done()]
            if failed:
                exc = failed[0].exception() if not failed[0].cancelled() else "cancelled"
                print(json.dumps({"error": f"a viewer ended: {exc!r}"}), flush=True)
                continue
            if line.strip() == "report":
                print(json.dumps({s: c.summary() for s, c in counts.items()}), flush=True)
            for c in counts.values():  # in place: the readers hold these
                c.reset()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Viewers:
    """``python -m tests.viewers`` driven from here: ``reset()``, then ``report()``."""

    def __init__(self, port: int, mode: str, query: str, sources: list[str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.viewers", str(port), mode, query, *sources],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "connected":
            self.close()
            raise AssertionError(f"viewers did not start: {line!r}")

    def _say(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def reset(self) -> None:
        self._say("reset")

    def report(self) -> dict[str, dict]:
        self._say("report")
        assert self.proc.stdout is not None
        out = json.loads(self.proc.stdout.readline())
        assert "error" not in out, out
        return out

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
