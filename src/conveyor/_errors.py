"""Every exception conveyor defines, as one tree.

Every class here is a :class:`ConveyorError`, so ``except conveyor.ConveyorError`` catches
whatever conveyor itself raises. Below that common base the tree keeps two questions apart,
and each class also subclasses the builtin that answers the question, so handlers written
against the builtins keep working::

    Exception
    └── ConveyorError                   anything conveyor defines
        │   the caller's input was bad: fix the call (also ValueError / TypeError)
        ├── JournalError                the journal: one child of each kind (catches both)
        │   ├── JournalInvalid          + ValueError: not a journal, damaged, another key
        │   │                             function or format, not trusted, a bad path, an
        │   │                             item's key repeats, a value that cannot be pickled
        │   └── JournalIOError          + OSError: the world failed: cannot open, lock, read
        │                                 or write it, in use by another run, busy
        ├── NotPicklableError           + pickle.PicklingError, TypeError: a function,
        │                                 argument or result cannot cross to a process
        │   the world failed: the call was fine (also RuntimeError / TooSlowError)
        ├── AttemptTimeout              + trio.TooSlowError: an attempt outran ``timeout``
        ├── WorkerDied                  + trio_parallel.BrokenWorkerError (a RuntimeError)
        ├── RemoteError                 + RuntimeError: a worker's exception that cannot
        │                                 be raised as it is in the caller
        │   what became of the items (raised on request, by the caller's own call)
        ├── ItemsFailed                 Report.raise_for_failures()
        ├── ItemUnfinished              + RuntimeError: Unfinished.unwrap()
        │   a signal a task raises
        └── RetryAfter                  "retry me after ``delay`` seconds"

A parameter refused at the call is a plain :class:`TypeError` (the wrong kind of value) or
:class:`ValueError` (the right kind, out of range), never one of these: its message has
one shape, ``[Owner: ]param=value is not valid: expected WHAT; e.g. FIX`` (see
``conveyor._options``).

The classes keep the names, bases and attributes they had before they were gathered here
(``JournalError`` was a ``ValueError`` itself: now only ``JournalInvalid`` is, and a failed
write, formerly a bare ``OSError``, is a ``JournalIOError``, still an ``OSError``).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio
import trio_parallel  # type: ignore[import-untyped]  # untyped; its API is small

from ._options import check_seconds, check_type

if TYPE_CHECKING:
    from ._records import Failed, Unfinished

__all__ = [
    "AttemptTimeout",
    "ConveyorError",
    "ItemUnfinished",
    "ItemsFailed",
    "JournalError",
    "JournalIOError",
    "JournalInvalid",
    "NotPicklableError",
    "RemoteError",
    "RetryAfter",
    "WorkerDied",
]


class ConveyorError(Exception):
    """The base of every exception conveyor defines (see the tree in ``conveyor._errors``).

    Not raised itself. Each subclass also subclasses the builtin that says what went wrong:
    ``ValueError``/``TypeError`` when the caller's input was bad, ``OSError``/
    ``RuntimeError`` (or ``trio.TooSlowError``) when the world failed.
    """


# --------------------------------------------------------------------------------- journal


class JournalError(ConveyorError):
    """A problem with a run's journal (``journal=PATH``): the common base of
    :class:`JournalInvalid` (the caller's journal or items are bad) and
    :class:`JournalIOError` (the world failed while using it).

    conveyor raises only those two; ``except JournalError`` catches both. Every message
    names the journal file and says what to do.
    """


class JournalInvalid(JournalError, ValueError):
    """The journal cannot be used as given, or an item cannot be journaled: fix the input.

    At the call, before any work starts: not a conveyor journal, damaged (SQLite's
    ``quick_check``), another format version, written with another key function, not
    trusted (another user's file, or writable by its group or others, since its pickles run
    code when loaded), a path that is a directory or in no directory. During the run: two
    items have the same key (that item alone fails, not run), or a value cannot be pickled
    (the run stops). A :class:`ValueError`, as ``JournalError`` was.
    """


class JournalIOError(JournalError, OSError):
    """The journal could not be opened, locked, read or written: the caller's input was fine,
    the world failed (permissions, disk full, an I/O error, a file another run holds).

    At the call: in use by another run (its ``flock``), busy (another program's SQLite
    lock), cannot be opened or locked. During the run: a write that fails stops the pool,
    and this is raised once the pool has ended, chained (``from``) to SQLite's error. An
    :class:`OSError` (as a failed write was before); ``errno`` is None.
    """


# --------------------------------------------------------------------------------- offload


class NotPicklableError(ConveyorError, pickle.PicklingError, TypeError):
    """The function, an argument or a result could not be pickled (or unpickled) on its way
    to or from a worker process.

    The message says which one and why. A lambda or a function defined inside another
    function cannot be pickled by reference; the message then shows the fix: define it at
    module level, and bind extra arguments with :func:`functools.partial`.

    It subclasses both :class:`pickle.PicklingError` and :class:`TypeError`, the two errors
    :mod:`pickle` raises for these problems, so existing handlers keep working. It would
    fail the same way on every attempt, so it carries ``retryable = False`` and a pool
    records it as ``Failed`` at once, whatever ``Retry.retry_on`` says.
    """

    retryable = False


class WorkerDied(ConveyorError, trio_parallel.BrokenWorkerError):  # type: ignore[misc]
    """The worker process running a job died before it returned (crash, ``os._exit``, SIGKILL,
    out of memory).

    Raised by :func:`in_process` with the default backend in place of trio-parallel's
    ``BrokenWorkerError`` (which it subclasses, so code catching that still works). The job
    may have run partly, so it is only safe to retry if it is idempotent; the pool's default
    ``retry_on`` (every ``Exception``) retries it, and trio-parallel starts a fresh worker for
    the next attempt. Other backends report a dead worker with their own errors, left as they
    are: ``concurrent.futures.process.BrokenProcessPool`` (that executor then stays broken),
    or Dask's ``KilledWorker`` (after Dask has itself rescheduled the task elsewhere).

    Attributes:
        exitcode: the worker's exit code if known (negative: killed by that signal).
    """

    def __init__(self, message: str, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[type[WorkerDied], tuple[str, int | None]]:
        return (type(self), (str(self), self.exitcode))


class RemoteError(ConveyorError, RuntimeError):
    """Stands in for an exception raised in a worker process that cannot be raised as it is
    in the caller.

    Two cases: the exception could not be pickled back (then it is retried like any error),
    or the function raised ``SystemExit``, ``KeyboardInterrupt`` or another
    ``BaseException`` that is not an ``Exception``: code running in a worker process cannot
    end the caller's program, so that call fails with this error instead, which carries
    ``retryable = False`` (a pool records it as ``Failed`` at once and goes on). Its message
    names what was raised (``SystemExit(3)``), and its ``__cause__`` holds the worker-side
    traceback, like any exception coming back from :func:`in_process`.
    """


# ------------------------------------------------------------------------------------ pool


class AttemptTimeout(ConveyorError, trio.TooSlowError):
    """An attempt ran longer than the pool's per-attempt ``timeout`` (or past the item's
    ``Retry.budget``); retried like any error. A :class:`trio.TooSlowError`."""


# --------------------------------------------------------------------------------- records


class ItemUnfinished(ConveyorError, RuntimeError):
    """Raised by :meth:`Unfinished.unwrap`: the pool stopped before the item settled."""


class ItemsFailed(ConveyorError):
    """Raised by :meth:`Report.raise_for_failures` when some items failed or did not finish.

    ``failed`` and ``unfinished`` are the records (lists); the message names the first few.
    """

    def __init__(self, failed: Sequence[Failed], unfinished: Sequence[Unfinished]) -> None:
        self.failed = list(failed)
        self.unfinished = list(unfinished)
        parts = []
        if failed:
            first = ", ".join(
                f"{r.item!r} ({type(r.error).__name__}: {r.error})" for r in failed[:3]
            )
            more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
            parts.append(f"{len(failed)} failed: {first}{more}")
        if unfinished:
            first = ", ".join(repr(r.item) for r in unfinished[:3])
            more = f" and {len(unfinished) - 3} more" if len(unfinished) > 3 else ""
            parts.append(f"{len(unfinished)} unfinished: {first}{more}")
        super().__init__("; ".join(parts))


# ---------------------------------------------------------------------------------- retries


class RetryAfter(ConveyorError):
    """Raise this from a task to ask for a retry after ``delay`` seconds.

    It overrides the backoff for that retry, e.g. for an HTTP 429 or 503 with a
    ``Retry-After`` header. Any other exception with a numeric ``retry_after`` attribute
    is honoured the same way. Whether the error is retried at all is still decided by
    ``Retry.retry_on`` and ``Retry.attempts``, and the delay is capped by
    ``Retry.max_retry_after``.

    Attributes:
        retry_after: ``delay`` as a float.
    """

    def __init__(self, delay: float, message: str = "") -> None:
        check_seconds("delay", delay, owner="RetryAfter", minimum=0, example="delay=1.0")
        check_type("message", message, str, "a str", "message='rate limited'",
                   owner="RetryAfter")
        super().__init__(message or f"retry after {delay} s")
        self.retry_after = float(delay)

    def __reduce__(self) -> tuple[type[RetryAfter], tuple[float, str]]:
        # Rebuilt from its delay and message (not from ``args``, which hold the message
        # only), so one raised in a worker process comes back as itself.
        return (type(self), (self.retry_after, str(self)))
