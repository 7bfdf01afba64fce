"""uvicorn's httptools protocol with the limits a server facing clients needs and uvicorn
lacks: a bound on each request's head, time limits on the parts a client controls, and a cap
on connections (``RELU_SERVE_HTTP_GUARD``, on by default; ``python -m service`` uses it).

uvicorn reads a request head of any size (a 10 MB header, 10,000 headers) and waits for the
rest of a head or body for as long as the client stays connected. This protocol answers:

- 431 when a head (request line and headers) passes ``max_header_bytes`` or has more than
  ``max_header_count`` fields: counted as the bytes arrive, so no more than the limit plus one
  read is ever held;
- 408 when a head is not complete ``header_timeout_s`` after its first byte (or after the
  connection opened), or a body goes silent for ``body_timeout_s`` while the server reads it;
- 503 at once, and the connection closed, past ``max_connections`` open in this worker.

Each refusal is a JSON error naming the setting, then the connection is closed. Everything
else is uvicorn's own ``HttpToolsProtocol``; this module is the only one that subclasses it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from service.settings import ServiceSettings, load_settings

logger = logging.getLogger(__name__)

# For uvicorn's ``Config(http=...)``, which imports it in every worker process.
PROTOCOL = "service.server.http:GuardedHttpToolsProtocol"
# After a refusal, how long what the client still sends is read and dropped before the
# connection closes: closing with unread bytes resets the connection, and a reset can reach
# the client before the answer does (a "lingering close", as nginx does it).
LINGER_S = 1.0


class HeadRefusedError(Exception):
    """A limit on the request head was passed; raised inside a parser callback."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One connection, with the limits of the module docstring.

    Time limits cost no timer per request: each connection notes when its head began and
    when its body last moved, and one sweep per server looks at every connection ten times
    per timeout (at most once a second).
    """

    settings: ServiceSettings | None = None  # read once per process, at the first connection
    swept: ClassVar[set[int]] = set()  # the servers (ids of their state) with a sweep

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if GuardedHttpToolsProtocol.settings is None:
            GuardedHttpToolsProtocol.settings = load_settings()
        self.limits = GuardedHttpToolsProtocol.settings
        self.head_bytes: int | None = 0  # bytes of the head being read; None in a body
        self.head_since: float | None = None  # when the head being read began
        self.body_seen: float | None = None  # when the body being read last moved
        self.lingering = False  # refused: what still arrives is dropped

    # ------------------------------------------------------------ the connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if id(self.server_state) not in self.swept:
            self.swept.add(id(self.server_state))
            self.loop.call_soon(self.sweep, self.loop, self.connections, self.limits)
        if len(self.connections) > self.limits.max_connections:
            self.refuse(
                503,
                "too_many_connections",
                f"this server holds {self.limits.max_connections} connections already "
                "(max_connections); retry shortly",
                retry_after=1,
            )
            return
        self.head_since = self.loop.time()

    def data_received(self, data: bytes) -> None:
        """uvicorn's own, with the head counted before it is parsed and our refusals."""
        if self.lingering:
            return
        self._unset_keepalive_if_required()
        if self.head_bytes is not None:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HeadRefusedError):  # httptools chains it so
                refused = exc.__context__
                self.refuse(refused.status, refused.code, refused.message)
                return
            self.bad_request()
            return
        except httptools.HttpParserError:
            self.bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self.head_bytes is not None and self.head_bytes > self.limits.max_header_bytes:
            self.refuse(*self.head_too_large(f"more than {self.head_bytes}"))

    # ------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.head_since is None:
            self.head_since = self.loop.time()

    def on_headers_complete(self) -> None:
        # The bytes received while the head was read bound its size from above (they may
        # hold the start of the body too): only a head that may be too large is measured.
        if self.head_bytes is not None and self.head_bytes > self.limits.max_header_bytes:
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > self.limits.max_header_bytes:
                raise HeadRefusedError(*self.head_too_large(str(size)))
        if len(self.headers) > self.limits.max_header_count:
            raise HeadRefusedError(
                431,
                "too_many_headers",
                f"request has {len(self.headers)} header fields, over the limit of "
                f"{self.limits.max_header_count} (max_header_count)",
            )
        self.head_bytes = self.head_since = None
        self.body_seen = self.loop.time()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.body_seen = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self.body_seen = None
        self.head_bytes = 0  # the next bytes start the next request's head
        super().on_message_complete()

    # ------------------------------------------------------------ time limits

    @staticmethod
    def sweep(
        loop: asyncio.AbstractEventLoop, connections: set[Any], limits: ServiceSettings
    ) -> None:
        """Refuse the connections past a time limit, then look again shortly."""
        now = loop.time()
        for connection in list(connections):
            if isinstance(connection, GuardedHttpToolsProtocol):
                connection.check_time(now)
        every = min(1.0, max(0.05, min(limits.header_timeout_s, limits.body_timeout_s) / 10))
        loop.call_later(every, GuardedHttpToolsProtocol.sweep, loop, connections, limits)

    def check_time(self, now: float) -> None:
        """408 for a head not complete ``header_timeout_s`` after it began, or a body
        silent for ``body_timeout_s``; time that the server itself is not reading (the app
        has not taken the last part yet) is not the client's."""
        limits = self.limits
        if self.head_since is not None and now - self.head_since > limits.header_timeout_s:
            self.refuse(
                408,
                "request_timeout",
                f"the request head was not complete within {limits.header_timeout_s:g} s "
                "(header_timeout_s)",
            )
        elif self.body_seen is not None:
            if self.flow.read_paused:
                self.body_seen = now
            elif now - self.body_seen > limits.body_timeout_s:
                self.refuse(
                    408,
                    "request_timeout",
                    f"the request body stopped arriving for {limits.body_timeout_s:g} s "
                    "(body_timeout_s)",
                )

    # ------------------------------------------------------------ answers

    def head_too_large(self, size: str) -> tuple[int, str, str]:
        return (
            431,
            "headers_too_large",
            f"request head of {size} bytes is over the limit of "
            f"{self.limits.max_header_bytes} bytes (max_header_bytes)",
        )

    def bad_request(self) -> None:
        message = "Invalid HTTP request received."
        self.logger.warning(message)
        self.send_400_response(message)

    def refuse(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: int | None = None,
    ) -> None:
        """Answer ``status`` with our JSON error, unless a response is under way on this
        connection, and close the connection after ``LINGER_S`` of dropping what still
        arrives (at once where the transport cannot half-close)."""
        self.head_since = self.body_seen = None
        if self.transport.is_closing() or self.lingering:
            return
        logger.info("%s: %s", self.client, message)
        cycle: RequestResponseCycle | None = self.cycle  # None before the first request
        if cycle is None or cycle.response_complete or not cycle.response_started:
            body = orjson.dumps({"error": {"code": code, "message": message}})
            head = [
                STATUS_LINE[status],
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n",
            ]
            if retry_after is not None:
                head.append(b"retry-after: %d\r\n" % retry_after)
            self.transport.write(b"".join([*head, b"\r\n", body]))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app reads a disconnect; its answer goes nowhere
            cycle.message_event.set()
        if self.transport.can_write_eof():
            self.lingering = True
            self.transport.write_eof()  # the answer, then the end of what we send
            self.transport.resume_reading()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()
