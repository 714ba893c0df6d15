"""The web console: static HTML, CSS and JavaScript under ``/console/``,
its page at ``/``.

The files are served as they are in the package (no build step, nothing
fetched from elsewhere at run time). They hold no data: the page signs in
with an API key and talks to the management API like any other client, so
the console needs no session state on the server. The headers below keep
the page from being framed and allow scripts and styles only from this
origin, which is what the files need.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

ROOT = Path(__file__).parent / "console"

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate on every load (ETag makes that cheap), so an upgraded
    # server is never paired with an old script.
    "Cache-Control": "no-cache",
}


class _ConsoleFiles(StaticFiles):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


def install(app: FastAPI) -> None:
    index = ROOT / "index.html"

    @app.get("/", include_in_schema=False)
    def console_page() -> FileResponse:
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=HEADERS)

    app.mount("/console", _ConsoleFiles(directory=ROOT), name="console")
