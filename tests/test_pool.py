"""The pool end to end (contract layer): run, map, open_pool under trio's MockClock.

Time is virtual (pytest-trio's ``autojump_clock``): every duration asserted here is exact.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from typing import Any

import pytest
import trio
import trio.testing

import conveyor
from conveyor import Backoff, Failed, Retry, RetryAfter, Succeeded, Unfinished


def seeded_failure(n: int, attempt: int, rate: float = 0.1) -> bool:
    """Seed 000's 10 % random failure, decided per (item, attempt) by a seeded RNG.

    Seeding per (item, attempt) makes the schedule independent of the order in which
    trio happens to run the workers (trio shuffles each scheduling batch).
    """
    return random.Random(f"seed000:{n}:{attempt}").random() < rate


def simulate_seed000(n_items: int, workers: int, attempts: int) -> tuple[int, dict[int, int]]:
    """The schedule conveyor follows, computed by hand: (rounds of 1 s, attempts per item).

    All attempts last 1 s, so workers free up together at each whole second. Items wait in
    the channel in order; an attempt that fails with backoff None is due at once and goes
    ahead of the items still queued (the seed's asyncio queue puts it behind them), so it
    runs in the next round.
    """
    queue: deque[tuple[int, int]] = deque((n, 1) for n in range(n_items))
    tries: dict[int, int] = {}
    rounds = 0
    while queue:
        batch = [queue.popleft() for _ in range(min(workers, len(queue)))]
        rounds += 1
        failed = []
        for n, attempt in batch:
            tries[n] = attempt
            fails = n == 50 or seeded_failure(n, attempt)
            if fails and attempt < attempts:
                failed.append((n, attempt + 1))
        queue.extendleft(reversed(sorted(failed)))
    return rounds, tries


async def seed_task(n: int) -> int:
    await trio.sleep(1)
    attempt = ATTEMPTS[n] = ATTEMPTS.get(n, 0) + 1
    if n == 50:
        raise RuntimeError(f"deterministic error {n}")
    if seeded_failure(n, attempt):
        raise RuntimeError(f"stochastic error {n}")
    return n + 1000000


ATTEMPTS: dict[int, int] = {}


class Counting:
    """An iterable of 0..n-1 that counts how many items the pool has taken from it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pulled = 0

    def __iter__(self) -> Any:
        for item in range(self.n):
            self.pulled += 1
            yield item


async def test_seed000_scenario(autojump_clock: trio.testing.MockClock) -> None:
    ATTEMPTS.clear()
    rounds, tries = simulate_seed000(100, 20, 4)
    start = trio.current_time()
    # buffer >= items: every item is queued at once, as in the seed's pre-filled Queue.
    report = await conveyor.run(
        seed_task, range(100), workers=20, buffer=128, retry=Retry(attempts=4, backoff=None)
    )
    assert trio.current_time() - start == rounds
    assert sorted(r.item for r in report.succeeded) == [n for n in range(100) if n != 50]
    assert all(r.value == r.item + 1000000 for r in report.succeeded)
    [failed] = report.failed
    assert failed.item == 50 and failed.attempts == 4
    assert isinstance(failed.error, RuntimeError)
    assert str(failed.error) == "deterministic error 50"
    assert "deterministic error 50" in failed.traceback
    assert "seed_task" in failed.traceback
    assert {r.item: r.attempts for r in report.succeeded} == {
        n: t for n, t in tries.items() if n != 50
    }
    assert report.stats.attempts == sum(tries.values())
    assert report.stats.retried == sum(tries.values()) - 100
    assert not report.unfinished


async def test_no_deadlock_with_buffer_0_one_worker_every_attempt_failing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def always_fails(n: int) -> None:
        await trio.sleep(0.5)
        raise ValueError(f"no {n}")

    with trio.fail_after(1000):
        report = await conveyor.run(
            always_fails, range(10), workers=1, buffer=0,
            retry=Retry(attempts=3, backoff=Backoff(initial=1, jitter=None)),
        )
    assert [r.item for r in report.failed] == list(range(10)) or sorted(
        r.item for r in report.failed
    ) == list(range(10))
    assert all(r.attempts == 3 for r in report.failed)


async def test_backoff_waits_without_holding_a_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One worker. Item 0 fails once and waits 10 s for its retry; meanwhile the worker
    # runs items 1..4 (1 s each). If the backoff held the worker, item 1 would start at 11.
    # (buffer=4: a waiting retry takes a slot of buffer + workers, so the pool needs room.)
    started: dict[tuple[int, int], float] = {}
    seen: dict[int, int] = {}

    async def task(n: int) -> int:
        seen[n] = seen.get(n, 0) + 1
        started[n, seen[n]] = trio.current_time()
        await trio.sleep(1)
        if n == 0 and seen[n] == 1:
            raise RuntimeError("once")
        return n

    report = await conveyor.run(
        task, range(5), workers=1, buffer=4,
        retry=Retry(attempts=2, backoff=Backoff(initial=10, jitter=None)),
    )
    assert sorted(report.values()) == [0, 1, 2, 3, 4]
    assert started[1, 1] == 1.0 and started[4, 1] == 4.0
    assert started[0, 2] == 11.0  # failed at 1.0, + 10 s backoff


async def test_retry_after_overrides_backoff(autojump_clock: trio.testing.MockClock) -> None:
    times: list[float] = []

    class Throttled(Exception):
        retry_after = 7.0

    async def task(n: int) -> str:
        times.append(trio.current_time())
        if len(times) == 1:
            raise RetryAfter(3)
        if len(times) == 2:
            raise Throttled("slow down")
        return "ok"

    report = await conveyor.run(
        task, [0], retry=Retry(attempts=3, backoff=Backoff(initial=100, jitter=None))
    )
    assert report.values() == ["ok"]
    assert times == [0.0, 3.0, 10.0]


async def test_retry_on_rejects_at_once(autojump_clock: trio.testing.MockClock) -> None:
    calls: list[int] = []

    async def task(n: int) -> None:
        calls.append(n)
        if n == 0:
            raise KeyError("bad input")
        raise ConnectionError("flaky")

    report = await conveyor.run(
        task, [0, 1], retry=Retry(attempts=5, backoff=None, retry_on=ConnectionError)
    )
    by_item = {r.item: r for r in report.failed}
    assert by_item[0].attempts == 1 and isinstance(by_item[0].error, KeyError)
    assert by_item[1].attempts == 5 and isinstance(by_item[1].error, ConnectionError)
    assert calls.count(0) == 1 and calls.count(1) == 5


async def test_retry_on_predicate(autojump_clock: trio.testing.MockClock) -> None:
    class HTTPError(Exception):
        def __init__(self, status: int) -> None:
            super().__init__(f"HTTP {status}")
            self.status = status

    async def task(status: int) -> None:
        raise HTTPError(status)

    report = await conveyor.run(
        task, [400, 503],
        retry=Retry(attempts=3, backoff=None, retry_on=lambda e: getattr(e, "status", 0) >= 500),
    )
    assert {r.item: r.attempts for r in report.failed} == {400: 1, 503: 3}


async def test_attempt_timeout_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    durations = {0: [5, 1], 1: [5, 5]}
    count: dict[int, int] = {}

    async def task(n: int) -> int:
        count[n] = count.get(n, 0) + 1
        await trio.sleep(durations[n][count[n] - 1])
        return n

    start = trio.current_time()
    report = await conveyor.run(
        task, [0, 1], workers=2, timeout=2, retry=Retry(attempts=2, backoff=None)
    )
    assert report.values() == [0]
    [failed] = report.failed
    assert failed.item == 1 and isinstance(failed.error, conveyor.AttemptTimeout)
    assert "timeout=2" in str(failed.error)
    assert trio.current_time() - start == 4.0


async def test_logging_retry_info_giveup_warning(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def task(n: int) -> None:
        raise RuntimeError(f"boom {n}")

    with caplog.at_level(logging.INFO, logger="conveyor"):
        await conveyor.run(task, [7], retry=Retry(attempts=2, backoff=None))
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "conveyor"]
    assert records[0][0] == logging.INFO
    assert "item 7 failed on attempt 1 of 2" in records[0][1] and "boom 7" in records[0][1]
    assert records[1][0] == logging.WARNING
    assert "item 7 gave up after 2 attempts" in records[1][1]


async def test_ordered_map_yields_in_input_order(autojump_clock: trio.testing.MockClock) -> None:
    finished: list[int] = []

    async def task(n: int) -> int:
        await trio.sleep(10 - n)  # later items finish first
        finished.append(n)
        return n * 2

    out = [r.unwrap() async for r in conveyor.map(task, range(10), workers=10, ordered=True)]
    assert out == [n * 2 for n in range(10)]
    assert finished == list(range(9, -1, -1))


async def test_unordered_map_yields_as_completed(autojump_clock: trio.testing.MockClock) -> None:
    async def task(n: int) -> int:
        await trio.sleep(10 - n)
        return n

    async with conveyor.map(task, range(5), workers=5) as records:
        out = [r.unwrap() async for r in records]
    assert out == [4, 3, 2, 1, 0]


async def test_ordered_window_bounds_how_far_ahead(autojump_clock: trio.testing.MockClock) -> None:
    started: list[int] = []

    async def task(n: int) -> int:
        started.append(n)
        await trio.sleep(1000 if n == 0 else 1)
        return n

    async with conveyor.map(task, range(100), workers=8, ordered=True, window=5) as records:
        with trio.move_on_after(500):
            async for _ in records:
                pass
        # item 0 blocks the window: nothing past item 4 may have been taken
        assert max(started) == 4
    out = [r.item async for r in conveyor.map(task, range(20), workers=8, ordered=True, window=3)]
    assert out == list(range(20))


async def test_submit_blocks_when_full_and_resumes(autojump_clock: trio.testing.MockClock) -> None:
    release = trio.Event()

    async def task(n: int) -> int:
        await release.wait()
        return n

    async with conveyor.open_pool(task, workers=2, buffer=3) as pool:
        for n in range(5):  # 2 running + 3 queued
            await pool.submit(n)
        with pytest.raises(trio.WouldBlock):
            pool.submit_nowait(5)
        with trio.move_on_after(10) as blocked:
            await pool.submit(5)
        assert blocked.cancelled_caught  # backpressure: it waited the whole 10 s
        assert pool.stats.submitted == 5

        async def free_later() -> None:
            await trio.sleep(3)
            release.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(free_later)
            t0 = trio.current_time()
            await pool.submit(5)
            assert trio.current_time() - t0 == 3.0
    report = pool.report()
    assert sorted(report.values()) == list(range(6))


async def test_cancel_settles_outstanding_as_unfinished(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def task(n: int) -> int:
        await trio.sleep(1)
        if n == 3:
            raise ValueError("three")
        return n

    with trio.move_on_after(2.5):
        async with conveyor.open_pool(
            task, workers=2, buffer=2, retry=Retry(attempts=5, backoff=Backoff(1, jitter=None))
        ) as pool:
            for n in range(10):
                await pool.submit(n)
    report = pool.report()
    settled = [r.item for r in report.succeeded + report.failed + report.unfinished]
    assert sorted(settled) == list(range(report.stats.submitted))
    # capacity 4: 0,1 run at t=0 with 2,3 queued; at t=1 0,1 succeed and 4,5 come in;
    # at t=2 item 2 succeeds, 3 fails (retry due at 3), 4,5 start and 6 comes in.
    assert report.stats.submitted == 7
    assert sorted(report.values()) == [0, 1, 2]
    unfinished = {r.item: r for r in report.unfinished}
    assert sorted(unfinished) == [3, 4, 5, 6]
    assert unfinished[3].attempts == 1 and isinstance(unfinished[3].last_error, ValueError)
    assert unfinished[4].attempts == 1 and unfinished[4].last_error is None
    assert unfinished[6].attempts == 0
    assert report.stats.unfinished == 4 and report.stats.retried == 1


async def test_error_in_callers_block_is_plain_and_settles(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def task(n: int) -> int:
        await trio.sleep(5)
        return n

    with pytest.raises(ValueError, match="caller's own bug") as info:
        async with conveyor.open_pool(task, workers=3) as pool:
            for n in range(3):
                await pool.submit(n)
            await trio.sleep(1)
            raise ValueError("caller's own bug")
    assert not isinstance(info.value, BaseExceptionGroup)
    assert [r.item for r in pool.report().unfinished] == [0, 1, 2]


async def test_error_from_items_is_plain(autojump_clock: trio.testing.MockClock) -> None:
    def items() -> Any:
        yield 1
        raise LookupError("items broke")

    async def task(n: int) -> int:
        return n

    with pytest.raises(LookupError, match="items broke"):
        await conveyor.run(task, items())


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_base_exceptions_propagate_and_are_not_retried(
    autojump_clock: trio.testing.MockClock, exc_type: type[BaseException]
) -> None:
    calls: list[int] = []

    async def task(n: int) -> int:
        calls.append(n)
        await trio.sleep(n)
        if n == 1:
            raise exc_type()
        return n

    with pytest.raises(exc_type):
        async with conveyor.open_pool(task, workers=5, retry=Retry(attempts=3)) as pool:
            for n in range(3):
                await pool.submit(n)
    assert calls.count(1) == 1
    report = pool.report()
    assert [r.item for r in report.succeeded] == [0]
    assert {r.item for r in report.unfinished} == {1, 2}
    assert isinstance(next(r for r in report.unfinished if r.item == 1).last_error, exc_type)


async def test_drain_lets_in_flight_attempts_finish(autojump_clock: trio.testing.MockClock) -> None:
    started: list[int] = []

    async def task(n: int) -> int:
        started.append(n)
        await trio.sleep(3)
        return n

    with trio.move_on_after(1):
        async with conveyor.open_pool(task, workers=2, buffer=5, drain=5) as pool:
            for n in range(6):
                await pool.submit(n)
    report = pool.report()
    assert trio.current_time() == 3.0  # the two in-flight attempts were given their 2 s
    assert sorted(report.values()) == [0, 1]
    assert [r.item for r in report.unfinished] == [2, 3, 4, 5]
    assert started == [0, 1] or sorted(started) == [0, 1]


async def test_drain_grace_expires_then_cancels(autojump_clock: trio.testing.MockClock) -> None:
    async def task(n: int) -> int:
        await trio.sleep(100)
        return n

    with trio.move_on_after(1):
        async with conveyor.open_pool(task, workers=2, drain=5) as pool:
            await pool.submit(0)
    assert trio.current_time() == 6.0
    [unfinished] = pool.report().unfinished
    assert unfinished.item == 0 and unfinished.attempts == 1


async def test_stop_with_drain_from_inside(autojump_clock: trio.testing.MockClock) -> None:
    async def task(n: int) -> int:
        await trio.sleep(2)
        return n

    async with conveyor.open_pool(task, workers=1, buffer=3) as pool:
        for n in range(4):
            await pool.submit(n)
        await trio.sleep(1)
        pool.stop(drain=10)
        with pytest.raises(trio.ClosedResourceError, match="stop"):
            await pool.submit(99)
    assert trio.current_time() == 2.0
    report = pool.report()
    assert report.values() == [0]
    assert [r.item for r in report.unfinished] == [1, 2, 3]


async def test_run_drain_on_outer_cancel(autojump_clock: trio.testing.MockClock) -> None:
    done: list[int] = []

    async def task(n: int) -> int:
        await trio.sleep(2)
        done.append(n)
        return n

    with trio.move_on_after(1) as scope:
        await conveyor.run(task, range(100), workers=3, drain=5)
    assert scope.cancelled_caught
    assert sorted(done) == [0, 1, 2]
    assert trio.current_time() == 2.0


async def test_results_stream_does_not_keep_successes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def task(n: int) -> int:
        await trio.sleep(1)
        if n % 3 == 0:
            raise ValueError(n)
        return n

    seen: list[Any] = []
    async with conveyor.open_pool(task, workers=4) as pool:
        for n in range(9):
            await pool.submit(n)
        pool.close()
        async for record in pool.results():
            seen.append(record)
    assert sorted(r.item for r in seen) == list(range(9))
    report = pool.report()
    assert report.succeeded == []  # handed out already
    assert report.stats.succeeded == 6
    assert sorted(r.item for r in report.failed) == [0, 3, 6]


async def test_map_break_stops_the_pool(autojump_clock: trio.testing.MockClock) -> None:
    started: list[int] = []

    async def task(n: int) -> int:
        started.append(n)
        await trio.sleep(1)
        return n

    stream = conveyor.map(task, range(1000), workers=2, buffer=0)
    async with stream as records:
        async for record in records:
            if record.item >= 3:
                break
    assert len(started) < 10
    report = stream.report()
    assert report.stats.submitted == report.stats.settled
    # bare `async for` with break: the pool is cancelled when the iterator is dropped
    count = 0
    async for _ in conveyor.map(task, range(1000), workers=2):
        count += 1
        if count == 3:
            break
    await trio.sleep(5)
    assert len(started) < 30


async def test_async_iterable_items_consumed_lazily(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pulled: list[int] = []

    async def items() -> Any:
        for n in range(1000):
            pulled.append(n)
            yield n

    async def task(n: int) -> int:
        await trio.sleep(1)
        return n

    with trio.move_on_after(0.5):
        await conveyor.run(task, items(), workers=4, buffer=6)
    assert len(pulled) == 10  # buffer + workers, not the whole iterable


async def test_sync_iterable_consumed_lazily_even_with_retries_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    counting = Counting(10_000)

    async def task(n: int) -> int:
        raise RuntimeError("down")  # every attempt fails; retries wait 100 s

    with trio.move_on_after(50):
        await conveyor.run(
            task, counting, workers=3, buffer=4,
            retry=Retry(attempts=2, backoff=Backoff(initial=100, jitter=None)),
        )
    # Waiting retries count against buffer + workers: intake stops at 7.
    assert counting.pulled == 7


async def test_report_raise_for_failures(autojump_clock: trio.testing.MockClock) -> None:
    async def task(n: int) -> int:
        if n:
            raise ValueError(f"bad {n}")
        return n

    report = await conveyor.run(task, range(3))
    assert not report.ok
    # (items 1 and 2 fail at the same moment: either may be listed first)
    message = r"2 failed: [12] \(ValueError: bad [12]\)"
    with pytest.raises(conveyor.ItemsFailed, match=message) as info:
        report.raise_for_failures()
    assert sorted(r.item for r in info.value.failed) == [1, 2]
    ok = await conveyor.run(task, [0])
    ok.raise_for_failures()
    assert ok.ok and ok.values() == [0]


async def test_pool_runs_in_caller_context_and_returns_nothing_late(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No task outlives the pool: once run() returns, nothing of it is still scheduled.
    alive = 0

    async def task(n: int) -> int:
        nonlocal alive
        alive += 1
        try:
            await trio.sleep(n % 3)
            return n
        finally:
            alive -= 1

    with trio.move_on_after(2.5):
        await conveyor.run(task, range(50), workers=5)
    assert alive == 0
    report = await conveyor.run(task, range(20), workers=5)
    assert alive == 0 and len(report.succeeded) == 20


def test_stats_arithmetic() -> None:
    stats = conveyor.Stats(submitted=10, succeeded=5, failed=2, unfinished=1, elapsed=4.0)
    assert stats.settled == 8 and stats.outstanding == 2
    assert math.isclose(stats.throughput, 2.0)
    assert conveyor.Stats().throughput == 0.0


def test_records() -> None:
    ok = Succeeded("x", 1, 1)
    assert ok.unwrap() == 1 and ok.outcome.unwrap() == 1
    err = ValueError("v")
    failed = Failed("y", err, 2, "tb")
    with pytest.raises(ValueError):
        failed.unwrap()
    with pytest.raises(ValueError):
        failed.outcome.unwrap()
    unfinished = Unfinished("z", 0, None)
    assert unfinished.outcome is None
    with pytest.raises(conveyor.ItemUnfinished, match="'z' did not finish"):
        unfinished.unwrap()


async def test_map_with_a_slow_reader_keeps_the_outbox_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Memory of a stream is bounded by buffer + workers + unread records (invariant 6),
    # however slowly the caller reads: the pool takes no more items than that.
    counting = Counting(10_000)

    async def task(n: int) -> int:
        return n

    workers, buffer = 4, 4
    most = 0
    async with conveyor.map(task, counting, workers=workers, buffer=buffer) as records:
        async for record in records:
            await trio.sleep(1)  # a slow consumer
            most = max(most, counting.pulled - record.item)
            if record.item >= 200:
                break
    # unread records are bounded by workers + buffer; in the pool at most buffer + workers
    assert most <= 3 * (workers + buffer)


class _ItemsBroke(LookupError):
    pass


@pytest.mark.parametrize("entry", ["run", "map", "map bare"])
@pytest.mark.parametrize("buffer", [None, 0, 3])
async def test_a_chunked_intake_accounts_every_item_taken_before_items_raises(
    autojump_clock: trio.testing.MockClock, entry: str, buffer: int | None,
) -> None:
    """Intake takes from a plain iterable in chunks (as much as the ledger and the channel
    have room for) and, when the ledger has room but the channel none (``buffer=0``, a
    worker between two items), one item at a time. Either way every item taken before
    ``items`` raises has exactly one record at its own index, and the error comes out
    bare once they have settled. Each entry form that feeds a plain iterable."""
    broke = _ItemsBroke("items broke")

    def items() -> Any:
        yield from range(300)
        raise broke

    async def fn(x: int) -> int:
        await trio.sleep(0.01)
        return x * 2

    last = conveyor.LastReport()
    options: dict[str, Any] = {"workers": 4, "drain": 5, "observers": [last]}
    if buffer is not None:
        options["buffer"] = buffer
    seen: list[Any] = []
    with pytest.raises(_ItemsBroke) as caught:
        if entry == "run":
            await conveyor.run(fn, items(), **options)
        elif entry == "map":
            async with conveyor.map(fn, items(), **options) as records:
                async for record in records:
                    seen.append(record)
        else:
            async for record in conveyor.map(fn, items(), **options):
                seen.append(record)
    assert caught.value is broke
    report = last.report
    assert report is not None
    every = [*seen, *report.succeeded, *report.failed, *report.unfinished]
    every = list({id(r): r for r in every}.values())
    assert sorted(r.index for r in every) == list(range(300))  # every item, once
    assert all(r.item == r.index for r in every)
    assert all(r.value == r.item * 2 for r in every if type(r) is Succeeded)
    assert report.stats.submitted == 300


async def test_a_chunked_intake_stamps_the_sampled_queue_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The chunked intake starts the queue wait of every sampled item (all of the first
    1,024, then one in 64) as it goes in: on a clock far from zero no wait is counted from
    zero, and they wait as long as they do (2 workers, 1 ms each, 3,000 items)."""
    autojump_clock.jump(10_000)

    async def fn(x: int) -> int:
        await trio.sleep(0.001)
        return x

    report = await conveyor.run(fn, range(3000), workers=2)
    waits = report.stats.queue_wait
    assert waits.count == 1024 + len(range(1024, 3000, 64))
    assert waits.max is not None and 0 < waits.max < 10
