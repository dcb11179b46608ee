"""Micro-batching building blocks (src/conveyor/_batch.py): collect and call_batch.

Time is virtual (trio's MockClock with autojump): a batch goes at an exact instant. The
split-on-failure property runs under hypothesis: any poison set within any batch size fails
exactly the poison items, every good item gets its own value, in at most 1 + 2 p ceil(log2 n)
calls. Cancelling collect at any instant loses no item.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import outcome
import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import conveyor
from conveyor import Backoff, Retry
from conveyor._batch import (
    BatchAnswerError,
    Collector,
    _split_calls_bound,
    call_batch,
    call_batch_flat,
    collect,
)


def channel(size: float = math.inf) -> tuple[trio.MemorySendChannel[Any],
                                               trio.MemoryReceiveChannel[Any]]:
    return trio.open_memory_channel[Any](size)


async def send_at(send: trio.MemorySendChannel[Any], schedule: Sequence[tuple[float, Any]],
                  close: float | None = None, sent: list[Any] | None = None) -> None:
    """Send each item at its instant (absolute virtual time); close at ``close`` if given;
    append each item sent to ``sent``."""
    for when, item in schedule:
        await trio.sleep_until(when)
        await send.send(item)
        if sent is not None:
            sent.append(item)
    if close is not None:
        await trio.sleep_until(close)
        await send.aclose()


async def timed_batches(receive: trio.MemoryReceiveChannel[Any], size: int, max_wait: float
                        ) -> list[tuple[float, list[Any]]]:
    """Every batch until the channel ends, with the instant it was returned."""
    out = []
    while batch := await collect(receive, size, max_wait):
        out.append((trio.current_time(), batch))
    return out


# ---------------------------------------------------------------------------------------------
# collect: by size, by time, whichever first; the end of the channel


async def test_a_batch_of_3_arriving_at_10_20_30_ms_goes_at_exactly_60_ms(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = channel()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_at, send, [(0.01, "a"), (0.02, "b"), (0.03, "c")], 1.0)
        batches = await timed_batches(receive, 10, 0.05)
    assert batches == [(pytest.approx(0.06, abs=1e-12), ["a", "b", "c"])]
    assert batches[0][0] == 0.01 + 0.05  # max_wait counts from the first item, exactly


async def test_size_500_max_wait_50ms_whichever_comes_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = channel()
    # 1,200 items at t=0 (two full batches go at once, 200 wait for more), 100 more at
    # t=0.02 (they join the 200: that batch goes at 0.05, 50 ms after its first item); then
    # 40 items 3 ms apart from t=1: 17 in each 50 ms, time first.
    schedule = [(0.0, i) for i in range(1200)] + [(0.02, 1200 + i) for i in range(100)]
    schedule += [(1.0 + 3 * i / 1000, 2000 + i) for i in range(40)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_at, send, schedule, 5.0)
        batches = await timed_batches(receive, 500, 0.05)
    assert [(round(t, 9), len(b)) for t, b in batches] == [
        (0.0, 500), (0.0, 500), (0.05, 300),  # size, size, then time
        (1.05, 17), (1.101, 17), (1.152, 6),  # time: 1.000-1.048, 1.051-1.099, 1.102-1.117
    ]
    assert [x for _, b in batches for x in b] == [x for _, x in schedule]  # in order, once


async def test_size_reached_before_max_wait_goes_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = channel()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_at, send, [(0.01, 1), (0.02, 2), (0.03, 3), (0.04, 4)], 1.0)
        batches = await timed_batches(receive, 3, 0.05)
    assert batches == [(pytest.approx(0.03), [1, 2, 3]), (pytest.approx(0.09), [4])]


async def test_end_of_channel_flushes_the_partial_batch_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = channel()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_at, send, [(0.01, "a"), (0.02, "b")], 0.025)
        batches = await timed_batches(receive, 10, 100.0)
    # Closed at 0.025: the batch goes then, not at 100.01.
    assert batches == [(pytest.approx(0.025), ["a", "b"])]
    assert await collect(receive, 10, 1.0) == []  # and stays ended


async def test_items_waiting_in_a_closed_channel_come_out_in_batches_then_empty() -> None:
    send, receive = channel()
    for i in range(7):
        send.send_nowait(i)
    send.close()
    assert await collect(receive, 3, 1.0) == [0, 1, 2]
    assert await collect(receive, 3, 1.0) == [3, 4, 5]
    assert await collect(receive, 3, 1.0) == [6]
    assert await collect(receive, 3, 1.0) == []


async def test_max_wait_0_takes_the_first_item_and_those_already_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = channel()
    for i in range(3):
        send.send_nowait(i)
    assert await collect(receive, 10, 0) == [0, 1, 2]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_at, send, [(0.5, "x"), (0.5, "y"), (0.6, "z")], 1.0)
        batches = await timed_batches(receive, 10, 0)
    assert batches == [(0.5, ["x"]), (0.5, ["y"]), (pytest.approx(0.6), ["z"])]


async def test_size_1_is_one_item_per_batch_without_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = channel()
    send.send_nowait(1)
    send.send_nowait(2)
    assert await collect(receive, 1, 10.0) == [1]
    assert trio.current_time() == 0.0


async def test_a_closed_receive_channel_raises() -> None:
    _, receive = channel()
    await receive.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await collect(receive, 3, 1.0)


@pytest.mark.parametrize(
    ("size", "max_wait", "error", "match"),
    [
        (0, 1.0, ValueError, r"batch size must be >= 1, got 0"),
        (-3, 1.0, ValueError, r"batch size must be >= 1, got -3"),
        (True, 1.0, TypeError, r"batch size must be an int >= 1, got True"),
        (2.0, 1.0, TypeError, r"batch size must be an int >= 1, got 2.0"),
        (3, -0.5, ValueError, r"max_wait must be a finite number of seconds >= 0, got -0.5"),
        (3, math.nan, ValueError, r"max_wait must be a finite .* got nan"),
        (3, math.inf, ValueError, r"max_wait must be a finite .* got inf"),
        (3, True, TypeError, r"max_wait must be a number of seconds >= 0, got True"),
        (3, "1", TypeError, r"max_wait must be a number of seconds >= 0, got '1'"),
    ],
)
async def test_collect_refuses_bad_size_or_wait_before_taking_anything(
    size: Any, max_wait: Any, error: type[Exception], match: str
) -> None:
    send, receive = channel()
    send.send_nowait("kept")
    with pytest.raises(error, match=match):
        await collect(receive, size, max_wait)
    assert receive.receive_nowait() == "kept"
    # The fix the message names: a size >= 1 and finite seconds >= 0.
    send.send_nowait("next")
    assert await collect(receive, 1, 0.0) == ["next"]


# ---------------------------------------------------------------------------------------------
# collect under cancel: nothing taken is lost


async def test_cancel_while_waiting_for_the_first_item_takes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = channel()
    with trio.move_on_after(1.0) as scope:
        await collect(receive, 5, 0.1)
    assert scope.cancelled_caught
    send.send_nowait("later")
    assert receive.receive_nowait() == "later"


async def test_cancel_after_items_were_taken_returns_them_and_the_cancel_follows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = channel()
    got: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_at, send, [(0.01, 1), (0.02, 2), (0.5, 3)])
        with trio.move_on_at(0.03) as scope:
            got = await collect(receive, 10, 1.0)
            assert trio.current_time() == pytest.approx(0.03)  # returned at the cancel
            await trio.lowlevel.checkpoint()  # the caller's next checkpoint: the cancel lands here
            pytest.fail("the cancel was lost")
    assert scope.cancelled_caught
    assert got == [1, 2]
    assert receive.receive_nowait() == 3  # sent later, still in the channel


async def test_a_long_backlog_goes_out_in_order_and_a_take_costs_its_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A backlog of many batches (a pipeline's first stage is fed thousands at once): the
    batches come out in order, ``len`` counts what is left, puts between takes go after the
    backlog, and ``drain`` gives the rest in order."""
    collector: Collector[int] = Collector(4, 1.0)
    collector.put_many(list(range(42)))
    got: list[int] = []
    for taken_batches in range(1, 6):
        batch = await collector.take()
        assert len(batch) == 4
        got.extend(batch)
        assert len(collector) == 42 - 4 * taken_batches
    collector.put(100)
    collector.put_many([101, 102])
    assert len(collector) == 42 - 20 + 3
    got.extend(await collector.take())
    rest = collector.drain()
    assert len(collector) == 0
    assert got + rest == [*range(42), 100, 101, 102]
    collector.put(7)  # usable again after a drain
    collector.close()
    assert await collector.take() == [7]
    assert await collector.take() == []


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.integers(0, 30), min_size=1, max_size=40),
    size=st.integers(1, 8),
    wait=st.integers(0, 40),
    cancel_at=st.integers(0, 400),
)
def test_cancel_at_any_instant_loses_nothing_and_duplicates_nothing(
    gaps: list[int], size: int, wait: int, cancel_at: int
) -> None:
    """Items sent at random ms; batches collected until a cancel at a random ms: every item
    is in exactly one batch or still in the channel, in order."""

    async def main() -> None:
        send, receive = channel()
        schedule, now = [], 0
        for i, gap in enumerate(gaps):
            now += gap
            schedule.append((now / 1000, i))
        batches: list[list[int]] = []
        sent: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_at, send, schedule, (now + 1) / 1000, sent)
            with trio.move_on_at(cancel_at / 1000):
                while True:
                    batch = await collect(receive, size, wait / 1000)
                    assert len(batch) <= size
                    if not batch:
                        break
                    batches.append(batch)
            nursery.cancel_scope.cancel()  # stop the sender too
        left = []
        while True:
            try:
                left.append(receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        taken = [x for b in batches for x in b]
        assert taken + left == sent  # in order, each once, none lost

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# ---------------------------------------------------------------------------------------------
# Collector: the same batches without a channel


async def put_at(collector: Collector[Any], schedule: Sequence[tuple[float, Any]],
                 close: float | None = None, sent: list[Any] | None = None) -> None:
    for when, item in schedule:
        await trio.sleep_until(when)
        collector.put(item)
        if sent is not None:
            sent.append(item)
    if close is not None:
        await trio.sleep_until(close)
        collector.close()


async def taken(collector: Collector[Any]) -> list[tuple[float, list[Any]]]:
    out = []
    while batch := await collector.take():
        out.append((trio.current_time(), batch))
    return out


async def test_collector_a_batch_of_3_arriving_at_10_20_30_ms_goes_at_exactly_60_ms(
    autojump_clock: trio.testing.MockClock,
) -> None:
    collector: Collector[str] = Collector(10, 0.05)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(put_at, collector, [(0.01, "a"), (0.02, "b"), (0.03, "c")], 1.0)
        batches = await taken(collector)
    assert batches == [(0.01 + 0.05, ["a", "b", "c"])]


async def test_collector_size_500_max_wait_50ms_whichever_comes_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    collector: Collector[int] = Collector(500, 0.05)
    schedule = [(0.0, i) for i in range(1200)] + [(0.02, 1200 + i) for i in range(100)]
    schedule += [(1.0 + 3 * i / 1000, 2000 + i) for i in range(40)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(put_at, collector, schedule, 5.0)
        batches = await taken(collector)
    # The 200 left at t=0 wait from the moment the second batch was taken (t=0): they go at
    # 0.05 with the 100 put at 0.02.
    assert [(round(t, 9), len(b)) for t, b in batches] == [
        (0.0, 500), (0.0, 500), (0.05, 300),
        (1.05, 17), (1.101, 17), (1.152, 6),
    ]
    assert [x for _, b in batches for x in b] == [x for _, x in schedule]


async def test_collector_close_flushes_at_once_then_empty_and_put_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    collector: Collector[int] = Collector(3, 100.0)
    for i in range(7):
        collector.put(i)
    assert len(collector) == 7
    assert await collector.take() == [0, 1, 2]  # full: at once
    async with trio.open_nursery() as nursery:
        nursery.start_soon(put_at, collector, [], 0.5)
        assert await collector.take() == [3, 4, 5]
        assert await collector.take() == [6]  # closed at 0.5: goes then, not at 100
        assert trio.current_time() == 0.5
    assert collector.closed and await collector.take() == []
    with pytest.raises(trio.ClosedResourceError, match="put on a closed Collector"):
        collector.put(8)


async def test_collector_max_wait_0_and_size_1(autojump_clock: trio.testing.MockClock) -> None:
    collector: Collector[int] = Collector(10, 0)
    collector.put(1)
    collector.put(2)
    assert await collector.take() == [1, 2]
    ones: Collector[int] = Collector(1, 10.0)
    ones.put(1)
    ones.put(2)
    assert await ones.take() == [1]
    assert trio.current_time() == 0.0
    assert ones.drain() == [2] and len(ones) == 0


@pytest.mark.parametrize(
    ("size", "max_wait", "error", "match"),
    [
        (0, 1.0, ValueError, r"batch size must be >= 1, got 0"),
        (True, 1.0, TypeError, r"batch size must be an int >= 1, got True"),
        (3, -1, ValueError, r"max_wait must be a finite number of seconds >= 0, got -1"),
        (3, math.inf, ValueError, r"max_wait must be a finite .* got inf"),
        (3, None, TypeError, r"max_wait must be a number of seconds >= 0, got None"),
    ],
)
def test_collector_refuses_bad_size_or_wait(
    size: Any, max_wait: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Collector(size, max_wait)
    Collector(1, 0.0)  # the fix the message names


async def test_two_takers_share_the_batches_and_neither_returns_empty_early(
    autojump_clock: trio.testing.MockClock,
) -> None:
    collector: Collector[int] = Collector(2, 0.1)
    got: list[list[int]] = []

    async def taker() -> None:
        while batch := await collector.take():
            got.append(batch)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker)
        nursery.start_soon(taker)
        nursery.start_soon(put_at, collector, [(0.01 * i, i) for i in range(7)], 1.0)
    assert sorted(x for b in got for x in b) == list(range(7))
    assert all(1 <= len(b) <= 2 for b in got)


async def test_a_cancelled_take_takes_nothing(autojump_clock: trio.testing.MockClock) -> None:
    collector: Collector[int] = Collector(10, 1.0)
    collector.put(1)
    with trio.move_on_after(0.5) as scope:
        await collector.take()
    assert scope.cancelled_caught
    assert len(collector) == 1
    with trio.CancelScope() as cancelled:
        cancelled.cancel()
        collector.put(2)
        await collector.take()
    assert len(collector) == 2  # cancelled at its first checkpoint: nothing taken


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.integers(0, 30), min_size=1, max_size=40),
    size=st.integers(1, 8),
    wait=st.integers(0, 40),
    cancel_at=st.integers(0, 400),
)
def test_collector_cancel_at_any_instant_loses_nothing(
    gaps: list[int], size: int, wait: int, cancel_at: int
) -> None:
    async def main() -> None:
        collector: Collector[int] = Collector(size, wait / 1000)
        schedule, now = [], 0
        for i, gap in enumerate(gaps):
            now += gap
            schedule.append((now / 1000, i))
        batches: list[list[int]] = []
        sent: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(put_at, collector, schedule, (now + 1) / 1000, sent)
            with trio.move_on_at(cancel_at / 1000):
                while batch := await collector.take():
                    assert 1 <= len(batch) <= size
                    batches.append(batch)
            nursery.cancel_scope.cancel()
        assert [x for b in batches for x in b] + collector.drain() == sent

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# ---------------------------------------------------------------------------------------------
# call_batch: one call, one outcome per item


