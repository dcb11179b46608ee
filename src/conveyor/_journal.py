"""A durable journal for :func:`conveyor.run`: a stopped run resumes where it stopped.

``run(fn, items, journal="job.journal", key=lambda item: item.id)`` records every settled
item by its key in an SQLite file. Run it again with the same journal and the items it holds
as succeeded are not run again: they come back in the report as ``Succeeded`` with the
stored value; items it holds as failed or unfinished (or not at all) are run.

How it is written, and what a crash costs:

- The pool's workers only settle items, as always; the caller's task reads the records as
  they settle (``pool.results()``), pickles each success's value and appends one row to a
  list. One writer task commits that list off the event loop (``trio.to_thread``), in one
  transaction, every ``_BATCH`` rows or ``_INTERVAL`` seconds, whichever comes first.
- SQLite in WAL mode with ``synchronous=NORMAL``: a committed transaction survives the
  process being killed (SIGKILL, a crash); only a power cut can lose the last commits. So
  a kill loses at most the uncommitted tail (under ``_BATCH`` rows, or ``_INTERVAL``
  seconds of results), and those items are simply run again by the next run.
- On a cancel, an error or Ctrl-C, the pool stops as usual (items not settled become
  ``Unfinished``), then the tail is committed, shielded from the cancel, together with a
  row per failed and unfinished item, before the exception propagates.
- A row is keyed by the item's key, and a succeeded row is never overwritten: whatever
  happens, the journal holds at most one result per key. Output written from the report
  (or from the journal) therefore never holds an item twice, even if an item was run twice
  because a crash lost its row.

What is checked when the journal is opened (before any work starts), each a
:class:`JournalError` naming the file: not an SQLite file, a damaged one
(``PRAGMA quick_check``), an SQLite database of another program, a journal of another format
version, and a journal written with a different key function (compared by the key
function's module and qualified name). Nothing is ever silently restarted.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import sqlite3
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sized
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from ._pool import sole_error
from ._records import Failed, Report, Succeeded, Unfinished

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ["JournalError", "JournalSpec", "check_journal", "run_journaled"]

logger = logging.getLogger("conveyor")

_FORMAT = "conveyor-journal"
_VERSION = "1"
# Commit every _BATCH rows or every _INTERVAL seconds, whichever comes first.
_BATCH = 100
_INTERVAL = 0.2
# Values are pickled with a protocol every supported Python reads.
_PICKLE_PROTOCOL = 5
_MAX_ERROR_TEXT = 2000
_INT64 = (-(2**63), 2**63 - 1)

_SCHEMA = (
    """
CREATE TABLE conveyor_journal (
    name  TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
)""",
    """
CREATE TABLE conveyor_items (
    key      PRIMARY KEY NOT NULL,  -- no type: an int, a str and a bytes key stay distinct
    status   TEXT NOT NULL CHECK (status IN ('succeeded', 'failed', 'unfinished')),
    attempts INTEGER NOT NULL,
    value    BLOB,                  -- the pickled value, for 'succeeded'
    error    TEXT,                  -- 'Type: message' of the last error, for the others
    at       REAL NOT NULL          -- time.time() when recorded
) WITHOUT ROWID""",
)

# A succeeded row is final: a later row for the same key never replaces it.
_UPSERT = """
INSERT INTO conveyor_items (key, status, attempts, value, error, at)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET
    status = excluded.status, attempts = excluded.attempts, value = excluded.value,
    error = excluded.error, at = excluded.at
