"""A process-wide budget of bytes that concurrent requests hold while they use them.

Limits per request (a body size, an image's pixels) do not bound what many requests hold at
once: 64 small PNGs that each decode to 4096 x 4096 pixels, sent twice at once, took a worker
to 2.1 GiB. A ``MemoryBudget`` is taken before the memory is allocated and given back after:
a request that does not fit waits its turn (first come, first served), and is answered 503
with Retry-After when its turn does not come within ``wait_s``; one that could never fit is
413, naming the setting.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from service.core.errors import PayloadTooLargeError, ServiceUnavailableError


class MemoryBudget:
    """``total`` bytes, shared by the requests of one event loop."""

    def __init__(self, total: int, setting: str, wait_s: float) -> None:
        self.total = total
        self.setting = setting
        self.wait_s = wait_s
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @asynccontextmanager
    async def hold(self, nbytes: int, what: str) -> AsyncIterator[None]:
        """Hold ``nbytes`` for the body of the ``with``; ``what`` names them in errors."""
        await self.take(nbytes, what)
        try:
            yield
        finally:
            self.give(nbytes)

    async def take(self, nbytes: int, what: str) -> None:
        """Take ``nbytes``, waiting for them in turn; ``give`` them back when done."""
        if nbytes > self.total:
            raise PayloadTooLargeError(
                f"{what} needs {nbytes} bytes, over the {self.total} bytes all requests "
                f"together may hold ({self.setting})",
                code="over_memory_budget",
            )
        if not self._waiting and self.used + nbytes <= self.total:
            self.used += nbytes  # the common case: no wait, no future
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, turn)
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.wait_s)
        except TimeoutError:
            if turn.done():  # given its bytes just as the wait ended: keep them
                return
            self._waiting.remove(entry)
            self._wake()  # those behind it may fit now
            raise ServiceUnavailableError(
                f"{what} waited {self.wait_s:g} s for {nbytes} bytes of memory that other "
                f"requests hold ({self.setting}: {self.total} bytes); retry shortly",
                code="memory_busy",
                headers={"Retry-After": "1"},
            ) from None
        except BaseException:
            if turn.done():
                self.give(nbytes)
            else:
                self._waiting.remove(entry)
                self._wake()
            raise

    def give(self, nbytes: int) -> None:
        self.used -= nbytes
        self._wake()

    def _wake(self) -> None:
        """Grant the waiting requests, in order, as long as the first one fits."""
        while self._waiting and self.used + self._waiting[0][0] <= self.total:
            nbytes, turn = self._waiting.popleft()
            self.used += nbytes
            turn.set_result(None)
