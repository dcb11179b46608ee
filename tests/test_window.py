"""``_window.Window``: a pipeline map's window, trio.Semaphore's promises kept in plain
attributes (slots counted exactly, first come first served, a cancelled wait takes
nothing), checked through the methods and through the written-out steps the pipeline uses."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from conveyor._window import Window


async def test_slots_are_counted_and_none_is_taken_without_one() -> None:
    window = Window(2)
    window.acquire_nowait()
    await window.acquire()
    assert window.value == 0
    with pytest.raises(trio.WouldBlock):
        window.acquire_nowait()
    window.release()
    window.value -= 1  # the written-out take: what the feed does with a free slot
    assert (window.value, window.waiting) == (0, 0)


async def test_a_slot_given_back_goes_to_the_first_waiter_and_each_waiter_gets_one() -> None:
    window = Window(0)
    order: list[int] = []

    async def take(n: int) -> None:
        await window.acquire()
        order.append(n)

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(take, n)
            await trio.testing.wait_all_tasks_blocked()
        assert window.waiting == 3
        window.release()
        window.release()  # two releases before either waiter runs: two waiters served
        await trio.testing.wait_all_tasks_blocked()
        # the first two waiters (trio runs the two woken tasks in either order)
        assert sorted(order) == [0, 1] and (window.value, window.waiting) == (0, 1)
        window.release()
        window.release()  # nobody waits any more: a free slot
    assert order[2] == 2 and (window.value, window.waiting) == (1, 0)


async def test_a_cancelled_wait_takes_no_slot_and_the_next_release_is_not_lost() -> None:
    window = Window(0)
    got: list[str] = []

    async def take(name: str, scope: trio.CancelScope) -> None:
        with scope:
            await window.acquire()
            got.append(name)

    first, second = trio.CancelScope(), trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "first", first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "second", second)
        await trio.testing.wait_all_tasks_blocked()
        first.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert window.waiting == 1
        window.release()  # to "second", not to the cancelled wait
    assert got == ["second"] and (window.value, window.waiting) == (0, 0)
    window.release()
    assert window.value == 1


async def test_acquire_is_a_checkpoint_even_with_a_free_slot() -> None:
    window = Window(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        await window.acquire()  # raises Cancelled: the slot is not taken
    assert scope.cancelled_caught and window.value == 1


async def test_wait_free_waits_for_a_slot_and_leaves_it_free() -> None:
    window = Window(0)
    done = trio.Event()

    async def waiter() -> None:
        await window.wait_free()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set() and window.waiting == 1
        window.release()
    assert done.is_set() and (window.value, window.waiting) == (1, 0)
