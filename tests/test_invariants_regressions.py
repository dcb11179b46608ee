"""Minimal regressions for the failures the wide hypothesis scenario found (issue 9, C).

Each test is one failure of tests/test_invariants.py's wide scenario, shrunk by hand to a
plain pytest-trio test on the virtual clock, and names the issue-9 item it belongs to. The
ones that fail on today's pool are marked ``xfail(strict=True)``: when a fix lands they start
failing (XPASS), so whoever fixes it removes the mark.

Some failures depend on the order in which trio runs the tasks of one scheduling batch (two
things happen at the same virtual instant, and trio shuffles the batch). Those tests repeat
their scenario (``TRIALS`` fresh pools, each its own trial) so that a bug which shows in half
of the orders fails the test every time, not one run in two.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

import conveyor
from conveyor import Failed, Retry, Succeeded, Unfinished

TRIALS = 20


def items_of(records: list[Any], report: conveyor.Report) -> list[Any]:
    """Every item with a record: streamed successes and the report's records."""
    streamed_ok = [r for r in records if isinstance(r, Succeeded)]
    return sorted(
        r.item for r in streamed_ok + report.succeeded + report.failed + report.unfinished
    )


def ledger_ok(report: conveyor.Report) -> bool:
    s = report.stats
    return s.submitted == s.succeeded + s.failed + s.unfinished


# -------------------------------------------------------------------- A1: taken and lost


