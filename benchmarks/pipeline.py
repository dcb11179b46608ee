"""Scenario 6, pipelines: three no-op stages, against what a user writes without conveyor.

- asyncio by hand (the reference): three bounded ``asyncio.Queue``s and a worker group per
  stage, a producer, ``join()`` stage after stage, then ``cancel()`` of every worker (the
  seed-001 recipe, chained); results collected in a list.
- aiostream: ``stream.iterate(items) | pipe.map(f, task_limit=20)`` three times, consumed
  with ``async for``.
- conveyor: ``conveyor.pipeline(stage(f, workers=20), ...)``: ``.map(items)`` consumed with
  ``async for`` (a record per input, the ledger and per-stage stats kept), and ``.run(items)``
  (the report keeps every record).

20 workers per stage, buffer 100 between stages, no-op ``x + 1`` work. Figures are µs per
input, timed inside the event loop. A second case is memory: the peak RSS of a child process
streaming 1,000 inputs against 100,000 (``--full``: 1,000,000) through the three stages
(target: growth <= 1.2x).

Run as a child: ``python -m benchmarks.pipeline memory N`` prints the peak in KiB.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from functools import partial
from time import perf_counter
from typing import Any

import trio

from benchmarks._harness import Case, Config, Sample, System, conveyor_has, run_loop

NAME = "pipeline"
WORKERS = 20
BUFFER = 100
STAGES = 3
SMALL = 1_000


async def noop(x: int) -> int:
    return x + 1


def asyncio_by_hand(n: int) -> Sample:
    async def main() -> float:
        t0 = perf_counter()
        queues: list[asyncio.Queue[int]] = [asyncio.Queue(BUFFER) for _ in range(STAGES)]
        results: list[int] = []

        async def worker(k: int) -> None:
            inbox = queues[k]
            outbox = queues[k + 1] if k + 1 < STAGES else None
            while True:
                x = await inbox.get()
                try:
                    y = await noop(x)
                    if outbox is not None:
                        await outbox.put(y)
                    else:
                        results.append(y)
                finally:
                    inbox.task_done()

        tasks = [asyncio.create_task(worker(k)) for k in range(STAGES) for _ in range(WORKERS)]
        for i in range(n):
            await queues[0].put(i)
        for q in queues:  # stage after stage: a stage's queue is done once the one before is
            await q.join()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        dt = perf_counter() - t0
        assert len(results) == n
        return dt

    return Sample(run_loop(main) / n * 1e6)


def has_aiostream() -> bool:
    try:
        import aiostream  # noqa: F401
    except ImportError:
        return False
    return True


def aiostream_chain(n: int) -> Sample:
    from aiostream import pipe, stream

    async def main() -> float:
        t0 = perf_counter()
        xs = stream.iterate(range(n))
        for _ in range(STAGES):
            xs = xs | pipe.map(noop, task_limit=WORKERS)
        count = 0
        async with xs.stream() as streamer:
            async for _ in streamer:
                count += 1
        dt = perf_counter() - t0
        assert count == n
        return dt

    return Sample(run_loop(main) / n * 1e6)


def _pipe() -> Any:
    import conveyor

    return conveyor.pipeline(*(
        conveyor.stage(noop, name=f"s{k}", workers=WORKERS, buffer=BUFFER) for k in range(STAGES)
    ))


def conveyor_map(n: int) -> Sample:
    async def main() -> float:
        t0 = perf_counter()
        count = 0
        async for _ in _pipe().map(range(n)):
            count += 1
        dt = perf_counter() - t0
        assert count == n
        return dt

    return Sample(trio.run(main) / n * 1e6)


def conveyor_run(n: int) -> Sample:
    async def main() -> float:
        t0 = perf_counter()
        report = await _pipe().run(range(n))
        dt = perf_counter() - t0
        assert len(report.succeeded) == n
        return dt

    return Sample(trio.run(main) / n * 1e6)


def _child_memory(n: int) -> None:
    async def main() -> int:
        count = 0
        async for _ in _pipe().map(range(n)):
            count += 1
        return count

    assert trio.run(main) == n


def peak_kib(n: int) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.pipeline", "memory", str(n)],
        check=True, capture_output=True, text=True,
    )
    return int(out.stdout.split()[-1])


def measure_memory(n: int) -> Sample:
    small = peak_kib(min(SMALL, n)) / 1024
    big = peak_kib(n) / 1024
    return Sample(big, {"small": small, "growth": big / small})


def cases(cfg: Config) -> list[Case]:
    n = cfg.pick(quick=20_000, full=100_000, smoke=300)
    m = cfg.pick(quick=100_000, full=1_000_000, smoke=2_000)
    have = conveyor_has("pipeline", "stage")
    return [
        Case(NAME, f"pipeline: 3 no-op stages x {WORKERS} workers, {n:,} inputs", "µs/item", [
            System("asyncio by hand (3 queues, join, cancel)", partial(asyncio_by_hand, n), True),
            System(
                "aiostream pipe.map(task_limit=20) x 3",
                partial(aiostream_chain, n) if has_aiostream() else None,
                missing="n/a (aiostream not installed)",
            ),
            System("conveyor pipeline .map", partial(conveyor_map, n) if have else None),
            System("conveyor pipeline .run", partial(conveyor_run, n) if have else None),
        ]),
        Case(
            NAME,
            f"pipeline memory: peak RSS, {m:,} inputs through 3 stages"
            + (" (quick; --full: 1,000,000)" if not cfg.full and not cfg.smoke else ""),
            "MiB",
            [System("conveyor pipeline .map (streamed)",
                    partial(measure_memory, m) if have else None, True)],
            notes={"small": f"{min(SMALL, m):,} inputs: {{:.1f}} MiB",
                   "growth": "growth {:.2f}x"},
        ),
    ]


def _main(argv: list[str]) -> None:
    from benchmarks.memory import own_peak_kib

    assert argv[0] == "memory"
    _child_memory(int(argv[1]))
    print(own_peak_kib())


if __name__ == "__main__":
    _main(sys.argv[1:])
