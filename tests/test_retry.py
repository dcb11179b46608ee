"""Retry policy units: backoff arithmetic, jitter bounds, retry_on forms, retry-after hints."""

from __future__ import annotations

import functools
import gc
import logging
import math
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import conveyor
from conveyor import Backoff, Retry, RetryAfter
from conveyor._retry import retry_after_hint


def test_exponential_capped_without_jitter() -> None:
    backoff = Backoff(initial=0.5, factor=3, max=10, jitter=None)
    assert [backoff.delay(n) for n in range(1, 6)] == [0.5, 1.5, 4.5, 10, 10]
    assert Backoff(initial=1, jitter=None).delay(10_000) == 30.0  # no overflow
    assert Backoff(initial=100, jitter=None).max == 100


@given(st.integers(1, 50), st.floats(0, 5), st.floats(1, 4))
def test_jitter_bounds(retry: int, initial: float, factor: float) -> None:
    exact = Backoff(initial=initial, factor=factor, max=60, jitter=None).delay(retry)
    full = Backoff(initial=initial, factor=factor, max=60).delay(retry)
    equal = Backoff(initial=initial, factor=factor, max=60, jitter="equal").delay(retry)
    assert 0 <= full <= exact
    assert exact / 2 <= equal <= exact


def test_seeded_jitter_is_reproducible() -> None:
    a = Backoff(seed=7)
    b = Backoff(seed=7)
    assert [a.delay(n) for n in range(1, 10)] == [b.delay(n) for n in range(1, 10)]


def test_should_retry_counts_attempts_and_kinds() -> None:
    retry = Retry(attempts=3, retry_on=(ConnectionError, TimeoutError))
    assert retry.should_retry(ConnectionError(), 1)
    assert retry.should_retry(TimeoutError(), 2)
    assert not retry.should_retry(TimeoutError(), 3)
    assert not retry.should_retry(ValueError(), 1)
    assert not Retry(attempts=1).should_retry(ValueError(), 1)


def test_retry_after_hints() -> None:
    assert retry_after_hint(RetryAfter(2.5)) == 2.5
    err = ValueError()
    err.retry_after = 4  # type: ignore[attr-defined]
    assert retry_after_hint(err) == 4.0
    err.retry_after = "soon"  # type: ignore[attr-defined]
    assert retry_after_hint(err) is None
    err.retry_after = True  # type: ignore[attr-defined]
    assert retry_after_hint(err) is None
    assert Retry(backoff=None).delay(ValueError(), 1) == 0.0
    assert Retry(backoff=Backoff(initial=1, jitter=None)).delay(RetryAfter(9), 1) == 9.0


def test_retryable_false_is_never_retried() -> None:
    class Permanent(Exception):
        retryable = False

    retry = Retry(attempts=5)
    assert not retry.should_retry(Permanent(), 1)
    flagged = ValueError()
    flagged.retryable = False  # type: ignore[attr-defined]
    assert not Retry(attempts=5, retry_on=ValueError).should_retry(flagged, 1)
    assert retry.should_retry(ValueError(), 1)


# ------------------------------------------------------------------ Backoff for every n


def test_backoff_zero_initial_is_zero_for_every_retry() -> None:
    backoff = Backoff(initial=0, jitter=None)
    assert [backoff.delay(n) for n in (1, 2, 1024, 1025, 2000, 10**6, 10**30)] == [0.0] * 7


def test_backoff_past_the_float_range_is_the_cap_and_never_inf() -> None:
    assert Backoff(initial=1, max=50, jitter=None).delay(2000) == 50
    assert Backoff(initial=1e-300, factor=10, max=1e300, jitter=None).delay(400) == pytest.approx(
        1e99, rel=1e-9
    )  # a tiny initial times a power past the float range, still below the cap
    assert Backoff(initial=3, factor=1, jitter=None).delay(10**30) == 3
    assert Backoff(initial=2, factor=10**300, max=1e308, jitter=None).delay(3) == 1e308


