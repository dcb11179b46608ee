"""The engine's work channel (conveyor._workchannel.WorkChannel): trio's memory channel's
promises for one sender side and one receiver side, each checked against a case that
could break it: order, the bound, a handoff with no buffer, close (what waits and what is
left), and cancelled waits that take or give nothing; and its own way of waking receivers
(one at a time, each woken one waking the next while jobs are left), also through a pool
and a pipeline, whose workers must all work at once on a burst."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import pytest
import trio
import trio.testing

import conveyor
from conveyor import Backoff, Retry
from conveyor._workchannel import WorkChannel
from tests.test_pipeline_promise import FORMS as PIPELINE_FORMS
from tests.test_pipeline_promise import submit_all
from tests.test_pipeline_promise import through as through_pipeline


async def test_jobs_come_out_in_order_and_the_buffer_is_bounded() -> None:
    channel = WorkChannel(3)
    for job in "abc":
        channel.send_nowait(job)
    assert len(channel) == 3
    with pytest.raises(trio.WouldBlock):
        channel.send_nowait("d")
    assert [channel.receive_nowait() for _ in range(3)] == ["a", "b", "c"]
    with pytest.raises(trio.WouldBlock):
        channel.receive_nowait()


async def test_a_job_wakes_the_receiver_that_waited_longest_and_only_one_at_a_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    channel = WorkChannel(0)
    got: list[tuple[str, object]] = []

    async def receiver(name: str) -> None:
        got.append((name, await channel.receive()))

    with trio.fail_after(100):  # a receiver left waiting fails the test (autojump)
        async with trio.open_nursery() as nursery:
            for name in ("first", "second", "third"):
                nursery.start_soon(receiver, name)
                await trio.testing.wait_all_tasks_blocked()
            channel.send_nowait(1)  # no buffer: in for a waiting receiver, which is woken
            assert (channel.woken, len(channel.receivers)) == (1, 2)
            channel.send_nowait(2)  # one is woken already: no second wake
            assert (channel.woken, len(channel.receivers)) == (1, 2)
            channel.send_nowait(3)
            with pytest.raises(trio.WouldBlock):
                channel.send_nowait(4)  # a slot per receiver, and no buffer
    # The first woken took the oldest job; each one woken with jobs left woke the next.
    assert got == [("first", 1), ("second", 2), ("third", 3)]
    assert (len(channel), channel.woken, len(channel.receivers)) == (0, 0, 0)


async def test_a_burst_starts_every_waiting_receiver_that_waits_in_its_work(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One woken at a time must not serialize I/O: each woken receiver that leaves jobs
    behind wakes the next, so five receivers that each wait 1 s per job do ten jobs in
    2 s, five at once."""
    channel = WorkChannel(5)
    starts: list[float] = []

    async def receiver() -> None:
        for _ in range(2):
            await channel.receive()
            starts.append(trio.current_time())
            await trio.sleep(1)

    with trio.fail_after(100):  # a receiver left waiting fails the test (autojump)
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            for job in range(10):  # a slot per waiting receiver, and the buffer's five
                channel.send_nowait(job)
    assert starts == [0.0] * 5 + [1.0] * 5
    assert trio.current_time() == 2.0


async def test_a_woken_receiver_that_finds_nothing_left_waits_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    channel = WorkChannel(0)
    got: list[object] = []

    async def receiver() -> None:
        got.append(await channel.receive())

    with trio.fail_after(100):  # a receiver left waiting fails the test (autojump)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            channel.send_nowait("taken by a running worker")
            assert channel.woken == 1
            assert channel.receive_nowait() == "taken by a running worker"  # before it runs
            await trio.testing.wait_all_tasks_blocked()
            assert (channel.woken, len(channel.receivers), got) == (0, 1, [])  # waits again
            channel.send_nowait("its own")
    assert got == ["its own"]


async def test_a_cancelled_waiting_receiver_gives_its_slot_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    channel = WorkChannel(1)
    with trio.fail_after(100):  # a receiver left waiting fails the test (autojump)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.receive)
            await trio.testing.wait_all_tasks_blocked()
            assert channel.limit == 2
            nursery.cancel_scope.cancel()
    assert (channel.limit, len(channel.receivers)) == (1, 0)
    channel.send_nowait("fits")
    with pytest.raises(trio.WouldBlock):
        channel.send_nowait("the slot was the receiver's")


