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
from typing import Any

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
    """One connection, with the limits of the module docstring."""

    settings: ServiceSettings | None = None  # read once per process, at the first connection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if GuardedHttpToolsProtocol.settings is None:
            GuardedHttpToolsProtocol.settings = load_settings()
        self.limits = GuardedHttpToolsProtocol.settings
        self.head_bytes: int | None = 0  # bytes of the head being read; None in a body
        self.head_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.body_seen = 0.0  # when body bytes last arrived
        self.lingering = False  # refused: what still arrives is dropped

    # ------------------------------------------------------------ the connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.refuse(
                503,
                "too_many_connections",
                f"this server holds {self.limits.max_connections} connections already "
                "(max_connections); retry shortly",
                retry_after=1,
            )
            return
        self.arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timers()
        super().connection_lost(exc)

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
        self.arm_head_timer()

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.limits.max_header_count:
            raise HeadRefusedError(
                431,
                "too_many_headers",
                f"request has more than {self.limits.max_header_count} header fields "
                "(max_header_count)",
            )
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            raise HeadRefusedError(*self.head_too_large(str(size)))
        self.head_bytes = None
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        super().on_headers_complete()
        self.body_seen = self.loop.time()
        self.body_timer = self.loop.call_later(self.limits.body_timeout_s, self.body_timed_out)

    def on_body(self, body: bytes) -> None:
        self.body_seen = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        self.head_bytes = 0  # the next bytes start the next request's head
        super().on_message_complete()

    # ------------------------------------------------------------ timers

    def arm_head_timer(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(
                self.limits.header_timeout_s, self.head_timed_out
            )

    def cancel_timers(self) -> None:
        for timer in (self.head_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.body_timer = None

    def head_timed_out(self) -> None:
        self.head_timer = None
        self.refuse(
            408,
            "request_timeout",
            f"the request head was not complete within {self.limits.header_timeout_s:g} s "
            "(header_timeout_s)",
        )

    def body_timed_out(self) -> None:
        """Silence from the client for ``body_timeout_s`` while its body is read; time that
        the server itself is not reading (the app has not taken the last part yet) is not
        the client's."""
        silent = self.loop.time() - self.body_seen
        if self.flow.read_paused or silent < self.limits.body_timeout_s:
            wait = self.limits.body_timeout_s - (0.0 if self.flow.read_paused else silent)
            self.body_timer = self.loop.call_later(wait, self.body_timed_out)
            return
        self.body_timer = None
        self.refuse(
            408,
            "request_timeout",
            f"the request body stopped arriving for {self.limits.body_timeout_s:g} s "
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
        self.cancel_timers()
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
