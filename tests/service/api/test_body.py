"""service.api.body.read_body: the whole body from the receive channel, chunks joined."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect, Request

from service.api.body import read_body


def _request(*messages: dict) -> Request:
    pending = list(messages)

    async def receive() -> dict:
        return pending.pop(0)

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


def test_chunks_are_joined_into_the_whole_body() -> None:
    chunked = _request(
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
    )
    assert asyncio.run(read_body(chunked)) == b"abcd"
    assert asyncio.run(read_body(_request({"type": "http.request", "body": b"one"}))) == b"one"
    assert asyncio.run(read_body(_request({"type": "http.request"}))) == b""


def test_a_client_that_went_away_raises_client_disconnect() -> None:
    request = _request(
        {"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.disconnect"}
    )
    with pytest.raises(ClientDisconnect):
        asyncio.run(read_body(request))
