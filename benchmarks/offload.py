"""Scenario 3, offload: CPU work sent to worker processes, heavy and tiny.

- heavy: 40 jobs of ~50 ms of pure-Python CPU, 2 workers: `conveyor.in_process` in
  `conveyor.run(..., workers=2)` against `asyncio.gather` of `loop.run_in_executor` on a
  `ProcessPoolExecutor(2)`. Wall time, after the pool's workers have been started (one short
  call each); the note gives ideal / wall, where ideal = (sum of the jobs' times, each
  measured inside its worker) / min(2, CPUs): a machine slowed down by other programs slows
  the jobs, not the pool's score.
- tiny round trips: 1,000 calls of `x + 1`, one after the other, then from 2 concurrent
  callers; µs per round trip, after a first call that starts the pool (reported apart as
  "start").
- tiny throughput: many tiny jobs, one round trip per job against batches of 256 (asyncio:
  `run_in_executor` of a function mapping a chunk; conveyor: `in_process_batched`). µs per
  job, pools started beforehand. The unbatched runs use a tenth of the items (they are much
  slower; the figures are per job).
- first job on a fresh worker: `tiny(1)` in a worker process started for it (a trio-parallel
  `cache_scope` of its own per measurement), from the call to the result: trio-parallel's
  `run_sync` alone (reference) against `conveyor.in_process`, and against a one-item
  `conveyor.run` with a `timeout` (which starts the worker before the attempt's clock runs).
  What conveyor adds is what its worker-side code imports (the goal: within 1.2x); this is
  paid again after every worker killed by a cancel or a timeout.

The functions are module-level so worker processes import them by name.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from time import perf_counter
from typing import Any

from benchmarks._harness import Case, Config, Sample, System, conveyor_has, run_loop

NAME = "offload"
HEAVY_JOBS = 40
HEAVY_SECONDS = 0.050
POOL = 2
BATCH = 256
WARM = 0.05  # seconds of sleep per worker to start a pool before timing


def spin(n: int) -> int:
    """Pure-Python CPU work, linear in `n` (the sum stays a small int, so no bignum slowdown)."""
    x = 0
    for i in range(n):
        x = (x + i * i) % 1_000_003
    return x


def tiny(x: int) -> int:
    return x + 1


def tiny_chunk(xs: Sequence[int]) -> list[int]:
    return [tiny(x) for x in xs]


def calibrate(seconds: float) -> tuple[int, float]:
    """(n, t): `spin(n)` takes about `seconds` here; t is its measured time (best of 3)."""
    n = 100_000
    while True:
        t0 = perf_counter()
        spin(n)
        dt = perf_counter() - t0
        if dt > 0.02:
            break
        n *= 2
    for _ in range(2):  # refine: the first probes run cold
        n = max(1, int(n * seconds / dt))
        t0 = perf_counter()
        spin(n)
        dt = perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = perf_counter()
        spin(n)
        times.append(perf_counter() - t0)
    return n, min(times)


def _cores() -> int:
    return min(POOL, os.cpu_count() or 1)


async def _warm_asyncio(pool: ProcessPoolExecutor) -> None:
    """Start every worker of `pool` (one short sleep each, at once) before the clock runs."""
    import asyncio

    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(pool, time.sleep, WARM) for _ in range(POOL)))


async def _warm_conveyor() -> None:
    """Start every trio-parallel worker (the default backend) before the clock runs."""
    import trio

    import conveyor

    warm = conveyor.in_process(time.sleep)
    async with trio.open_nursery() as nursery:
        for _ in range(POOL):
            nursery.start_soon(warm, WARM)


# ---- heavy --------------------------------------------------------------------------------


def timed_spin(n: int) -> float:
    """`spin(n)` in a worker; returns how long it took there (seconds)."""
    t0 = perf_counter()
    spin(n)
    return perf_counter() - t0


def _heavy_sample(wall: float, job_seconds: list[float]) -> Sample:
    # Ideal from the jobs' own times in the workers (so a machine slowed down by other
    # programs does not count against the pool): all cores busy with jobs, nothing else.
    ideal = sum(job_seconds) / _cores()
    return Sample(wall, {"efficiency": ideal / wall, "ideal": ideal})


def heavy_asyncio(jobs: int, n: int) -> Sample:
    import asyncio

    async def main() -> tuple[float, list[float]]:
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(max_workers=POOL) as pool:
            await _warm_asyncio(pool)
            t0 = perf_counter()
            times = await asyncio.gather(
                *(loop.run_in_executor(pool, timed_spin, n) for _ in range(jobs))
            )
            return perf_counter() - t0, list(times)

    return _heavy_sample(*run_loop(main))


def heavy_conveyor(jobs: int, n: int) -> Sample:
    import trio

    import conveyor

    async def main() -> tuple[float, list[float]]:
        await _warm_conveyor()
        t0 = perf_counter()
        report = await conveyor.run(conveyor.in_process(timed_spin), [n] * jobs, workers=POOL)
        dt = perf_counter() - t0
        assert len(report.succeeded) == jobs, report.stats
        return dt, [r.value for r in report.succeeded]

    return _heavy_sample(*trio.run(main))


# ---- tiny round trips ---------------------------------------------------------------------


def _split(n: int, callers: int) -> list[range]:
    return [range(c, n, callers) for c in range(callers)]


def roundtrip_asyncio(n: int, callers: int) -> Sample:
    import asyncio

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(max_workers=POOL) as pool:
            t0 = perf_counter()
            await loop.run_in_executor(pool, tiny, 0)
            t1 = perf_counter()

            async def caller(xs: range) -> None:
                for x in xs:
                    assert await loop.run_in_executor(pool, tiny, x) == x + 1

            await asyncio.gather(*(caller(xs) for xs in _split(n, callers)))
            t2 = perf_counter()
        return t1 - t0, t2 - t1

    start, dt = run_loop(main)
    return Sample(dt / n * 1e6, {"start_ms": start * 1e3})


def roundtrip_conveyor(n: int, callers: int) -> Sample:
    import trio

    import conveyor

    async def main() -> tuple[float, float]:
        fn = conveyor.in_process(tiny)
        t0 = perf_counter()
        await fn(0)
        t1 = perf_counter()

        async def caller(xs: range) -> None:
            for x in xs:
                assert await fn(x) == x + 1

        async with trio.open_nursery() as nursery:
            for xs in _split(n, callers):
                nursery.start_soon(caller, xs)
        t2 = perf_counter()
        return t1 - t0, t2 - t1

    start, dt = trio.run(main)
    return Sample(dt / n * 1e6, {"start_ms": start * 1e3})


# ---- tiny throughput ----------------------------------------------------------------------


def many_asyncio(n: int, chunk: int) -> Sample:
    import asyncio

    async def main() -> float:
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(max_workers=POOL) as pool:
            await _warm_asyncio(pool)
            t0 = perf_counter()
            if chunk == 1:
                out = await asyncio.gather(*(loop.run_in_executor(pool, tiny, x) for x in range(n)))
            else:
                parts = await asyncio.gather(
                    *(
                        loop.run_in_executor(pool, tiny_chunk, range(i, min(i + chunk, n)))
                        for i in range(0, n, chunk)
                    )
                )
                out = [y for part in parts for y in part]
            dt = perf_counter() - t0
        assert len(out) == n and out[-1] == n
        return dt

    return Sample(run_loop(main) / n * 1e6)


def many_conveyor(n: int, chunk: int) -> Sample:
    import trio

    import conveyor

    async def main() -> float:
        await _warm_conveyor()
        t0 = perf_counter()
        report: Any
        if chunk == 1:
            report = await conveyor.run(conveyor.in_process(tiny), range(n), workers=4 * POOL)
        else:
            async with conveyor.in_process_batched(tiny, batch_size=chunk) as fn:
                report = await conveyor.run(fn, range(n), workers=4 * chunk)
        dt = perf_counter() - t0
        assert len(report.succeeded) == n, report.stats
        return dt

    return Sample(trio.run(main) / n * 1e6)


# ---- first job on a fresh worker ----------------------------------------------------------


def fresh_trio_parallel() -> Sample:
    import trio
    import trio_parallel

    async def main() -> float:
        async with trio_parallel.cache_scope():  # no idle worker: this call starts one
            t0 = perf_counter()
            assert await trio_parallel.run_sync(tiny, 1) == 2
            return perf_counter() - t0

    return Sample(trio.run(main) * 1e3)


def fresh_conveyor(timeout: float | None) -> Sample:
    import trio
    import trio_parallel

    import conveyor

    async def main() -> float:
        fn = conveyor.in_process(tiny)
        async with trio_parallel.cache_scope():
            t0 = perf_counter()
            if timeout is None:
                assert await fn(1) == 2
            else:
                report = await conveyor.run(fn, [1], timeout=timeout)
                assert report.succeeded[0].value == 2, report
            return perf_counter() - t0

    return Sample(trio.run(main) * 1e3)


def cases(cfg: Config) -> list[Case]:
    jobs = cfg.pick(quick=HEAVY_JOBS, full=HEAVY_JOBS, smoke=4)
    seconds = HEAVY_SECONDS if not cfg.smoke else 0.005
    n, t_job = calibrate(seconds)
    trips = cfg.pick(quick=1_000, full=5_000, smoke=20)
    many = cfg.pick(quick=20_000, full=100_000, smoke=200)
    few = max(many // 10, 1)
    has_process = conveyor_has("run", "in_process")
    has_batched = conveyor_has("run", "in_process_batched")
    out = [
        Case(
            NAME,
            f"offload heavy: {jobs} jobs x {t_job * 1e3:.0f} ms, {POOL} workers",
            "s",
            [
                System(
                    "asyncio run_in_executor(ProcessPool)",
                    partial(heavy_asyncio, jobs, n),
                    reference=True,
                ),
                System(
                    "conveyor in_process",
                    partial(heavy_conveyor, jobs, n) if has_process else None,
                ),
            ],
            notes={"efficiency": "{:.2f} of ideal", "ideal": "ideal {:.2f} s"},
            comment=f"on {_cores()} cores",
        )
    ]
    for callers in (1, 2):
        how = "sequential" if callers == 1 else f"{callers} concurrent callers"
        out.append(
            Case(
                NAME,
                f"offload tiny round trip, {trips} calls, {how}",
                "µs/call",
                [
                    System(
                        "asyncio run_in_executor(ProcessPool)",
                        partial(roundtrip_asyncio, trips, callers),
                        reference=True,
                    ),
                    System(
                        "conveyor in_process",
                        partial(roundtrip_conveyor, trips, callers) if has_process else None,
                    ),
                ],
                notes={"start_ms": "start {:.0f} ms"},
            )
        )
    out.append(
        Case(
            NAME,
            f"offload tiny jobs: {many} batched by {BATCH}, {few} one by one",
            "µs/job",
            [
                System(
                    f"asyncio run_in_executor, 1 per call ({few})",
                    partial(many_asyncio, few, 1),
                    reference=True,
                ),
                System(
                    f"asyncio run_in_executor, chunks of {BATCH}",
                    partial(many_asyncio, many, BATCH),
                ),
                System(
                    f"conveyor in_process, 1 per call ({few})",
                    partial(many_conveyor, few, 1) if has_process else None,
                ),
                System(
                    f"conveyor in_process_batched({BATCH})",
                    partial(many_conveyor, many, BATCH) if has_batched else None,
                ),
            ],
        )
    )
    out.append(
        Case(
            NAME,
            "offload first job on a fresh worker process",
            "ms",
            [
                System("trio-parallel run_sync", fresh_trio_parallel, reference=True),
                System(
                    "conveyor in_process",
                    partial(fresh_conveyor, None) if has_process else None,
                ),
                System(
                    "conveyor run(in_process, timeout=10)",
                    partial(fresh_conveyor, 10.0) if has_process else None,
                ),
            ],
            comment="goal: conveyor in_process within 1.2x",
        )
    )
    return out