async def test_close_lets_waiting_receivers_take_what_is_buffered_then_ends_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Jobs can be buffered while receivers wait (one is woken, not run yet): a close
    then wakes them all, each takes a job (and works on it, 1 s, all at once), and each
    ends on the empty channel."""
    channel = WorkChannel(0)
    starts: list[float] = []
    ended: list[str] = []

    async def receiver(name: str) -> None:
        while True:
            try:
                await channel.receive()
            except trio.EndOfChannel:
                ended.append(name)
                return
            starts.append(trio.current_time())
            await trio.sleep(1)

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            for name in ("a", "b", "c"):
                nursery.start_soon(receiver, name)
            await trio.testing.wait_all_tasks_blocked()
            for job in range(3):
                channel.send_nowait(job)
            assert (len(channel), channel.woken) == (3, 1)  # one woken, two waiting
            channel.close()
    assert starts == [0.0] * 3
    assert sorted(ended) == ["a", "b", "c"]
    assert trio.current_time() == 1.0


async def test_a_waiting_sender_gets_in_as_soon_as_there_is_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for size in (0, 1):
        channel = WorkChannel(size)
        sent: list[int] = []

        async def sender(job: int, channel: WorkChannel = channel, sent: list[int] = sent) -> None:
            await channel.send(job)
            sent.append(job)

        async with trio.open_nursery() as nursery:
            for job in range(3):
                nursery.start_soon(sender, job)
                await trio.testing.wait_all_tasks_blocked()
            assert sent == ([0] if size else [])
            got = [channel.receive_nowait() for _ in range(3 - size)]
            await trio.testing.wait_all_tasks_blocked()
            got += [channel.receive_nowait() for _ in range(size)]
        assert got == [0, 1, 2]
        assert sorted(sent) == [0, 1, 2]


async def test_close_ends_waiting_receivers_refuses_senders_and_keeps_the_buffer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    channel = WorkChannel(1)
    channel.send_nowait("kept")
    ended: list[str] = []

    async def blocked_sender() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await channel.send("refused")
        ended.append("sender")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_sender)
        await trio.testing.wait_all_tasks_blocked()
        channel.close()
        channel.close()  # idempotent
    assert ended == ["sender"]
    assert channel.receive_nowait() == "kept"  # buffered before the close
    with pytest.raises(trio.EndOfChannel):
        channel.receive_nowait()
    with pytest.raises(trio.ClosedResourceError):
        channel.send_nowait("late")

    empty = WorkChannel(1)

    async def blocked_receiver() -> None:
        with pytest.raises(trio.EndOfChannel):
            await empty.receive()
        ended.append("receiver")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_receiver)
        await trio.testing.wait_all_tasks_blocked()
        empty.close()
    assert ended == ["sender", "receiver"]


async def test_cancelled_waits_leave_the_channel_as_it_was(
    autojump_clock: trio.testing.MockClock,
) -> None:
    channel = WorkChannel(0)
    with trio.move_on_after(1) as scope:
        await channel.receive()
    assert scope.cancelled_caught
    with pytest.raises(trio.WouldBlock):
        channel.send_nowait("nobody waits any more")  # the cancelled receiver is gone
    with trio.move_on_after(1) as scope:
        await channel.send("given up")
    assert scope.cancelled_caught
    with pytest.raises(trio.WouldBlock):
        channel.receive_nowait()  # the cancelled sender's job is not in the channel
    # A wait already cancelled is a checkpoint that takes or gives nothing, even when it
    # could have.
    channel = WorkChannel(1)
    channel.send_nowait("there")
    with trio.CancelScope() as cancelled:
        cancelled.cancel()
        await channel.receive()
    assert len(channel) == 1
    with trio.CancelScope() as cancelled:
        cancelled.cancel()
        channel.receive_nowait()
        await channel.send("not sent")
    assert len(channel) == 0


async def test_receive_takes_what_is_there_without_waiting_and_ends_at_once_when_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # receive() tests the channel before it waits (it does not try receive_nowait): each
    # of its cases, in zero time on the autojump clock.
    channel = WorkChannel(1)
    channel.send_nowait("buffered")
    sent: list[str] = []

    async def sender() -> None:
        await channel.send("waiting sender")  # no room: waits for the receive below
        sent.append("in")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        assert await channel.receive() == "buffered"  # the sender's job takes the slot
        assert await channel.receive() == "waiting sender"
        assert trio.current_time() == start
    assert sent == ["in"]
    unbuffered = WorkChannel(0)

    async def handing() -> None:
        await unbuffered.send("by hand")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handing)
        await trio.testing.wait_all_tasks_blocked()
        assert await unbuffered.receive() == "by hand"  # size 0: straight from the sender
    channel.close()
    with trio.fail_after(1), pytest.raises(trio.EndOfChannel):
        await channel.receive()  # closed and empty: at once, no wait


# ------------------------------------------------------------------ through the engine

POOL_FORMS = ("run", "map_with", "map_bare", "open_pool")


async def through_pool(
    fn: Callable[[Any], Awaitable[Any]],
    items: Iterable[Any] | AsyncIterable[Any],
    form: str,
    **options: Any,
) -> conveyor.Report:
    """Run a pool of ``fn`` over ``items`` to its end in ``form``."""
    if form == "run":
        return await conveyor.run(fn, items, **options)
    if form in ("map_with", "map_bare"):
        stream = conveyor.map(fn, items, **options)
        if form == "map_with":
            async with stream as records:
                async for _ in records:
                    pass
        else:
            async for _ in stream:
                pass
        return stream.report()
    async with conveyor.open_pool(fn, **options) as pool:
        await submit_all(pool.submit, items)
    return pool.report()


async def two_bursts(items: list[Any], second: list[float]) -> AsyncIterator[Any]:
    """``items`` in two halves, the second 10 s after the first is taken (its time goes
    into ``second``): it finds every worker waiting."""
    half = len(items) // 2
    for item in items[:half]:
        yield item
    await trio.sleep(10)
    second.append(trio.current_time())
    for item in items[half:]:
        yield item


@pytest.mark.parametrize("source", ["list", "async"])
@pytest.mark.parametrize("buffer", [0, 100])
@pytest.mark.parametrize("form", POOL_FORMS)
async def test_every_worker_of_a_pool_works_at_once_on_a_burst(
    form: str, buffer: int, source: str, autojump_clock: trio.testing.MockClock
) -> None:
    """A pool's workers wake one at a time (the channel's wake), yet all of them work at
    once: 20 items of 1 s on 5 workers take 4 s, five starting each second; from an async
    source in two bursts 10 s apart, the second too."""
    starts: list[float] = []

    async def fn(item: int) -> int:
        starts.append(trio.current_time())
        await trio.sleep(1)
        return item

    with trio.fail_after(100):
        items = list(range(20))
        second: list[float] = []
        report = await through_pool(
            fn,
            items if source == "list" else two_bursts(items, second),
            form,
            workers=5,
            buffer=buffer,
        )
    assert report.stats.succeeded == 20  # (streams hand successes out, not keep them)
    # (buffer 0: the source is asked for its 11th item once the 10th started, at 1 s)
    seconds = [0, 1, 2, 3] if source == "list" else [0, 1, second[0], second[0] + 1]
    assert sorted(starts) == [float(t) for t in seconds for _ in range(5)]
    assert trio.current_time() == seconds[-1] + 1


@pytest.mark.parametrize("source", ["list", "async"])  # fed in chunks, or input by input
@pytest.mark.parametrize("form", PIPELINE_FORMS)
async def test_every_worker_of_every_stage_works_at_once_on_a_burst(
    form: str, source: str, autojump_clock: trio.testing.MockClock
) -> None:
    """As for a pool, in each stage of a pipeline: 20 inputs through two stages of 1 s per
    item and 5 workers each take 5 s; each stage starts five items a second. From an
    async source, in two bursts 10 s apart: the second starts all at once too."""
    starts: dict[str, list[float]] = {"a": [], "b": []}

    def timed(name: str) -> Callable[[int], Awaitable[int]]:
        async def fn(item: int) -> int:
            starts[name].append(trio.current_time())
            await trio.sleep(1)
            return item

        return fn

    pipe = conveyor.pipeline(
        conveyor.stage(timed("a"), name="a", workers=5),
        conveyor.stage(timed("b"), name="b", workers=5),
    )
    with trio.fail_after(100):
        items = list(range(20))
        second: list[float] = []
        _, report = await through_pipeline(
            pipe, items if source == "list" else two_bursts(items, second), form
        )
    assert report.stats.succeeded == 20  # (streams hand successes out, not keep them)
    seconds = [0, 1, 2, 3] if source == "list" else [0, 1, second[0], second[0] + 1]
    assert sorted(starts["a"]) == [float(t) for t in seconds for _ in range(5)]
    assert sorted(starts["b"]) == [float(t + 1) for t in seconds for _ in range(5)]
    assert trio.current_time() == seconds[-1] + 2


async def _retry_beside_a_fresh_item() -> float:
    """When "a"'s retry starts: it comes due at 1 s, the instant "b" (10 s) is submitted
    while both workers wait."""
    started: dict[str, list[float]] = {"a": [], "b": [], "x": []}

    async def fn(item: str) -> str:
        started[item].append(trio.current_time())
        if item == "a" and len(started["a"]) == 1:
            raise OSError("once")
        await trio.sleep({"a": 0, "b": 10, "x": 0.5}[item])
        return item

    retry = Retry(attempts=2, backoff=Backoff(initial=1, jitter=None))
    async with conveyor.open_pool(fn, workers=2, buffer=0, retry=retry) as pool:
        await pool.submit("a")  # fails at once: due again at 1 s
        await pool.submit("x")  # keeps the second worker until 0.5 s
        await trio.sleep_until(1)
        await pool.submit("b")
    assert len(started["a"]) == 2
    return started["a"][1]


RUNS = 32  # trio runs a moment's tasks in a random order: which of the two comes first


def test_a_retry_that_comes_due_beside_a_fresh_item_starts_at_once() -> None:
    """A retry comes due in the instant a fresh item goes into the channel, one worker
    woken for it and the other waiting: the retry goes into the channel too, where the
    woken worker's successor finds it, and starts at once. (Put ahead of the channel for
    the workers to look at first, where no worker waits to be woken, it waited for "b"'s
    10 s in the runs where "b" came first.)"""
    late = [
        at
        for at in (
            trio.run(_retry_beside_a_fresh_item, clock=trio.testing.MockClock(autojump_threshold=0))
            for _ in range(RUNS)
        )
        if at != 1.0
    ]
    assert late == []