@given(
    st.integers(1, 10**9),
    st.floats(0, 1e6) | st.sampled_from([0.0, 5e-324, 1e-300]),  # 5e-324: subnormal
    st.floats(1, 1e6) | st.sampled_from([1.0, 1.0000001, 2.0]),
    st.floats(0, 1e300),
)
def test_backoff_delay_is_the_capped_power_for_every_n(
    n: int, initial: float, factor: float, extra: float
) -> None:
    cap = initial + extra
    delay = Backoff(initial=initial, factor=factor, max=cap, jitter=None).delay(n)
    assert 0 <= delay <= cap and math.isfinite(delay)
    if initial == 0:
        assert delay == 0
        return
    log_exact = math.log(initial) + (n - 1) * math.log(factor)
    if abs(log_exact - math.log(cap)) <= 1e-12:  # at the cap, within log's rounding
        assert delay == pytest.approx(cap, rel=1e-9)
    elif log_exact > math.log(cap):
        assert delay == cap
    elif delay > 1e-300:  # (a subnormal product is as exact as floats get there)
        assert math.log(delay) == pytest.approx(log_exact, rel=1e-9, abs=1e-9)


# ------------------------------------------------------------- retry_on predicate raising


def errno_5(error: Exception) -> bool:
    return error.errno == 5  # type: ignore[attr-defined]  # a ValueError has none


async def flaky(item: int) -> int:
    """Items < 10: OSError(5) on the first attempt; items >= 10: ValueError, always."""
    if item >= 10:
        raise ValueError(f"bad item {item}")
    if (item, "tried") not in SEEN:
        SEEN.add((item, "tried"))
        raise OSError(5, "I/O error")
    return item


SEEN: set[tuple[int, str]] = set()


def _check_predicate_failures(report: conveyor.Report) -> None:
    assert sorted(r.item for r in report.succeeded) == [0, 1, 2]
    assert {r.item: r.attempts for r in report.succeeded} == {0: 2, 1: 2, 2: 2}
    assert sorted(r.item for r in report.failed) == [10, 11]
    assert report.unfinished == []
    for record in report.failed:
        # Its own error, not the predicate's, attempted once (not retried).
        assert type(record.error) is ValueError and record.attempts == 1
        assert str(record.error) == f"bad item {record.item}"
        (note,) = record.error.__notes__
        assert note.startswith(
            "conveyor: the retry_on predicate 'errno_5' raised on this error "
            "(AttributeError: 'ValueError' object has no attribute 'errno'), so it was not "
            "retried:\nTraceback (most recent call last):"
        )
        assert "in errno_5" in note  # where the predicate failed
        assert note in record.traceback


async def test_retry_on_that_raises_fails_the_item_with_its_error_and_the_run_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    retry = Retry(attempts=3, retry_on=errno_5, backoff=Backoff(initial=1, jitter=None))
    items = [0, 10, 1, 11, 2]

    SEEN.clear()
    _check_predicate_failures(await conveyor.run(flaky, items, retry=retry, workers=2))

    SEEN.clear()
    async with conveyor.map(flaky, items, retry=retry, workers=2) as records:
        seen = [record async for record in records]
    assert len(seen) == 5
    _check_predicate_failures(
        conveyor.Report([r for r in seen if isinstance(r, conveyor.Succeeded)],
                        [r for r in seen if isinstance(r, conveyor.Failed)], [],
                        records_stats(seen))
    )

    SEEN.clear()
    bare = [record async for record in conveyor.map(flaky, items, retry=retry, ordered=True)]
    assert [r.item for r in bare] == items
    assert [type(r).__name__ for r in bare] == ["Succeeded", "Failed"] * 2 + ["Succeeded"]

    SEEN.clear()
    async with conveyor.open_pool(flaky, retry=retry) as pool:
        for item in items:
            await pool.submit(item)
    _check_predicate_failures(pool.report())


def records_stats(records: list[conveyor.Record]) -> conveyor.Stats:
    return conveyor.Stats(  # only the counts matter here
        submitted=len(records), succeeded=0, failed=0, unfinished=0, retried=0, attempts=0,
        in_flight=0, queued=0, waiting_retry=0, elapsed=0.0,
    )


def test_should_retry_never_raises_for_a_raising_predicate() -> None:
    retry = Retry(retry_on=errno_5)
    error = ValueError("x")
    assert retry.should_retry(error, 1) is False
    assert "AttributeError" in error.__notes__[0]
    assert retry.should_retry(OSError(5, "io"), 1) is True


async def returns_false(error: Exception) -> bool:
    return False