WHERE conveyor_items.status != 'succeeded'
"""

Key = str | int | bytes
Row = tuple[Key, str, int, bytes | None, str | None, float]


class JournalError(ValueError):
    """The journal file cannot be used: not a journal, damaged, written with another key
    function, or not writable; or two items have the same key.

    Raised at the call, before any work starts, for a problem with the file; the message
    names the file and says what to do.
    """


# ---------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True, slots=True)
class JournalSpec:
    """``run()``'s ``journal=`` and ``key=`` options, checked."""

    path: str
    key: Callable[[Any], Any] | None
    fingerprint: str

    def key_of(self, item: Any) -> Key:
        """The journal key of ``item``, checked: a str, an int (64-bit) or bytes."""
        key = item if self.key is None else self.key(item)
        kind = type(key)
        if kind is str or kind is bytes:
            return key  # type: ignore[no-any-return]
        if kind is int and _INT64[0] <= key <= _INT64[1]:
            return key  # type: ignore[no-any-return]
        source = "the item itself (no key= given)" if self.key is None else "key(item)"
        raise TypeError(
            f"journal key must be a str, bytes or a 64-bit int; {source} is {key!r} "
            f"for item {item!r}"
        )


def check_journal(journal: object, key: object) -> JournalSpec | None:
    """Check ``journal=`` and ``key=`` at the call; None when there is no journal."""
    if journal is None:
        if key is not None:
            raise ValueError(f"key= only applies with journal=PATH, got key={key!r} and no journal")
        return None
    if not isinstance(journal, str | os.PathLike):
        raise TypeError(
            f"journal must be a file path (str or os.PathLike) or None, got {journal!r}"
        )
    path = os.fspath(journal)
    if not isinstance(path, str) or not path:
        raise TypeError(f"journal must be a non-empty str path, got {journal!r}")
    if key is not None and not callable(key):
        raise TypeError(f"key must be a callable item -> str | int | bytes, or None, got {key!r}")
    return JournalSpec(path, key, key_fingerprint(key))


def key_fingerprint(key: Callable[[Any], Any] | None) -> str:
    """What identifies a key function across runs: its module and qualified name.

    ``None`` (the item is its own key) is ``"item"``; a :func:`functools.partial` is the
    fingerprint of its function; another callable object, that of its class.
    """
    if key is None:
        return "item"
    if isinstance(key, functools.partial):
        return f"partial({key_fingerprint(key.func)})"
    target: Any = key if hasattr(key, "__qualname__") else type(key)
    module = getattr(target, "__module__", None) or "?"
    return f"{module}.{target.__qualname__}"


# ---------------------------------------------------------------------------------------------
# The SQLite file (sync; used from one thread at a time)


