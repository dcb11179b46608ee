"""Scenario 6, batching: tiny jobs grouped into batches of 256 and sent to 2 worker processes.

The question (issue 12): does micro-batching pay off per item? The same tiny jobs (`x + 1`)
go to worker processes, 256 a round trip, and the figure is µs per job, pools started
beforehand:

- reference: asyncio, by hand: the items cut into chunks of 256, each chunk one
  `loop.run_in_executor(ProcessPoolExecutor(2), tiny_chunk, chunk)`, all gathered (the same
  row as in the offload scenario);
- `conveyor.in_process_batched(tiny, batch_size=256)` under `conveyor.run`: one call per
  item, batched behind the caller's back (what conveyor offered before batching stages);
- the batching machinery (`conveyor._batch`), two ways: the items go into a trio channel,
  4 batcher tasks each take a batch with `collect(receive, 256, max_wait=0.05)` (size or
  time, whichever first) and send it with `call_batch(in_process(tiny_chunk), batch)` (one
  round trip per batch, one `outcome` per item); or the items are put in a `Collector`
  (a list append each) and each batch answered by `call_batch_flat` (one entry per item,
  the value itself); the latter also with `in_process(..., executor=ProcessPoolExecutor(2))`,
  the reference's own process bridge (its call queue keeps the next chunk waiting in each
  worker, where trio-parallel's default backend has a worker idle for a round trip between
  two batches);
- when the installed conveyor has pipelines: a one-stage pipeline whose stage is a batching
  stage (`batch=conveyor.Batch(256, max_wait=0.05)`) calling `in_process(tiny_chunk)`.

Goal: the batching stage's cost per item at most 2x the hand-chunked asyncio one. The note
gives the parent process's CPU time per job (`time.process_time`), which a busy machine
inflates less than the wall time.

The functions are module-level so worker processes import them by name.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from time import perf_counter, process_time
from typing import Any

from benchmarks._harness import Case, Config, Sample, System, conveyor_has, run_loop
from benchmarks.offload import (
    POOL,
    WARM,
    _warm_asyncio,
    _warm_conveyor,
    many_conveyor,
    tiny_chunk,
)

NAME = "batching"
BATCH = 256
MAX_WAIT = 0.05
BATCHERS = 2 * POOL  # batches in flight or forming at once: a worker never waits for one


def _sample(wall: float, cpu: float, n: int) -> Sample:
    """µs per job, and the parent process's CPU µs per job (what the event loop's side
    costs: less sensitive to a busy machine than the wall time)."""
    return Sample(wall / n * 1e6, {"cpu": cpu / n * 1e6})


def hand_chunked(n: int) -> Sample:
    """The reference: chunks of 256 by hand, `run_in_executor` each, all gathered."""
    import asyncio

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(max_workers=POOL) as pool:
            await _warm_asyncio(pool)
            t0, c0 = perf_counter(), process_time()
            parts = await asyncio.gather(
                *(
                    loop.run_in_executor(pool, tiny_chunk, range(i, min(i + BATCH, n)))
                    for i in range(0, n, BATCH)
                )
            )
            out = [y for part in parts for y in part]
            dt, dc = perf_counter() - t0, process_time() - c0
        assert len(out) == n and out[-1] == n
        return dt, dc

    return _sample(*run_loop(main), n)


def machinery(n: int, cheap: bool, executor: bool = False) -> Sample:
    """4 batcher tasks sending batches to `in_process(tiny_chunk)`: with `cheap`, taken from
    a `Collector` and answered by `call_batch_flat`; else taken from a trio channel by
    `collect` and answered by `call_batch` (an `outcome` per item)."""
    import outcome
    import trio

    import conveyor
    from conveyor._batch import Collector, call_batch, call_batch_flat, collect

    async def main() -> tuple[float, float]:
        if executor:
            pool = ProcessPoolExecutor(max_workers=POOL)
            fn = conveyor.in_process(tiny_chunk, executor=pool)
            async with trio.open_nursery() as nursery:  # start the workers first
                for _ in range(POOL):
                    nursery.start_soon(conveyor.in_process(time.sleep, executor=pool), WARM)
        else:
            await _warm_conveyor()
            fn = conveyor.in_process(tiny_chunk)
        results: list[list[Any]] = []
        t0, c0 = perf_counter(), process_time()
        if cheap:
            collector: Collector[int] = Collector(BATCH, MAX_WAIT)

            async def feed() -> None:
                put = collector.put
                for i, x in enumerate(range(n)):
                    put(x)
                    if not i % BATCH:
                        await trio.lowlevel.checkpoint()
                collector.close()

            async def batcher() -> None:
                while batch := await collector.take():
                    results.append(await call_batch_flat(fn, batch, split=False))

        else:
            send, receive = trio.open_memory_channel[int](BATCH * BATCHERS)

            async def feed() -> None:
                async with send:
                    for x in range(n):
                        try:
                            send.send_nowait(x)
                        except trio.WouldBlock:
                            await send.send(x)

            async def batcher() -> None:
                while batch := await collect(receive, BATCH, MAX_WAIT):
                    results.append(await call_batch(fn, batch, split=False))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            for _ in range(BATCHERS):
                nursery.start_soon(batcher)
        done = [o for part in results for o in part]
        dt, dc = perf_counter() - t0, process_time() - c0
        if executor:
            pool.shutdown()
        assert len(done) == n, len(done)
        assert not any(isinstance(o, Exception | outcome.Error) for o in done)
        return dt, dc

    return _sample(*trio.run(main), n)


def stage(n: int) -> Sample:
    """A one-stage pipeline, the stage a batching stage over `in_process(tiny_chunk)`."""
    import trio

    import conveyor

    async def main() -> tuple[float, float]:
        await _warm_conveyor()
        pipe = conveyor.pipeline(  # type: ignore[attr-defined]
            conveyor.stage(  # type: ignore[attr-defined]
                conveyor.in_process(tiny_chunk),
                workers=BATCHERS,
                batch=conveyor.Batch(BATCH, max_wait=MAX_WAIT),  # type: ignore[attr-defined]
            )
        )
        t0, c0 = perf_counter(), process_time()
        report = await pipe.run(range(n))
        dt, dc = perf_counter() - t0, process_time() - c0
        assert len(report.succeeded) == n, report.stats
        return dt, dc

    return _sample(*trio.run(main), n)


def cases(cfg: Config) -> list[Case]:
    many = cfg.pick(quick=50_000, full=200_000, smoke=600)
    has_pipeline = conveyor_has("pipeline", "stage", "Batch")
    return [
        Case(
            NAME,
            f"batching tiny jobs: {many} in batches of {BATCH}, {POOL} worker processes",
            "µs/job",
            [
                System(
                    f"asyncio run_in_executor, chunks of {BATCH} by hand",
                    partial(hand_chunked, many),
                    reference=True,
                ),
                System(
                    f"conveyor in_process_batched({BATCH})",
                    partial(many_conveyor, many, BATCH)
                    if conveyor_has("run", "in_process_batched")
                    else None,
                ),
                System(
                    f"conveyor channel+collect+call_batch({BATCH}), in_process(chunk)",
                    partial(machinery, many, False) if conveyor_has("in_process") else None,
                ),
                System(
                    f"conveyor Collector+call_batch_flat({BATCH}), in_process(chunk)",
                    partial(machinery, many, True) if conveyor_has("in_process") else None,
                ),
                System(
                    f"conveyor Collector+call_batch_flat({BATCH}), in_process(chunk, "
                    "executor=ProcessPool)",
                    partial(machinery, many, True, True) if conveyor_has("in_process") else None,
                ),
                System(
                    f"conveyor batching stage Batch({BATCH}), in_process(chunk)",
                    partial(stage, many) if has_pipeline else None,
                ),
            ],
            notes={"cpu": "parent CPU {:.2f} µs/job"},
            comment="goal: the batching stage at most 2x the hand-chunked asyncio cost",
        )
    ]