async def test_a1_ordered_map_left_early_settles_every_item_it_took(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def trial() -> None:
        taken: list[int] = []

        def source() -> Any:
            for i in range(2):
                taken.append(i)
                yield i

        async def fn(i: int) -> int:
            return i

        stream = conveyor.map(fn, source(), ordered=True, workers=1, buffer=0)
        got: list[Any] = []
        async with stream as records:
            async for record in records:
                got.append(record)
                break
        report = stream.report()
        assert items_of(got, report) == sorted(taken), (got, report, taken)
        assert report.stats.submitted == len(taken) and ledger_ok(report)
        assert all(u.last_error is None for u in report.unfinished)

    for _ in range(TRIALS):  # the item is lost in most orders of one scheduling batch
        await trial()


async def test_a1_async_source_item_taken_as_the_pool_stops_is_unfinished(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The source's next item is ready (its wait ended) in the same moment the pool is told
    # to stop: the caller leaves its loop right after waking the source.
    ready = trio.Event()
    taken: list[int] = []

    async def source() -> AsyncIterator[int]:
        taken.append(0)
        yield 0
        await ready.wait()
        taken.append(1)
        yield 1

    async def fn(i: int) -> int:
        return i

    stream = conveyor.map(fn, source(), workers=1, buffer=0)
    got: list[Any] = []
    async with stream as records:
        async for record in records:
            got.append(record)
            ready.set()
            break
    report = stream.report()
    assert items_of(got, report) == taken  # before the fix: taken [0, 1], records of [0]
    assert report.stats.submitted == len(taken) and ledger_ok(report)
    if taken == [0, 1]:  # the source was resumed before the stop reached it
        assert report.unfinished == [Unfinished(1, attempts=0, last_error=None)]


async def test_a1_async_source_item_taken_as_an_outside_cancel_lands_is_unfinished(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Found by the wide scenario (map_with, async source, deadline at 0): the feeder takes
    # item 0, the cancel closes intake, and the item is in no record.
    taken: list[int] = []

    async def source() -> AsyncIterator[int]:
        for i in range(3):
            taken.append(i)
            yield i

    async def fn(i: int) -> int:
        return i

    stream = conveyor.map(fn, source(), workers=1, buffer=0)
    got: list[Any] = []
    with trio.move_on_after(0):
        async with stream as records:
            async for record in records:
                got.append(record)
    report = stream.report()
    assert taken, "the source was asked for an item"
    assert items_of(got, report) == taken, (got, report, taken)
    assert report.stats.submitted == len(taken) and ledger_ok(report)


async def test_a1_bare_ordered_map_keeps_every_record_when_the_source_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Found by the wide scenario (async source raising after its last item, bare ordered
    # map): item 1 settles while item 0 still runs, so it waits for its turn; the source's
    # error ends the pool, the host task of the bare form takes item 1's record from the
    # ordered reader and is cancelled while handing it to the caller. The record is in no
    # list: neither yielded nor in report().
    class SourceError(Exception):
        pass

    raised = SourceError()

    async def source() -> AsyncIterator[int]:
        yield 0
        yield 1
        raise raised

    async def fn(i: int) -> int:
        if i == 0:
            await trio.sleep(1)
        return i

    stream = conveyor.map(fn, source(), ordered=True, workers=2, buffer=0)
    got: list[Any] = []
    with pytest.raises(SourceError) as caught:
        async for record in stream:
            got.append(record)
    assert caught.value is raised
    report = stream.report()
    assert items_of(got, report) == [0, 1], (got, report)
    assert ledger_ok(report)


# ------------------------------------------------------- A2: an attempt after the cancel


async def test_a2_no_attempt_starts_once_the_deadline_fires_as_an_attempt_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def trial() -> None:
        starts: list[tuple[int, float]] = []

        async def fn(i: int) -> int:
            starts.append((i, trio.current_time()))
            await trio.sleep(1)
            return i

        deadline = trio.current_time() + 1  # item 0's attempt ends at this very instant
        with trio.move_on_at(deadline):
            async with conveyor.open_pool(fn, workers=1, buffer=4, drain=10) as pool:
                for i in range(3):
                    await pool.submit(i)
        late = [s for s in starts if s[1] >= deadline]
        assert not late, late
        report = pool.report()
        assert [r.item for r in report.succeeded] == [0]  # drain: it finished
        assert [u.item for u in report.unfinished] == [1, 2]

    for _ in range(TRIALS):
        await trial()


async def test_a2_pool_opened_in_a_cancelled_scope_calls_fn_zero_times(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def trial() -> None:
        calls: list[int] = []

        async def fn(i: int) -> int:
            calls.append(i)
            return i

        with trio.CancelScope() as scope:
            scope.cancel()
            await conveyor.run(fn, range(3), workers=2)
        assert calls == []

    for _ in range(TRIALS):
        await trial()


async def test_a2_no_attempt_starts_after_the_callers_scope_is_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Deterministic form: the cancel is delivered by the attempt of item 0 itself ("the first
    # answer is enough"); the worker, finding item 1 queued, must not start it.
    calls: list[int] = []
    accepted: list[int] = []
    with trio.CancelScope() as scope:
        fn = first_answer_cancels(calls, scope)
        async with conveyor.open_pool(fn, workers=1, buffer=4) as pool:
            for i in range(3):
                await pool.submit(i)
                accepted.append(i)
    assert calls == [0]
    report = pool.report()
    assert [r.item for r in report.succeeded] == [0]
    assert [u.item for u in report.unfinished] == accepted[1:]


def first_answer_cancels(
    calls: list[int], scope: trio.CancelScope
) -> Callable[[int], Awaitable[int]]:
    async def fn(i: int) -> int:
        calls.append(i)
        scope.cancel()
        return i

    return fn


# ------------------------------------------------------- A3: the bare map form left early


async def live_tasks() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(t) for n in task.child_nurseries for t in n.child_tasks)

    return count(trio.lowlevel.current_root_task())


@pytest.mark.parametrize("leave", ["break", "raise"])
async def test_a3_leaving_a_bare_map_loop_starts_no_attempt_and_ends_the_pool(
    autojump_clock: trio.testing.MockClock, leave: str
) -> None:
    class Leave(Exception):
        pass

    calls: list[int] = []

    async def fn(i: int) -> int:
        calls.append(i)
        return i

    before = await live_tasks()
    stream = conveyor.map(fn, range(3), workers=1, buffer=0)
    try:
        async for _record in stream:
            if leave == "break":
                break
            raise Leave
    except Leave:
        pass
    left_after = len(calls)
    await trio.sleep(100)  # the virtual clock runs on: a pool left behind shows here
    assert len(calls) == left_after, calls
    assert await live_tasks() == before
    report = stream.report()
    assert report.stats.submitted == report.stats.succeeded + report.stats.unfinished


# ------------------------------------------------------------- A4, A5, A7: user callbacks


class PredicateError(Exception):
    pass


async def test_a4_a_raising_retry_on_predicate_fails_that_item_and_the_run_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def retry_on(error: Exception) -> bool:
        raise PredicateError("predicate bug")

    async def fn(i: int) -> int:
        if i == 0:
            raise ValueError(i)
        return i

    report = await conveyor.run(fn, range(3), retry=Retry(attempts=3, retry_on=retry_on))
    assert [r.item for r in report.succeeded] == [1, 2]
    [failed] = report.failed
    assert failed.item == 0 and failed.attempts == 1
    assert ledger_ok(report)


async def test_a5_overload_on_sees_no_cancelled_and_a_cancel_leaves_items_unfinished(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[BaseException] = []

    def overload_on(error: BaseException) -> bool:
        seen.append(error)
        return error.status == 429  # type: ignore[attr-defined]

    async def fn(i: int) -> int:
        await trio.sleep(10)
        return i

    adaptive = conveyor.Adaptive(overload_on=overload_on, min=4, max=4)
    with trio.move_on_after(1):
        async with conveyor.open_pool(fn, workers=4, adaptive=adaptive, drain=0) as pool:
            for i in range(4):
                await pool.submit(i)
    report = pool.report()
    assert not seen
    assert report.failed == []
    assert sorted(u.item for u in report.unfinished) == [0, 1, 2, 3]


async def test_a5_a_raising_overload_on_never_changes_an_items_record(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def overload_on(error: BaseException) -> bool:
        raise PredicateError("predicate bug")

    async def fn(i: int) -> int:
        if i == 0:
            raise RuntimeError("flaky")
        return i

    adaptive = conveyor.Adaptive(overload_on=overload_on, max=4)
    report = await conveyor.run(
        fn, range(3), adaptive=adaptive, retry=Retry(attempts=2, backoff=None)
    )
    [failed] = report.failed
    assert isinstance(failed.error, RuntimeError) and failed.attempts == 2
    assert [r.item for r in report.succeeded] == [1, 2]


async def test_a7_a_raising_key_function_fails_the_item_at_once_with_zero_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class KeyFnError(Exception):
        pass

    def key(i: int) -> int:
        if i == 0:
            raise KeyFnError(i)
        return i

    calls: list[int] = []

    async def fn(i: int) -> int:
        calls.append(i)
        return i

    report = await conveyor.run(
        fn, range(2), per_key=conveyor.PerKey(key, limit=1), retry=Retry(attempts=3)
    )
    [failed] = report.failed
    assert isinstance(failed, Failed) and isinstance(failed.error, KeyFnError)
    assert failed.attempts == 0
    assert calls == [1] and report.stats.attempts == 1


async def test_a3_a_cancelled_bare_map_loop_loses_no_record(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Found by the wide scenario (cancel_from_fn, bare map, one item): the record is counted
    # in stats.succeeded but is neither yielded nor in report(). Deterministic when fn itself
    # cancels the caller's scope; with a move_on_after that fires as the attempt ends, it is
    # lost in about half of the scheduling orders (the trials below).
    got: list[Any] = []
    with trio.CancelScope() as scope:

        async def fn(i: int) -> int:
            scope.cancel()  # "the first answer is enough"
            return i

        stream = conveyor.map(fn, range(1), workers=1, buffer=0)
        async for record in stream:
            got.append(record)
    report = stream.report()
    assert report.stats.succeeded == 1
    assert items_of(got, report) == [0], (got, report)

    async def trial() -> None:
        async def fn(i: int) -> int:
            await trio.sleep(1)
            return i

        stream = conveyor.map(fn, range(1), workers=1, buffer=0)
        got: list[Any] = []
        with trio.move_on_after(1):
            async for record in stream:
                got.append(record)
        report = stream.report()
        assert items_of(got, report) == [0], (got, report)
        assert ledger_ok(report)

    for _ in range(TRIALS):
        await trial()


async def test_a2_bare_map_starts_no_attempt_after_an_outside_cancel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Found by the wide scenario after the A2 fix (which holds for the structured forms):
    # the bare form's pool runs in a system task outside the caller's scope, so it learns
    # of the cancel only when the caller's task next runs. Deterministic when fn itself
    # cancels the caller's scope (fn never awaits: every queued item starts).
    calls: list[int] = []
    with trio.CancelScope() as scope:
        fn = first_answer_cancels(calls, scope)
        async for _record in conveyor.map(fn, range(3), workers=1, buffer=2):
            pass
    assert calls == [0]

    # A deadline at the instant two attempts end: a queued item starts in about half of
    # the scheduling orders.
    async def trial() -> None:
        starts: list[tuple[int, float]] = []

        async def fn(i: int) -> int:
            starts.append((i, trio.current_time()))
            await trio.sleep([2, 2, 0][i])
            return i

        deadline = trio.current_time() + 2
        with trio.move_on_at(deadline):
            async for _record in conveyor.map(fn, range(3), workers=2, buffer=1):
                pass
        late = [s for s in starts if s[1] >= deadline]
        assert not late, late

    for _ in range(TRIALS):
        await trial()


# ------------------------------------------------- the source's error, raised as it was


class SourceError(Exception):
    pass


@pytest.mark.parametrize("form", ["run", "map_with", "map"])
async def test_a_source_error_raised_as_the_scope_is_cancelled_comes_out_as_raised(
    autojump_clock: trio.testing.MockClock, form: str
) -> None:
    # Found by the wide scenario (async source raising at once, a cancel at 0.0 from another
    # task). The source's error is the caller's own: a cancel must not swallow it. Made
    # deterministic here by the source cancelling the scope itself just before it raises.
    raised = SourceError()

    async def fn(i: int) -> int:
        return i

    with pytest.raises(SourceError) as caught:
        with trio.CancelScope() as scope:

            async def source() -> AsyncIterator[int]:
                scope.cancel()
                raise raised
                yield 0  # an async generator

            if form == "run":
                await conveyor.run(fn, source())
            elif form == "map_with":
                async with conveyor.map(fn, source()) as records:
                    async for _record in records:
                        pass
            else:
                async for _record in conveyor.map(fn, source()):
                    pass
    assert caught.value is raised


async def test_a5_a_raising_overload_on_releases_every_other_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Found by the wide scenario (everything drawn: adaptive with a raising predicate, per_key,
    # a cancel): after the pool, the PerKey still holds a key.
    def overload_on(error: BaseException) -> bool:
        raise PredicateError("predicate bug")

    async def fn(i: int) -> int:
        raise RuntimeError("flaky")

    per_key = conveyor.PerKey(lambda i: i, limit=1)
    limiter = trio.CapacityLimiter(2)
    report = await conveyor.run(
        fn, range(2), per_key=per_key, limiter=limiter,
        adaptive=conveyor.Adaptive(overload_on=overload_on, max=4), retry=None,
    )
    assert ledger_ok(report)
    assert per_key.keys == 0 and per_key.parked == 0
    assert limiter.borrowed_tokens == 0
