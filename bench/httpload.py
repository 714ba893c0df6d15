"""A minimal asyncio HTTP/1.1 client for load generation: one keep-alive
connection per worker, Content-Length bodies only (what aus-server sends).
General clients spend more CPU per request than the server under test,
which would make the client the thing measured."""

from __future__ import annotations

import asyncio
import json as _json


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return _json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class Connection:
    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None):
        self.host, self.port = host, port
        self.base_headers = {"Host": f"{host}:{port}", **(headers or {})}
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self._r, self._w = await asyncio.open_connection(self.host, self.port, limit=2**24)

    async def request(self, method: str, path: str, json=None,
                      headers: dict[str, str] | None = None) -> Response:
        for attempt in (0, 1):
            if self._w is None:
                await self._open()
            try:
                return await self._exchange(method, path, json, headers)
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _exchange(self, method, path, json, headers) -> Response:
        body = b"" if json is None else _json.dumps(json).encode()
        h = {**self.base_headers, **(headers or {})}
        if json is not None:
            h.setdefault("Content-Type", "application/json")
        h["Content-Length"] = str(len(body))
        target = path.replace(" ", "%20").replace('"', "%22")
        head = f"{method} {target} HTTP/1.1\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        self._w.write(head.encode() + body)
        status_line = await self._r.readline()
        if not status_line:
            raise ConnectionError("closed by the server")
        status = int(status_line.split()[1])
        out: dict[str, str] = {}
        while (line := await self._r.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            out[k.strip().lower()] = v.strip()
        data = await self._r.readexactly(int(out.get("content-length", "0")))
        if out.get("connection", "").lower() == "close":
            await self.close()
        return Response(status, out, data)

    async def close(self) -> None:
        if self._w is not None:
            self._w.close()
            try:
                await self._w.wait_closed()
            except (ConnectionError, OSError):
                pass
        self._r = self._w = None
