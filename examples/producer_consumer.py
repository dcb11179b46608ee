"""Seed 001 on trio: producers at different speeds, one pool, live stats, a graceful Ctrl-C.

The seed's asyncio recipe is a ``Queue`` between producers and consumers, workers started
with ``create_task``, ``queue.join()`` and ``cancel()`` for shutdown, and a note to "monitor
the queue (size, wait time) and throughput". Here the queue is the pool's bounded buffer
(``pool.submit`` waits while it is full: backpressure on the producers), the workers are the
pool's, and the monitoring is ``pool.stats``.

Three producers make items at different speeds; the pool processes them (a simulated call
that sometimes fails: transient errors are retried, a few are permanent); a consumer reads
each result as it settles; once a second a stats line shows queue depth, queue-wait p50/p99
and throughput.

On SIGINT (Ctrl-C) it stops the producers, lets attempts already running finish for a grace
period (``pool.stop(drain=...)``), and prints the final account: every item a producer
handed to the pool is in exactly one of succeeded / failed / unfinished. Without Ctrl-C the
producers stop after ``--duration`` seconds and the pool finishes everything it holds.

    python examples/producer_consumer.py --duration 30        # Ctrl-C at any time

The last line of output is the account as JSON (``account: {...}``), which the test reads.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys

import trio

import conveyor

# (name, seconds between items): different speeds, as in the seed.
PRODUCERS = [("fast", 0.005), ("medium", 0.02), ("slow", 0.1)]


class TransientError(Exception):
    """A failure worth another attempt (a timeout, a 503...)."""


class PermanentError(Exception):
    """A failure no retry will fix (bad input)."""


async def process(item: str) -> int:
    """The work on one item: a call of varying latency that sometimes fails."""
    rng = random.Random(item)  # per item, so a retry of it may succeed
    await trio.sleep(rng.uniform(0.01, 0.1))
    roll = random.random()
    if roll < 0.08:
        raise TransientError(f"{item}: try again")
    if roll < 0.09:
        raise PermanentError(f"{item}: cannot be processed")
    return len(item)


def stats_line(stats: conveyor.Stats) -> str:
    def ms(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds * 1000:.0f} ms"

    wait = stats.queue_wait
    return (
        f"stats: queued {stats.queued:3d} | in flight {stats.in_flight:2d} "
        f"| wait p50 {ms(wait.p50)} p99 {ms(wait.p99)} | {stats.throughput:6.1f}/s "
        f"| done {stats.settled} (failed {stats.failed}, retried {stats.retried})"
    )


async def main(duration: float, grace: float, workers: int, buffer: int) -> dict[str, list[str]]:
    produced: list[str] = []
    succeeded: list[str] = []
    failed: list[str] = []
    retry = conveyor.Retry(
        attempts=3, backoff=conveyor.Backoff(initial=0.05), retry_on=TransientError
    )

    async with conveyor.open_pool(process, workers=workers, buffer=buffer, retry=retry) as pool:

        async def producer(name: str, every: float) -> None:
            n = 0
            while True:
                item = f"{name}-{n}"
                n += 1
                try:
                    await pool.submit(item)  # waits while the buffer is full
                except trio.ClosedResourceError:
                    return  # the pool was stopped: this item was not accepted
                produced.append(item)  # accepted: from now on the pool accounts for it
                await trio.sleep(every)

        async def producers() -> None:
            with trio.move_on_after(duration):
                async with trio.open_nursery() as nursery:
                    for name, every in PRODUCERS:
                        nursery.start_soon(producer, name, every)
            pool.close()  # no more items: the pool finishes what it holds

        async def consumer() -> None:
            async for record in pool.results():
                if isinstance(record, conveyor.Succeeded):
                    succeeded.append(record.item)
                else:
                    failed.append(record.item)

        async def monitor() -> None:
            while True:
                await trio.sleep(1)
                print(stats_line(pool.stats), flush=True)

        async def on_sigint(scope: trio.CancelScope) -> None:
            with trio.open_signal_receiver(signal.SIGINT) as signals:
                async for _ in signals:
                    print(f"SIGINT: stopping producers, draining for {grace} s", flush=True)
                    scope.cancel()  # the producers
                    pool.stop(drain=grace)  # start nothing new; running attempts get `grace`
                    return

        async with trio.open_nursery() as nursery:
            producing = trio.CancelScope()

            async def run_producers() -> None:
                with producing:
                    await producers()

            nursery.start_soon(run_producers)
            nursery.start_soon(monitor)
            nursery.start_soon(on_sigint, producing)
            await consumer()  # ends when the pool has ended
            nursery.cancel_scope.cancel()

    report = pool.report()
    unfinished = [record.item for record in report.unfinished]
    print(stats_line(report.stats), flush=True)
    print(
        f"final: produced {len(produced)}, succeeded {len(succeeded)}, failed {len(failed)}, "
        f"unfinished {len(unfinished)}",
        flush=True,
    )
    account = {
        "produced": produced,
        "succeeded": succeeded,
        "failed": failed,
        "unfinished": unfinished,
    }
    print("account: " + json.dumps(account), flush=True)
    return account


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of producing")
    parser.add_argument("--grace", type=float, default=2.0, help="drain period on Ctrl-C")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--buffer", type=int, default=32, help="the pool's bounded buffer")
    args = parser.parse_args(argv)
    trio.run(main, args.duration, args.grace, args.workers, args.buffer)


if __name__ == "__main__":
    sys.exit(cli())
