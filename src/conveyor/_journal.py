"""A durable journal for ``run``, ``map`` and ``open_pool``: a stopped run resumes where it
stopped.

``run(fn, items, journal="job.journal", key=lambda item: item.id)`` records every settled
item by its key in an SQLite file. Run it again with the same journal and the items it holds
as succeeded are not run again: they settle at once as ``Succeeded`` with the stored value
(in the report, and in a ``map`` stream or ``results()`` like any record, in their place
when ordered); items it holds as failed or unfinished (or not at all) are run.

How it is written, and what a crash costs:

- Intake (the filter of ``items``, the gate of ``submit``) computes each item's key once.
  An item whose key raises, is not a str/int/bytes, or repeats another item's key settles
  as ``Failed`` with attempts 0 and is not written; the run goes on.
- The pool tells the journal of each record as it settles (an outbox that calls back on
  append: nothing on the hot path of a pool without a journal), whoever reads the records.
  A flusher (a system task, so that the caller's block sits in no nursery of ours) pickles
  them into rows and commits them off the event loop (``trio.to_thread``), in one
  transaction, every ``_BATCH`` records or ``_INTERVAL`` seconds, whichever comes first.
- SQLite in WAL mode with ``synchronous=NORMAL``: a committed transaction survives the
  process being killed (SIGKILL, a crash); only a power cut can lose the last commits. So
  a kill loses at most the uncommitted tail (under ``_BATCH`` rows, or ``_INTERVAL``
  seconds of results), and those items are simply run again by the next run.
- On every way out (the end, a cancel, an error, Ctrl-C, a ``break`` out of a ``map``),
  after the pool has stopped (items not settled become ``Unfinished``), the rest is
  committed, shielded from the cancel, with a row per unfinished item, before the
  exception propagates.
- A row is keyed by the item's key, and a succeeded row is never overwritten: whatever
  happens, the journal holds at most one result per key. Output written from the report
  (or from the journal) therefore never holds an item twice, even if an item was run twice
  because a crash lost its row.

What is checked when the journal is opened (before any work starts), each a
:class:`JournalInvalid` (or, for one in use or unreadable, :class:`JournalIOError`; both
are a :class:`JournalError`) naming the file and the fix: a path that is a directory or in no
directory; a file another user owns, or that its group or others can write (or such a
``-wal``/``-shm`` file), since its pickles run code when loaded; a journal in use by another
run (an ``flock`` on ``PATH-lock``, which the kernel releases when its process dies); not an
SQLite file, or a damaged one (``PRAGMA quick_check``); an SQLite database of another
program; a journal of another format version; a journal written with a different key
function (:func:`key_fingerprint`). Nothing is ever silently restarted. A new journal is
created 0600, atomically (the schema is created in one transaction that looks again under
SQLite's write lock). A write that fails during the run is a :class:`JournalIOError` (an
:class:`OSError`): it stops the pool and is raised once the pool has ended.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import operator
import os
import pickle
import shlex
import sqlite3
import stat
import sys
import time
import traceback
import types
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sized
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import trio

try:
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]

from ._errors import JournalError, JournalInvalid, JournalIOError
from ._options import check_callable, invalid
from ._pool import Pool, running
from ._records import Failed, Report, Succeeded, Unfinished

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = [
    "JournalError", "JournalIOError", "JournalInvalid", "JournalSpec", "check_journal",
    "journaled", "open_journaled_pool",
    "run_journaled",
]

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
# How long SQLite waits for another connection's lock before it gives up (seconds).
_BUSY_TIMEOUT = 5.0
# Result codes (the low byte of sqlite_errorcode).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 6, 11, 26
_LOCK_SUFFIX = "-lock"
_WHY_TRUST = (
    "A journal's values are pickles, and loading a pickle runs whatever code it names, so "
    "conveyor only opens a journal that its own user owns and no one else can write (as ssh "
    "does with a key file)."
)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

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
Items = Iterable[Any] | AsyncIterable[Any]
T = TypeVar("T")
Row = tuple[Key, str, int, bytes | None, str | None, float]


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
        return self.checked(item if self.key is None else self.key(item), item)

    def checked(self, key: Any, item: Any) -> Key:
        """``key`` if SQLite holds it exactly (a str, bytes or a 64-bit int), else a
        TypeError that says so."""
        kind = type(key)
        if kind is str or kind is bytes:
            return key  # type: ignore[no-any-return]
        if kind is int and _INT64[0] <= key <= _INT64[1]:
            return key  # type: ignore[no-any-return]
        if inspect.iscoroutine(key):
            key.close()  # no "never awaited" warning: the message says what happened
        source = "the item itself (no key= given)" if self.key is None else "key(item)"
        raise TypeError(
            f"journal key must be a str, bytes or a 64-bit int; {source} is {key!r} "
            f"for item {item!r}"
        )


def check_journal(journal: object, key: object) -> JournalSpec | None:
    """Check ``journal=`` and ``key=`` at the call; None when there is no journal."""
    example = "journal='job.journal'"
    if journal is None:
        if key is not None:
            raise invalid("key", key, "None without a journal (key= names each item's record "
                          "in the journal)", example)
        return None
    if not isinstance(journal, str | os.PathLike):
        raise invalid("journal", journal, "a file path (str or os.PathLike) or None", example,
                      kind=TypeError)
    path = os.fspath(journal)
    if not isinstance(path, str):
        raise invalid("journal", journal, "a str path (not bytes)", example, kind=TypeError)
    if not path:
        raise invalid("journal", journal, "a non-empty file path", example)
    if "\x00" in path:
        raise invalid("journal", journal, "a file path without NUL characters", example)
    if os.path.isdir(path):
        raise invalid("journal", journal, "a file path, not a directory",
                      f"journal={os.path.join(path, 'job.journal')!r} (a file in it)")
    key_fn = None if key is None else check_callable(
        "key", key, "a function item -> str | int | bytes, or None (the item itself)",
        "key=str")
    return JournalSpec(path, key_fn, key_fingerprint(key_fn))


def key_fingerprint(key: Callable[[Any], Any] | None) -> str:
    """What identifies a key function across runs: its name and a hash of what defines it.

    ``"item"`` when there is no key function (the item is its own key). Otherwise
    ``"NAME code=HASH py=X.Y"``: NAME is the module and qualified name (for the message), and
    HASH covers what makes the function compute what it computes: its bytecode, constants and
    the names it uses; the values of its defaults and closure variables when they are plain
    data (numbers, strings, bytes, None, and tuples or frozensets of them), otherwise their
    type; the functions of its own module that it calls by name, the same way; for a
    :func:`functools.partial`, its function and arguments; for a method or another callable
    object, the function and the object's plain-data attributes. Two lambdas differ; moving
    a function in its file, or renaming its arguments' callers, does not change it.

    Bytecode differs between Python versions, so ``py`` says which one wrote it (see
    :func:`_same_key`).
    """
    if key is None:
        return "item"
    identity = repr(_identity(key, set()))
    digest = hashlib.sha256(identity.encode("utf-8", "backslashreplace")).hexdigest()[:16]
    return f"{_name(key)} code={digest} py={sys.version_info[0]}.{sys.version_info[1]}"


def _name(key: Any) -> str:
    if isinstance(key, functools.partial):
        return f"partial({_name(key.func)})"
    target: Any = key if hasattr(key, "__qualname__") else type(key)
    module = getattr(target, "__module__", None) or "?"
    return f"{module}.{target.__qualname__}"


_PLAIN = (type(None), bool, int, float, complex, str, bytes)


def _identity(obj: Any, seen: set[int]) -> Any:
    """A nested tuple of plain values that stands for what ``obj`` computes (see
    :func:`key_fingerprint`)."""
    if isinstance(obj, _PLAIN):
        return (type(obj).__name__, obj)
    if isinstance(obj, tuple | frozenset | list):
        items = [_identity(value, seen) for value in obj]
        return (type(obj).__name__, sorted(map(repr, items)) if isinstance(obj, frozenset)
                else items)
    if id(obj) in seen:
        return ("again", getattr(obj, "__qualname__", type(obj).__qualname__))
    if isinstance(obj, types.FunctionType):
        seen.add(id(obj))
        code = obj.__code__
        closure = [cell.cell_contents if _filled(cell) else None for cell in obj.__closure__ or ()]
        called = [
            _identity(value, seen)
            for name in code.co_names
            if isinstance(value := obj.__globals__.get(name), types.FunctionType)
            and value.__module__ == obj.__module__
        ]
        return ("function", obj.__module__, obj.__qualname__, _code_identity(code, obj.__doc__),
                _identity(obj.__defaults__ or (), seen),
                _identity(sorted((obj.__kwdefaults__ or {}).items()), seen),
                _identity(closure, seen), called)
    if isinstance(obj, functools.partial):
        seen.add(id(obj))
        return ("partial", _identity(obj.func, seen), _identity(obj.args, seen),
                _identity(sorted(obj.keywords.items()), seen))
    if isinstance(obj, types.MethodType):
        seen.add(id(obj))
        return ("method", _identity(obj.__func__, seen), _identity(obj.__self__, seen))
    if isinstance(obj, type | types.BuiltinFunctionType | types.ModuleType):
        return (type(obj).__name__, getattr(obj, "__module__", None),
                getattr(obj, "__qualname__", obj.__name__))
    if isinstance(obj, operator.itemgetter | operator.attrgetter | operator.methodcaller):
        return ("operator", repr(obj))  # their repr holds their arguments
    # Another object: its class (and the code of its __call__, if it is one written in
    # Python) and its plain-data attributes.
    seen.add(id(obj))
    kind = type(obj)
    call = getattr(kind, "__call__", None)  # noqa: B004 - the class's, not the instance's
    attributes = getattr(obj, "__dict__", None)
    return ("object", kind.__module__, kind.__qualname__,
            _identity(call, seen) if isinstance(call, types.FunctionType) else None,
            _identity(sorted((k, v) for k, v in attributes.items() if isinstance(v, _PLAIN))
                      if isinstance(attributes, dict) else (), seen))


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _code_identity(code: types.CodeType, doc: object = None) -> Any:
    """Bytecode, constants (nested code objects too, a docstring left out) and names."""
    consts = [
        _code_identity(value) if isinstance(value, types.CodeType) else repr(value)
        for value in code.co_consts
        if not (doc is not None and value is doc)
    ]
    return (code.co_code.hex(), consts, code.co_names, code.co_argcount,
            code.co_kwonlyargcount, code.co_flags, len(code.co_varnames), code.co_freevars)


def _same_key(stored: str, fingerprint: str) -> bool | None:
    """Whether the journal's key function (``stored``) is this run's (``fingerprint``).

    None when only the names can be compared: the journal was written by another Python
    version (its bytecode differs), or by a conveyor that stored names only.
    """
    if stored == fingerprint:
        return True
    stored_name, _, stored_rest = stored.partition(" code=")
    name, _, rest = fingerprint.partition(" code=")
    if stored_name != name:
        return False
    if not stored_rest:
        return None  # an older journal: names only
    stored_py = stored_rest.partition(" py=")[2]
    return None if stored_py != rest.partition(" py=")[2] else False


# ---------------------------------------------------------------------------------------------
# The SQLite file (sync; used from one thread at a time)


class _Db:
    """One connection to one journal file, with the journal's lock held. Every method runs in
    a worker thread.

    Opening: the file is created 0600 if it is new, then checked (:func:`_check_trust`); the
    lock is taken (:class:`_Lock`), then the connection opened and the journal created or
    checked (:func:`_connect`).
    """

    def __init__(self, spec: JournalSpec) -> None:
        self.path = spec.path
        _prepare_file(spec.path)
        self.lock = _Lock(spec.path)
        try:
            self.conn = _connect(spec.path, spec.fingerprint)
        except BaseException:
            self.lock.release()
            raise

    def load_succeeded(self) -> dict[Key, tuple[int, bytes]]:
        """Every succeeded key: (attempts, pickled value)."""
        try:
            return {
                key: (attempts, value)
                for key, attempts, value in self.conn.execute(
                    "SELECT key, attempts, value FROM conveyor_items WHERE status = 'succeeded'"
                )
            }
        except sqlite3.Error as error:
            raise _open_problem(self.path, error) from error

    def write(self, rows: list[Row]) -> None:
        """Commit ``rows`` in one transaction; a failure is a :class:`JournalIOError` (an
        :class:`OSError`: the world failed, not the caller's input), chained from SQLite's
        error."""
        conn = self.conn
        try:
            conn.execute("BEGIN")
            try:
                conn.executemany(_UPSERT, rows)
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled it back already (disk full)
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            raise JournalIOError(f"journal {self.path!r}: cannot write to it: {error}") from error

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self.lock.release()


def _prepare_file(path: str) -> None:
    """Create the journal file 0600 if it does not exist (atomically: O_CREAT), and refuse
    a file this process should not trust, or its SQLite side files."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o600)
    except IsADirectoryError:
        raise JournalInvalid(
            f"journal {path!r} is a directory; give a file path, e.g. "
            f"journal={os.path.join(path, 'job.journal')!r}"
        ) from None
    except FileNotFoundError:
        raise JournalInvalid(
            f"journal {path!r}: its directory {os.path.dirname(path) or '.'!r} does not exist; "
            f"create it first, or give another journal path"
        ) from None
    except OSError as error:
        raise JournalIOError(
            f"journal {path!r}: cannot open it for reading and writing ({error}); give "
            f"another journal path"
        ) from error
    try:
        status = os.fstat(fd)
    finally:
        os.close(fd)
    _check_trust(path, path, status)
    for suffix, what in (("-wal", "write-ahead log"), ("-shm", "shared-memory file")):
        try:
            status = os.stat(path + suffix)
        except FileNotFoundError:
            continue
        _check_trust(path, path + suffix, status, what)


def _check_trust(path: str, target: str, status: os.stat_result, what: str = "") -> None:
    """Refuse a file that another user owns, or that its group or others can write: its
    pickles would run their code in this process (ssh treats a key file the same way).
    ``target`` is the file checked: the journal ``path`` or one of its SQLite side files
    (``what``)."""
    name = repr(path) if not what else f"{path!r}: its {what} {target!r}"
    if not stat.S_ISREG(status.st_mode):
        raise JournalInvalid(f"journal {name} is not a regular file; give another journal path")
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None:  # no owners to compare (Windows)
        return
    me = geteuid()
    if status.st_uid != me:
        raise JournalInvalid(
            f"journal {name} belongs to another user ({_user(status.st_uid)}), not to this "
            f"process's user ({_user(me)}). {_WHY_TRUST} If you trust this file, make it "
            f"yours (chown {_user_name(me)} {shlex.quote(target)}), or give another journal "
            f"path"
        )
    writable = status.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable:
        who = {stat.S_IWGRP: "its group", stat.S_IWOTH: "others"}.get(
            writable, "its group and others"
        )
        raise JournalInvalid(
            f"journal {name} can be written by {who} (mode "
            f"{stat.S_IMODE(status.st_mode):04o}). {_WHY_TRUST} Make it private (chmod go-w "
            f"{shlex.quote(target)}; conveyor creates journals 0600), or give another "
            f"journal path"
        )


def _user(uid: int) -> str:
    name = _user_name(uid)
    return f"uid {uid}" if name == str(uid) else f"uid {uid}, {name!r}"


def _user_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


class _Lock:
    """The journal's lock: an exclusive ``flock`` on the side file ``PATH-lock``, held while
    a run uses the journal, so that a second run is refused instead of running every item
    again. The kernel releases it when the process ends, however it ends (SIGKILL
    included): a lock cannot outlive its run. The file holds the holder's pid, for the
    message; it is left in place (deleting a lock file races with the next run taking it).
    """

    def __init__(self, path: str) -> None:
        self.fd = -1
        if _fcntl is None:  # no flock (Windows): runs on one journal are not kept apart
            return
        lock_path = path + _LOCK_SUFFIX
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o600)
        except OSError as error:
            raise JournalIOError(
                f"journal {path!r}: cannot open its lock file {lock_path!r} ({error}); give "
                f"another journal path"
            ) from error
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            by = f"process {holder[0]}" if holder and holder[0].isdigit() else "a process"
            since = f", since {holder[1]}" if len(holder) > 1 else ""
            raise JournalIOError(
                f"journal {path!r} is in use by another run ({by}{since}): two runs on "
                f"one journal would each run the items the other is running. Wait for "
                f"that run to end (a run that was killed releases it at once), or give "
                f"this one another journal path"
            ) from None
        except OSError as error:
            os.close(fd)
            raise JournalIOError(
                f"journal {path!r}: cannot lock {lock_path!r} ({error}); give another "
                f"journal path (on a local disk)"
            ) from error
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
        except OSError:
            pass  # the pid is for the message only
        self.fd = fd

    def release(self) -> None:
        """Release the lock (closing the file releases it). Idempotent."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _connect(path: str, fingerprint: str) -> sqlite3.Connection:
    """Open the SQLite file, create the journal in it if it is empty, and check it.

    SQLite waits up to ``_BUSY_TIMEOUT`` for another connection's lock, but not always
    (switching to WAL while another process does the same answers "locked" at once): a busy
    answer is tried again until that time has passed.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT
    while True:
        try:
            conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as error:
            raise _open_problem(path, error) from error
        try:
            _create_or_check(conn, path, fingerprint)
        except sqlite3.Error as error:
            conn.close()
            if _code(error) in (_SQLITE_BUSY, _SQLITE_LOCKED) and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise _open_problem(path, error) from error
        except BaseException:
            conn.close()
            raise
        return conn


