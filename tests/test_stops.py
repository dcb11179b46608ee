"""Issue 9: nothing lost, every stop honoured, the caller's errors as raised.

Each test here failed before its fix. Races are made deterministic on trio's MockClock
(``autojump_clock``): an attempt that ends at the very instant a deadline fires, a source
whose ``__anext__`` lets the pool's tasks run (a shielded checkpoint) before it returns.
Where the old failure depended on trio's shuffling of a scheduling batch, the test repeats
the scenario so that the old behaviour could not pass by luck.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

import conveyor
from conveyor import Retry, Succeeded, Unfinished

from .test_pool import Counting

# ---------------------------------------------------------------- A1: an item taken is kept


class StopsWhileTaking:
    """An async source whose 4th ``__anext__`` stops the pool while it is taking the item.

    It cancels the caller's scope, lets every other task run (the pool's stop closes
    intake meanwhile), and then returns the item anyway: the I/O that produced it had
    completed. That item was taken from the source, so it must be in the ledger.
    """

    def __init__(self, scope: trio.CancelScope, n: int = 10) -> None:
        self.scope = scope
        self.n = n
        self.taken: list[int] = []

    def __aiter__(self) -> StopsWhileTaking:
        return self

    async def __anext__(self) -> int:
        i = len(self.taken)
        if i >= self.n:
            raise StopAsyncIteration
        if i == 3:
            self.scope.cancel()
            with trio.CancelScope(shield=True):
                for _ in range(5):
                    await trio.lowlevel.checkpoint()
        self.taken.append(i)
        return i


async def slow(i: int) -> int:
    await trio.sleep(1)
    return i


@pytest.mark.parametrize("form", ["map", "ordered"])
async def test_an_item_taken_from_an_async_source_at_stop_is_unfinished(
    autojump_clock: trio.testing.MockClock, form: str
) -> None:
    with trio.CancelScope() as scope:
        source = StopsWhileTaking(scope)
        stream = conveyor.map(slow, source, workers=2, ordered=form == "ordered")
        async with stream as records:
            async for _ in records:
                pass
    report = stream.report()
    assert source.taken == [0, 1, 2, 3]
    assert report.stats.submitted == 4
    assert sorted(r.item for r in report.unfinished) == [0, 1, 2, 3]
    [third] = [r for r in report.unfinished if r.item == 3]
    assert third == Unfinished(3, attempts=0, last_error=None)


async def test_leaving_an_ordered_map_early_loses_no_taken_item(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # An ordered map feeds any input through an async generator: the item it takes
    # during the stop must be accounted for too. Many break points, since it is a race.
    for stop_after in range(1, 40):
        items = Counting(200)
        stream = conveyor.map(slow, items, workers=3, buffer=2, ordered=True)
        seen = []
        async with stream as records:
            async for record in records:
                seen.append(record)
                if len(seen) == stop_after:
                    break
        report = stream.report()
        settled = [r.item for r in seen + report.succeeded + report.failed + report.unfinished]
        assert sorted(settled) == list(range(items.pulled)), stop_after
        assert report.stats.submitted == items.pulled


# ---------------------------------------------------------------- A2: no start after a cancel


@pytest.mark.parametrize("drain", [0.0, 10.0])
async def test_no_queued_item_starts_once_an_outside_cancel_is_delivered(
    autojump_clock: trio.testing.MockClock, drain: float
) -> None:
    # The first attempt ends at t=1, the very instant the deadline fires: the worker
    # that settles it must not start the next item (trio runs the two in one batch, in
    # a random order; before the fix about half the runs started item 1).
    started: list[int] = []

    async def fn(i: int) -> int:
        started.append(i)
        await trio.sleep(1)
        return i

    for _ in range(30):
        started.clear()

        with trio.move_on_after(1):
            async with conveyor.open_pool(fn, workers=1, drain=drain) as pool:
                for i in range(5):
                    pool.submit_nowait(i)
                pool.close()
                async for _ in pool.results():
                    pass
        assert started == [0]
        report = pool.report()
        if drain:  # the attempt running at the cancel finishes within the grace
            assert [r.item for r in report.succeeded] == [0]
            assert [r.item for r in report.unfinished] == [1, 2, 3, 4]
        else:  # it may end at that instant, or be cancelled
            assert [r.item for r in report.succeeded + report.unfinished] in (
                [0, 1, 2, 3, 4], [1, 2, 3, 4, 0]
            )
        assert [r.attempts for r in report.unfinished if r.item != 0] == [0, 0, 0, 0]


async def test_run_cancelled_as_an_attempt_ends_starts_nothing_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    started: list[int] = []

    async def fn(i: int) -> int:
        started.append(i)
        await trio.sleep(1)
        return i

    for _ in range(30):
        started.clear()

        with trio.move_on_after(1):
            await conveyor.run(fn, range(5), workers=1, drain=10)
        assert started == [0]


@pytest.mark.parametrize("form", ["run", "map", "map_bare", "open_pool"])
async def test_a_pool_opened_in_a_cancelled_scope_calls_fn_zero_times(
    autojump_clock: trio.testing.MockClock, form: str
) -> None:
    calls: list[int] = []

    async def fn(i: int) -> int:
        calls.append(i)
        return i

    with trio.CancelScope() as scope:
        scope.cancel()
        if form == "run":
            await conveyor.run(fn, range(5), drain=10)
        elif form == "map":
            async with conveyor.map(fn, range(5), drain=10) as records:
                async for _ in records:
                    pass
        elif form == "map_bare":
            async for _ in conveyor.map(fn, range(5), drain=10):
                pass
        else:
            async with conveyor.open_pool(fn, drain=10) as pool:
                pool.submit_nowait(1)
    assert scope.cancelled_caught
    await trio.sleep(10)
    assert calls == []


# ---------------------------------------------------------------- A3: leaving a bare map loop


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("how", ["break", "raise"])
async def test_leaving_a_bare_map_loop_stops_the_pool(
    autojump_clock: trio.testing.MockClock, ordered: bool, how: str
) -> None:
    calls = 0

    async def fn(i: int) -> int:
        nonlocal calls
        calls += 1
        await trio.sleep(1)
        return i

    tasks_before = trio.lowlevel.current_statistics().tasks_living
    stream = conveyor.map(fn, range(100_000), workers=10, ordered=ordered)
    calls_at_exit = -1
    with pytest.raises(ZeroDivisionError) if how == "raise" else _nothing():
        async for record in stream:
            if record.item >= 5:
                calls_at_exit = calls
                if how == "raise":
                    1 / 0  # noqa: B018
                break
    await trio.sleep(100)
    assert calls == calls_at_exit  # no fn call after the loop was left
    assert trio.lowlevel.current_statistics().tasks_living == tasks_before
    stats = stream.report().stats
    assert stats.in_flight == 0
    assert stats.submitted == stats.succeeded + stats.failed + stats.unfinished


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def test_a_bare_map_loop_run_to_the_end_reports_everything(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = conveyor.map(slow, range(50), workers=7, ordered=True)
    records = [r async for r in stream]
    assert [r.item for r in records] == list(range(50))
    assert stream.report().stats.succeeded == 50


async def test_a_bare_map_loop_cancelled_while_waiting_stops_the_pool_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def fn(i: int) -> int:
        nonlocal calls
        calls += 1
        await trio.sleep(1)
        return i

    stream = conveyor.map(fn, range(1000), workers=4)
    with trio.move_on_after(2.5):
        async for _ in stream:
            pass
    # the pool has ended by the time the cancel propagates out of the loop
    stats = stream.report().stats
    assert stats.in_flight == 0 and calls == 12
    assert stats.submitted == stats.succeeded + stats.unfinished


# ---------------------------------------------------------------- A8: a forgotten await


async def test_a_task_that_returns_a_coroutine_fails_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def work(n: int) -> int:
        return n

    async def forgot(n: int) -> Any:
        return work(n)  # missing await

    report = await conveyor.run(forgot, range(3), retry=Retry(attempts=3, backoff=None))
    assert not report.succeeded and len(report.failed) == 3
    for failed in report.failed:
        assert isinstance(failed.error, TypeError) and failed.attempts == 1
        assert "without awaiting it" in str(failed.error)
        assert "`return await" in str(failed.error) and "work(...)`" in str(failed.error)
    # (no "coroutine was never awaited" RuntimeWarning: pytest turns warnings into errors)


# ---------------------------------------------------------------- A9: errors as raised


def _raised() -> list[BaseException]:
    return [
        ValueError("plain"),
        ExceptionGroup("mine", [ValueError(1), KeyError(2)]),
        ExceptionGroup("outer", [ExceptionGroup("inner", [ValueError(3)])]),
        ExceptionGroup("one", [ValueError(4)]),
        BaseExceptionGroup("base", [KeyboardInterrupt()]),
        KeyboardInterrupt(),
    ]


@pytest.mark.parametrize("index", range(len(_raised())))
async def test_the_callers_exception_propagates_as_the_object_raised(
    autojump_clock: trio.testing.MockClock, index: int
) -> None:
    raised = _raised()[index]
    with pytest.raises(BaseException) as caught:
        async with conveyor.open_pool(slow) as pool:
            await pool.submit(1)
            await trio.sleep(0.5)
            raise raised
    assert caught.value is raised
    assert pool.report().unfinished == [Unfinished(1, 1, None)]


@pytest.mark.parametrize("index", range(len(_raised()) - 2))
async def test_the_callers_exception_in_a_map_block_propagates_as_raised(
    autojump_clock: trio.testing.MockClock, index: int
) -> None:
    raised = _raised()[index]
    with pytest.raises(BaseException) as caught:
        async with conveyor.map(slow, range(10)) as records:
            async for _ in records:
                raise raised
    assert caught.value is raised


async def test_an_error_from_items_is_raised_bare_after_the_pool_settled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    error = ExceptionGroup("from the source", [OSError("disk")])

    async def source() -> AsyncIterator[int]:
        for i in range(5):
            yield i
        await trio.sleep(0.5)
        raise error

    stream = conveyor.map(slow, source(), workers=2)
    seen = []
    with pytest.raises(ExceptionGroup) as caught:
        async with stream as records:
            async for record in records:
                seen.append(record)
    assert caught.value is error
    report = stream.report()
    assert report.stats.submitted == 5
    settled = sorted(r.item for r in seen + report.failed + report.unfinished)
    assert settled == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- A10: retries go first


async def test_a_due_retry_runs_before_the_queued_items(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: dict[int, list[float]] = {}

    async def fn(i: int) -> int:
        starts.setdefault(i, []).append(trio.current_time())
        await trio.sleep(0.01)
        if i == 0 and len(starts[0]) == 1:
            raise RuntimeError("once")
        return i

    await conveyor.run(fn, range(100), workers=1, retry=Retry(attempts=2, backoff=None))
    assert starts[0] == [0.0, pytest.approx(0.01)]  # at once, not after the 99 others
    assert starts[1] == [pytest.approx(0.02)]


async def test_a_retry_due_after_its_backoff_goes_ahead_of_the_backlog(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: dict[int, list[float]] = {}

    async def fn(i: int) -> int:
        starts.setdefault(i, []).append(trio.current_time())
        await trio.sleep(0.01)
        if i == 0 and len(starts[0]) == 1:
            raise conveyor.RetryAfter(0.1)
        return i

    await conveyor.run(fn, range(100), workers=1, retry=Retry(attempts=2))
    # due at 0.11; the attempt running then ends at 0.12, and the retry is next
    assert starts[0] == [0.0, pytest.approx(0.12)]


# ---------------------------------------------------------------- B: bad input at the call


@pytest.mark.parametrize(
    ("drain", "error"),
    [(math.nan, (TypeError, ValueError)), ("5", TypeError), (-1, ValueError),
     (True, TypeError)],
)
async def test_stop_checks_drain(
    autojump_clock: trio.testing.MockClock, drain: Any, error: Any
) -> None:
    async with conveyor.open_pool(slow) as pool:
        await pool.submit(1)
        with pytest.raises(error, match="drain"):
            pool.stop(drain=drain)
        pool.stop(drain=0.5)  # the fix the message suggests: a number of seconds >= 0
    assert pool.report().stats.unfinished == 1


async def test_entering_one_open_pool_twice_says_a_pool_runs_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cm = conveyor.open_pool(slow)
    async with cm:
        pass
    with pytest.raises(RuntimeError, match="a pool runs once"):
        async with cm:
            pass
    async with conveyor.open_pool(slow) as pool:  # the fix: open a new one
        await pool.submit(1)
    assert pool.report().stats.succeeded == 1


async def test_workers_far_more_than_items_starts_one_task_per_item(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peak = 0

    async def fn(i: int) -> int:
        nonlocal peak
        peak = max(peak, trio.lowlevel.current_statistics().tasks_living)
        await trio.sleep(1)
        return i

    before = trio.lowlevel.current_statistics().tasks_living
    report = await conveyor.run(fn, range(10), workers=10**30)
    assert report.stats.succeeded == 10 and trio.current_time() == 1
    assert peak - before <= 10 + 5  # ten workers, the scheduler, the feeder, the watcher...


async def test_lazy_workers_still_run_workers_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with conveyor.open_pool(slow, workers=4) as pool:
        for i in range(8):
            await pool.submit(i)
    assert trio.current_time() == 2
    assert pool.report().stats.succeeded == 8


async def test_wait_stats_checks_its_predicate(autojump_clock: trio.testing.MockClock) -> None:
    async def pred(stats: conveyor.Stats) -> bool:
        return True

    async with conveyor.open_pool(slow) as pool:
        with pytest.raises(TypeError, match="predicate"):
            await pool.wait_stats(pred)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="predicate"):
            await pool.wait_stats(3)  # type: ignore[arg-type]
        await pool.submit(1)
        stats = await pool.wait_stats(lambda s: s.succeeded == 1)
    assert stats.succeeded == 1


async def test_records_are_unchanged_by_the_reader_class(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with conveyor.open_pool(slow, workers=3) as pool:
        for i in range(6):
            await pool.submit(i)
        pool.close()
        got = [r async for r in pool.results()]
    assert sorted(r.item for r in got) == list(range(6))
    assert all(isinstance(r, Succeeded) for r in got)


@pytest.mark.parametrize("items", ["abc", b"abc", bytearray(b"ab")])
async def test_a_string_as_items_is_refused_with_a_fix_that_works(
    autojump_clock: trio.testing.MockClock, items: Any
) -> None:
    for call in (
        lambda: conveyor.run(slow, items),
        lambda: conveyor.map(slow, items),
    ):
        with pytest.raises(TypeError, match=r"^items=.* is not valid: expected an iterable of "
                           r"items, not a \w+, which would be processed one character at a "
                           r"time; e\.g\. items=\[.*\] \(a single item\)$"):
            await _maybe(call())
    report = await conveyor.run(slow, [items])  # the suggested fix
    assert report.values() == [items]


async def _maybe(value: Any) -> Any:
    if hasattr(value, "__await__"):
        return await value
    return value


# ------------------------------------------------ fn: any awaitable-returning callable


async def fetch(client: dict[str, int], n: int) -> int:
    await trio.sleep(1)
    return client["base"] + n


class AsyncCallable:
    async def __call__(self, n: int) -> int:
        await trio.sleep(1)
        return n


@pytest.mark.parametrize("kind", ["lambda", "partial", "async __call__"])
async def test_any_callable_returning_an_awaitable_is_a_task(
    autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    import functools

    client = {"base": 100}
    fn: Any = {
        "lambda": lambda n: fetch(client, n),
        "partial": functools.partial(fetch, client),
        "async __call__": AsyncCallable(),
    }[kind]
    base = 0 if kind == "async __call__" else 100
    report = await conveyor.run(fn, range(3))
    assert sorted(report.values()) == [base, base + 1, base + 2]
    async with conveyor.map(fn, range(3)) as records:
        assert sorted([r.unwrap() async for r in records]) == [base, base + 1, base + 2]


def double(n: int) -> int:
    return 2 * n


async def test_a_sync_callable_fails_its_items_not_retried_with_advice_that_works(
    autojump_clock: trio.testing.MockClock,
) -> None:
    report = await conveyor.run(double, range(3), retry=Retry(attempts=5, backoff=None))
    assert not report.succeeded and [f.attempts for f in report.failed] == [1, 1, 1]
    message = str(report.failed[0].error)
    assert isinstance(report.failed[0].error, TypeError)
    assert "returned int 0, not an awaitable" in message
    assert "conveyor.in_thread(double)" in message
    # the advice, followed
    report = await conveyor.run(conveyor.in_thread(double), range(3))
    assert sorted(report.values()) == [0, 2, 4]


# ------------------------------------------------ a retryable error during the drain


async def test_an_attempt_failing_during_the_drain_is_unfinished_with_its_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def fn(i: int) -> int:
        await trio.sleep(2)
        raise OSError(f"down {i}")

    with trio.move_on_after(1):
        async with conveyor.open_pool(fn, workers=2, drain=5, retry=Retry(attempts=3)) as pool:
            await pool.submit(1)
            await pool.submit(2)
    report = pool.report()
    assert not report.failed
    assert [(r.item, r.attempts, type(r.last_error)) for r in report.unfinished] == [
        (1, 1, OSError), (2, 1, OSError)
    ]
    assert report.stats.retried == 0


# ---------------------------------------------------------------- A11: the README's three ways in


async def test_the_three_ways_in_snippet_keeps_its_stats_identity(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with conveyor.open_pool(slow, workers=10) as pool:
        for item in range(1000):
            await pool.submit(item)
        pool.close()
        read = [record async for record in pool.results()]
    report = pool.report()
    stats = report.stats
    assert len(read) == 1000 and report.succeeded == []  # what was read is not kept
    assert stats.submitted == stats.succeeded + stats.failed + stats.unfinished == 1000
