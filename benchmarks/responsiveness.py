"""Scenario 4, responsiveness: does the event loop stay on time while CPU work runs?

A ticker wants to wake every 1 ms and records how late each wake-up is, while 3 CPU-heavy
jobs of ~300 ms (pure Python) run: inline on the event loop, in threads, in processes.
Figures are the p99 lateness in ms (the note adds p50 and max). The worker pools are started
before the ticker (a warm-up call per worker), so pool start-up is not counted.

- asyncio: the jobs called inline in tasks; `asyncio.to_thread`; `run_in_executor` on a
  `ProcessPoolExecutor`. The ticker is `asyncio.sleep` to the next deadline.
- conveyor: `conveyor.run` of an async function calling the job inline; `conveyor.in_thread`;
  `conveyor.in_process`. The ticker is `trio.sleep_until`.

A late tick skips the deadlines it missed (one sample per wake-up, not a burst of them).
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

from benchmarks._harness import Case, Config, Sample, System, conveyor_has, run_loop
from benchmarks.offload import calibrate, spin

NAME = "responsiveness"
PERIOD = 0.001
JOBS = 3
JOB_SECONDS = 0.300


def _pool_size() -> int:
    return min(JOBS, os.cpu_count() or 1)


def _summary(lateness: list[float]) -> Sample:
    ms = sorted(x * 1e3 for x in lateness) or [0.0]
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return Sample(p99, {"p50": statistics.median(ms), "max": ms[-1], "ticks": float(len(ms))})


def asyncio_ticker(mode: str, n: int) -> Sample:
    import asyncio

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        lateness: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            deadline = loop.time() + PERIOD
            while not done.is_set():
                await asyncio.sleep(max(0.0, deadline - loop.time()))
                now = loop.time()
                lateness.append(max(0.0, now - deadline))
                deadline += PERIOD
                if deadline < now:
                    deadline = now + PERIOD

        async def inline() -> None:
            await asyncio.sleep(0)
            spin(n)

        with ProcessPoolExecutor(max_workers=_pool_size()) as pool:
            if mode == "processes":  # start every worker before the ticker
                await asyncio.gather(
                    *(loop.run_in_executor(pool, time.sleep, 0.05) for _ in range(_pool_size()))
                )
            tick = asyncio.create_task(ticker())
            await asyncio.sleep(0.005)
            if mode == "inline":
                await asyncio.gather(*(inline() for _ in range(JOBS)))
            elif mode == "threads":
                await asyncio.gather(*(asyncio.to_thread(spin, n) for _ in range(JOBS)))
            else:
                await asyncio.gather(*(loop.run_in_executor(pool, spin, n) for _ in range(JOBS)))
            done.set()
            await tick
        return lateness

    return _summary(run_loop(main))


def conveyor_ticker(mode: str, n: int) -> Sample:
    import trio

    import conveyor

    async def inline(k: int) -> int:
        await trio.lowlevel.checkpoint()
        return spin(k)

    async def main() -> list[float]:
        lateness: list[float] = []
        fn: Any
        if mode == "inline":
            fn = inline
        elif mode == "threads":
            fn = conveyor.in_thread(spin)
        else:
            fn = conveyor.in_process(spin)
            # start every worker before the ticker
            warm = conveyor.in_process(time.sleep)
            async with trio.open_nursery() as nursery:
                for _ in range(_pool_size()):
                    nursery.start_soon(warm, 0.05)

        async def ticker(cancel_scope: trio.CancelScope) -> None:
            with cancel_scope:
                deadline = trio.current_time() + PERIOD
                while True:
                    await trio.sleep_until(deadline)
                    now = trio.current_time()
                    lateness.append(max(0.0, now - deadline))
                    deadline += PERIOD
                    if deadline < now:
                        deadline = now + PERIOD

        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()
            nursery.start_soon(ticker, scope)
            await trio.sleep(0.005)
            report = await conveyor.run(fn, [n] * JOBS, workers=JOBS)
            assert len(report.succeeded) == JOBS, report.stats
            scope.cancel()
        return lateness

    return _summary(trio.run(main))


def cases(cfg: Config) -> list[Case]:
    n, t = calibrate(JOB_SECONDS if not cfg.smoke else 0.01)
    has = {
        "inline": conveyor_has("run"),
        "threads": conveyor_has("run", "in_thread"),
        "processes": conveyor_has("run", "in_process"),
    }
    return [
        Case(
            NAME,
            f"responsiveness: 1 ms ticker, {JOBS} jobs x {t * 1e3:.0f} ms {mode}",
            "ms p99 late",
            [
                System(f"asyncio ({mode})", partial(asyncio_ticker, mode, n), reference=True),
                System(
                    f"conveyor ({mode})",
                    partial(conveyor_ticker, mode, n) if has[mode] else None,
                ),
            ],
            notes={"p50": "p50 {:.3f} ms", "max": "max {:.1f} ms"},
        )
        for mode in ("inline", "threads", "processes")
    ]