def values(outcomes: Sequence[outcome.Outcome[Any]]) -> list[Any]:
    return [o.value if isinstance(o, outcome.Value) else o.error for o in outcomes]


def doubled(items: list[int]) -> list[int]:
    return [2 * x for x in items]


async def async_doubled(items: list[int]) -> list[int]:
    await trio.lowlevel.checkpoint()
    return [2 * x for x in items]


def returns_awaitable(items: list[int]) -> Awaitable[list[int]]:
    return async_doubled(items)


@pytest.mark.parametrize("fn", [doubled, async_doubled, returns_awaitable])
async def test_each_item_gets_its_own_value_in_order(fn: Callable[[list[int]], Any]) -> None:
    outcomes = await call_batch(fn, [1, 2, 3], split=False)
    assert all(isinstance(o, outcome.Value) for o in outcomes)
    assert values(outcomes) == [2, 4, 6]


async def test_any_sized_iterable_answer_is_accepted() -> None:
    assert values(await call_batch(lambda xs: tuple(xs), [1, 2], split=False)) == [1, 2]
    assert values(await call_batch(lambda xs: (x for x in xs), [1, 2], split=False)) == [1, 2]
    assert values(await call_batch(lambda xs: range(len(xs)), [7, 8], split=False)) == [0, 1]