async def test_an_async_retry_on_is_refused_and_the_advice_works() -> None:
    with pytest.raises(TypeError, match=(
        r"^Retry: retry_on=returns_false is not valid: expected an exception class, a tuple of "
        r"them, or a predicate f\(exc\) -> bool, written as a plain `def` \(not `async def`\): "
        r"conveyor calls it without awaiting it, so an async function's coroutine would never "
        r"run; e\.g\. retry_on=\(TimeoutError, ConnectionError\)$"
    )):
        Retry(retry_on=returns_false)
    with pytest.raises(TypeError, match="written as a plain `def`"):
        Retry(retry_on=functools.partial(returns_false))

    def plain(error: Exception) -> bool:  # the advice: the same, as a plain def
        return False

    calls: list[int] = []

    async def fails(item: int) -> None:
        calls.append(item)
        raise ValueError(item)

    report = await conveyor.run(fails, [1], retry=Retry(retry_on=plain, backoff=None))
    assert calls == [1] and report.failed[0].attempts == 1  # False means: not retried


async def test_a_predicate_that_returns_a_coroutine_fails_the_item_not_retried() -> None:
    calls: list[int] = []

    async def fails(item: int) -> None:
        calls.append(item)
        raise ValueError(item)

    retry = Retry(retry_on=lambda e: returns_false(e), backoff=None)  # async in disguise
    report = await conveyor.run(fails, [1, 2], retry=retry)
    gc.collect()  # a coroutine left unawaited would warn (an error under filterwarnings)
    assert sorted(calls) == [1, 2]  # never retried: a coroutine must not count as true
    for record in report.failed:
        assert type(record.error) is ValueError and record.attempts == 1
        assert "TypeError: the retry_on predicate returned an awaitable (coroutine), not a " \
               "bool" in record.error.__notes__[0]


# ----------------------------------------------------------------- retry-after hints capped


class TooManyRequests(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"429, Retry-After: {retry_after}")
        self.retry_after = retry_after


def _hinting(hint: float) -> Any:
    done: set[int] = set()

    async def fn(item: int) -> float:
        if item not in done:
            done.add(item)
            raise TooManyRequests(hint) if item % 2 else conveyor.RetryAfter(hint)
        return trio.current_time()

    return fn


@pytest.mark.parametrize(
    ("make_retry", "hint", "cap"),
    [
        (lambda: Retry(attempts=2, backoff=Backoff(max=5)), 3600, 5),  # default: the backoff's max
        (lambda: Retry(attempts=2), 3600, 30),  # Backoff()'s max is 30 s
        (lambda: Retry(attempts=2, backoff=None), 3600, 30),  # no backoff: 30 s
        (lambda: Retry(attempts=2, max_retry_after=120), 3600, 120),
        (lambda: Retry(attempts=2, max_retry_after=0), 7, 0),
        (lambda: Retry(attempts=2, backoff=None), math.inf, 30),  # an attribute may say inf
    ],
)
async def test_retry_after_hints_are_cut_to_max_retry_after_and_logged(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    make_retry: Any,
    hint: float,
    cap: float,
) -> None:
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        items = [0, 1] if math.isfinite(hint) else [1, 3]  # odd: an attribute, not RetryAfter
        report = await conveyor.run(_hinting(hint), items, retry=make_retry())
    assert sorted(r.value for r in report.succeeded) == [cap, cap]  # exact, on trio's clock
    assert trio.current_time() == cap
    cut = sorted(r.getMessage() for r in caplog.records if "cut to" in r.getMessage())
    assert len(cut) == 2
    assert cut[1] == (
        f"retry-after hint of {hint:g} s (TooManyRequests: 429, Retry-After: {hint}) cut to "
        f"max_retry_after={cap:g} s"
    )
    if math.isfinite(hint):  # RetryAfter itself refuses inf
        assert cut[0].startswith(f"retry-after hint of {hint:g} s (RetryAfter: retry after ")
    assert all(r.levelno == logging.WARNING and r.name == "conveyor" for r in caplog.records
               if "cut to" in r.getMessage())


async def test_a_hint_under_the_cap_is_kept_exactly_and_not_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        report = await conveyor.run(_hinting(4.5), [0], retry=Retry(attempts=2))
    assert report.succeeded[0].value == 4.5
    assert not [r for r in caplog.records if "cut to" in r.getMessage()]


def test_max_retry_after_default_follows_the_backoff() -> None:
    assert Retry().max_retry_after == 30
    assert Retry(backoff=Backoff(initial=100)).max_retry_after == 100
    assert Retry(backoff=Backoff(max=2)).max_retry_after == 2
    assert Retry(backoff=None).max_retry_after == 30
    assert Retry(max_retry_after=7).max_retry_after == 7


