"""Limits on their own (contract tests): exact timing on trio's clock, sharing, per-key
parking driven by a minimal fake pool, adaptive AIMD, and bad input refused at the call.

The same limits inside the real pool are tested in test_stats.py and test_invariants.py.
"""

from __future__ import annotations

import gc
import logging
import math
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

import pytest
import trio
import trio.testing

import conveyor
from conveyor._limits import (
    Adaptive,
    CapacityLimit,
    Limit,
    PerKey,
    Rate,
    capacity_limit,
)

# ------------------------------------------------------------------------------------ Rate


async def _start_times(limit: Limit, n: int) -> list[float]:
    starts: list[float] = []

    async def one() -> None:
        token = await limit.acquire(None)
        starts.append(trio.current_time())
        limit.release(token, None)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return starts


async def test_rate_100_at_10_per_second_start_exactly_a_tenth_apart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts = await _start_times(Rate(10), 100)
    assert starts == [i / 10 for i in range(100)]


async def test_rate_burst_then_steady_then_burst_again_after_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rate = Rate(2, burst=3)
    assert await _start_times(rate, 7) == [0, 0, 0, 0.5, 1.0, 1.5, 2.0]
    await trio.sleep_until(10.0)  # idle long enough for the whole burst to come back
    assert await _start_times(rate, 4) == [10, 10, 10, 10.5]


async def test_rate_shared_by_two_callers_holds_for_both_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rate = Rate(4)
    a: list[float] = []
    b: list[float] = []

    async def user(log: list[float]) -> None:
        for _ in range(5):
            await rate.acquire()
            log.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(user, a)
        nursery.start_soon(user, b)
    assert sorted(a + b) == [i / 4 for i in range(10)]


async def test_rate_cancelled_wait_gives_its_slot_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rate = Rate(1)
    await rate.acquire()  # slot 0
    with trio.move_on_after(0.5):
        await rate.acquire()  # slot 1.0, cancelled at 0.5
    await rate.acquire()
    assert trio.current_time() == 1.0  # not 2.0


