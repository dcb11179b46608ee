"""The durable journal of ``run(..., journal=path, key=...)``.

Contract layer: a re-run skips what the journal holds as succeeded and runs the rest; a
cancel, an error or Ctrl-C commits the tail before propagating; a file that is not a journal
(or was written with another key function) is refused at the call. Collaboration layer: the
SQLite file itself (rows committed in small batches while the run goes on; a succeeded row
is never replaced). A hypothesis property: over several interrupted runs, every item's
value is computed once per success, never more.
"""

from __future__ import annotations

import functools
import io
import operator
import os
import pickle
import re
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import conveyor
from conveyor import Failed, JournalError, Retry, Succeeded
from conveyor._journal import _Db, check_journal, key_fingerprint


async def jrun(fn: Callable[[Any], Awaitable[Any]], items: Any, **options: Any) -> conveyor.Report:
    return await conveyor.run(fn, items, **options)


ROOT = Path(__file__).resolve().parent.parent


def rows(path: Path) -> dict[Any, tuple[str, int, Any, str | None]]:
    """The journal's rows, read with a separate connection: key -> (status, attempts,
    value, error)."""
    conn = sqlite3.connect(path)
    try:
        return {
            key: (status, attempts, None if value is None else pickle.loads(value), error)
            for key, status, attempts, value, error in conn.execute(
                "SELECT key, status, attempts, value, error FROM conveyor_items"
            )
        }
    finally:
        conn.close()


class Counting:
    """A task function that counts its calls per item and fails the items in ``fail``."""

    def __init__(self, fail: set[int] | None = None) -> None:
        self.calls: Counter[int] = Counter()
        self.fail = fail or set()

    async def __call__(self, n: int) -> int:
        self.calls[n] += 1
        await trio.lowlevel.checkpoint()
        if n in self.fail:
            raise ValueError(f"bad item {n}")
        return n * n


def key_of(n: int) -> str:
    return f"item-{n}"


def other_key(n: int) -> str:
    return f"item-{n}"


# ---------------------------------------------------------------------------------------------
# Resuming


