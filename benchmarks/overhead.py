"""Scenario 1, overhead: what does the machinery cost per item when the work costs nothing?

100,000 items (`--full`; 30,000 in the quick run), `return x + 1`, 20 workers, with every system's
bookkeeping on:

- asyncio (seed 000): the reference, `_asyncio_seed.main` (pre-filled Queue, a frozen
  dataclass per task, result and give-up queues, `task_done` in `finally`, `join`, cancel).
- the same on uvloop; aiometer's `amap` (no retries: it has none) on asyncio;
- trio by hand: a memory channel, a producer and 20 workers in a nursery, no retries and no
  records: the floor under anything built on trio channels;
- conveyor: `conveyor.run(fn, items, workers=20, retry=Retry(attempts=4))`, which keeps a
  ledger, stats and a `Succeeded` record per item.

Three variants: no-op; one checkpoint per item (`asyncio.sleep(0)`,
`trio.lowlevel.checkpoint()`); bounded queue (buffer 100)
fed by a producer task, seed 001's backpressure pattern. Figures are µs per item, timed inside
the event loop from the first line of `main` to the last (loop start-up excluded for all).

A fourth case compares the two forms of `conveyor.map` on no-op items: the structured
`async with conveyor.map(...) as records` (the reference) and the bare
`async for record in conveyor.map(...)`, whose pool runs in a system task (issue 9: the bare
form should cost at most 1.2x the structured one per item).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from time import perf_counter
from typing import Any

import trio

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

NAME = "overhead"
WORKERS = 20
ATTEMPTS = 4
BUFFER = 100


# ---- the work ---------------------------------------------------------------------------


async def noop(x: int) -> int:
    return x + 1


async def asyncio_checkpoint(x: int) -> int:
    await asyncio.sleep(0)
    return x + 1


async def trio_checkpoint(x: int) -> int:
    await trio.lowlevel.checkpoint()
    return x + 1


# ---- the systems ------------------------------------------------------------------------


def asyncio_seed(fn: Callable[[int], Awaitable[Any]], n: int, bounded: int, uv: bool) -> Sample:
    async def main() -> float:
        t0 = perf_counter()
        out = await _asyncio_seed.main(
            fn, range(n), num_workers=WORKERS, attempts=ATTEMPTS, bounded=bounded
        )
        dt = perf_counter() - t0
        assert out.num_result == n and not out.giveups, out
        return dt

    return Sample(run_loop(main, uvloop=uv) / n * 1e6)


def aiometer_amap(fn: Callable[[int], Awaitable[Any]], n: int) -> Sample:
    import aiometer

    async def main() -> float:
        t0 = perf_counter()
        count = 0
        async with aiometer.amap(fn, range(n), max_at_once=WORKERS) as results:
            async for _ in results:
                count += 1
        dt = perf_counter() - t0
        assert count == n
        return dt

    return Sample(run_loop(main) / n * 1e6)


def trio_by_hand(fn: Callable[[int], Awaitable[Any]], n: int, bounded: int) -> Sample:
    async def main() -> float:
        t0 = perf_counter()
        results: list[Any] = []
        send, receive = trio.open_memory_channel[int](bounded or WORKERS)

        async def produce() -> None:
            async with send:
                for i in range(n):
                    await send.send(i)

        async def work(receive: trio.MemoryReceiveChannel[int]) -> None:
            async with receive:
                async for x in receive:
                    results.append(await fn(x))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            async with receive:
                for _ in range(WORKERS):
                    nursery.start_soon(work, receive.clone())
        dt = perf_counter() - t0
        assert len(results) == n
        return dt

    return Sample(trio.run(main) / n * 1e6)


def conveyor_run(fn: Callable[[int], Awaitable[Any]], n: int, bounded: int) -> Sample:
    import conveyor

    async def main() -> float:
        t0 = perf_counter()
        kwargs: dict[str, Any] = {"buffer": bounded} if bounded else {}
        report = await conveyor.run(
            fn, range(n), workers=WORKERS, retry=conveyor.Retry(attempts=ATTEMPTS), **kwargs
        )
        dt = perf_counter() - t0
        assert len(report.succeeded) == n and not report.failed and not report.unfinished
        return dt

    return Sample(trio.run(main) / n * 1e6)


def conveyor_map(n: int, bare: bool) -> Sample:
    import conveyor

    async def main() -> float:
        t0 = perf_counter()
        count = 0
        stream = conveyor.map(noop, range(n), workers=WORKERS)
        if bare:
            async for _ in stream:
                count += 1
        else:
            async with stream as records:
                async for _ in records:
                    count += 1
        dt = perf_counter() - t0
        assert count == n
        return dt

    return Sample(trio.run(main) / n * 1e6)


def label(n: int) -> str:
    """100000 -> '100k'."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def cases(cfg: Config) -> list[Case]:
    n = cfg.pick(quick=30_000, full=100_000, smoke=300)
    # aiometer starts a task per item (~10x slower here): a tenth of the items keeps the quick
    # run quick; its figure is per item, so it stays comparable.
    n_aiometer = max(n // 10, 1)
    have_conveyor = conveyor_has("run", "Retry")
    out = []
    for variant, afn, tfn, bounded in [
        ("no-op", noop, noop, 0),
        ("1 checkpoint", asyncio_checkpoint, trio_checkpoint, 0),
        (f"no-op, queue {BUFFER} + producer", noop, noop, BUFFER),
    ]:
        systems = [
            System("asyncio (seed 000)", partial(asyncio_seed, afn, n, bounded, False), True),
            System(
                "asyncio+uvloop (seed 000)",
                partial(asyncio_seed, afn, n, bounded, True) if has_uvloop() else None,
                missing="n/a (uvloop not installed)",
            ),
        ]
        if not bounded:
            systems.append(
                System(
                    f"aiometer.amap ({label(n_aiometer)}, no retry)",
                    partial(aiometer_amap, afn, n_aiometer) if has_aiometer() else None,
                    missing="n/a (aiometer not installed)",
                )
            )
        systems += [
            System("trio by hand (no retry/ledger)", partial(trio_by_hand, tfn, n, bounded)),
            System(
                "conveyor.run",
                partial(conveyor_run, tfn, n, bounded) if have_conveyor else None,
            ),
        ]
        out.append(Case(NAME, f"overhead {variant}, {label(n)} items", "µs/item", systems))
    have_map = conveyor_has("map")
    out.append(Case(NAME, f"conveyor.map forms, no-op, {label(n)} items", "µs/item", [
        System("map, async with (structured)",
               partial(conveyor_map, n, False) if have_map else None, True),
        System("map, bare async for", partial(conveyor_map, n, True) if have_map else None),
    ]))
    return out
