"""``MemoryBudget``: bytes taken before memory is used, in turn, within a wait limit."""

from __future__ import annotations

import asyncio

import pytest

from service.core.budget import MemoryBudget
from service.core.errors import PayloadTooLargeError, ServiceUnavailableError


def test_requests_that_do_not_fit_wait_their_turn_in_order() -> None:
    async def scenario() -> list[str]:
        budget = MemoryBudget(100, "test_budget", wait_s=5)
        order: list[str] = []

        async def request(name: str, nbytes: int, hold_s: float) -> None:
            async with budget.hold(nbytes, name):
                order.append(f"{name} in ({budget.used})")
                await asyncio.sleep(hold_s)
            order.append(f"{name} out")

        first = asyncio.create_task(request("a", 60, 0.05))
        await asyncio.sleep(0)
        second = asyncio.create_task(request("b", 60, 0.0))  # waits for a
        await asyncio.sleep(0)
        third = asyncio.create_task(request("c", 10, 0.0))  # would fit, but b is first
        await asyncio.gather(first, second, third)
        assert budget.used == 0
        return order

    order = asyncio.run(scenario())
    assert order == [
        "a in (60)",
        "a out",
        "b in (70)",  # b and c granted together once a gave its 60 back
        "c in (70)",
        "b out",
        "c out",
    ]


def test_a_request_that_could_never_fit_is_413_naming_the_setting() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100, "test_budget", wait_s=5)
        with pytest.raises(PayloadTooLargeError, match=r"101 bytes.*\(test_budget\)"):
            await budget.take(101, "an image")
        assert budget.used == 0

    asyncio.run(scenario())


def test_a_wait_past_the_limit_is_503_and_leaves_nothing_taken() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100, "test_budget", wait_s=0.05)
        await budget.take(90, "a")
        with pytest.raises(ServiceUnavailableError, match="test_budget") as refused:
            await budget.take(20, "b")
        assert refused.value.headers == {"Retry-After": "1"}
        budget.give(90)
        assert budget.used == 0
        await budget.take(100, "c")  # the refused request left no claim behind

    asyncio.run(scenario())


def test_a_cancelled_wait_gives_its_place_up() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100, "test_budget", wait_s=5)
        await budget.take(90, "a")
        waiting = asyncio.create_task(budget.take(50, "b"))
        behind = asyncio.create_task(budget.take(10, "c"))
        await asyncio.sleep(0.01)
        waiting.cancel()  # the client went away
        await asyncio.sleep(0.01)
        assert behind.done()  # c fits now that b is no longer first
        assert budget.used == 100
        budget.give(100)

    asyncio.run(scenario())