async def test_a_rerun_skips_succeeded_items_and_returns_their_stored_values(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "job.journal"
    first = Counting()
    report = await jrun(first, range(250), journal=journal, key=key_of)
    assert sorted(r.value for r in report.succeeded) == [n * n for n in range(250)]
    assert all(count == 1 for count in first.calls.values()) and len(first.calls) == 250
    assert {k: v[:3] for k, v in rows(journal).items()} == {
        key_of(n): ("succeeded", 1, n * n) for n in range(250)
    }

    second = Counting()
    again = await jrun(second, list(range(250)), journal=journal, key=key_of)
    assert not second.calls  # nothing ran
    assert sorted((r.item, r.value, r.attempts) for r in again.succeeded) == [
        (n, n * n, 1) for n in range(250)
    ]
    assert again.ok
    assert again.stats.succeeded == 0  # stats count this run's work only


async def test_failed_items_run_again_and_succeeded_ones_do_not(tmp_path: Path) -> None:
    journal = tmp_path / "job.journal"
    first = Counting(fail={3, 7})
    report = await jrun(first, range(10), journal=journal, key=key_of)
    assert sorted(r.item for r in report.failed) == [3, 7]
    stored = rows(journal)
    assert stored[key_of(3)] == ("failed", 1, None, "ValueError: bad item 3")
    assert stored[key_of(0)][0] == "succeeded"

    second = Counting()
    again = await jrun(second, range(10), journal=journal, key=key_of)
    assert set(second.calls) == {3, 7}
    assert again.ok
    assert sorted(r.value for r in again.succeeded) == [n * n for n in range(10)]
    assert {status for status, *_ in rows(journal).values()} == {"succeeded"}


async def test_attempts_are_stored_with_the_value(tmp_path: Path, autojump_clock: Any) -> None:
    journal = tmp_path / "job.journal"
    tries: Counter[int] = Counter()

    async def flaky(n: int) -> int:
        tries[n] += 1
        if tries[n] < 3:
            raise ConnectionError("try again")
        return n

    await jrun(flaky, [1, 2], journal=journal, key=key_of,
               retry=Retry(attempts=5, backoff=None))
    again = await jrun(flaky, [1, 2], journal=journal, key=key_of)
    assert sorted((r.item, r.attempts) for r in again.succeeded) == [(1, 3), (2, 3)]


async def test_the_item_is_its_own_key_when_no_key_function_is_given(tmp_path: Path) -> None:
    journal = tmp_path / "urls.journal"
    first = Counting()
    await jrun(first, [1, 2, 3], journal=journal)
    assert set(rows(journal)) == {1, 2, 3}
    second = Counting()
    report = await jrun(second, [1, 2, 3, 4], journal=str(journal))
    assert set(second.calls) == {4}
    assert sorted(r.value for r in report.succeeded) == [1, 4, 9, 16]


async def test_async_iterable_items_are_filtered_too(tmp_path: Path) -> None:
    journal = tmp_path / "job.journal"

    async def numbers(n: int) -> AsyncIterator[int]:
        for k in range(n):
            await trio.lowlevel.checkpoint()
            yield k

    await jrun(Counting(), numbers(20), journal=journal, key=key_of)
    second = Counting()
    report = await jrun(second, numbers(30), journal=journal, key=key_of)
    assert set(second.calls) == set(range(20, 30))
    assert len(report.succeeded) == 30


async def test_progress_counts_only_the_items_left_to_run(tmp_path: Path) -> None:
    journal = tmp_path / "job.journal"
    await jrun(Counting(), range(60), journal=journal, key=key_of)
    out = io.StringIO()
    progress = conveyor.Progress(out, tty=False)
    await jrun(Counting(), range(100), journal=journal, key=key_of, progress=progress)
    assert "| 40/40 100.0% |" in out.getvalue().splitlines()[-1]
    assert progress.total is None  # the run's count is shown; the user's total stays unset


# ---------------------------------------------------------------------------------------------
# Stopping: the tail is committed before the exception propagates


async def test_a_cancelled_run_commits_its_successes_and_the_rerun_does_the_rest(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "job.journal"
    first = Counting()
    thirty = trio.Event()

    async def half(n: int) -> int:
        if n >= 30:
            await trio.sleep_forever()
        value = await first(n)
        if len(first.calls) == 30:
            thirty.set()
        return value

    async def cancel_at_thirty(scope: trio.CancelScope) -> None:
        await thirty.wait()
        scope.cancel()  # the 30 have settled: a worker settles its item as fn returns

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_at_thirty, scope)
            await jrun(half, range(50), journal=journal, key=key_of, workers=50)
    assert scope.cancelled_caught
    stored = rows(journal)
    # 30 successes: fewer than a batch, committed by the shielded final flush.
    assert {k for k, v in stored.items() if v[0] == "succeeded"} == {key_of(n) for n in range(30)}
    assert {k for k, v in stored.items() if v[0] == "unfinished"} == {
        key_of(n) for n in range(30, 50)
    }
    second = Counting()
    report = await jrun(second, range(50), journal=journal, key=key_of)
    assert set(second.calls) == set(range(30, 50))
    assert sorted(r.value for r in report.succeeded) == [n * n for n in range(50)]


async def test_keyboard_interrupt_commits_the_tail_and_propagates(tmp_path: Path) -> None:
    journal = tmp_path / "job.journal"

    async def interrupted(n: int) -> int:
        if n == 40:
            await trio.sleep(0.05)  # let the others settle first
            raise KeyboardInterrupt
        return n

    with pytest.raises(KeyboardInterrupt):
        await jrun(interrupted, range(41), journal=journal, key=key_of, workers=41)
    stored = rows(journal)
    assert {k for k, v in stored.items() if v[0] == "succeeded"} == {key_of(n) for n in range(40)}
    assert stored[key_of(40)][0] == "unfinished"


@pytest.mark.slow
async def test_rows_are_committed_in_small_batches_while_the_run_goes_on(tmp_path: Path) -> None:
    journal = tmp_path / "job.journal"
    release = trio.Event()

    async def fn(n: int) -> int:
        if n >= 150:
            await release.wait()
        return n

    async def watch() -> None:
        # Another connection sees the committed rows while the run is still going.
        with trio.fail_after(10):
            while True:
                await trio.sleep(0.02)
                try:
                    done = await trio.to_thread.run_sync(rows, journal)
                except sqlite3.OperationalError:
                    continue  # not created yet
                if len(done) == 150:
                    break
        release.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        report = await jrun(fn, range(300), journal=journal, key=key_of, workers=200)
    assert len(report.succeeded) == 300
    assert len(rows(journal)) == 300


# ---------------------------------------------------------------------------------------------
# Refused at the call


async def never(n: int) -> int:
    raise AssertionError("must not run")


async def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "job.journal"
    journal.write_bytes(os.urandom(4096))
    with pytest.raises(JournalError, match=r"job\.journal' is not a conveyor journal"):
        await jrun(never, range(3), journal=journal, key=key_of)
    assert len(journal.read_bytes()) == 4096


async def test_a_damaged_journal_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "job.journal"
    await jrun(Counting(), range(2000), journal=journal, key=key_of)
    data = bytearray(journal.read_bytes())
    assert len(data) > 3 * 4096
    data[2 * 4096 : 3 * 4096] = os.urandom(4096)  # a page in the middle
    journal.write_bytes(bytes(data))
    with pytest.raises(JournalError, match=r"job\.journal' (is damaged|is not a conveyor)"):
        await jrun(never, range(3), journal=journal, key=key_of)


async def test_a_database_of_another_program_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "app.db"
    conn = sqlite3.connect(journal)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(
        JournalError,
        match=r"is an SQLite database but not a conveyor journal \(its tables: users\)",
    ):
        await jrun(never, range(3), journal=journal, key=key_of)
    assert sqlite3.connect(journal).execute("SELECT name FROM sqlite_master").fetchall() == [
        ("users",)
    ]


async def test_a_journal_of_another_key_function_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "job.journal"
    await jrun(Counting(), range(3), journal=journal, key=key_of)
    with pytest.raises(
        JournalError,
        match=r"written with another key function: 'tests\.test_journal\.key_of code=\w+ "
        r"py=3\.\d+', this run's is 'tests\.test_journal\.other_key code=\w+ py=3\.\d+'.*Use "
        r"the key function that wrote it, or another journal path",
    ):
        await jrun(never, range(3), journal=journal, key=other_key)
    with pytest.raises(JournalError, match=r"this run's is 'item'"):
        await jrun(never, range(3), journal=journal)
    # The fix the message gives: the key function that wrote it.
    assert len((await jrun(never, range(3), journal=journal, key=key_of)).succeeded) == 3


async def test_a_changed_lambda_is_a_changed_key_function(tmp_path: Path) -> None:
    # Before: both were 'tests.test_journal.<lambda>', and every item ran again under the
    # new key, unnoticed.
    journal = tmp_path / "job.journal"
    await jrun(Counting(), range(3), journal=journal, key=lambda n: f"item-{n}")
    with pytest.raises(JournalError, match=r"written with another key function: "
                                           r"'tests\.test_journal\..*<lambda> code="):
        await jrun(never, range(3), journal=journal, key=lambda n: f"row-{n}")
    again = await jrun(never, range(3), journal=journal, key=lambda n: f"item-{n}")
    assert len(again.succeeded) == 3


def make_key(prefix: str) -> Callable[[int], str]:
    return lambda n: f"{prefix}-{n}"


def test_key_fingerprints_cover_what_defines_the_key() -> None:
    same = key_fingerprint
    assert same(None) == "item"
    assert re.fullmatch(r"tests\.test_journal\.key_of code=[0-9a-f]{16} py=3\.\d+",
                        same(key_of))
    # Same name and body, other name: differ. Same code, other closure value: differ.
    assert same(key_of) != same(other_key)
    assert same(make_key("a")) == same(make_key("a"))
    assert same(make_key("a")) != same(make_key("b"))
    # A partial: its function and its arguments.
    assert same(functools.partial(key_of)).startswith("partial(tests.test_journal.key_of) ")
    assert same(functools.partial(make_key, "a")) != same(functools.partial(make_key, "b"))
    # A callable object: its class's __call__ and its plain attributes.
    assert same(Counting()).startswith("tests.test_journal.Counting ")
    assert same(operator.itemgetter("id")) != same(operator.itemgetter("name"))
    # A helper of the same module that the key calls by name counts too.
    assert same(calls_helper) != same(calls_other_helper)


def helper(n: int) -> str:
    return str(n)


def other_helper(n: int) -> str:
    return str(-n)


def calls_helper(n: int) -> str:
    return helper(n)


def calls_other_helper(n: int) -> str:
    return other_helper(n)


@pytest.mark.slow
async def test_a_key_fingerprint_is_the_same_in_another_process() -> None:
    script = (
        "from tests.test_journal import key_of, make_key\n"
        "from conveyor._journal import key_fingerprint\n"
        "print(key_fingerprint(key_of)); print(key_fingerprint(make_key('a')))\n"
    )
    root = ROOT
    done = await trio.run_process(
        [sys.executable, "-c", script], capture_stdout=True,
        env={**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}"}, cwd=root,
    )
    assert done.stdout.decode().split("\n")[:2] == [
        key_fingerprint(key_of), key_fingerprint(make_key("a"))
    ]


@pytest.mark.parametrize("stored", [
    "tests.test_journal.key_of",  # written by a conveyor that stored names only
    "tests.test_journal.key_of code=0123456789abcdef py=3.0",  # by another Python
])
async def test_a_journal_whose_key_code_cannot_be_compared_is_checked_by_name(
    tmp_path: Path, stored: str, caplog: pytest.LogCaptureFixture
) -> None:
    journal = tmp_path / "job.journal"
    await jrun(Counting(), range(3), journal=journal, key=key_of)
    conn = sqlite3.connect(journal)
    conn.execute("UPDATE conveyor_journal SET value = ? WHERE name = 'key'", (stored,))
    conn.commit()
    conn.close()
    with pytest.raises(JournalError, match=r"written with another key function"):
        await jrun(never, range(3), journal=journal, key=other_key)
    report = await jrun(never, range(3), journal=journal, key=key_of)
    assert len(report.succeeded) == 3
    assert "Only their names can be compared" in caplog.text
    conn = sqlite3.connect(journal)
    assert conn.execute("SELECT value FROM conveyor_journal WHERE name = 'key'").fetchone() == (
        key_fingerprint(key_of),
    )  # recorded: from now on the code is compared
    conn.close()


async def test_a_journal_in_a_missing_directory_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "nowhere" / "job.journal"
    with pytest.raises(JournalError, match=r"its directory '.*nowhere' does not exist; create it"):
        await jrun(never, range(3), journal=journal, key=key_of)
    (tmp_path / "nowhere").mkdir()  # the fix the message gives
    assert (await jrun(Counting(), range(3), journal=journal, key=key_of)).ok


# ---------------------------------------------------------------------------------------------
# A bad key fails its item only: Failed, attempts 0; the run goes on and is journaled


async def bad_key_run(
    tmp_path: Path, key: Callable[[int], Any], bad: int
) -> tuple[conveyor.Report, Counting, Failed]:
    """Run range(10) where item ``bad``'s key is bad; check the others ran and were
    journaled, then a rerun: the others come from the journal, ``bad`` fails again."""
    journal = tmp_path / "job.journal"
    calls = Counting()
    report = await jrun(calls, range(10), journal=journal, key=key, workers=2)
    assert set(calls.calls) == set(range(10)) - {bad}  # the run went on
    assert sorted(r.item for r in report.succeeded) == sorted(set(range(10)) - {bad})
    (failed,) = report.failed
    assert failed.item == bad and failed.attempts == 0
    assert report.stats.submitted == 10 and report.stats.failed == 1
    stored = rows(journal)
    assert len(stored) == 9 and {v[0] for v in stored.values()} == {"succeeded"}
    again = await jrun(never, range(10), journal=journal, key=key, workers=2)
    assert len(again.succeeded) == 9 and [r.item for r in again.failed] == [bad]
    # the journal's successes are not this run's work: only the bad item is in the stats
    assert (again.stats.submitted, again.stats.succeeded, again.stats.failed) == (1, 0, 1)
    return report, calls, failed


async def test_an_item_whose_key_raises_fails_alone(tmp_path: Path) -> None:
    # Before: the run ended with the key's KeyError after 10 calls.
    def key(n: int) -> str:
        return {3: None}.get(n, f"item-{n}") or {}["id"]  # item 3 has no id

    _, _, failed = await bad_key_run(tmp_path, key, bad=3)
    assert isinstance(failed.error, KeyError)
    assert "raised by the journal's key function tests.test_journal." in failed.traceback
    assert "for item 3; the item was not run" in failed.traceback


@pytest.mark.parametrize("bad_key", [1.5, None, ("a", 1), True, 2**64])
async def test_an_item_whose_key_sqlite_cannot_hold_exactly_fails_alone(
    tmp_path: Path, bad_key: object
) -> None:
    # Before: the run ended with a TypeError before any call.
    _, _, failed = await bad_key_run(
        tmp_path, lambda n: bad_key if n == 0 else f"item-{n}", bad=0
    )
    assert isinstance(failed.error, TypeError)
    assert re.fullmatch(r"journal key must be a str, bytes or a 64-bit int; key\(item\) is "
                        r".* for item 0; the item was not run", str(failed.error))


async def test_a_key_that_returns_a_coroutine_fails_its_item_and_closes_it(
    tmp_path: Path,
) -> None:
    async def fetch_id(n: int) -> str:
        return str(n)

    # A lambda around an async function cannot be told from a plain one at the call.
    _, _, failed = await bad_key_run(
        tmp_path, lambda n: fetch_id(n) if n == 5 else f"item-{n}", bad=5
    )
    assert "key(item) is <coroutine object" in str(failed.error)  # and no "never awaited"


async def test_an_item_that_repeats_a_key_fails_alone(tmp_path: Path) -> None:
    # Before: the run ended with a JournalError after 3 calls.
    journal = tmp_path / "job.journal"
    calls = Counting()
    report = await jrun(calls, [0, 1, 2, 1, 3], journal=journal, key=key_of, workers=1)
    assert sorted(calls.calls) == [0, 1, 2, 3]  # the first 1 ran, the run went on
    (failed,) = report.failed
    assert (failed.item, failed.attempts) == (1, 0)
    assert isinstance(failed.error, JournalError)
    assert str(failed.error).startswith("two items have the journal key 'item-1' (this one is "
                                        "1); each item needs its own key")
    assert rows(journal)[key_of(1)][:3] == ("succeeded", 1, 1)  # the first one's row stays


async def test_a_failing_write_is_a_journal_io_error_an_os_error(tmp_path: Path) -> None:
    spec = check_journal(tmp_path / "j", key_of)
    assert spec is not None
    db = _Db(spec)
    try:
        db.conn.execute("PRAGMA max_page_count = 8")  # a full disk, for this connection
        with pytest.raises(OSError, match=r"'.*j': cannot write to it: database or disk is "
                                          r"full") as caught:
            db.write([(f"k{n}", "succeeded", 1, bytes(1000), None, 0.0) for n in range(100)])
        # The world failed, not the caller's input: an OSError, and a JournalError (the
        # common base, since the errors tree), never the ValueError of a bad journal.
        assert isinstance(caught.value, conveyor.JournalIOError)
        assert isinstance(caught.value, JournalError)
        assert not isinstance(caught.value, ValueError)
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    finally:
        db.close()


async def test_a_value_that_cannot_be_pickled_is_an_error(tmp_path: Path) -> None:
    async def unpicklable(n: int) -> Any:
        return lambda: n

    with pytest.raises(JournalError, match=r"the value of item 0 cannot be pickled"):
        await jrun(unpicklable, [0], journal=tmp_path / "j", key=key_of)


def test_journal_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"^key=key_of is not valid: expected None without a "
                                         r"journal \(key= names each item's record in the "
                                         r"journal\); e\.g\. journal='job\.journal'$"):
        check_journal(None, key_of)
    with pytest.raises(TypeError, match=r"^journal=42 is not valid: expected a file path \(str "
                                        r"or os\.PathLike\) or None; "
                                        r"e\.g\. journal='job\.journal'$"):
        check_journal(42, None)
    with pytest.raises(ValueError, match=r"^journal='' is not valid: expected a non-empty file "
                                         r"path; e\.g\. journal='job\.journal'$"):
        check_journal("", None)
    with pytest.raises(TypeError, match=r"^key='id' is not valid: expected a function item -> "
                                        r"str \| int \| bytes, or None \(the item itself\); "
                                        r"e\.g\. key=str$"):
        check_journal("j", "id")
    # the fixes given: a journal path, and key=str
    assert check_journal("job.journal", key_of) is not None
    assert check_journal("j", str) is not None
    assert check_journal(None, None) is None


