"""``journal=`` and ``key=`` with ``map`` (both forms, ordered or not) and ``open_pool``.

The promise is the one ``run`` keeps: a resumed stream yields the journaled successes too
(in their place when ordered), nothing is run twice, and the journal is committed on every
way out. In-process tests for each form and way out; real processes for Ctrl-C (SIGINT)
and SIGKILL halfway, then the same call again.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

import conveyor
from conveyor import Failed, Succeeded

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


class Squares:
    """n -> n * n, counting the calls that complete, per item."""

    def __init__(self) -> None:
        self.calls: Counter[int] = Counter()

    async def __call__(self, n: int) -> int:
        await trio.lowlevel.checkpoint()
        self.calls[n] += 1
        return n * n


async def never(n: int) -> int:
    raise AssertionError("must not run")


def key_of(n: int) -> str:
    return f"item-{n}"


def succeeded_rows(path: Path) -> set[Any]:
    conn = sqlite3.connect(path)
    try:
        return {
            key for (key,) in
            conn.execute("SELECT key FROM conveyor_items WHERE status = 'succeeded'")
        }
    finally:
        conn.close()


async def released(journal: Path) -> None:
    """Wait until no run holds ``journal`` (its lock file can be locked)."""
    import fcntl

    with trio.fail_after(5):
        while True:
            fd = os.open(f"{journal}-lock", os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            finally:
                os.close(fd)
            await trio.sleep(0.01)


async def read_map(journal: Path, fn: Any, items: Any, *, form: str, **options: Any) -> list[Any]:
    """Every record a map yields, in the given form."""
    records: list[Any] = []
    if form == "bare":
        async for record in conveyor.map(fn, items, journal=journal, **options):
            records.append(record)
    else:
        async with conveyor.map(fn, items, journal=journal, **options) as stream:
            async for record in stream:
                records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# map


@pytest.mark.parametrize("form", ["bare", "with"])
@pytest.mark.parametrize("ordered", [False, True])
async def test_a_resumed_map_yields_the_journaled_successes_too(
    tmp_path: Path, form: str, ordered: bool
) -> None:
    journal = tmp_path / "job.journal"
    first = Squares()
    records = await read_map(journal, first, range(0, 300, 2), form=form, key=key_of,
                             ordered=ordered)
    assert sorted(r.item for r in records) == list(range(0, 300, 2))
    assert succeeded_rows(journal) == {key_of(n) for n in range(0, 300, 2)}

    second = Squares()
    records = await read_map(journal, second, range(300), form=form, key=key_of,
                             ordered=ordered)
    assert set(second.calls) == set(range(1, 300, 2))  # only the new ones ran
    assert all(count == 1 for count in second.calls.values())
    assert all(type(r) is Succeeded and r.value == r.item * r.item for r in records)
    items = [r.item for r in records]
    assert sorted(items) == list(range(300))  # each once
    if ordered:
        assert items == list(range(300))  # the journaled ones in their place
    assert succeeded_rows(journal) == {key_of(n) for n in range(300)}


@pytest.mark.parametrize("form", ["bare", "with"])
async def test_leaving_a_map_early_commits_what_was_settled(tmp_path: Path, form: str) -> None:
    journal = tmp_path / "job.journal"
    first = Squares()
    seen: list[int] = []
    if form == "bare":
        async for record in conveyor.map(first, range(1000), journal=journal, workers=4):
            seen.append(record.item)
            if len(seen) == 10:
                break
        # The bare form's pool ends after the dropped iterator is collected, and then
        # releases the journal: wait for that.
        await released(journal)
    else:
        async with conveyor.map(first, range(1000), journal=journal, workers=4) as records:
            async for record in records:
                seen.append(record.item)
                if len(seen) == 10:
                    break
    # Everything that ran before the stop (read or not) is in the journal.
    done = succeeded_rows(journal)
    assert {n for n in first.calls} == done
    second = Squares()
    records = await read_map(journal, second, range(1000), form=form, workers=4)
    assert not set(second.calls) & done
    assert sorted(r.item for r in records) == list(range(1000))


async def test_a_cancelled_map_commits_and_the_rerun_completes(tmp_path: Path) -> None:
    journal = tmp_path / "job.journal"
    first = Squares()

    async def half(n: int) -> int:
        if n >= 50:
            await trio.sleep_forever()
        return await first(n)

    with trio.CancelScope() as scope:
        async with conveyor.map(half, range(100), journal=journal, workers=60) as records:
            read = 0
            async for _ in records:
                read += 1
                if read == 50:
                    scope.cancel()  # like Ctrl-C, with 50 in flight
    assert scope.cancelled_caught
    assert succeeded_rows(journal) == {n for n in range(50)}
    second = Squares()
    records = await read_map(journal, second, range(100), form="with")
    assert set(second.calls) == set(range(50, 100))
    assert sorted(r.item for r in records) == list(range(100))


async def test_a_map_with_a_bad_key_yields_that_item_as_failed(tmp_path: Path) -> None:
    records = await read_map(
        tmp_path / "j", Squares(), range(10), form="bare", ordered=True,
        key=lambda n: 1.5 if n == 4 else key_of(n),
    )
    assert [r.item for r in records] == list(range(10))  # in its place
    failed = records[4]
    assert type(failed) is Failed and failed.attempts == 0
    assert "key(item) is 1.5 for item 4; the item was not run" in str(failed.error)


async def test_a_map_on_a_journal_in_use_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "job.journal"
    async with conveyor.map(Squares(), range(10), journal=journal) as records:
        with pytest.raises(conveyor.JournalError, match=r"is in use by another run"):
            async for _ in conveyor.map(never, range(10), journal=journal):
                pass
        async for _ in records:
            pass


def test_map_and_open_pool_check_the_journal_options_at_the_call() -> None:
    with pytest.raises(ValueError, match=r"^key=key_of is not valid: expected None without"):
        conveyor.map(never, [1], key=key_of)
    with pytest.raises(ValueError, match=r"^journal='a\\x00b' is not valid: expected a file path "
                                         r"without NUL"):
        conveyor.map(never, [1], journal="a\x00b")
    with pytest.raises(ValueError, match=r"^key=key_of is not valid: expected None without"):
        conveyor.open_pool(never, key=key_of)
    with pytest.raises(TypeError, match=r"^journal=3 is not valid: expected a file path"):
        conveyor.open_pool(never, journal=3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# open_pool


async def test_a_resumed_pool_settles_journaled_items_at_once(tmp_path: Path) -> None:
    journal = tmp_path / "job.journal"
    first = Squares()
    async with conveyor.open_pool(first, journal=journal, key=key_of) as pool:
        for n in range(0, 100, 2):
            await pool.submit(n)
    assert len(pool.report().succeeded) == 50

    second = Squares()
    read: list[Any] = []
    async with conveyor.open_pool(second, journal=journal, key=key_of) as pool:
        for n in range(100):
            if n % 3:
                await pool.submit(n)
            else:
                pool.submit_nowait(n)
        pool.close()
        async for record in pool.results():
            read.append(record)
    assert set(second.calls) == set(range(1, 100, 2))
    assert sorted(r.item for r in read) == list(range(100))
    assert all(r.value == r.item * r.item for r in read)
    assert pool.report().stats.succeeded == 50  # this run's work only
    assert succeeded_rows(journal) == {key_of(n) for n in range(100)}


async def test_a_pool_whose_results_are_never_read_is_journaled(tmp_path: Path) -> None:
    journal = tmp_path / "job.journal"
    async with conveyor.open_pool(Squares(), journal=journal) as pool:
        for n in range(300):
            await pool.submit(n)
    assert succeeded_rows(journal) == set(range(300))
    report = pool.report()
    assert sorted(r.item for r in report.succeeded) == list(range(300))


async def test_an_error_in_the_pools_block_commits_and_propagates_as_raised(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "job.journal"
    boom = RuntimeError("boom")
    with pytest.raises(RuntimeError) as caught:
        async with conveyor.open_pool(Squares(), journal=journal) as pool:
            for n in range(20):
                await pool.submit(n)
            await pool.wait_stats(lambda stats: stats.succeeded == 20)
            raise boom
    assert caught.value is boom
    assert succeeded_rows(journal) == set(range(20))


async def test_a_pool_item_with_a_repeated_key_fails_alone(tmp_path: Path) -> None:
    async with conveyor.open_pool(Squares(), journal=tmp_path / "j", key=key_of) as pool:
        for n in [1, 2, 1]:
            await pool.submit(n)
    report = pool.report()
    assert sorted(r.item for r in report.succeeded) == [1, 2]
    (failed,) = report.failed
    assert (failed.item, failed.attempts) == (1, 0)
    assert "two items have the journal key 'item-1'" in str(failed.error)


async def test_a_pool_refuses_submissions_after_close_even_for_journaled_items(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "job.journal"
    async with conveyor.open_pool(Squares(), journal=journal) as pool:
        await pool.submit(1)
    async with conveyor.open_pool(never, journal=journal) as pool:
        pool.close()
        with pytest.raises(trio.ClosedResourceError):
            await pool.submit(1)


# ---------------------------------------------------------------------------------------------
# Real processes: Ctrl-C and SIGKILL halfway, then the same call again


def stream_child(form: str, journal: Path, calls: Path, n: int, stop: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests._journal_child", "stream", form, str(journal),
         str(calls), str(n), str(stop)],
        cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def committed(journal: Path) -> int:
    try:
        return len(succeeded_rows(journal))
    except sqlite3.Error:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("form", ["map", "map-with", "map-ordered", "pool"])
def test_stopped_halfway_by_a_signal_then_run_again_complete_and_nothing_twice(
    tmp_path: Path, form: str, how: signal.Signals
) -> None:
    journal = tmp_path / "job.journal"
    calls = tmp_path / "calls"
    n, stop = 40, 20
    first = stream_child(form, journal, calls, n, stop)
    try:
        assert first.stdout is not None
        line = first.stdout.readline().strip()
        assert line == "half", (line, first.stderr.read() if first.stderr else "")
        if how == signal.SIGKILL:
            # Nothing runs on SIGKILL: what counts is what was committed while running.
            deadline = time.monotonic() + 30
            while committed(journal) < stop and time.monotonic() < deadline:
                time.sleep(0.05)
        first.send_signal(how)
        _, err = first.communicate(timeout=30)
    finally:
        first.kill()
        first.communicate()
    if how == signal.SIGINT:
        assert "KeyboardInterrupt" in err, err  # it went out through the journal's commit
    assert committed(journal) == stop
    assert sorted(map(int, calls.read_text().split())) == list(range(stop))

    again = stream_child(form, journal, calls, n, n)  # the same call, nothing blocks now
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    done, *read = out.split()
    assert done == "done"
    assert sorted(map(int, read)) == list(range(n))  # complete, each item once
    if form == "map-ordered":
        assert list(map(int, read)) == list(range(n))
    assert sorted(map(int, calls.read_text().split())) == list(range(n))  # nothing ran twice