def test_rate_state_does_not_leak_between_trio_runs() -> None:
    rate = Rate(1)

    async def main() -> float:
        await rate.acquire()
        await rate.acquire()
        return trio.current_time()

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == 1.0
    # A fresh run starts its clock at 0 again: the old reservations must not make it wait.
    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"per_second": 0}, ValueError, r"^Rate: per_second=0 is not valid: expected a finite "
                                        r"number > 0; e\.g\. per_second=10\.0$"),
        ({"per_second": -2}, ValueError, r"^Rate: per_second=-2 is not valid: expected a finite "
                                         r"number > 0;"),
        ({"per_second": math.inf}, ValueError, r"^Rate: per_second=inf is not valid: expected a "
                                               r"finite number > 0;"),
        ({"per_second": math.nan}, ValueError, r"^Rate: per_second=nan is not valid"),
        ({"per_second": "5"}, TypeError, r"^Rate: per_second='5' is not valid: expected a finite "
                                         r"number > 0; e\.g\. per_second=5\.0$"),
        ({"per_second": 1, "burst": 0}, ValueError,
         r"^Rate: burst=0 is not valid: expected an int >= 1 \(at most 2\*\*53\); e\.g\. burst=1$"),
        ({"per_second": 1, "burst": 1.5}, TypeError, r"^Rate: burst=1\.5 is not valid: expected an "
                                                     r"int >= 1 .*; e\.g\. burst=1$"),
        ({"per_second": True}, TypeError, r"^Rate: per_second=True is not valid: expected a "
                                          r"finite number > 0;"),
        ({"per_second": 10**400}, ValueError, r"^Rate: per_second=1000000.*\.\.\. is not valid:"),
        ({"per_second": 1, "burst": True}, TypeError, r"^Rate: burst=True is not valid:"),
        ({"per_second": 1, "burst": 10**30}, ValueError,
         r"^Rate: burst=10{30} is not valid: expected an int >= 1 \(at most 2\*\*53\); "
         r"e\.g\. burst=9007199254740992$"),
    ],
)
def test_rate_refuses_bad_input(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Rate(**kwargs)


# ------------------------------------------------------------------------- CapacityLimiter


async def test_two_users_sharing_a_limiter_of_3_never_exceed_3(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = trio.CapacityLimiter(3)
    limits = [capacity_limit(shared), capacity_limit(shared)]
    running = peak = 0

    async def attempt(limit: CapacityLimit, duration: float) -> None:
        nonlocal running, peak
        token = await limit.acquire()
        running += 1
        peak = max(peak, running)
        try:
            await trio.sleep(duration)
        finally:
            running -= 1
            limit.release(token, None)

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(attempt, limits[i % 2], 1 + i % 3)
    assert peak == 3
    assert shared.borrowed_tokens == 0


async def test_capacity_limit_cancelled_acquire_holds_nothing() -> None:
    limit = capacity_limit(1)
    token = await limit.acquire()
    with trio.move_on_after(0.01):
        await limit.acquire()
    limit.release(token, None)
    assert limit.limiter.borrowed_tokens == 0
    assert limit.limiter.statistics().tasks_waiting == 0


def test_capacity_limit_int_makes_a_private_limiter() -> None:
    a, b = capacity_limit(4), capacity_limit(4)
    assert a.limiter.total_tokens == 4
    assert a.limiter is not b.limiter


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, r"^limiter=0 is not valid: expected an int >= 1, a "
                        r"trio\.CapacityLimiter or None; e\.g\. limiter=1$"),
        (-3, ValueError, r"^limiter=-3 is not valid: .*; e\.g\. limiter=1$"),
        (2.5, TypeError, r"^limiter=2\.5 is not valid: .*; e\.g\. limiter=2$"),
        (True, TypeError, r"^limiter=True is not valid: expected an int >= 1"),
    ],
)
def test_capacity_limit_refuses_bad_input(value: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        capacity_limit(value)


# --------------------------------------------------------------------------------- PerKey


def host(item: str) -> str:
    return item.split("/")[0]


class FakePool:
    """The smallest pool that honours the PerKey contract: workers read jobs from a channel,
    parked jobs come back through ``resend`` at their due time (as the retry scheduler would).
    Records per-key concurrency and each item's start and end times."""

    def __init__(
        self, per_key: PerKey[str], key: Callable[[str], Hashable], workers: int
    ) -> None:
        self.per_key = per_key
        self.key = key
        self.workers = workers
        self.running: Counter[Hashable] = Counter()
        self.peak: Counter[Hashable] = Counter()
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}

    async def run(self, items: list[str], duration: Callable[[str], float]) -> None:
        send, receive = trio.open_memory_channel[tuple[str, Any]](math.inf)
        outstanding = len(items)
        for item in items:
            send.send_nowait((item, None))

        async with trio.open_nursery() as nursery:

            async def later(job: str, token: Any, due: float) -> None:
                await trio.sleep_until(due)
                send.send_nowait((job, token))

            def resend(job: str, token: Any, due: float) -> None:
                nursery.start_soon(later, job, token, due)

            async def worker() -> None:
                nonlocal outstanding
                async for item, reserved in receive:
                    token = await self.per_key.admit(item, item, resend, reserved)
                    if token is None:
                        continue
                    k = self.key(item)
                    self.running[k] += 1
                    self.peak[k] = max(self.peak[k], self.running[k])
                    self.started[item] = trio.current_time()
                    try:
                        await trio.sleep(duration(item))
                    finally:
                        self.running[k] -= 1
                        self.per_key.release(token, None)
                    self.ended[item] = trio.current_time()
                    outstanding -= 1
                    if outstanding == 0:
                        send.close()

            for _ in range(self.workers):
                nursery.start_soon(worker)


def _slow_host_items() -> list[str]:
    # The slow host's items come first: the case where blocking workers would all pile on it.
    return [f"slow/{i}" for i in range(8)] + [f"{h}/{i}" for i in range(8) for h in "bc"]


def _slow_duration(item: str) -> float:
    return 10.0 if item.startswith("slow") else 1.0


async def test_per_key_limit_2_with_3_hosts_holds_and_slow_host_does_not_starve_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    per_key: PerKey[str] = PerKey(host, limit=2)
    pool = FakePool(per_key, host, workers=4)
    await pool.run(_slow_host_items(), _slow_duration)
    assert pool.peak == {"slow": 2, "b": 2, "c": 2} or pool.peak == {"slow": 2, "b": 1, "c": 1}
    assert len(pool.ended) == 24
    # Two workers run the slow host's items (2 at a time); the other two are free to run
    # b and c: 16 one-second items on 2 workers end at 8 s, while the slow host needs 40 s.
    assert max(t for item, t in pool.ended.items() if not item.startswith("slow")) == 8.0
    assert max(pool.ended.values()) == 40.0
    assert per_key.keys == 0  # every key idle again and forgotten
    assert per_key.parked == 0