def test_a_retry_after_property_that_raises_is_no_hint() -> None:
    class Odd(Exception):
        @property
        def retry_after(self) -> float:
            raise KeyError("no header")

    assert retry_after_hint(Odd()) is None
    assert Retry(backoff=None).delay(Odd(), 1) == 0.0
    big = ValueError()
    big.retry_after = 10**400  # type: ignore[attr-defined]
    assert retry_after_hint(big) == math.inf
    assert Retry(backoff=None).delay(big, 1) == 30.0
    nan = ValueError()
    nan.retry_after = math.nan  # type: ignore[attr-defined]
    assert retry_after_hint(nan) is None


# ------------------------------------------------------------------ Retry(budget=): issue 10.4


async def test_a_budget_cuts_the_running_attempt_and_is_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow(item: int) -> int:
        await trio.sleep(10)
        return item

    retry = Retry(attempts=5, backoff=None, budget=3)
    report = await conveyor.run(slow, [1], retry=retry)
    [failed] = report.failed
    assert isinstance(failed.error, conveyor.AttemptTimeout) and failed.attempts == 1
    assert "budget=3 s" in str(failed.error)
    assert trio.current_time() == 3


async def test_a_budget_stops_retries_whose_next_attempt_would_start_after_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []

    async def failing(item: int) -> int:
        starts.append(trio.current_time())
        raise OSError("down")

    # exact backoff 1, 2, 4 s: attempts at 0, 1, 3; the next would be at 7 > 5
    retry = Retry(attempts=10, backoff=Backoff(initial=1, jitter=None), budget=5)
    report = await conveyor.run(failing, [1], retry=retry)
    [failed] = report.failed
    assert starts == [0, 1, 3] and failed.attempts == 3
    assert isinstance(failed.error, OSError)
    assert "budget=5 s (Retry.budget) has run out" in failed.traceback
    assert trio.current_time() == 3  # given up at once, not at the budget's end


async def test_a_budget_and_a_timeout_whichever_ends_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []

    async def slow(item: int) -> int:
        starts.append(trio.current_time())
        await trio.sleep(10)
        return item

    retry = Retry(attempts=10, backoff=None, budget=5)
    report = await conveyor.run(slow, [1], retry=retry, timeout=2)
    [failed] = report.failed
    assert starts == [0, 2, 4] and failed.attempts == 3
    assert "budget=5 s" in str(failed.error)  # the last one was cut by the budget
    assert trio.current_time() == 5


async def test_a_budget_counts_from_the_first_attempt_not_from_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def work(item: int) -> int:
        await trio.sleep(2)
        return item

    # one worker: the 4th item starts at t=6, past a 3 s budget counted from submission
    report = await conveyor.run(work, range(4), workers=1, retry=Retry(budget=3))
    assert sorted(report.values()) == [0, 1, 2, 3]


@pytest.mark.parametrize("form", ["map", "open_pool"])
async def test_a_budget_holds_in_every_entry_form(
    autojump_clock: trio.testing.MockClock, form: str
) -> None:
    async def failing(item: int) -> int:
        await trio.sleep(1)
        raise OSError("down")

    retry = Retry(attempts=100, backoff=None, budget=2.5)
    if form == "map":
        stream = conveyor.map(failing, [1, 2], retry=retry)
        async with stream as records:
            got = [r async for r in records]
    else:
        async with conveyor.open_pool(failing, retry=retry) as pool:
            await pool.submit(1)
            await pool.submit(2)
            pool.close()
            got = [r async for r in pool.results()]
    assert [r.attempts for r in got] == [3, 3]  # at 0, 1, 2; the third cut at 2.5
    assert trio.current_time() == 2.5


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, True, "5"])
def test_a_bad_budget_is_refused(bad: object) -> None:
    with pytest.raises((TypeError, ValueError), match=(
        r"^Retry: budget=.* is not valid: expected a finite number of seconds > 0 \(or None: no "
        r"limit\); e\.g\. budget=(300\.0|5\.0)$"
    )):
        Retry(budget=bad)  # type: ignore[arg-type]
    assert Retry(budget=300.0).budget == 300.0  # the suggested fix
    assert Retry(budget=5.0).budget == 5.0  # the suggested fix for "5"
    assert Retry(budget=0.5).budget == 0.5  # the fix: a finite number of seconds > 0
