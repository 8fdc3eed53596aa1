"""The viewer page: ``GET /``, every camera live in a grid, those out of sight paused (see
``web/index.html``)."""

from __future__ import annotations

from importlib import resources

from aiohttp import web


def add_routes(app: web.Application) -> None:
    html = resources.files("spotrelay").joinpath("web/index.html").read_text(encoding="utf-8")

    async def index(request: web.Request) -> web.Response:
        return web.Response(
            text=html, content_type="text/html", headers={"Cache-Control": "no-cache"}
        )

    app.router.add_get("/", index)