async def test_per_key_without_parking_shows_the_starvation_parking_prevents(
    autojump_clock: trio.testing.MockClock,
) -> None:
    per_key: PerKey[str] = PerKey(host, limit=2, max_parked=0)
    pool = FakePool(per_key, host, workers=4)
    await pool.run(_slow_host_items(), _slow_duration)
    assert max(pool.peak.values()) == 2
    # Workers 3 and 4 wait for the slow host: b and c start only once its line is empty.
    assert min(t for item, t in pool.started.items() if not item.startswith("slow")) == 30.0


async def test_per_key_parking_is_bounded_then_workers_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    per_key: PerKey[str] = PerKey(host, limit=1, max_parked=3)
    pool = FakePool(per_key, host, workers=3)
    peak_parked = 0

    async def watch() -> None:
        nonlocal peak_parked
        while True:
            peak_parked = max(peak_parked, per_key.parked)
            await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await pool.run([f"a/{i}" for i in range(10)], lambda item: 1.0)
        nursery.cancel_scope.cancel()
    assert peak_parked == 3
    assert pool.peak == {"a": 1}
    assert len(pool.ended) == 10
    assert max(pool.ended.values()) == 10.0


async def test_per_key_rate_spaces_starts_per_key_without_holding_workers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    per_key: PerKey[str] = PerKey(host, rate=Rate(2))
    pool = FakePool(per_key, host, workers=2)
    items = [f"{h}/{i}" for i in range(4) for h in "ab"]
    await pool.run(items, lambda item: 0.1)
    for h in "ab":
        starts = sorted(t for item, t in pool.started.items() if item.startswith(h))
        assert starts == [0.0, 0.5, 1.0, 1.5]


