"""A journaled run in a child process, for the journal tests that need real processes.

    python -m tests._journal_child race JOURNAL CALLS N

prints ``ready``, waits for one line on stdin (so that several children start at the same
moment), then runs ``conveyor.run`` over ``range(N)`` with the journal, appending each item to
the file CALLS as its call completes, and prints ``ok`` or ``error Type: message``.

    python -m tests._journal_child connect JOURNAL

the same start, then only opens (creates) the journal's SQLite file, without the run's lock,
and prints ``ok`` or ``error Type: message``.

    python -m tests._journal_child hold JOURNAL

runs over ``range(3)`` with the journal, prints ``running`` once the first call has started,
and waits there until it is killed or interrupted.

    python -m tests._journal_child stream FORM JOURNAL CALLS N STOP

streams ``n -> n * n`` over ``range(N)`` with the journal in one of the FORMs ``map`` (bare
``async for``), ``map-with`` (``async with``), ``map-ordered`` (bare, ``ordered=True``) or
``pool`` (``open_pool``: submit, then read ``results()``); each call appends its item to CALLS
as it completes, except that items >= STOP wait forever. Prints ``half`` once STOP records
have been read (then waits to be killed or interrupted), or, if all N were read, ``done``
and the items read in the order read.
"""

from __future__ import annotations

import os
import sys

import trio

import conveyor


def record_call(calls: str, item: object) -> None:
    """Append ``item`` to the side file ``calls`` (one write: whole lines, even across
    processes)."""
    fd = os.open(calls, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{item}\n".encode())
    finally:
        os.close(fd)


async def race(journal: str, calls: str, n: int) -> None:
    async def fn(item: int) -> int:
        await trio.lowlevel.checkpoint()
        record_call(calls, item)
        return item

    print("ready", flush=True)
    sys.stdin.readline()
    try:
        report = await conveyor.run(fn, range(n), journal=journal)
    except Exception as error:
        print(f"error {type(error).__name__}: {error}", flush=True)
        return
    assert len(report.succeeded) == n, report
    print("ok", flush=True)


async def hold(journal: str) -> None:
    async def fn(item: int) -> int:
        print("running", flush=True)
        await trio.sleep_forever()
        return item

    await conveyor.run(fn, range(3), journal=journal, workers=1)


async def stream(form: str, journal: str, calls: str, n: int, stop: int) -> None:
    async def fn(item: int) -> int:
        await trio.lowlevel.checkpoint()
        if item >= stop:
            await trio.sleep_forever()
        record_call(calls, item)
        return item * item

    read: list[int] = []

    def take(record: conveyor.Succeeded[int]) -> None:
        assert record.value == record.item * record.item, record
        read.append(record.item)
        if len(read) == stop < n:
            print("half", flush=True)

    if form in ("map", "map-ordered"):
        async for record in conveyor.map(fn, range(n), journal=journal, workers=8,
                                         ordered=form == "map-ordered"):
            take(record)  # type: ignore[arg-type]
    elif form == "map-with":
        async with conveyor.map(fn, range(n), journal=journal, workers=8) as records:
            async for record in records:
                take(record)  # type: ignore[arg-type]
    elif form == "pool":
        async with conveyor.open_pool(fn, journal=journal, workers=8) as pool:
            for item in range(n):
                await pool.submit(item)
            pool.close()
            async for record in pool.results():
                take(record)  # type: ignore[arg-type]
    else:
        raise SystemExit(f"unknown form {form!r}")
    print("done", *read, flush=True)


def main(argv: list[str]) -> None:
    mode, *args = argv
    if mode == "race":
        journal, calls, n = args
        trio.run(race, journal, calls, int(n))
    elif mode == "connect":
        from conveyor._journal import _connect

        (journal,) = args
        print("ready", flush=True)
        sys.stdin.readline()
        try:
            _connect(journal, "item").close()
        except Exception as error:
            print(f"error {type(error).__name__}: {error}", flush=True)
        else:
            print("ok", flush=True)
    elif mode == "stream":
        form, journal, calls, n, stop = args
        trio.run(stream, form, journal, calls, int(n), int(stop))
    elif mode == "hold":
        (journal,) = args
        trio.run(hold, journal)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
