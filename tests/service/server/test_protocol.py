"""The HTTP protocol of ``python -m service``: a response's writes leave in one system call,
and the answers are uvicorn's own protocol's, byte for byte."""

from __future__ import annotations

import asyncio
import http.client
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.__main__ import main
from service.server.protocol import CoalescingTransport
from tests.server_helpers import uvicorn_server
from tests.service.server.corpus import CASES, MAX_BODY_BYTES, send


class CountingTransport:
    """Delegates to a real socket transport, counting the writes that reach it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def _pair() -> tuple[CountingTransport, asyncio.StreamReader, asyncio.Server]:
    """A real TCP connection on 127.0.0.1: (server side transport, client reader, server)."""
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer)
        await reader.read()  # the connection lives until the client's end closes

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, client_writer = await asyncio.open_connection("127.0.0.1", port)
    writer = await accepted
    counting = CountingTransport(writer.transport)  # type: ignore[arg-type]
    counting.peer = client_writer  # type: ignore[attr-defined] # alive: a collected one closes
    return counting, reader, server


def test_writes_of_one_step_go_out_together() -> None:
    async def scenario() -> None:
        real, reader, server = await _pair()
        transport = CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        transport.write(b"hello")
        assert real.writes == []  # nothing sent within the step
        assert transport.get_write_buffer_size() == 43
        await asyncio.sleep(0)  # the end of the step
        assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]
        transport.write(b"next")  # a later step: its own write
        await asyncio.sleep(0)
        assert real.writes[1:] == [b"next"]
        transport.write(b"last")
        transport.close()  # close sends what is pending first
        received = await reader.read()  # to EOF
        assert received == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhellonextlast"
        server.close()

    asyncio.run(scenario())


def test_abort_drops_what_is_pending() -> None:
    async def scenario() -> None:
        real, reader, server = await _pair()
        transport = CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"never sent")
        transport.abort()
        await asyncio.sleep(0)
        assert real.writes == []
        try:
            received = await reader.read()
        except ConnectionResetError:
            received = b""
        assert received == b""
        server.close()

    asyncio.run(scenario())


def test_the_launcher_puts_our_app_and_protocol_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # What `python -m service` hands uvicorn: our app, our protocol, then the caller's options
    # (so a caller's own --http still wins).
    seen: dict[str, Any] = {}

    def fake_uvicorn_main(args: list[str], prog_name: str) -> None:
        seen.update(args=args, prog_name=prog_name)

    monkeypatch.setattr("uvicorn.main.main", fake_uvicorn_main)
    main(["--port", "9", "--http", "h11"])
    assert seen["args"] == [
        "service.main:app",
        "--http",
        "service.server.protocol:HttpToolsProtocol",
        "--port",
        "9",
        "--http",
        "h11",
    ]
    monkeypatch.setenv("RELU_SERVE_COALESCE_WRITES", "false")  # the switch: uvicorn's own
    main(["--port", "9"])
    assert seen["args"] == ["service.main:app", "--port", "9"]


@pytest.fixture(scope="module")
def server_address(model_repo: Path) -> Iterator[tuple[str, int]]:
    with uvicorn_server(model_repo) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


def test_a_real_server_answers_many_requests_on_one_connection(
    server_address: tuple[str, int],
) -> None:
    connection = http.client.HTTPConnection(*server_address, timeout=10)
    for _ in range(20):  # keep-alive: each answer whole and in order
        connection.request("GET", "/health/live")
        response = connection.getresponse()
        assert response.status == 200
        assert response.read()
    connection.request("GET", "/v1/models", headers={"Connection": "close"})
    response = connection.getresponse()
    assert response.status == 200
    assert b'"models"' in response.read()
    connection.close()
    # A client that closes after one answer gets all of it, then the end of the stream.
    with socket.create_connection(server_address, timeout=10) as raw:
        raw.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := raw.recv(65536):
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    assert len(body) == length
    assert b'"models"' in body


@pytest.fixture(scope="module")
def both_protocols(model_repo: Path) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """Clients of two real servers: ours with coalesced writes, and uvicorn's own protocol."""
    env = {"RELU_SERVE_MAX_BODY_BYTES": str(MAX_BODY_BYTES)}
    stock = {**env, "RELU_SERVE_COALESCE_WRITES": "false"}
    with (
        uvicorn_server(model_repo, env=env) as (ours, _),
        uvicorn_server(model_repo, env=stock) as (theirs, _),
        httpx.Client(base_url=ours, timeout=30) as a,
        httpx.Client(base_url=theirs, timeout=30) as b,
    ):
        yield a, b


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("case", CASES)
def test_coalesced_answers_are_uvicorns_own(
    both_protocols: tuple[httpx.Client, httpx.Client], case: str
) -> None:
    ours, theirs = (send(client, case) for client in both_protocols)
    assert ours.status_code == theirs.status_code
    strip = {"date"}  # the only header that may differ: the second it was sent
    assert {k: v for k, v in ours.headers.items() if k not in strip} == {
        k: v for k, v in theirs.headers.items() if k not in strip
    }
    assert ours.content == theirs.content
