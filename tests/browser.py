"""Headless Chromium for tests, driven over the DevTools protocol: one way to start it (its own
profile and temporary files, removed afterwards; every process it started ended) and to talk
to it."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator

import aiohttp

from tests.procs import spawn
from tests.relay import free_port
from tests.wait import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self.ids = ws, itertools.count(1)

    async def call(self, method: str, **params):
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        async for msg in self.ws:
            data = json.loads(msg.data)
            if data.get("id") == msg_id:
                if "error" in data:
                    raise AssertionError(data["error"])
                return data["result"]
        raise AssertionError("DevTools connection closed")

    async def eval(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def until(self, expression: str, condition: str, timeout: float = 15.0):
        """Wait, in the page, until ``condition`` (JavaScript, ``v`` being the value of
        ``expression``) holds; the value of ``expression`` then, or its last value if it never
        did within ``timeout`` seconds (for the test's assertion to show)."""
        js = f"""new Promise(resolve => {{
          const end = Date.now() + {timeout * 1000:.0f};
          const check = () => {{
            let v = null, ok = false;
            try {{ v = ({expression}); ok = Boolean({condition}); }} catch (e) {{}}
            if (ok || Date.now() > end) resolve(v); else setTimeout(check, 50);
          }};
          check();
        }})"""
        for _ in range(5):  # the page may still be navigating (from about:blank, or reloading)
            try:
                result = await self.call(
                    "Runtime.evaluate", expression=js, awaitPromise=True, returnByValue=True
                )
                return result["result"].get("value")
            except AssertionError as exc:
                if "context was destroyed" not in str(exc):
                    raise
        raise AssertionError(f"the page kept navigating while waiting for {condition}")


@contextlib.asynccontextmanager
async def devtools(ws_url: str, script: str | None = None) -> AsyncIterator[Page]:
    """The page at ``ws_url`` (what ``chromium`` yields), driven over DevTools. ``script``: run
    in every document the page loads from now on, before the page's own (the caller then loads
    one: a reload, a navigation)."""
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        page = Page(ws)
        if script is not None:
            await page.call("Page.enable")
            await page.call("Page.addScriptToEvaluateOnNewDocument", source=script)
        yield page


def _page_ws_url(port: int) -> str | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
        pages = [p for p in json.load(r) if p.get("type") == "page"]
    return pages[0]["webSocketDebuggerUrl"] if pages else None


@contextlib.contextmanager
def chromium(url: str, *flags: str, binary: str | None = None) -> Iterator[str]:
    """Chromium showing ``url``; yields the DevTools WebSocket URL of its page."""
    port = free_port()
    # A short path: Chromium's sockets live in its TMPDIR, and socket paths are short.
    profile = tempfile.mkdtemp(prefix="chromium-")
    cmd = [binary or CHROMIUM or "chromium", *FLAGS, *flags]
    cmd += [f"--user-data-dir={profile}", f"--remote-debugging-port={port}", url]
    try:
        with spawn(cmd, env={**os.environ, "TMPDIR": profile}):
            yield wait_until(lambda: _page_ws_url(port), 30, "chromium's page", ignore=(OSError,))
    finally:
        shutil.rmtree(profile, ignore_errors=True)
