"""Scenario 2, io: seed 000's workload scaled down, where retries meet waiting.

1,000 items, each attempt sleeps 10 ms (the I/O), item 50 always fails, and any other attempt
fails with probability 10%; 4 attempts in all, 50 workers. Whether an attempt fails is decided
per (item, attempt number) from a seeded RNG, so every system sees the same failure schedule,
makes the same number of attempts and ends with the same successes and give-ups (checked).

The figure is the wall time; the note gives wall / ideal, where
ideal = ceil(total attempts / workers) x 10 ms: every worker sleeping all the time.
The asyncio pattern puts a retry at the back of the queue, so retries pile up at the tail.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from time import perf_counter
from typing import Any

from benchmarks import _asyncio_seed
from benchmarks._harness import (
    Case,
    Config,
    Sample,
    System,
    conveyor_has,
    has_aiometer,
    has_uvloop,
    run_loop,
)

NAME = "io"
WORKERS = 50
ATTEMPTS = 4
DELAY = 0.010
P_FAIL = 0.1
ALWAYS_FAILS = 50
SEED = 20240000


def failure_schedule(n: int, seed: int = SEED) -> frozenset[tuple[int, int]]:
    """The (item, attempt) pairs (attempt counted from 1) that fail at random."""
    rng = random.Random(seed)
    return frozenset(
        (i, a) for i in range(n) for a in range(1, ATTEMPTS + 1) if rng.random() < P_FAIL
    )


def expected(n: int, fails: frozenset[tuple[int, int]]) -> tuple[int, int, int]:
    """(total attempts, successes, give-ups) that the schedule implies."""
    total = ok = 0
    for i in range(n):
        for a in range(1, ATTEMPTS + 1):
            total += 1
            if i != ALWAYS_FAILS and (i, a) not in fails:
                ok += 1
                break
    return total, ok, n - ok


def make_work(
    sleep: Callable[[float], Awaitable[Any]], fails: frozenset[tuple[int, int]]
) -> Callable[[int], Awaitable[int]]:
    """Seed 000's `run(n)`, with a seeded schedule instead of `random.random()`."""
    seen: Counter[int] = Counter()

    async def run(n: int) -> int:
        seen[n] += 1
        attempt = seen[n]
        await sleep(DELAY)
        if n == ALWAYS_FAILS:
            raise RuntimeError(f"deterministic error {n}")
        if (n, attempt) in fails:
            raise RuntimeError(f"stochastic error {n}")
        return n + 1_000_000

    return run


def _sample(wall: float, total_attempts: int) -> Sample:
    ideal = math.ceil(total_attempts / WORKERS) * DELAY
    return Sample(wall * 1e3, {"x_ideal": wall / ideal, "ideal_ms": ideal * 1e3})


def asyncio_seed(n: int, uv: bool) -> Sample:
    import asyncio

    fails = failure_schedule(n)
    total, ok, gave_up = expected(n, fails)

    async def main() -> float:
        t0 = perf_counter()
        out = await _asyncio_seed.main(
            make_work(asyncio.sleep, fails), range(n), num_workers=WORKERS, attempts=ATTEMPTS
        )
        dt = perf_counter() - t0
        assert (out.num_result, len(out.giveups)) == (ok, gave_up), out
        return dt

    return _sample(run_loop(main, uvloop=uv), total)


def aiometer_inline(n: int) -> Sample:
    """aiometer has no retry: each item's task retries in place, at once."""
    import asyncio

    import aiometer

    fails = failure_schedule(n)
    total, ok, gave_up = expected(n, fails)

    async def main() -> float:
        run = make_work(asyncio.sleep, fails)

        async def with_retry(i: int) -> bool:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    await run(i)
                except Exception:
                    if attempt == ATTEMPTS:
                        return False
                else:
                    return True
            raise AssertionError("unreachable")

        t0 = perf_counter()
        oks = await aiometer.run_all(
            [partial(with_retry, i) for i in range(n)], max_at_once=WORKERS
        )
        dt = perf_counter() - t0
        assert (sum(oks), n - sum(oks)) == (ok, gave_up)
        return dt

    return _sample(run_loop(main), total)


def conveyor_run(n: int) -> Sample:
    import trio

    import conveyor

    fails = failure_schedule(n)
    total, ok, gave_up = expected(n, fails)

    async def main() -> float:
        t0 = perf_counter()
        report = await conveyor.run(
            make_work(trio.sleep, fails),
            range(n),
            workers=WORKERS,
            retry=conveyor.Retry(attempts=ATTEMPTS, backoff=None),
        )
        dt = perf_counter() - t0
        assert (len(report.succeeded), len(report.failed)) == (ok, gave_up), report.stats
        return dt

    return _sample(trio.run(main), total)


def cases(cfg: Config) -> list[Case]:
    n = cfg.pick(quick=1_000, full=10_000, smoke=60)
    total, _, _ = expected(n, failure_schedule(n))
    return [
        Case(
            NAME,
            f"io {n} items x 10 ms, 10% fail, 4 attempts, 50 workers",
            "ms",
            [
                System("asyncio (seed 000)", partial(asyncio_seed, n, False), reference=True),
                System(
                    "asyncio+uvloop (seed 000)",
                    partial(asyncio_seed, n, True) if has_uvloop() else None,
                    missing="n/a (uvloop not installed)",
                ),
                System(
                    "aiometer.run_all (retry inline)",
                    partial(aiometer_inline, n) if has_aiometer() else None,
                    missing="n/a (aiometer not installed)",
                ),
                System(
                    "conveyor.run (backoff=None)",
                    partial(conveyor_run, n) if conveyor_has("run", "Retry") else None,
                ),
            ],
            notes={"x_ideal": "{:.3f} x ideal"},
            comment=f"ideal {math.ceil(total / WORKERS) * DELAY * 1e3:.0f} ms ({total} attempts)",
        )
    ]
