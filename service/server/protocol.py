"""uvicorn's httptools protocol, with each response sent in one system call.

uvicorn writes a response's head as soon as the app sends ``http.response.start`` and its
body with ``http.response.body``: two ``write`` system calls per answer, ~25% of the event
loop's time serving the default model under load here (py-spy; a system call costs ~10 us
on this virtual machine, and the GIL is held through it). ``HttpToolsProtocol`` gives the
connection a transport that gathers what is written during one step of the event loop and
sends it at the end of that step, so head and body leave together. Nothing else changes:
uvicorn parses, dispatches, applies flow control and closes connections as usual.

    uvicorn service.main:app --http service.server.protocol:HttpToolsProtocol
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http import httptools_impl


class CoalescingTransport:
    """A transport that sends the data written during one event-loop step as one write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Send what is pending now (a no-op when nothing is)."""
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:  # everything else: the real transport's
        return getattr(self._transport, name)


class HttpToolsProtocol(httptools_impl.HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a ``CoalescingTransport``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