class _Db:
    """One connection to one journal file. Every method runs in a worker thread."""

    def __init__(self, spec: JournalSpec) -> None:
        self.path = spec.path
        try:
            self.conn = sqlite3.connect(
                spec.path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as error:
            raise JournalError(f"journal {spec.path!r}: cannot open it: {error}") from error
        try:
            self._check(spec.fingerprint)
        except BaseException:
            self.conn.close()
            raise

    def _check(self, fingerprint: str) -> None:
        path = self.path
        conn = self.conn
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            tables = {
                name
                for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if not tables:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.executemany(
                        "INSERT INTO conveyor_journal (name, value) VALUES (?, ?)",
                        [
                            ("format", _FORMAT),
                            ("version", _VERSION),
                            ("key", fingerprint),
                            ("created", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
                        ],
                    )
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return
            if tables != {"conveyor_journal", "conveyor_items"}:
                raise JournalError(
                    f"journal {path!r} is an SQLite database but not a conveyor journal "
                    f"(its tables: {', '.join(sorted(tables))}); conveyor will not write into "
                    f"it: give run() another journal path"
                )
            (check,) = conn.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                raise JournalError(
                    f"journal {path!r} is damaged (SQLite quick_check: {check}); move it away "
                    f"to start over, or restore it from a copy"
                )
            meta = dict(conn.execute("SELECT name, value FROM conveyor_journal"))
        except sqlite3.DatabaseError as error:
            raise JournalError(
                f"journal {path!r} is not a conveyor journal, or it is damaged ({error}); "
                f"move it away to start over, or give run() another journal path"
            ) from error
        if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            raise JournalError(
                f"journal {path!r} has format {meta.get('format')!r} version "
                f"{meta.get('version')!r}; this conveyor writes {_FORMAT!r} version {_VERSION!r}"
            )
        if meta.get("key") != fingerprint:
            raise JournalError(
                f"journal {path!r} was written with the key function {meta.get('key')!r}, "
                f"this run uses {fingerprint!r}: its records would not match these items. "
                f"Use the same key function, or another journal path (or delete this one "
                f"to start over)"
            )

    def load_succeeded(self) -> dict[Key, tuple[int, bytes]]:
        """Every succeeded key: (attempts, pickled value)."""
        try:
            return {
                key: (attempts, value)
                for key, attempts, value in self.conn.execute(
                    "SELECT key, attempts, value FROM conveyor_items WHERE status = 'succeeded'"
                )
            }
        except sqlite3.DatabaseError as error:
            raise JournalError(f"journal {self.path!r}: cannot read it: {error}") from error

    def write(self, rows: list[Row]) -> None:
        """Commit ``rows`` in one transaction."""
        conn = self.conn
        try:
            conn.execute("BEGIN")
            try:
                conn.executemany(_UPSERT, rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            raise JournalError(f"journal {self.path!r}: cannot write to it: {error}") from error

    def close(self) -> None:
        self.conn.close()


# ---------------------------------------------------------------------------------------------
# Items: skip what the journal holds as succeeded


class _Remaining:
    """``items`` without those the journal holds as succeeded (collected in ``skipped``).

    Also refuses two items with the same key: their records would overwrite each other
    and a resumed run would hand one item the other's value.
    """

    def __init__(
        self, items: Iterable[Any] | AsyncIterable[Any], spec: JournalSpec,
        done: dict[Key, tuple[int, bytes]],
    ) -> None:
        self.items = items
        self.spec = spec
        self.done = done
        self.skipped: list[Succeeded[Any]] = []
        self.seen: set[Key] = set()

    def runs(self, item: Any) -> bool:
        """Whether ``item`` must run (or was taken from the journal into ``skipped``)."""
        key = self.spec.key_of(item)
        if key in self.seen:
            raise JournalError(
                f"two items have the journal key {key!r} (the second is {item!r}); each "
                f"item needs its own key, or one would get the other's result on resume"
            )
        self.seen.add(key)
        stored = self.done.pop(key, None)
        if stored is None:
            return True
        attempts, blob = stored
        try:
            value = pickle.loads(blob)
        except Exception as error:
            logger.warning(
                "journal %r: the stored value of key %r cannot be loaded (%s: %s); "
                "running the item again", self.spec.path, key, type(error).__name__, error,
            )
            return True
        self.skipped.append(Succeeded(item, value, attempts))
        return False

    def count(self) -> int | None:
        """How many items will run, when ``items`` is a sized collection."""
        items = self.items
        if not isinstance(items, Sized) or isinstance(items, AsyncIterable):
            return None
        if not self.done:
            return len(items)
        key_of = self.spec.key_of
        done = self.done
        return sum(1 for item in items if key_of(item) not in done)

    def feed(self) -> Iterable[Any] | AsyncIterable[Any]:
        if isinstance(self.items, AsyncIterable):
            return self._async_feed(self.items)
        return self._sync_feed(self.items)

    def _sync_feed(self, items: Iterable[Any]) -> Iterator[Any]:
        runs = self.runs
        for item in items:
            if runs(item):
                yield item

    async def _async_feed(self, items: AsyncIterable[Any]) -> AsyncIterator[Any]:
        runs = self.runs
        async for item in items:
            if runs(item):
                yield item


# ---------------------------------------------------------------------------------------------
# The writer


def _error_text(error: BaseException | None) -> str | None:
    if error is None:
        return None
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _MAX_ERROR_TEXT else text[: _MAX_ERROR_TEXT - 3] + "..."


class _Writer:
    """Rows appended by the reader, committed by one flusher task."""

    def __init__(self, db: _Db, spec: JournalSpec) -> None:
        self.db = db
        self.spec = spec
        self.pending: list[Row] = []
        self.full = trio.Event()
        self.succeeded: list[Succeeded[Any]] = []

    def success_row(self, record: Succeeded[Any]) -> Row:
        try:
            blob = pickle.dumps(record.value, protocol=_PICKLE_PROTOCOL)
        except Exception as error:
            raise JournalError(
                f"journal {self.spec.path!r}: the value of item {record.item!r} cannot be "
                f"pickled ({type(error).__name__}: {error}); a journaled run needs "
                f"picklable values"
            ) from error
        # The key was checked when the item was fed: no second check on the hot path.
        key = record.item if self.spec.key is None else self.spec.key(record.item)
        return (key, "succeeded", record.attempts, blob, None, time.time())

    def other_row(self, record: Failed | Unfinished) -> Row:
        if type(record) is Failed:
            return (self.spec.key_of(record.item), "failed", record.attempts, None,
                    _error_text(record.error), time.time())
        assert type(record) is Unfinished
        return (self.spec.key_of(record.item), "unfinished", record.attempts, None,
                _error_text(record.last_error), time.time())

    async def read(self, pool: Pool[Any]) -> None:
        """Take each record as it settles; wake the flusher every ``_BATCH`` rows."""
        succeeded = self.succeeded
        async with aclosing(pool.results()) as records:  # type: ignore[type-var]
            async for record in records:
                # self.pending, not a local: flush() swaps the list.
                if type(record) is Succeeded:
                    succeeded.append(record)
                    self.pending.append(self.success_row(record))
                else:
                    self.pending.append(self.other_row(record))  # type: ignore[arg-type]
                if len(self.pending) >= _BATCH:
                    self.full.set()

    async def flusher(self) -> None:
        """Commit what is pending every ``_BATCH`` rows or ``_INTERVAL`` seconds."""
        while True:
            with trio.move_on_after(_INTERVAL):
                await self.full.wait()
            self.full = trio.Event()
            await self.flush()

    async def flush(self) -> None:
        rows, self.pending = self.pending, []
        if not rows:
            return
        try:
            # Shielded: rows taken from `pending` are written whatever happens (a commit is
            # small, and a thread that started cannot be stopped anyway).
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.db.write, rows)
        except BaseException:
            self.pending[:0] = rows  # not committed (rolled back): the final flush retries
            raise


# ---------------------------------------------------------------------------------------------
# The journaled run


async def run_journaled(
    pool: Pool[Any], items: Iterable[Any] | AsyncIterable[Any], spec: JournalSpec
) -> Report:
    """Run ``pool`` over ``items`` with the journal ``spec`` (see the module docstring)."""
    db = await trio.to_thread.run_sync(_Db, spec)
    try:
        done = await trio.to_thread.run_sync(db.load_succeeded)
        remaining = _Remaining(items, spec, done)
        progress = pool._progress
        if progress is not None and done:
            progress.total = remaining.count()
        writer = _Writer(db, spec)
        try:
            async with pool._running(remaining.feed()):
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(writer.flusher)
                        await writer.read(pool)
                        nursery.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    # This nursery is ours, not the caller's: what stopped it (Ctrl-C, a
                    # cancel, a failed write) comes out as itself, as from run().
                    sole = sole_error(group, None)
                    if sole is None:
                        raise
                    raise sole from None
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await _final_flush(pool, writer)
                except Exception as error:
                    # Do not hide the error (or Ctrl-C) that stopped the run.
                    logger.error("journal %r: the last records were not saved: %s",
                                 spec.path, error)
            raise
        with trio.CancelScope(shield=True):
            await _final_flush(pool, writer)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(db.close)
    report = pool.report()
    return Report(
        remaining.skipped + writer.succeeded + report.succeeded,
        report.failed,
        report.unfinished,
        report.stats,
    )


async def _final_flush(pool: Pool[Any], writer: _Writer) -> None:
    """Commit the tail: what is pending, successes the reader did not take, every failed and
    unfinished item (failed rows already written are written again, unchanged)."""
    report = pool.report()
    pending = writer.pending
    for success in report.succeeded:
        pending.append(writer.success_row(success))
    for failed in report.failed:
        pending.append(writer.other_row(failed))
    for unfinished in report.unfinished:
        pending.append(writer.other_row(unfinished))
    await writer.flush()