async def test_per_key_acquire_waits_fifo_and_a_cancelled_waiter_leaves_the_line(
    autojump_clock: trio.testing.MockClock,
) -> None:
    per_key: PerKey[str] = PerKey(host, limit=1)
    log: list[tuple[str, float]] = []

    async def attempt(item: str) -> None:
        token = await per_key.acquire(item)
        log.append((item, trio.current_time()))
        await trio.sleep(1)
        per_key.release(token, None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(attempt, "a/1")
        await trio.sleep(0.1)
        doomed = trio.CancelScope()

        async def cancelled_waiter() -> None:
            with doomed:
                await per_key.acquire("a/doomed")
            log.append(("left", trio.current_time()))

        nursery.start_soon(cancelled_waiter)
        await trio.sleep(0.1)
        nursery.start_soon(attempt, "a/2")
        await trio.sleep(0.1)
        nursery.start_soon(attempt, "a/3")
        await trio.sleep(0.1)
        doomed.cancel()
    assert log == [("a/1", 0.0), ("left", 0.4), ("a/2", 1.0), ("a/3", 2.0)]
    assert per_key.keys == 0


async def test_per_key_cancel_while_waiting_for_a_rate_slot_releases_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    per_key: PerKey[str] = PerKey(host, limit=5, rate=Rate(1))
    first = await per_key.acquire("a/1")
    with trio.move_on_after(0.5):
        await per_key.acquire("a/2")  # slot at 1.0: cancelled before it
    assert per_key.running("a") == 1
    second = await per_key.acquire("a/3")
    assert trio.current_time() == 1.0  # the cancelled slot was given back
    per_key.release(first, None)
    per_key.release(second, None)


async def test_per_key_forgets_idle_keys_a_million_distinct_keys(
    autojump_clock: trio.testing.MockClock,
) -> None:
    per_key: PerKey[int] = PerKey(lambda item: item, limit=2)
    peak = 0
    for i in range(1_000_000):
        token = await per_key.acquire(i)
        peak = max(peak, per_key.keys)
        per_key.release(token, None)
    assert peak == 1
    assert per_key.keys == 0


async def test_per_key_with_rate_forgets_keys_once_their_rate_state_is_fresh(
    autojump_clock: trio.testing.MockClock,
) -> None:
    per_key: PerKey[int] = PerKey(lambda item: item, rate=Rate(10))  # fresh 0.1 s after use
    peak = 0
    for i in range(100_000):
        token = await per_key.acquire(i)
        per_key.release(token, None)
        peak = max(peak, per_key.keys)
        if i % 1000 == 999:
            await trio.sleep(0.01)  # 1000 new keys per 10 ms: ~10 windows warm at once
    assert peak <= 12_000
    await trio.sleep(1)
    await per_key.acquire(-1)  # forgetting is lazy: the next call sweeps
    assert per_key.keys == 1


async def test_per_key_withdraw_returns_the_parked_jobs_of_one_pool() -> None:
    per_key: PerKey[str] = PerKey(host, limit=1)
    resent: list[str] = []

    def resend_a(job: str, token: Any, due: float) -> None:
        resent.append(job)

    def resend_b(job: str, token: Any, due: float) -> None:
        resent.append(job)

    token = await per_key.admit("h/0", "job0", resend_a)
    assert token is not None
    assert await per_key.admit("h/1", "job1", resend_a) is None
    assert await per_key.admit("h/2", "job2", resend_b) is None
    assert await per_key.admit("h/3", "job3", resend_a) is None
    assert per_key.withdraw(resend_a) == ["job1", "job3"]
    assert per_key.parked == 1
    per_key.release(token, None)
    assert resent == ["job2"]  # only b's job is still waiting for the key
    assert per_key.running("h") == 0  # a claim in transit holds no slot
    assert per_key.keys == 1 and per_key.parked == 1


async def test_per_key_discard_frees_a_dropped_claim_and_the_key_is_forgotten() -> None:
    per_key: PerKey[str] = PerKey(host, limit=1)
    claims: list[Any] = []
    token = await per_key.admit("h/0", "job0", lambda job, claim, due: claims.append(claim))
    assert await per_key.admit("h/1", "job1", lambda job, claim, due: claims.append(claim)) is None
    per_key.release(token, None)
    assert len(claims) == 1 and per_key.parked == 1
    per_key.discard(claims[0])
    assert per_key.parked == 0
    assert per_key.keys == 0


async def test_per_key_claim_finding_the_slot_taken_goes_back_to_the_front() -> None:
    per_key: PerKey[str] = PerKey(host, limit=1, max_parked=2)
    resent: list[tuple[str, Any]] = []

    def resend(job: str, claim: Any, due: float) -> None:
        resent.append((job, claim))

    first = await per_key.admit("h/0", "job0", resend)
    assert await per_key.admit("h/1", "job1", resend) is None
    assert await per_key.admit("h/2", "job2", resend) is None
    per_key.release(first, None)  # job1 resent with a claim
    job, claim = resent.pop()
    assert job == "job1"
    # Parking is full (job1 travelling, job2 parked): a worker in hand takes the free slot.
    in_hand = await per_key.admit("h/3", "job3", resend)
    assert in_hand is not None
    assert await per_key.admit("h/1", "job1", resend, claim) is None  # re-parked, at the front
    per_key.release(in_hand, None)
    assert [job for job, _ in resent] == ["job1"]


async def async_host(item: str) -> str:
    return item.split("/")[0]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((host,), {"limit": 0}, ValueError,
         r"^PerKey: limit=0 is not valid: expected an int >= 1 or None; e\.g\. limit=1$"),
        ((host,), {}, ValueError, r"^PerKey: limit=None is not valid: expected an int >= 1 when "
                                  r"rate is None \(give a limit, a rate, or both\); "
                                  r"e\.g\. limit=2$"),
        (("host",), {"limit": 1}, TypeError, r"^PerKey: key='host' is not valid: expected a "
                                             r"function item -> hashable key; e\.g\. key=lambda"),
        ((async_host,), {"limit": 1}, TypeError,
         r"^PerKey: key=async_host is not valid: expected a function item -> hashable key, "
         r"written as a plain `def` \(not `async def`\): conveyor calls it without awaiting it"),
        ((host,), {"limit": True}, TypeError, r"^PerKey: limit=True is not valid: expected an int"),
        ((host,), {"limit": 1, "max_parked": 1.5}, TypeError,
         r"^PerKey: max_parked=1\.5 is not valid: expected an int >= 0; e\.g\. max_parked=1$"),
        ((host,), {"rate": 5}, TypeError, r"^PerKey: rate=5 is not valid: expected a "
                                          r"conveyor\.Rate or None; "
                                          r"e\.g\. rate=conveyor\.Rate\(5\)$"),
        ((host,), {"limit": 1, "max_parked": -1}, ValueError,
         r"^PerKey: max_parked=-1 is not valid: expected an int >= 0; e\.g\. max_parked=0$"),
    ],
)
def test_per_key_refuses_bad_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        PerKey(*args, **kwargs)