async def test_no_items_means_no_call() -> None:
    def boom(items: list[Any]) -> list[Any]:
        raise AssertionError("called")

    assert await call_batch(boom, [], split=True) == []


async def test_an_exception_in_an_items_place_fails_that_item_alone() -> None:
    bad = ValueError("row 1 is bad")

    def answer(items: list[int]) -> list[Any]:
        return [bad if x == 1 else x * 10 for x in items]

    outcomes = await call_batch(answer, [0, 1, 2], split=False)
    assert isinstance(outcomes[1], outcome.Error) and outcomes[1].error is bad
    assert [type(o) for o in outcomes] == [outcome.Value, outcome.Error, outcome.Value]
    assert values(outcomes)[0::2] == [0, 20]
    # An exception class (not an instance) is a value; so is a wrapped instance.
    wrapped = await call_batch(lambda xs: [ValueError, (bad,)], [0, 1], split=False)
    assert values(wrapped) == [ValueError, (bad,)]


async def test_a_raising_batch_fn_fails_every_item_each_with_its_own_copy() -> None:
    calls = []

    def raising(items: list[int]) -> list[int]:
        calls.append(list(items))
        try:
            raise OSError("lookup")
        except OSError as cause:
            raise RuntimeError("service down", len(items)) from cause

    outcomes = await call_batch(raising, [1, 2, 3], split=False)
    assert calls == [[1, 2, 3]]  # once, not split
    errors = [o.error for o in outcomes if isinstance(o, outcome.Error)]
    assert len(errors) == 3 and len({id(e) for e in errors}) == 3
    for error in errors:
        assert type(error) is RuntimeError and error.args == ("service down", 3)
        assert isinstance(error.__cause__, OSError)
        assert error.__traceback__ is errors[0].__traceback__ is not None
    with pytest.raises(RuntimeError, match="service down"):
        outcomes[2].unwrap()