def _code(error: sqlite3.Error) -> int:
    """SQLite's primary result code of ``error`` (0 if unknown)."""
    return (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _create_or_check(conn: sqlite3.Connection, path: str, fingerprint: str) -> None:
    """Create the journal if the file has no table, then check it (SQLite's errors are
    raised as they are)."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    if not _tables(conn):
        # Created in one transaction that first looks again, under SQLite's write
        # lock: another process may have created it since (a race, not damage).
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not _tables(conn):
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
    tables = _tables(conn)
    if tables != {"conveyor_journal", "conveyor_items"}:
        raise JournalInvalid(
            f"journal {path!r} is an SQLite database but not a conveyor journal "
            f"(its tables: {', '.join(sorted(tables))}); conveyor will not write into "
            f"it: give another journal path"
        )
    (check,) = conn.execute("PRAGMA quick_check").fetchone()
    if check != "ok":
        raise JournalInvalid(
            f"journal {path!r} is damaged (SQLite quick_check: {check}); move it away "
            f"to start over, or restore it from a copy"
        )
    meta = dict(conn.execute("SELECT name, value FROM conveyor_journal"))
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise JournalInvalid(
            f"journal {path!r} has format {meta.get('format')!r} version "
            f"{meta.get('version')!r}; this conveyor writes {_FORMAT!r} version {_VERSION!r}"
        )
    stored = str(meta.get("key"))
    same = _same_key(stored, fingerprint)
    if same is False:
        raise JournalInvalid(
            f"journal {path!r} was written with another key function: {stored!r}, this "
            f"run's is {fingerprint!r} (a name, and a hash of its code and the values it "
            f"uses). Its records would not match these items. Use the key function that "
            f"wrote it, or another journal path (or delete this one to start over)"
        )
    if same is None:
        logger.warning(
            "journal %r was written with the key function %r; this run's is %r. Only their "
            "names can be compared (another Python version, or an older journal): the "
            "journal now records this one", path, stored, fingerprint,
        )
        conn.execute("UPDATE conveyor_journal SET value = ? WHERE name = 'key'", (fingerprint,))


def _open_problem(path: str, error: sqlite3.Error) -> JournalInvalid | JournalIOError:
    """What an SQLite error met while opening or reading the journal means, as a
    :class:`JournalInvalid` (not a database, or damaged: only a file SQLite finds so is said
    to be one) or a :class:`JournalIOError` (busy, unreadable: never "moved away")."""
    code = _code(error)
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return JournalInvalid(
            f"journal {path!r} is not a conveyor journal, or it is damaged ({error}); "
            f"move it away to start over, or give another journal path"
        )
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return JournalIOError(
            f"journal {path!r} is busy: another program has held a lock on the SQLite file "
            f"for {_BUSY_TIMEOUT:g} s ({error}); try again once it is done"
        )
    return JournalIOError(f"journal {path!r}: cannot open or read it ({error})")


# ---------------------------------------------------------------------------------------------
# A journaled pool: what is done is settled from the journal, what settles is written


class _Session:
    """The journal of one pool's run.

    Intake (:meth:`runs`, the filter of ``items`` and the gate of ``submit``): an item the
    journal holds as succeeded settles at once with the stored value; an item whose key is
    bad settles as ``Failed`` (attempts 0) and the run goes on; the others run.

    Output: the pool tells :meth:`observe` of each record as it settles (whoever reads the
    records, and even if nobody does); one flusher commits them every ``_BATCH`` records or
    ``_INTERVAL`` seconds; :meth:`close` commits the rest, and the unfinished items, on the
    way out.
    """

    def __init__(self, pool: Engine, spec: JournalSpec, db: _Db,
                 done: dict[Key, tuple[int, bytes]]) -> None:
        self.pool = pool
        self.spec = spec
        self.db = db
        self.done = done
        self.seen: set[Key] = set()
        self.settled: list[Succeeded[Any] | Failed | Unfinished] = []
        self.pending: list[Row] = []  # rows taken from `settled`, not committed yet
        self.full = trio.Event()
        self.failure: Exception | None = None  # met by the flusher; raised on the way out
        self.scope = trio.CancelScope()
        self.flusher_done = trio.Event()

    # -- intake

    def runs(self, item: Any) -> bool:
        """Whether ``item`` must run; if not, it has been settled (from the journal, or as
        failed on its key)."""
        key_fn = self.spec.key
        if key_fn is None:
            raw = item
        else:
            try:
                raw = key_fn(item)
            except Exception as error:
                error.add_note(
                    f"conveyor: raised by the journal's key function "
                    f"{_name(key_fn)} for item {item!r}; the item was not run"
                )
                self._refuse(item, error)
                return False
        try:
            key = self.spec.checked(raw, item)
        except TypeError as error:
            self._refuse(item, TypeError(f"{error}; the item was not run"))
            return False
        if key in self.seen:
            self._refuse(item, JournalInvalid(
                f"two items have the journal key {key!r} (this one is {item!r}); each item "
                f"needs its own key, or one would get the other's result on resume: this "
                f"one was not run"
            ))
            return False
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
        self.pool.settle_unrun(Succeeded(item, value, attempts))
        return False

    def _refuse(self, item: Any, error: Exception) -> None:
        logger.warning("item %r not run: %s: %s", item, type(error).__name__, error)
        record = Failed(item, error, 0, "".join(traceback.format_exception(error)))
        self.pool.settle_unrun(record)

    def count(self, items: Items | None) -> int | None:
        """How many items will run, when ``items`` is a sized collection."""
        if not isinstance(items, Sized) or isinstance(items, AsyncIterable):
            return None
        if not self.done:
            return len(items)
        done = self.done
        left = 0
        for item in items:
            try:
                left += self.spec.key_of(item) not in done
            except Exception:
                continue  # a bad key: it will fail, not run
        return left

    def feed(self, items: Items) -> Items:
        """``items`` without those settled at intake."""
        if isinstance(items, AsyncIterable):
            return self._async_feed(items)
        return self._sync_feed(items)

    def _sync_feed(self, items: Iterable[Any]) -> Iterator[Any]:
        runs = self.runs
        for item in items:
            if runs(item):
                yield item

    async def _async_feed(self, items: AsyncIterable[Any]) -> AsyncIterator[Any]:
        runs = self.runs
        async with aclosing(aiter(items)) as iterator:  # type: ignore[type-var]
            async for item in iterator:
                if runs(item):
                    yield item

    # -- output

    def observe(self, record: Succeeded[Any] | Failed) -> None:
        """Called by the pool as each record settles (the hot path: append, count)."""
        settled = self.settled
        settled.append(record)
        if len(settled) >= _BATCH:
            self.full.set()

    async def flusher(self) -> None:
        """Commit what has settled every ``_BATCH`` records or ``_INTERVAL`` seconds. A
        system task (so the caller's block is in no nursery of ours): a failure stops the
        pool and is raised on the way out."""
        try:
            with self.scope:
                while True:
                    with trio.move_on_after(_INTERVAL):
                        await self.full.wait()
                    self.full = trio.Event()
                    await self.flush()
        except Exception as error:
            self.failure = error
            self.pool.stop()
        finally:
            self.flusher_done.set()

    def _rows(self) -> list[Row]:
        settled, self.settled = self.settled, []
        rows = self.pending
        now = time.time()
        for record in settled:
            try:
                key = self.spec.key_of(record.item)
            except Exception as error:
                logger.warning("journal %r: item %r not recorded: its key now raises %s: %s",
                               self.spec.path, record.item, type(error).__name__, error)
                continue
            if type(record) is Succeeded:
                try:
                    blob = pickle.dumps(record.value, protocol=_PICKLE_PROTOCOL)
                except Exception as error:
                    raise JournalInvalid(
                        f"journal {self.spec.path!r}: the value of item {record.item!r} cannot "
                        f"be pickled ({type(error).__name__}: {error}); a journaled run needs "
                        f"picklable values"
                    ) from error
                rows.append((key, "succeeded", record.attempts, blob, None, now))
            elif type(record) is Failed:
                rows.append((key, "failed", record.attempts, None, _error_text(record.error),
                             now))
            else:
                assert type(record) is Unfinished
                rows.append((key, "unfinished", record.attempts, None,
                             _error_text(record.last_error), now))
        return rows

    async def flush(self) -> None:
        self.pending = self._rows()
        rows = self.pending
        if not rows:
            return
        # Shielded: rows taken are written whatever happens (a commit is small, and a
        # thread that started cannot be stopped anyway). Not committed (rolled back): kept
        # in `pending` for the next flush.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.db.write, rows)
        self.pending = []

    async def close(self) -> None:
        """Stop the flusher and commit the rest: what has settled since, and a row per
        unfinished item (the pool has ended). Shielded from cancels."""
        with trio.CancelScope(shield=True):
            self.scope.cancel()
            await self.flusher_done.wait()
            self.settled.extend(self.pool.report().unfinished)
            try:
                await self.flush()
            except Exception as error:
                if self.failure is None:
                    self.failure = error


@asynccontextmanager
async def journaled(
    pool: Engine, spec: JournalSpec | None, items: Items | None = None
) -> AsyncIterator[Items | None]:
    """Around a pool's run: open the journal (refused at once if it cannot be used), yield
    ``items`` filtered by it (and gate ``pool.submit``), and commit it on every way out.
    With no journal (``spec`` None), yield ``items`` as they are."""
    if spec is None:
        yield items
        return
    db = await trio.to_thread.run_sync(_Db, spec)
    try:
        done = await trio.to_thread.run_sync(db.load_succeeded)
        session = _Session(pool, spec, db, done)
        if done:
            pool.total = session.count(items)  # the items that will run (PoolInfo.total)
        pool.observe_settled(session.observe)  # type: ignore[arg-type]
        pool.gate = session.runs
        trio.lowlevel.spawn_system_task(session.flusher, name="conveyor journal flusher")
        try:
            yield None if items is None else session.feed(items)
        except BaseException as error:
            await session.close()
            failure = session.failure
            if failure is None:
                raise
            if not isinstance(error, Exception):
                # Ctrl-C or a cancel stays what it is; the journal's problem is logged.
                logger.error("journal %r: %s: %s", spec.path, type(failure).__name__, failure)
                raise
            raise failure from error  # what stopped the pool, and what that caused
        await session.close()
        if session.failure is not None:
            raise session.failure
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(db.close)


@asynccontextmanager
async def open_journaled_pool(pool: Engine, spec: JournalSpec) -> AsyncIterator[Pool[Any]]:
    """``open_pool(..., journal=...)``: the pool's block inside the journal's."""
    async with journaled(pool, spec), running(pool) as facade:
        yield facade


async def run_journaled(pool: Engine, items: Items, spec: JournalSpec) -> Report:
    """``run(..., journal=...)``: the report holds the successes taken from the journal
    too (in input order with the others, as they settle)."""
    async with journaled(pool, spec, items) as feed:
        assert feed is not None
        async with running(pool, feed):
            pass
    return pool.report()


def _error_text(error: BaseException | None) -> str | None:
    if error is None:
        return None
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _MAX_ERROR_TEXT else text[: _MAX_ERROR_TEXT - 3] + "..."