# ------------------------------------------------------------------------------- Adaptive


class Overloaded(Exception):
    pass


async def test_adaptive_decreases_once_per_window_on_overload_and_recovers() -> None:
    adaptive = Adaptive(overload_on=Overloaded, min=2, max=16, initial=8)
    tokens = [await adaptive.acquire() for _ in range(8)]
    assert adaptive.running == 8
    # A burst of overload errors from attempts of the same window: one decrease only.
    for token in tokens[:4]:
        adaptive.release(token, Overloaded())
    assert adaptive.limit == 4
    assert adaptive.decreases == 1
    # Other errors are not overload signals: no change either way.
    adaptive.release(tokens[4], ValueError())
    assert adaptive.limit == 4
    for token in tokens[5:]:
        adaptive.release(token, None)
    # Recovery: each good attempt adds 1/limit, so the limit climbs back, never past max.
    seen = []
    for _ in range(400):
        token = await adaptive.acquire()
        adaptive.release(token, None)
        seen.append(adaptive.limit)
    assert seen == sorted(seen)
    assert seen[-1] == 16
    # Repeated overload in new windows drives it down to min and no lower.
    for _ in range(10):
        token = await adaptive.acquire()
        adaptive.release(token, Overloaded())
    assert adaptive.limit == 2


async def test_adaptive_holds_attempts_to_its_current_limit_as_it_grows_and_shrinks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    adaptive = Adaptive(overload_on=lambda e: isinstance(e, Overloaded), min=1, max=4)
    running = 0
    starts: list[tuple[int, int]] = []  # (attempts running, limit) as each one starts

    async def attempt(fail: bool) -> None:
        nonlocal running
        token = await adaptive.acquire()
        running += 1
        starts.append((running, adaptive.limit))
        await trio.sleep(1)
        running -= 1
        adaptive.release(token, Overloaded() if fail else None)

    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(attempt, False)
    assert all(n <= limit for n, limit in starts)  # only grows here: never over
    assert starts[0] == (1, 1) and max(n for n, _ in starts) == 4
    assert adaptive.limit == 4
    # Now the service pushes back: every attempt is overloaded, the limit falls to min and
    # (once the attempts started at the higher limit have ended) one attempt runs at a time.
    starts.clear()
    async with trio.open_nursery() as nursery:
        for _ in range(12):
            nursery.start_soon(attempt, True)
    assert adaptive.limit == 1
    assert [n for n, _ in starts[-4:]] == [1, 1, 1, 1]