async def test_a_raising_async_batch_fn_fails_every_item() -> None:
    async def raising(items: list[int]) -> list[int]:
        await trio.lowlevel.checkpoint()
        raise KeyError("k")

    outcomes = await call_batch(raising, [1, 2], split=False)
    assert [type(o.error) for o in outcomes if isinstance(o, outcome.Error)] == [KeyError] * 2


@pytest.mark.parametrize("answer_len", [0, 2, 4])
async def test_a_wrong_length_answer_fails_the_batch_naming_both_lengths(answer_len: int) -> None:
    calls = []

    def wrong(items: list[int]) -> list[int]:
        calls.append(items)
        return list(range(answer_len))

    outcomes = await call_batch(wrong, [1, 2, 3], split=True)
    assert len(calls) == 1  # never split for it
    for o in outcomes:
        assert isinstance(o, outcome.Error) and isinstance(o.error, BatchAnswerError)
        assert f"returned {answer_len} values for a batch of 3 items" in str(o.error)
        assert o.error.retryable is False
    # The fix the message names: one value per item.
    assert values(await call_batch(lambda xs: [None] * len(xs), [1, 2, 3], split=True)) == [
        None
    ] * 3


@pytest.mark.parametrize("answer", [None, 5, "abc", b"ab", {1: 2, 2: 3}])
async def test_an_answer_that_is_not_a_sequence_fails_the_batch(answer: Any) -> None:
    outcomes = await call_batch(lambda xs: answer, [1, 2], split=False)
    for o in outcomes:
        assert isinstance(o, outcome.Error) and isinstance(o.error, BatchAnswerError)
        assert "must return a sequence of one value per item (2, in order)" in str(o.error)
        assert type(answer).__name__ in str(o.error)


