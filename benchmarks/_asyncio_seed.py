"""The asyncio reference: seed 000's retry queue, reproduced faithfully (not tuned down).

Seed 000 (/work/shared/seeds/000_*.txt) is the pattern people already have: a pre-filled
`asyncio.Queue` of frozen `TaskParam` dataclasses, N worker tasks, a result queue and a give-up
queue, a failed task put back on the queue with `retry + 1`, `task_done()` in `finally` so that
`join()` can end, then the workers cancelled. The code below is the seed's, with three changes
that do not make it cheaper:

- `run` (the work) is a parameter instead of a module-level function;
- the seed forgets to await `asyncio.gather(*workers, return_exceptions=True)`; we await it,
  as seed 001 does (a graceful shutdown that waits for the cancelled workers);
- the seed retries while `task.retry <= task.max_retry`, so `max_retry=3` makes FIVE attempts.
  We keep that comparison and pass `max_retry = attempts - 2`, so both systems make the same
  number of attempts (see `max_retry_for`).

The seed logs every failure with `LOGGER.warning(f"...")`; the f-strings are still built (that
is the pattern's cost), but the logger is silenced so the benchmark does not print them.

`bounded` adds seed 001's variant: a bounded queue fed by a producer task (`await put`).
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import Queue
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

LOGGER = logging.getLogger(__name__)
LOGGER.setLevel(logging.ERROR)  # the f-strings are built; the records are dropped
LOGGER.propagate = False


def max_retry_for(attempts: int) -> int:
    """The seed's `max_retry` that gives `attempts` attempts in total (its `<=` off-by-one)."""
    return attempts - 2


@dataclass(frozen=True)
class TaskParam:
    n: int
    retry: int
    max_retry: int

    def increment(self) -> TaskParam:
        return TaskParam(self.n, self.retry + 1, self.max_retry)


async def worker(
    name: str,
    run: Callable[[int], Awaitable[Any]],
    task_queue: Queue[TaskParam],
    result_queue: Queue[Any],
    giveup_queue: Queue[TaskParam],
) -> None:
    while True:
        task: TaskParam = await task_queue.get()
        try:
            ret = await run(task.n)
            result_queue.put_nowait(ret)
        except Exception as e:
            LOGGER.warning(f"{name} catch {e}")
            if task.retry <= task.max_retry:
                LOGGER.info(f"{name} task {task} is sent to retry")
                task_queue.put_nowait(task.increment())
            else:
                LOGGER.warning(f"{name} task {task} exceeds max_retry, give up")
                giveup_queue.put_nowait(task)
        finally:
            # Success or failure, a task taken off the queue must be marked done, or join()
            # never ends (the seed's own comment).
            task_queue.task_done()


@dataclass(frozen=True)
class Outcome:
    """What the pattern produced: how many results, which tasks gave up."""

    num_result: int
    giveups: list[TaskParam]


async def main(
    run: Callable[[int], Awaitable[Any]],
    items: Iterable[int],
    *,
    num_workers: int,
    attempts: int,
    bounded: int = 0,
) -> Outcome:
    """Seed 000's `main`, parametrised. `bounded > 0`: seed 001's bounded queue + producer."""
    task_queue: Queue[TaskParam] = Queue(maxsize=bounded)
    result_queue: Queue[Any] = Queue()
    giveup_queue: Queue[TaskParam] = Queue()
    max_retry = max_retry_for(attempts)

    producer = None
    if bounded:

        async def produce() -> None:
            for i in items:
                await task_queue.put(TaskParam(i, 0, max_retry))

        producer = asyncio.create_task(produce())
    else:
        for i in items:
            task_queue.put_nowait(TaskParam(i, 0, max_retry))

    workers = [
        asyncio.create_task(worker(f"worker-{i}", run, task_queue, result_queue, giveup_queue))
        for i in range(num_workers)
    ]

    if producer is not None:
        await producer
    await task_queue.join()

    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)

    num_result = 0
    while not result_queue.empty():
        _ = result_queue.get_nowait()
        num_result += 1

    giveups = []
    while not giveup_queue.empty():
        giveups.append(giveup_queue.get_nowait())
    return Outcome(num_result, giveups)