def test_a_succeeded_row_is_never_replaced(tmp_path: Path) -> None:
    spec = check_journal(tmp_path / "j", key_of)
    assert spec is not None
    db = _Db(spec)
    try:
        db.write([("a", "succeeded", 1, pickle.dumps(1), None, 0.0)])
        db.write([("a", "failed", 2, None, "ValueError: x", 0.0),
                  ("b", "failed", 1, None, "ValueError: y", 0.0)])
        db.write([("b", "unfinished", 3, None, None, 0.0)])
    finally:
        db.close()
    assert rows(tmp_path / "j") == {
        "a": ("succeeded", 1, 1, None),
        "b": ("unfinished", 3, None, None),
    }


# ---------------------------------------------------------------------------------------------
# Property: interrupted runs never compute a success twice, and end complete


@settings(deadline=None, max_examples=25)
@given(
    n=st.integers(1, 60),
    stops=st.lists(st.integers(0, 60), min_size=0, max_size=3),
    flaky=st.sets(st.integers(0, 59), max_size=10),
)
async def test_interrupted_runs_end_complete_and_compute_each_success_once(
    n: int, stops: list[int], flaky: set[int]
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        journal = Path(tmp) / "job.journal"
        successes: Counter[int] = Counter()
        failed_once: set[int] = set()

        for stop_after in [*stops, None]:
            started = 0
            scope = trio.CancelScope()

            async def fn(
                k: int, stop_after: int | None = stop_after, scope: trio.CancelScope = scope
            ) -> int:
                nonlocal started
                started += 1
                if stop_after is not None and started > stop_after:
                    scope.cancel()  # like Ctrl-C: the run stops with attempts in flight
                    await trio.sleep_forever()
                await trio.lowlevel.checkpoint()
                if k in flaky and k not in failed_once:
                    failed_once.add(k)
                    raise ValueError("flaky")
                successes[k] += 1
                return -k

            with scope:
                report = await jrun(fn, range(n), journal=journal, key=key_of, workers=4,
                                    retry=Retry(attempts=2, backoff=None))
        # The last run was not stopped: everything that can succeed has, in the report.
        assert sorted(r.item for r in report.succeeded) == list(range(n))
        assert all(r.value == -r.item for r in report.succeeded if isinstance(r, Succeeded))
        assert set(successes) == set(range(n))
        assert all(count == 1 for count in successes.values()), successes


async def test_run_checks_the_journal_options_at_the_call() -> None:
    with pytest.raises(ValueError, match=r"^key=key_of is not valid: expected None without"):
        await conveyor.run(never, [1], key=key_of)
    with pytest.raises(TypeError, match=r"^journal=3 is not valid: expected a file path"):
        await conveyor.run(never, [1], journal=3)  # type: ignore[arg-type]