async def test_cancel_and_base_exceptions_propagate() -> None:
    async def slow(items: list[int]) -> list[int]:
        await trio.sleep_forever()
        raise AssertionError

    with trio.move_on_after(0.01) as scope:
        await call_batch(slow, [1, 2], split=True)
    assert scope.cancelled_caught

    def interrupt(items: list[int]) -> list[int]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await call_batch(interrupt, [1, 2], split=True)


async def test_a_sync_batch_fn_still_makes_call_batch_a_checkpoint() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await call_batch(doubled, [1], split=False)


async def test_call_batch_refuses_bad_arguments() -> None:
    with pytest.raises(TypeError, match="batch_fn must be callable, got 3"):
        await call_batch(3, [1], split=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="split must be True or False, got 1"):
        await call_batch(doubled, [1], split=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="split_on must be a callable"):
        await call_batch(doubled, [1], split=True, split_on=ValueError())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# split: only the poison items fail


class Poisoned(Exception):
    pass


def poisoned_service(poison: set[int], calls: list[list[int]]) -> Callable[[list[int]], list[int]]:
    """A batch function that answers the whole batch or refuses it if it holds a poison
    item (like a prediction server answering 400 for a batch with one bad row)."""

    def service(items: list[int]) -> list[int]:
        calls.append(list(items))
        bad = [x for x in items if x in poison]
        if bad:
            raise Poisoned(f"bad items {bad}")
        return [x * x for x in items]

    return service


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n=st.integers(1, 300))
def test_split_fails_exactly_the_poison_items_in_o_p_log_n_calls(
    data: st.DataObject, n: int
) -> None:
    poison = data.draw(st.sets(st.integers(0, n - 1), max_size=min(n, 12)), label="poison")
    calls: list[list[int]] = []
    service = poisoned_service(poison, calls)
    outcomes = trio.run(partial(call_batch, service, list(range(n)), split=True))
    assert len(outcomes) == n
    for x, o in enumerate(outcomes):
        if x in poison:
            assert isinstance(o, outcome.Error) and isinstance(o.error, Poisoned)
            assert str(o.error) == f"bad items [{x}]"  # the error of its own single call
        else:
            assert isinstance(o, outcome.Value) and o.value == x * x
    assert len(calls) <= _split_calls_bound(n, len(poison))
    assert _split_calls_bound(n, len(poison)) <= 1 + 2 * len(poison) * max(1, math.log2(n) + 1)
    # Every good item was answered by exactly one successful call.
    answered = [x for call in calls if not poison & set(call) for x in call]
    assert sorted(answered) == sorted(set(range(n)) - poison)