async def test_adaptive_latency_target_counts_slow_attempts_as_overload(
    autojump_clock: trio.testing.MockClock,
) -> None:
    adaptive = Adaptive(latency_target=0.5, min=1, max=10, initial=10)
    token = await adaptive.acquire()
    await trio.sleep(0.4)
    adaptive.release(token, None)
    assert adaptive.limit == 10
    token = await adaptive.acquire()
    await trio.sleep(0.6)
    adaptive.release(token, None)
    assert adaptive.limit == 5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"overload_on": Overloaded, "min": 0}, ValueError,
         r"^Adaptive: min=0 is not valid: expected an int >= 1 \(at most 2\*\*53\); e\.g\. min=1$"),
        (
            {"overload_on": Overloaded, "min": 5, "max": 2},
            ValueError,
            r"^Adaptive: min=5 is not valid: expected an int <= max \(2\); e\.g\. min=2$",
        ),
        (
            {"overload_on": Overloaded, "min": 2, "max": 4, "initial": 8},
            ValueError,
            r"^Adaptive: initial=8 is not valid: expected an int within min\.\.max \(2\.\.4\), or "
            r"None \(min\); e\.g\. initial=4$",
        ),
        ({"overload_on": Overloaded, "decrease": 1.0}, ValueError,
         r"^Adaptive: decrease=1\.0 is not valid: expected a finite number > 0 and < 1; "
         r"e\.g\. decrease=0\.5$"),
        ({"overload_on": Overloaded, "increase": 0}, ValueError,
         r"^Adaptive: increase=0 is not valid: expected a finite number > 0;"),
        ({"latency_target": -1}, ValueError, r"^Adaptive: latency_target=-1 is not valid: "
                                             r"expected None or a finite number of seconds > 0;"),
        ({}, ValueError, r"^Adaptive: overload_on=None is not valid: expected .* when "
                         r"latency_target is None \(give overload_on, latency_target, or both\);"),
        ({"overload_on": 429}, TypeError, r"^Adaptive: overload_on=429 is not valid: expected an "
                                          r"exception class, a tuple"),
        ({"overload_on": (Overloaded, 3)}, TypeError,
         r"\(3 in the tuple is not an exception class\); e\.g\. overload_on=TimeoutError$"),
    ],
)
def test_adaptive_refuses_bad_input(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Adaptive(**kwargs)


def test_every_limit_satisfies_the_protocol() -> None:
    limits: list[object] = [
        Rate(1),
        capacity_limit(1),
        PerKey(host, limit=1),
        Adaptive(overload_on=Overloaded),
    ]
    assert all(isinstance(limit, Limit) for limit in limits)


# ------------------------------------------- Adaptive: predicates contained, bad ones refused


class HttpError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def is_429(error: Exception) -> bool:
    return error.status == 429  # type: ignore[attr-defined]  # not every error has one


async def test_adaptive_predicate_never_sees_a_cancel_items_cut_off_are_unfinished(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[type[BaseException]] = []

    def predicate(error: Exception) -> bool:
        seen.append(type(error))
        return is_429(error)

    async def slow(item: int) -> int:
        await trio.sleep(10)
        return item

    adaptive = Adaptive(overload_on=predicate, min=1, max=10, initial=10)
    with trio.move_on_after(1):
        async with conveyor.open_pool(slow, workers=10, adaptive=adaptive) as pool:
            for item in range(10):
                await pool.submit(item)
    report = pool.report()
    assert sorted(r.item for r in report.unfinished) == list(range(10))
    assert report.failed == [] and report.succeeded == []
    assert all(r.attempts == 1 and r.last_error is None for r in report.unfinished)
    assert seen == []  # a Cancelled never reaches the predicate
    assert adaptive.limit == 10 and adaptive.decreases == 0 and adaptive.running == 0


async def test_adaptive_predicate_that_raises_keeps_the_items_own_error_and_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fn(item: int) -> int:
        if item % 2:
            raise ValueError(f"not HTTP: {item}")  # no .status: the predicate raises
        raise HttpError(500)

    adaptive = Adaptive(overload_on=is_429, min=1, max=8, initial=4)
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        report = await conveyor.run(
            fn, range(4), adaptive=adaptive, retry=conveyor.Retry(attempts=2, backoff=None)
        )
    assert sorted(r.item for r in report.failed) == [0, 1, 2, 3]
    for record in report.failed:
        assert record.attempts == 2  # retried as usual: the predicate decides nothing else
        if record.item % 2:
            assert type(record.error) is ValueError
            assert record.error.__notes__[-1] == (
                "conveyor: the Adaptive overload_on predicate 'is_429' raised on this error "
                "(AttributeError: 'ValueError' object has no attribute 'status'); counted as "
                "no overload signal"
            )
            assert record.error.__notes__[-1] in record.traceback
        else:
            assert type(record.error) is HttpError and not hasattr(record.error, "__notes__")
    assert adaptive.limit == 4 and adaptive.decreases == 0
    logged = [r for r in caplog.records if "overload_on predicate" in r.getMessage()]
    assert len(logged) == 4 and all(r.levelno == logging.WARNING for r in logged)
    assert sorted(r.getMessage().rsplit("; ", 1)[1] for r in logged) == [
        "the error was ValueError: not HTTP: 1", "the error was ValueError: not HTTP: 1",
        "the error was ValueError: not HTTP: 3", "the error was ValueError: not HTTP: 3",
    ]


async def returns_true(error: Exception) -> bool:
    return True


@pytest.mark.parametrize(
    ("overload_on", "error", "match"),
    [
        (int, TypeError, r"^Adaptive: overload_on=int is not valid: expected an exception class, "
                         r"a tuple of them, or a predicate f\(exc\) -> bool \(int is not an "
                         r"exception class\); e\.g\. overload_on=TimeoutError$"),
        (429, TypeError, r"^Adaptive: overload_on=429 is not valid: expected an exception class"),
        ("429", TypeError, r"^Adaptive: overload_on='429' is not valid: expected an exception "),
        ((), ValueError, r"^Adaptive: overload_on=\(\) is not valid: expected .*, not an empty "
                         r"tuple; e\.g\. overload_on=TimeoutError$"),
        (returns_true, TypeError,
         r"^Adaptive: overload_on=returns_true is not valid: expected .*, written as a plain "
         r"`def` \(not `async def`\): conveyor calls it without awaiting it"),
    ],
)
def test_adaptive_refuses_bad_overload_on(overload_on: Any, error: type[Exception], match: str
                                          ) -> None:
    with pytest.raises(error, match=match):
        Adaptive(overload_on=overload_on)


async def test_adaptive_predicate_returning_a_coroutine_is_no_signal_and_no_warning() -> None:
    adaptive = Adaptive(overload_on=lambda e: returns_true(e), initial=4, max=8)

    async def fn(item: int) -> None:
        raise HttpError(429)

    report = await conveyor.run(fn, range(3), adaptive=adaptive)
    gc.collect()  # an unawaited coroutine would warn, an error under filterwarnings
    assert adaptive.decreases == 0 and len(report.failed) == 3
    assert "returned an awaitable (coroutine), not a bool" in report.failed[0].error.__notes__[0]


async def test_the_advice_for_an_async_overload_on_works() -> None:
    def plain(error: Exception) -> bool:  # the same predicate, as a plain def
        return True

    adaptive = Adaptive(overload_on=plain, initial=4, max=8)

    async def fn(item: int) -> None:
        raise HttpError(429)

    await conveyor.run(fn, [1], adaptive=adaptive)
    assert adaptive.limit == 2 and adaptive.decreases == 1


# -------------------------------------------------------- Adaptive: one decrease per episode


async def test_a_slot_freed_by_an_overloaded_attempt_is_not_handed_on_before_the_decrease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    adaptive = Adaptive(overload_on=Overloaded, min=1, max=16, initial=8)
    tokens = [await adaptive.acquire() for _ in range(8)]
    granted: list[Any] = []

    async def waiter() -> None:
        granted.append(await adaptive.acquire())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        adaptive.release(tokens[0], Overloaded())
        await trio.testing.wait_all_tasks_blocked()
        assert adaptive.limit == 4 and adaptive.running == 7 and granted == []
        for token in tokens[1:4]:  # the same episode: no second decrease
            adaptive.release(token, Overloaded())
        assert adaptive.limit == 4 and adaptive.decreases == 1
        adaptive.release(tokens[4], None)
        await trio.testing.wait_all_tasks_blocked()
        assert granted  # running fell to 3 < 4: the waiter gets the slot now
        for token in tokens[5:]:
            adaptive.release(token, None)
    adaptive.release(granted[0], None)
    assert adaptive.running == 0


async def test_adaptive_against_a_service_that_takes_6_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """AIMD on a service that refuses (at once) any call beyond 6 concurrent ones.

    Ideal: 600 calls of 0.1 s, 6 at a time, take 600 * 0.1 / 6 = 10.0 s. The limit probes
    7, gets the one refusal and halves once (7 * 0.5 -> 3), then climbs back as the calls
    already running finish (with two decreases per episode it sank to 1 and the run took
    12.3 s, 1.23x).
    """
    calls, duration, capacity = 600, 0.1, 6
    adaptive = Adaptive(overload_on=Overloaded, min=1, max=100)
    running = 0
    refused = 0

    async def service(item: int) -> int:
        nonlocal running, refused
        if running >= capacity:
            refused += 1
            raise Overloaded
        running += 1
        try:
            await trio.sleep(duration)
        finally:
            running -= 1
        return item

    samples: list[tuple[float, int]] = []  # (time, limit in force), every 10 ms

    async def watch(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await trio.sleep(0.005)  # between the rounds of calls, never at one
        task_status.started()
        while True:
            samples.append((trio.current_time(), adaptive.limit))
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await nursery.start(watch)
        report = await conveyor.run(
            service, range(calls), workers=20, adaptive=adaptive,
            retry=conveyor.Retry(attempts=100, backoff=None),
        )
        elapsed = trio.current_time()
        nursery.cancel_scope.cancel()
    ideal = calls * duration / capacity
    assert len(report.succeeded) == calls
    assert elapsed <= 1.15 * ideal, (elapsed, ideal)
    warm = [limit for t, limit in samples if t > 1.0]  # warm-up: 1 -> 7 takes < 1 s
    assert min(warm) >= 3 and max(warm) <= 6, Counter(warm)
    assert adaptive.decreases == refused  # one refusal per episode, one decrease each
