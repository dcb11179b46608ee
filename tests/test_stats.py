"""Limits and stats inside the real pool (collaboration tests), and the stats' invariants.

- limits held around every attempt, retries included: a limiter shared by two pools, an
  exact rate, per-key limits with a slow host, the adaptive limit;
- ``pool.stats``: counts that add up at any moment, quantiles, recent throughput;
- ``pool.wait_stats``; ``run(..., progress=...)``;
- a hypothesis property: at the end of every run the stats agree with the report.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import conveyor
from conveyor._progress import Progress


class Flaky(Exception):
    pass


# -------------------------------------------------------------------------- limits in pools


async def test_two_pools_sharing_a_limiter_of_3_never_run_more_than_3_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = trio.CapacityLimiter(3)
    running = peak = 0
    calls: Counter[int] = Counter()

    async def work(item: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        calls[item] += 1
        await trio.sleep(1 + item % 3)
        running -= 1
        if calls[item] == 1 and item % 4 == 0:
            raise Flaky  # retries pass through the limiter too
        return item

    retry = conveyor.Retry(attempts=2, backoff=None)
    reports: list[conveyor.Report] = []

    async def one(items: range) -> None:
        reports.append(
            await conveyor.run(work, items, workers=10, limiter=shared, retry=retry)
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, range(0, 30))
        nursery.start_soon(one, range(100, 130))
    assert peak == 3
    assert sum(len(r.succeeded) for r in reports) == 60
    assert shared.borrowed_tokens == 0


async def test_an_int_limiter_is_private_to_its_pool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    running = peak = 0

    async def work(item: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(1)
        running -= 1

    report = await conveyor.run(work, range(20), workers=8, limiter=2)
    assert peak == 2
    assert trio.current_time() == 10.0
    assert report.stats.succeeded == 20


async def test_a_retry_waiting_for_its_backoff_holds_no_limiter_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[tuple[str, float]] = []

    async def work(item: str) -> None:
        starts.append((item, trio.current_time()))
        await trio.sleep(1)
        if item == "a" and len(starts) == 1:
            raise Flaky

    retry = conveyor.Retry(attempts=2, backoff=conveyor.Backoff(initial=5, jitter=None))
    async with conveyor.open_pool(work, workers=2, limiter=1, retry=retry) as pool:
        await pool.submit("a")
        await trio.sleep(0.5)  # "a" holds the token; "b" comes second
        await pool.submit("b")
    # "b" runs while "a" waits out its 5 s backoff: the waiting retry holds no token.
    assert starts == [("a", 0.0), ("b", 1.0), ("a", 6.0)]


async def test_rate_through_the_pool_starts_attempts_exactly_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []

    async def work(item: int) -> None:
        starts.append(trio.current_time())
        await trio.sleep(0.35)

    await conveyor.run(work, range(100), workers=20, rate=conveyor.Rate(10))
    assert starts == [i / 10 for i in range(100)]


async def test_retries_go_through_the_rate_as_well(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[tuple[int, float]] = []

    async def work(item: int) -> None:
        starts.append((item, trio.current_time()))
        if len([s for s in starts if s[0] == item]) == 1:
            raise Flaky

    retry = conveyor.Retry(attempts=2, backoff=None)
    report = await conveyor.run(work, range(5), workers=5, rate=conveyor.Rate(2), retry=retry)
    assert [t for _, t in starts] == [i / 2 for i in range(10)]
    assert report.stats.attempts == 10 and report.stats.retried == 5


async def test_stop_starts_nothing_that_was_waiting_for_a_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    started: list[str] = []

    async def work(item: str) -> str:
        started.append(item)
        await trio.sleep(3)
        return item

    async with conveyor.open_pool(work, workers=2, limiter=1) as pool:
        await pool.submit("a")
        await pool.submit("b")  # its worker waits for the limiter
        await trio.sleep(1)
        assert pool.stats.limited == 1 and pool.stats.in_flight == 1
        pool.stop(drain=5)  # "a" may finish; "b" must not start once "a" lets go at 3 s
    report = pool.report()
    assert started == ["a"]
    assert [r.item for r in report.succeeded] == ["a"]
    [unfinished] = report.unfinished
    assert unfinished.item == "b" and unfinished.attempts == 0
    assert report.stats.attempts == 1


def host(item: str) -> str:
    return item.split("/")[0]


async def test_per_key_limit_of_2_with_3_hosts_holds_and_a_slow_host_starves_no_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    running: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    ended: dict[str, float] = {}

    async def fetch(url: str) -> str:
        h = host(url)
        running[h] += 1
        peak[h] = max(peak[h], running[h])
        await trio.sleep(10 if h == "slow" else 1)
        running[h] -= 1
        ended[url] = trio.current_time()
        return url

    # The slow host's items come first: blocking workers would all end up waiting on it.
    urls = [f"slow/{i}" for i in range(8)] + [f"{h}/{i}" for i in range(8) for h in "bc"]
    per_key = conveyor.PerKey(host, limit=2)
    report = await conveyor.run(fetch, urls, workers=6, buffer=30, per_key=per_key)
    assert len(report.succeeded) == 24
    assert peak == {"slow": 2, "b": 2, "c": 2}
    # b and c (8 one-second items each, 2 at a time per host, on the 4 workers the slow
    # host does not hold) are done at 4 s; the slow host takes 40 s on its own. Were
    # workers to wait for a busy key, all 6 would soon wait on the slow host.
    assert max(t for url, t in ended.items() if not url.startswith("slow")) == 4.0
    assert max(ended.values()) == 40.0
    assert per_key.keys == 0 and per_key.parked == 0
    assert report.stats.parked == 0


async def test_a_per_key_limit_shared_by_two_pools_survives_one_being_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    per_key = conveyor.PerKey(host, limit=1)
    running: Counter[str] = Counter()
    peak: Counter[str] = Counter()

    async def fetch(url: str) -> str:
        h = host(url)
        running[h] += 1
        peak[h] = max(peak[h], running[h])
        try:
            await trio.sleep(1)
        finally:
            running[h] -= 1
        return url

    urls = [f"{h}/{i}" for i in range(6) for h in "ab"]
    reports: dict[str, conveyor.Report] = {}

    async def doomed() -> None:
        with trio.move_on_after(2.5):  # cancelled while most of its items are parked
            async with conveyor.open_pool(fetch, workers=4, per_key=per_key) as pool:
                for url in urls:
                    await pool.submit(url)
        reports["doomed"] = pool.report()

    async def survivor() -> None:
        reports["survivor"] = await conveyor.run(fetch, urls, workers=4, per_key=per_key)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(doomed)
        nursery.start_soon(survivor)
    assert peak == {"a": 1, "b": 1}  # one at a time per host, across both pools
    assert len(reports["survivor"].succeeded) == 12  # its items came through after the cancel
    cut = reports["doomed"]
    assert cut.unfinished and len(cut.succeeded) + len(cut.unfinished) == 12
    assert per_key.keys == 0 and per_key.parked == 0  # the cancelled pool left nothing behind


async def test_per_key_rate_and_a_retry_of_a_parked_item(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: dict[str, list[float]] = {}

    async def fetch(url: str) -> None:
        starts.setdefault(url, []).append(trio.current_time())
        if url == "a/1" and len(starts[url]) == 1:
            raise Flaky

    per_key = conveyor.PerKey(host, limit=1, rate=conveyor.Rate(4))
    retry = conveyor.Retry(attempts=2, backoff=None)
    urls = [f"{h}/{i}" for i in range(4) for h in "ab"]
    report = await conveyor.run(fetch, urls, workers=4, per_key=per_key, retry=retry)
    assert len(report.succeeded) == 8
    a = sorted(t for url, ts in starts.items() if url.startswith("a") for t in ts)
    b = sorted(t for url, ts in starts.items() if url.startswith("b") for t in ts)
    assert a == [0.0, 0.25, 0.5, 0.75, 1.0]  # 5 attempts (one retry), 4 per second
    assert b == [0.0, 0.25, 0.5, 0.75]


async def test_a_failing_key_function_fails_the_item_not_the_pool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def work(item: Any) -> Any:
        return item

    calls: list[Any] = []

    async def counted(item: Any) -> Any:
        calls.append(item)
        return item

    per_key = conveyor.PerKey(lambda item: item["host"], limit=1)
    report = await conveyor.run(
        counted, [{"host": "a"}, {"nohost": 1}], per_key=per_key, retry=conveyor.Retry(attempts=3)
    )
    assert len(report.succeeded) == 1
    # fn never ran for it, and the key would raise again: failed at once, not retried
    [failed] = report.failed
    assert isinstance(failed.error, KeyError) and failed.attempts == 0
    assert calls == [{"host": "a"}]
    assert report.stats.attempts == 1 and report.stats.retried == 0


async def test_adaptive_limit_backs_off_under_overload_and_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    capacity = 4  # the "service" takes 4 at once; more get Overloaded
    running = 0
    seen: list[int] = []

    class Overloaded(Exception):
        pass

    adaptive = conveyor.Adaptive(overload_on=Overloaded, min=1, max=16, initial=12)

    async def call(item: int) -> int:
        nonlocal running
        running += 1
        try:
            await trio.sleep(1)
            if running > capacity:
                raise Overloaded
            return item
        finally:
            running -= 1

    retry = conveyor.Retry(attempts=20, backoff=None, retry_on=Overloaded)
    async with conveyor.open_pool(call, workers=16, adaptive=adaptive, retry=retry) as pool:

        async def watch() -> None:
            while True:
                seen.append(pool.stats.adaptive_limit or 0)
                await trio.sleep(0.5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            for i in range(300):
                await pool.submit(i)
            pool.close()
            await pool.wait_stats(lambda s: s.settled == 300)
            nursery.cancel_scope.cancel()
    report = pool.report()
    assert report.stats.succeeded == 300
    assert seen[0] == 12
    assert min(seen) <= capacity  # backed off below the service's capacity
    low = seen.index(min(seen))
    assert max(seen[low:]) > min(seen)  # and climbed back from there
    assert adaptive.decreases >= 1
    assert max(seen[len(seen) // 2 :]) <= 2 * capacity  # and stayed near it
    assert report.stats.adaptive_limit == adaptive.limit


# ---------------------------------------------------------------------------------- stats


async def test_stats_add_up_at_every_moment_of_a_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: Counter[int] = Counter()

    async def work(item: int) -> int:
        calls[item] += 1
        await trio.sleep(0.1 * (item % 7))
        if item % 5 == 0 and calls[item] < 3:
            raise Flaky
        if item % 11 == 0:
            raise ValueError(item)
        return item

    retry = conveyor.Retry(attempts=3, backoff=conveyor.Backoff(initial=0.5, jitter=None))
    snapshots: list[conveyor.Stats] = []
    async with conveyor.open_pool(
        work, workers=4, buffer=8, retry=retry, limiter=3, rate=conveyor.Rate(20),
        per_key=conveyor.PerKey(lambda i: i % 3, limit=1),
    ) as pool:

        async def watch() -> None:
            while True:
                snapshots.append(pool.stats)
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            for i in range(100):
                await pool.submit(i)
            pool.close()
            await pool.wait_stats(lambda s: s.settled == 100)
            nursery.cancel_scope.cancel()
    assert len(snapshots) > 50
    for s in snapshots:
        parts = s.queued + s.in_flight + s.waiting_retry + s.limited + s.parked
        assert parts == s.outstanding, s
        assert min(s.queued, s.in_flight, s.waiting_retry, s.limited, s.parked) >= 0, s
        assert s.in_flight <= 3
    assert any(s.parked for s in snapshots) and any(s.limited for s in snapshots)
    assert any(s.waiting_retry for s in snapshots)
    final = pool.report().stats
    assert final.outstanding == 0 and final.succeeded + final.failed == 100


async def test_quantiles_of_queue_wait_and_attempt_latency(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def work(item: int) -> None:
        await trio.sleep(1.0 if item < 90 else 10.0)

    report = await conveyor.run(work, range(100), workers=1, buffer=100)
    latency, wait = report.stats.attempt_latency, report.stats.queue_wait
    assert latency.count == wait.count == 100
    assert latency.p50 == pytest.approx(1.0, rel=0.01)
    assert latency.p90 == pytest.approx(1.0, rel=0.01)
    assert latency.p99 == pytest.approx(10.0, rel=0.01)
    # One worker: item k waited for the k before it (1 s each for the first 90).
    assert wait.p50 == pytest.approx(49.0, rel=0.01)
    assert wait.p99 == pytest.approx(90 + 8 * 10.0, rel=0.01)


async def test_throughput_is_over_the_recent_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def work(item: int) -> None:
        await trio.sleep(0.1 if item < 400 else 1.0)

    rates: list[float] = []
    async with conveyor.open_pool(work, workers=10) as pool:

        async def watch() -> None:
            while True:
                await trio.sleep(1)
                rates.append(pool.stats.throughput)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            for i in range(600):
                await pool.submit(i)
            pool.close()
            await pool.wait_stats(lambda s: s.settled == 600)
            nursery.cancel_scope.cancel()
    assert rates[3] == pytest.approx(100, rel=0.05)  # 10 workers x 10 items/s
    # Now 1 s each: the window forgot the fast part (within one batch of 10 at its edges).
    assert rates[-1] == pytest.approx(10, abs=1.0)


async def test_wait_stats_wakes_on_the_condition_and_returns_final_stats_at_the_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def work(item: int) -> int:
        await trio.sleep(1)
        if item % 2:
            raise ValueError(item)
        return item

    async with conveyor.open_pool(work, workers=2) as pool:
        for i in range(20):
            await pool.submit(i)
        pool.close()
        stats = await pool.wait_stats(lambda s: s.failed >= 3)
        assert stats.failed == 3 and trio.current_time() == 3.0
        final = await pool.wait_stats(lambda s: s.failed > 1000)  # never: returns at the end
    assert final.failed == 10 and final.settled == 20


async def test_progress_line_through_run_has_no_effect_on_results(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = io.StringIO()

    async def work(item: int) -> int:
        await trio.sleep(1.1)  # ends at 1.1, 2.2...: never at the same moment as a tick
        return item * 2

    report = await conveyor.run(
        work, range(50), workers=5, progress=Progress(out, interval=3, tty=False)
    )
    assert sorted(r.value for r in report.succeeded) == [i * 2 for i in range(50)]
    lines = out.getvalue().splitlines()
    # At 3, 6 and 9 s (total known from len(items)), then the final line when it ends.
    assert [line.split(" | ")[1] for line in lines] == [
        "10/50 20.0%", "25/50 50.0%", "40/50 80.0%", "50/50 100.0%"
    ]


async def test_progress_true_writes_to_stderr(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    async def work(item: int) -> int:
        return item

    await conveyor.run(work, iter(range(7)), progress=True)
    err = capsys.readouterr().err
    assert err.startswith("conveyor | 7 done of 7 accepted")


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"limiter": 0}, ValueError, r"^limiter=0 is not valid: expected an int >= 1, a "
                                     r"trio\.CapacityLimiter or None; e\.g\. limiter=1$"),
        ({"limiter": "3"}, TypeError, r"^limiter='3' is not valid: .*; e\.g\. limiter=3$"),
        ({"rate": 5}, TypeError, r"^rate=5 is not valid: expected a conveyor\.Rate or None; "
                                 r"e\.g\. rate=conveyor\.Rate\(5\)$"),
        ({"per_key": len}, TypeError, r"^per_key=len is not valid: expected a conveyor\.PerKey "
                                      r"or None; e\.g\. per_key=conveyor\.PerKey\(lambda url: "),
        ({"adaptive": 4}, TypeError, r"^adaptive=4 is not valid: expected a conveyor\.Adaptive or "
                                     r"None; e\.g\. adaptive=conveyor\.Adaptive\(overload_on="),
        ({"progress": "yes"}, TypeError, r"^progress='yes' is not valid: expected True, False or "
                                         r"a conveyor\.Progress; e\.g\. progress=True$"),
    ],
)
async def test_limit_options_are_checked_at_the_call(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    async def work(item: int) -> int:
        return item

    with pytest.raises(error, match=match):
        await conveyor.run(work, range(3), **options)
    with pytest.raises(error, match=match):
        conveyor.open_pool(work, **options)
    with pytest.raises(error, match=match):
        conveyor.map(work, range(3), **options)


# ------------------------------------------------------------------- stats agree with report


@settings(deadline=None, max_examples=40)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=0, max_size=40),
    st.integers(1, 5),
    st.sampled_from([None, 1, 2]),
    st.booleans(),
    st.sampled_from([None, 0.5, 3.0]),
)
def test_stats_agree_with_the_report_at_the_end_of_every_run(
    plan: list[tuple[int, bool]],
    workers: int,
    limiter: int | None,
    per_key: bool,
    stop_after: float | None,
) -> None:
    """plan[i] = (failures before success, whether the failure is permanent)."""

    async def main() -> conveyor.Pool[Any]:
        calls: Counter[int] = Counter()

        async def work(i: int) -> int:
            calls[i] += 1
            await trio.sleep(0.1 * (i % 4))
            failures, permanent = plan[i]
            if calls[i] <= failures:
                raise (ValueError if permanent else Flaky)(i)
            return i

        retry = conveyor.Retry(attempts=3, backoff=conveyor.Backoff(0.2), retry_on=Flaky)
        options: dict[str, Any] = {"workers": workers, "retry": retry, "limiter": limiter}
        if per_key:
            options["per_key"] = conveyor.PerKey(lambda i: i % 2, limit=1, rate=conveyor.Rate(5))
        with trio.move_on_after(math.inf if stop_after is None else stop_after):
            async with conveyor.open_pool(work, **options) as pool:
                for i in range(len(plan)):
                    await pool.submit(i)
        return pool

    pool = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    report = pool.report()
    s = report.stats
    assert s.succeeded == len(report.succeeded)
    assert s.failed == len(report.failed)
    assert s.unfinished == len(report.unfinished)
    assert s.submitted == s.succeeded + s.failed + s.unfinished
    assert s.in_flight == s.queued == s.waiting_retry == s.limited == s.parked == 0
    records = [*report.succeeded, *report.failed, *report.unfinished]
    assert s.attempts == sum(r.attempts for r in records)
    assert s.attempt_latency.count <= s.attempts
    if stop_after is None:
        assert s.unfinished == 0
        assert s.retried == sum(r.attempts - 1 for r in records)
        assert s.attempt_latency.count == s.attempts  # small runs: every attempt measured


@pytest.mark.parametrize("way", ["plain", "limited", "observed"])
async def test_in_flight_counts_the_attempts_running_however_an_attempt_ends(
    autojump_clock: trio.testing.MockClock, way: str,
) -> None:
    """``in_flight`` is the attempts running now: one per call of ``fn`` under way, and one
    less once an attempt returned, raised (and was retried), returned a coroutine it forgot
    to await, timed out, or was cut by a stop; an observer told that an attempt ended no
    longer counts it. ``submitted`` counts each item once, retries included. Each way in:
    the plain attempt, one under a limiter, one an observer watches."""
    running = 0
    in_fn: list[tuple[int, int]] = []
    at_end: list[tuple[int, int]] = []
    holder: dict[str, conveyor.Pool[Any]] = {}
    raised: set[int] = set()

    async def forgot(x: int) -> int:
        return x

    async def fn(x: int) -> Any:
        nonlocal running
        running += 1
        try:
            in_fn.append((holder["pool"].stats.in_flight, running))
            if x == 1 and x not in raised:
                raised.add(x)
                raise Flaky("once")  # retried
            if x == 2:
                return forgot(x)  # a forgotten await: fails
            if x == 3:
                await trio.sleep(10)  # past timeout=5: fails
            if x == 4:
                await trio.sleep(1000)  # cut by the stop
            await trio.sleep(1)
            return x
        finally:
            running -= 1

    class Ends(conveyor.Observer):
        def opened(self, info: conveyor.PoolInfo) -> conveyor.Observer:
            self.info = info
            return self

        def attempt_ended(
            self, attempt: conveyor.Attempt, error: BaseException | None, duration: float
        ) -> None:
            at_end.append((self.info.stats().in_flight, running))

    options: dict[str, Any] = {}
    if way == "limited":
        options["limiter"] = trio.CapacityLimiter(10)
    if way == "observed":
        options["observers"] = [Ends()]
    async with conveyor.open_pool(
        fn, workers=5, timeout=5, drain=0,
        retry=conveyor.Retry(2, retry_on=lambda e: isinstance(e, Flaky)), **options,
    ) as pool:
        holder["pool"] = pool
        for x in range(4):
            await pool.submit(x)
        s = await pool.wait_stats(lambda s: s.succeeded + s.failed == 4)
        assert (s.in_flight, s.submitted, s.attempts) == (0, 4, 5)
        await pool.submit(4)  # runs until the stop cuts it
        s = await pool.wait_stats(lambda s: s.in_flight == 1)
        assert (s.submitted, s.attempts, s.queued) == (5, 6, 0)
        pool.stop()
    report = pool.report()
    assert sorted(r.item for r in report.succeeded) == [0, 1]
    assert sorted(r.item for r in report.failed) == [2, 3]
    assert [r.item for r in report.unfinished] == [4]
    s = report.stats
    assert (s.in_flight, s.submitted, s.attempts, s.queued) == (0, 5, 6, 0)
    assert len(in_fn) == 6 and all(counted == ran for counted, ran in in_fn)
    if way == "observed":
        assert len(at_end) == 6 and all(counted == ran for counted, ran in at_end), at_end