async def test_without_split_one_poison_item_fails_the_whole_batch() -> None:
    calls: list[list[int]] = []
    outcomes = await call_batch(poisoned_service({3}, calls), list(range(8)), split=False)
    assert len(calls) == 1
    assert all(isinstance(o, outcome.Error) for o in outcomes)


async def test_split_on_limits_splitting_to_the_errors_it_accepts() -> None:
    calls: list[list[int]] = []
    service = poisoned_service({3}, calls)

    def busy_or_service(items: list[int]) -> list[int]:
        if len(items) == 8:
            calls.append(list(items))
            raise ConnectionError("503")
        return service(items)

    outcomes = await call_batch(
        busy_or_service, list(range(8)), split=True,
        split_on=lambda error: isinstance(error, Poisoned),
    )
    assert calls == [list(range(8))]  # a 503 is not split: it fails the batch, to be retried
    assert all(isinstance(o, outcome.Error) and isinstance(o.error, ConnectionError)
               for o in outcomes)
    calls.clear()
    outcomes = await call_batch(
        service, list(range(8)), split=True, split_on=lambda error: isinstance(error, Poisoned)
    )
    assert [type(o) for o in outcomes].count(outcome.Error) == 1
    assert len(calls) == 7  # 8 -> 4+4 -> 2+2 -> 1+1


async def test_a_raising_split_on_propagates() -> None:
    def broken(error: Exception) -> bool:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await call_batch(poisoned_service({0}, []), [0, 1], split=True, split_on=broken)


async def test_split_gives_each_call_its_own_list_and_leaves_items_alone() -> None:
    seen: list[list[int]] = []

    def mutating(items: list[int]) -> list[int]:
        seen.append(list(items))
        items.clear()
        raise Poisoned

    items = [1, 2, 3, 4]
    await call_batch(mutating, items, split=True)
    assert items == [1, 2, 3, 4]
    assert seen == [[1, 2, 3, 4], [1, 2], [1], [2], [3, 4], [3], [4]]


# ---------------------------------------------------------------------------------------------
# call_batch_flat: the same answers, one entry per item (a value or an Exception instance)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(0, 64),
    poison=st.sets(st.integers(0, 63), max_size=5),
    marked=st.sets(st.integers(0, 63), max_size=5),
    split=st.booleans(),
)
def test_flat_entries_are_the_outcomes_unwrapped(
    n: int, poison: set[int], marked: set[int], split: bool
) -> None:
    def service(items: list[int]) -> list[Any]:
        if poison & set(items):
            raise Poisoned(sorted(poison & set(items)))
        return [ValueError(x) if x in marked else -x for x in items]

    async def main() -> tuple[list[Any], list[outcome.Outcome[Any]]]:
        items = list(range(n))
        flat = await call_batch_flat(service, items, split=split)
        return flat, await call_batch(service, items, split=split)

    flat, outcomes = trio.run(main)
    assert len(flat) == len(outcomes) == n
    for entry, o in zip(flat, outcomes, strict=True):
        if isinstance(o, outcome.Error):
            assert type(entry) is type(o.error) and entry.args == o.error.args
        else:
            assert isinstance(o, outcome.Value) and entry == o.value


