"""The invariants of docs/design.md (1-8) as hypothesis properties, over random worker
counts, buffer sizes, attempt limits, per-item failure schedules and cancel times (virtual
time: MockClock).

1. every accepted item settles exactly once;  2. attempts never exceed Retry.attempts and a
non-retryable error is attempted once;  3. at most `workers` attempts at once;  4. an
exception from fn never escapes;  6. memory: items taken and not settled <= buffer + workers;
5. when the pool ends nothing it started still runs. With limits drawn too: at most
`limiter` attempts at once, at most one per key under `per_key` (parking included), and the
stats agree with the records (nothing left limited or parked).
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings

import conveyor
from conveyor import Backoff, Retry, Succeeded

from .strategies import Scenario, scenarios


class Fatal(KeyError):
    """Not retryable: Retry(retry_on=RuntimeError) rejects it."""


def check(s: Scenario) -> None:
    n = len(s.plans)
    started: dict[int, int] = {}
    decided: set[int] = set()
    running = 0
    max_running = 0
    per_key_running: dict[int, int] = {}
    max_per_key = 0
    pulled = 0
    # In open_pool mode the caller's own loop takes the next item before submit() waits.
    capacity = s.buffer + s.workers + (s.mode == "open_pool")
    over_capacity: list[int] = []

    def items() -> Any:
        nonlocal pulled
        for i in range(n):
            pulled += 1
            if pulled - len(decided) > capacity:
                over_capacity.append(pulled - len(decided))
            yield i

    async def fn(i: int) -> int:
        nonlocal running, max_running, max_per_key
        attempt = started[i] = started.get(i, 0) + 1
        step = s.step(i, attempt)
        running += 1
        max_running = max(max_running, running)
        k = s.key(i) if s.keys is not None else 0
        per_key_running[k] = per_key_running.get(k, 0) + 1
        max_per_key = max(max_per_key, per_key_running[k])
        try:
            await trio.sleep(step.duration)
        finally:
            running -= 1
            per_key_running[k] -= 1
        if step.outcome == "ok" or step.outcome == "fatal" or attempt == s.attempts:
            decided.add(i)
        if step.outcome == "retry":
            raise RuntimeError(f"retryable {i}/{attempt}")
        if step.outcome == "fatal":
            raise Fatal(i)
        return i * 10

    retry = Retry(
        attempts=s.attempts,
        backoff=None if s.backoff is None else Backoff(initial=s.backoff, jitter=None),
        retry_on=RuntimeError,
    )
    options: dict[str, Any] = {"workers": s.workers, "buffer": s.buffer, "retry": retry}
    options["limiter"] = s.limiter
    if s.keys is not None:
        options["per_key"] = conveyor.PerKey(s.key, limit=1)
    streamed: list[Any] = []
    report: conveyor.Report | None = None

    async def main() -> None:
        nonlocal report
        with trio.move_on_after(s.cancel_at if s.cancel_at is not None else 1e9):
            if s.mode == "run":
                report = await conveyor.run(fn, items(), **options)
            elif s.mode in ("map", "ordered"):
                stream = conveyor.map(fn, items(), ordered=s.mode == "ordered", **options)
                try:
                    async with stream as records:
                        async for record in records:
                            streamed.append(record)
                finally:
                    report = stream.report()
            else:
                pool_cm = conveyor.open_pool(fn, **options)
                try:
                    async with pool_cm as pool:
                        for i in items():
                            await pool.submit(i)
                finally:
                    report = pool.report()
        assert running == 0  # invariant 5: nothing of the pool still runs

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert report is not None
    stats = report.stats
    yielded_ok = [r for r in streamed if isinstance(r, Succeeded)]
    records = yielded_ok + report.succeeded + report.failed + report.unfinished
    items_settled = sorted(r.item for r in records)

    # 1. exactly once, and the counters agree with the records
    assert items_settled == list(range(stats.submitted)), (items_settled, stats)
    assert stats.succeeded == len(yielded_ok) + len(report.succeeded)
    assert stats.failed == len(report.failed) and stats.unfinished == len(report.unfinished)
    assert stats.in_flight == 0 and stats.queued == 0 and stats.waiting_retry == 0
    assert stats.limited == 0 and stats.parked == 0
    assert stats.attempt_latency.count == stats.attempts  # small runs: each one measured
    assert stats.attempts == sum(started.values())
    if s.cancel_at is None:
        assert stats.submitted == n and not report.unfinished
    if s.mode == "ordered":
        assert [r.item for r in streamed] == sorted(r.item for r in streamed)

    # 2. attempts bounded, fatal errors attempted once, each record's count is exact
    for r in records:
        assert r.attempts == started.get(r.item, 0) <= s.attempts
    for r in yielded_ok + report.succeeded:
        assert s.expected_attempts(r.item) == ("ok", r.attempts) and r.value == r.item * 10
    for f in report.failed:
        outcome, count = s.expected_attempts(f.item)
        kind = "fatal" if isinstance(f.error, Fatal) else "retry"
        assert (outcome, count) == (kind, f.attempts)
        assert f.traceback.startswith("Traceback")

    # 3. concurrency bounded by workers, the limiter and per key;  6. intake bounded by
    # buffer + workers (parked items included)
    assert max_running <= s.workers
    if s.limiter is not None:
        assert max_running <= s.limiter
    if s.keys is not None:
        assert max_per_key <= 1
        assert options["per_key"].keys == 0 and options["per_key"].parked == 0
    assert not over_capacity, over_capacity


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_invariants(s: Scenario) -> None:
    check(s)
