"""Seed 000 on conveyor: 100 tasks, 20 workers, retries, and an account of what gave up.

The seed (an asyncio.Queue, 20 workers, task_done in finally, join, then cancel) sends
batches of features to prediction servers; a call can fail at random (a retry helps) or
always (item 50: a retry never helps). Here the same job is one call to conveyor.run:
failed items go back over the work channel until their attempts run out, and every item
ends as Succeeded or Failed, with its error.

    python examples/retry_queue.py              # 1 s of "I/O" per task, as in the seed
    python examples/retry_queue.py --scale 0.05 # the same schedule, 20 times faster
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from collections.abc import Awaitable, Callable

import trio

import conveyor

LOGGER = logging.getLogger("retry_queue")


def make_task(scale: float, seed: int) -> Callable[[int], Awaitable[int]]:
    tries: dict[int, int] = {}

    async def predict(n: int) -> int:
        # Something slow and I/O bound: a request to a prediction server.
        await trio.sleep(1 * scale)
        attempt = tries[n] = tries.get(n, 0) + 1
        if n == 50:
            raise RuntimeError(f"deterministic error {n}")  # a retry never helps
        # A 10 % failure a retry probably cures. Drawn per (item, attempt) from a seeded
        # RNG, so a given --seed gives the same failures whatever order tasks run in.
        if random.Random(f"{seed}:{n}:{attempt}").random() < 0.1:
            raise RuntimeError(f"stochastic error {n}")
        return n + 1000000

    return predict


async def main(scale: float, seed: int, items: int, workers: int, attempts: int) -> None:
    predict = make_task(scale, seed)
    started = time.perf_counter()
    report = await conveyor.run(
        predict,
        range(items),
        workers=workers,
        retry=conveyor.Retry(attempts=attempts, backoff=None),  # resend at once, like the seed
    )
    elapsed = time.perf_counter() - started
    print(f"#success = {len(report.succeeded)}")
    print("failed tasks")
    for failed in report.failed:
        print(f"  item {failed.item}: {type(failed.error).__name__}: {failed.error} "
              f"(after {failed.attempts} attempts)")
    stats = report.stats
    print(f"attempts = {stats.attempts}, retried = {stats.retried}, "
          f"unfinished = {stats.unfinished}, time = {elapsed:.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="seconds of work per task (default 1.0, as in the seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random failures")
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--attempts", type=int, default=4,
                        help="attempts per item, the first included (the seed's max_retry 3 + 1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")
    trio.run(main, args.scale, args.seed, args.items, args.workers, args.attempts)