async def test_flat_hands_on_the_batch_functions_own_list() -> None:
    answer = [1, 2, 3]
    assert await call_batch_flat(lambda xs: answer, [0, 0, 0], split=False) is answer
    assert await call_batch_flat(lambda xs: (7, 8), [0, 0], split=False) == [7, 8]
    with pytest.raises(TypeError, match="split must be True or False"):
        await call_batch_flat(doubled, [1], split=None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# retry: the parts of a split batch are retried per the policy, so a 503 on a half does not
# give up its good items


class Busy(Exception):
    """A transient refusal (a 503): a retry heals it."""


def flaky_service(poison: set[int], busy_per_call: list[int], calls: list[list[int]]
                  ) -> Callable[[list[int]], list[int]]:
    """Like poisoned_service, but the k-th *distinct* part called is refused as Busy the
    first busy_per_call[k % len] times it is called."""
    seen: dict[tuple[int, ...], int] = {}
    order: dict[tuple[int, ...], int] = {}

    async def service(items: list[int]) -> list[int]:
        await trio.sleep(0.001)
        calls.append(list(items))
        key = tuple(items)
        k = order.setdefault(key, len(order))
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= busy_per_call[k % len(busy_per_call)]:
            raise Busy(f"busy {key[:3]}")
        bad = [x for x in items if x in poison]
        if bad:
            raise Poisoned(f"bad items {bad}")
        return [x * x for x in items]

    return service


def is_poisoned(error: Exception) -> bool:
    return isinstance(error, Poisoned)


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 100),
    busy=st.lists(st.integers(0, 2), min_size=1, max_size=7),
)
def test_split_with_retry_fails_exactly_the_poison_items_despite_transient_errors(
    data: st.DataObject, n: int, busy: list[int]
) -> None:
    poison = data.draw(st.sets(st.integers(0, n - 1), max_size=min(n, 6)), label="poison")
    calls: list[list[int]] = []
    retry = Retry(attempts=3, backoff=None, retry_on=Busy)

    async def main() -> list[outcome.Outcome[Any]]:
        return await call_batch(flaky_service(poison, busy, calls), list(range(n)), split=True,
                                split_on=is_poisoned, retry=retry)

    outcomes = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    for x, o in enumerate(outcomes):
        if x in poison:
            assert isinstance(o, outcome.Error) and str(o.error) == f"bad items [{x}]"
        else:
            assert isinstance(o, outcome.Value) and o.value == x * x
    distinct = {tuple(c) for c in calls}
    assert len(distinct) <= _split_calls_bound(n, len(poison))  # retries aside, the same parts


async def test_without_retry_a_busy_half_fails_its_good_items_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[list[int]] = []
    # The first part (the whole batch) is refused for its poison item; the second part
    # (0-3, all good) meets a 503 once.
    service = flaky_service({5}, [0, 1, 0, 0, 0, 0, 0, 0], calls)
    outcomes = await call_batch(service, list(range(8)), split=True, split_on=is_poisoned)
    errors = [type(o.error) for o in outcomes if isinstance(o, outcome.Error)]
    assert errors == [Busy] * 4 + [Poisoned]  # four good items given up with the 503
    calls.clear()
    service = flaky_service({5}, [0, 1, 0, 0, 0, 0, 0, 0], calls)
    outcomes = await call_batch(service, list(range(8)), split=True, split_on=is_poisoned,
                                retry=Retry(attempts=2, backoff=None, retry_on=Busy))
    errors = [type(o.error) for o in outcomes if isinstance(o, outcome.Error)]
    assert errors == [Poisoned]
    assert calls[:3] == [list(range(8)), [0, 1, 2, 3], [0, 1, 2, 3]]  # the retry, at once


