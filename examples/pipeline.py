"""Seed 001 as a three-stage pipeline: fetch records, transform them in worker processes, store
them in SQLite in batches, with one account of every input and a graceful Ctrl-C.

Three producers hand record ids to the pipeline at different speeds (``p.submit`` waits while
the first stage is full: backpressure on the producers, from the last stage back):

1. ``fetch``: a simulated call that returns the record (varying latency; transient errors are
   retried, a few ids are permanently missing);
2. ``transform``: CPU-heavy work on the record, in worker processes (``conveyor.in_process``);
3. ``store``: a batching stage writing up to 50 rows per batch into a real SQLite file, one
   transaction per batch (``conveyor.Batch(50, max_wait=0.2)``).

On SIGINT (Ctrl-C) it stops the producers and the pipeline (``p.stop(drain=...)``: nothing new
starts in any stage, running attempts get the grace period), and prints the account: every
id a producer handed in is in exactly one of succeeded / failed / unfinished, and the failed
and unfinished ones say in which stage. Every succeeded id is in the database, and no other.

    python examples/pipeline.py --duration 30 --db out.sqlite      # Ctrl-C at any time

The last line of output is the account as JSON (``account: {...}``), which the test reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sqlite3
import sys
import tempfile

import trio

import conveyor

# (name, seconds between ids): different speeds, as in the seed.
PRODUCERS = [("fast", 0.005), ("medium", 0.02), ("slow", 0.1)]


class TransientError(Exception):
    """A failure worth another attempt (a timeout, a 503...)."""


class MissingRecord(Exception):
    """The record does not exist: no retry will fix it."""


async def fetch(record_id: str) -> dict[str, object]:
    """Stage 1: fetch the record (a call of varying latency that sometimes fails)."""
    rng = random.Random(record_id)
    await trio.sleep(rng.uniform(0.005, 0.05))
    if rng.random() < 0.02:
        raise MissingRecord(f"{record_id}: no such record")
    if random.random() < 0.1:
        raise TransientError(f"{record_id}: try again")
    return {"id": record_id, "payload": rng.randbytes(64).hex()}


def transform_sync(record: dict[str, object]) -> dict[str, object]:
    """Stage 2 (in a worker process): CPU-heavy work on one record."""
    digest = str(record["payload"]).encode()
    for _ in range(2000):
        digest = hashlib.sha256(digest).digest()
    return {"id": record["id"], "digest": digest.hex()}


transform = conveyor.in_process(transform_sync)


def write_batch(path: str, rows: list[dict[str, object]]) -> list[str]:
    """Stage 3 (in a thread): one transaction for the whole batch."""
    conn = sqlite3.connect(path)
    try:
        with conn:  # one transaction: all rows of the batch, or none
            conn.executemany(
                "INSERT INTO records (id, digest) VALUES (?, ?)",
                [(row["id"], row["digest"]) for row in rows],
            )
    finally:
        conn.close()
    return [str(row["id"]) for row in rows]


def make_store(path: str) -> conveyor.Stage:
    async def store(rows: list[dict[str, object]]) -> list[str]:
        # Not abandoned on a cancel: a transaction that started is waited for, so a batch in
        # the database is always a batch the pipeline counts as succeeded.
        return await trio.to_thread.run_sync(write_batch, path, rows)

    return conveyor.stage(store, workers=1, batch=conveyor.Batch(50, max_wait=0.2))


def create_db(path: str) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE IF NOT EXISTS records (id TEXT PRIMARY KEY, digest TEXT)")
    conn.close()


async def main(duration: float, grace: float, db: str) -> dict[str, object]:
    create_db(db)
    pipe = conveyor.pipeline(
        conveyor.stage(
            fetch, workers=16, buffer=32,
            retry=conveyor.Retry(attempts=4, backoff=conveyor.Backoff(initial=0.02),
                                 retry_on=TransientError),
        ),
        conveyor.stage(transform, name="transform", workers=2, buffer=8),
        make_store(db),
    )
    produced: list[str] = []
    succeeded: list[str] = []

    async with pipe.open(drain=grace) as p:

        async def producer(name: str, every: float) -> None:
            n = 0
            while True:
                item = f"{name}-{n}"
                n += 1
                try:
                    await p.submit(item)  # waits while the first stage is full
                except trio.ClosedResourceError:
                    return  # stopped: this id was not accepted
                produced.append(item)  # accepted: from now on the pipeline accounts for it
                await trio.sleep(every)

        async def producers() -> None:
            with trio.move_on_after(duration):
                async with trio.open_nursery() as nursery:
                    for name, every in PRODUCERS:
                        nursery.start_soon(producer, name, every)
            p.close()  # no more ids: every stage finishes what it holds

        async def monitor() -> None:
            while True:
                await trio.sleep(1)
                line = " | ".join(
                    f"{name} {s.in_flight} running, {s.outstanding} held, {s.settled} done"
                    for name, s in p.stages.items()
                )
                print(f"stats: {line}", flush=True)

        async def on_sigint(scope: trio.CancelScope) -> None:
            with trio.open_signal_receiver(signal.SIGINT) as signals:
                async for _ in signals:
                    print(f"SIGINT: stopping producers, draining for {grace} s", flush=True)
                    scope.cancel()
                    p.stop(drain=grace)
                    return

        async with trio.open_nursery() as nursery:
            producing = trio.CancelScope()

            async def run_producers() -> None:
                with producing:
                    await producers()

            nursery.start_soon(run_producers)
            nursery.start_soon(monitor)
            nursery.start_soon(on_sigint, producing)
            async for record in p.results():
                if isinstance(record, conveyor.Succeeded):
                    succeeded.append(record.item)
            nursery.cancel_scope.cancel()

    report = p.report()
    failed: dict[str, list[str]] = {}
    for f in report.failed:
        failed.setdefault(str(f.stage), []).append(f.item)
    unfinished: dict[str, list[str]] = {}
    for u in report.unfinished:
        unfinished.setdefault(str(u.stage), []).append(u.item)
    conn = sqlite3.connect(db)
    stored = [row[0] for row in conn.execute("SELECT id FROM records")]
    conn.close()
    for name, s in report.stages.items():
        print(f"stage {name}: {s.submitted} in, {s.succeeded} succeeded, {s.failed} failed, "
              f"{s.unfinished} unfinished, {s.attempts} attempts", flush=True)
    print(
        f"final: produced {len(produced)}, succeeded {len(succeeded)}, "
        f"failed {sum(map(len, failed.values()))}, "
        f"unfinished {sum(map(len, unfinished.values()))}, stored {len(stored)}",
        flush=True,
    )
    account: dict[str, object] = {
        "produced": produced,
        "succeeded": succeeded,
        "failed": failed,
        "unfinished": unfinished,
        "stored": stored,
    }
    print("account: " + json.dumps(account), flush=True)
    return account


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of producing")
    parser.add_argument("--grace", type=float, default=2.0, help="drain period on Ctrl-C")
    parser.add_argument("--db", default=None, help="the SQLite file (default: a temporary one)")
    args = parser.parse_args(argv)
    db = args.db
    if db is None:
        db = os.path.join(tempfile.mkdtemp(prefix="conveyor-pipeline-"), "records.sqlite")
    trio.run(main, args.duration, args.grace, db)


if __name__ == "__main__":
    sys.exit(cli())