async def test_retry_waits_the_policys_delay_and_the_errors_hint(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []

    async def busy_twice(items: list[int]) -> list[int]:
        starts.append(trio.current_time())
        if len(starts) == 1:
            raise Busy("first")
        if len(starts) == 2:
            raise conveyor.RetryAfter(2.5, "second: Retry-After 2.5")
        return items

    retry = Retry(attempts=3, backoff=Backoff(initial=0.25, jitter=None))
    outcomes = await call_batch(busy_twice, [1, 2], split=False, retry=retry)
    assert values(outcomes) == [1, 2]
    assert starts == [0.0, 0.25, 2.75]


async def test_retries_run_out_then_the_items_fail_with_the_last_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[list[int]] = []

    def always_busy(items: list[int]) -> list[int]:
        calls.append(items)
        raise Busy(len(calls))

    outcomes = await call_batch(always_busy, [1, 2, 3, 4], split=True, split_on=is_poisoned,
                                retry=Retry(attempts=3, backoff=None))
    assert len(calls) == 3  # attempts of the whole batch; Busy does not split
    assert [str(o.error) for o in outcomes if isinstance(o, outcome.Error)] == ["3"] * 4
    # Not retryable (retryable = False) or rejected by retry_on: no second attempt.
    calls.clear()
    outcomes = await call_batch(always_busy, [1], split=False,
                                retry=Retry(attempts=3, retry_on=KeyError))
    assert len(calls) == 1


async def test_retry_must_be_a_retry_policy() -> None:
    with pytest.raises(TypeError, match=r"retry must be a conveyor.Retry or None, got 3"):
        await call_batch(doubled, [1], split=False, retry=3)  # type: ignore[arg-type]
    # The fix the message names.
    assert values(await call_batch(doubled, [1], split=False, retry=Retry())) == [2]


# ---------------------------------------------------------------------------------------------
# Exact timing under any schedule: collect and Collector against a model


def model_batches(arrivals: list[int], size: int, wait: float, close: float, busy: float,
                  collector: bool) -> list[tuple[float, list[int]]]:
    """When each batch goes (ms), for a consumer that asks for the next batch ``busy`` ms
    after it got one. A batch ends when its size-th item is there, at its deadline, or when
    the input closes with nothing more to come, whichever is first (but not before it is
    asked for). Its deadline is ``wait`` after its start: for ``collect``, the moment it
    took the first item (the item's arrival, or the call if the item was waiting); for a
    ``Collector``, the first item's put, or the previous take if the item was left over
    from it. Arrivals are whole ms, other times are not: nothing ties."""
    out: list[tuple[float, list[int]]] = []
    i, asked, last_take, n = 0, 0.0, -1.0, len(arrivals)
    while i < n:
        if collector:
            start = arrivals[i] if arrivals[i] > last_take else last_take
        else:
            start = max(arrivals[i], asked)
        deadline = start + wait
        until = max(deadline, asked)  # a deadline already past: it goes when asked
        j = i
        while j < n and j - i < size and arrivals[j] <= until:
            j += 1
        if j - i == size:
            end = max(asked, arrivals[j - 1])
        elif j == n and close < until:
            end = max(asked, close)
        else:
            end = until
        out.append((end, list(range(i, j))))
        i, last_take, asked = j, end, end + busy
    return out


@settings(max_examples=400, deadline=None)
@given(
    gaps=st.lists(st.integers(0, 20), min_size=1, max_size=60),
    size=st.integers(1, 10),
    wait=st.integers(0, 50),
    busy=st.integers(0, 30),
    linger=st.integers(0, 60),
    use_collector=st.booleans(),
)
def test_batches_go_exactly_when_full_or_max_wait_after_their_first_item(
    gaps: list[int], size: int, wait: int, busy: int, linger: int, use_collector: bool
) -> None:
    arrivals = list(itertools.accumulate(gaps))
    close = arrivals[-1] + linger + 0.25
    max_wait, busy_ms = wait + 0.4321, (busy + 0.1234) if busy else 0.0
    expected = model_batches(arrivals, size, max_wait, close, busy_ms, use_collector)

    async def main() -> list[tuple[float, list[int]]]:
        schedule = [(at / 1000, i) for i, at in enumerate(arrivals)]
        got: list[tuple[float, list[int]]] = []
        async with trio.open_nursery() as nursery:
            if use_collector:
                collector: Collector[int] = Collector(size, max_wait / 1000)
                nursery.start_soon(put_at, collector, schedule, close / 1000)
                while batch := await collector.take():
                    got.append((trio.current_time() * 1000, batch))
                    await trio.sleep(busy_ms / 1000)
            else:
                send, receive = channel()
                nursery.start_soon(send_at, send, schedule, close / 1000)
                while batch := await collect(receive, size, max_wait / 1000):
                    got.append((trio.current_time() * 1000, batch))
                    await trio.sleep(busy_ms / 1000)
        return got

    got = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [b for _, b in got] == [b for _, b in expected]
    assert [t for t, _ in got] == pytest.approx([t for t, _ in expected], abs=1e-6)
