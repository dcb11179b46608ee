"""The part of conveyor that runs inside worker processes: standard library only.

``conveyor.in_process`` and ``conveyor.in_process_batched`` send :func:`run_jobs` or
:func:`run_batch` to a worker process by reference, together with the pickled function and
arguments. This module is deliberately *not* inside the ``conveyor`` package: importing
anything there runs ``conveyor/__init__.py``, which imports trio and trio-parallel, and a
fresh worker would pay for those imports before its first job (again after every worker
killed on cancel or timeout, or dead). It imports only the standard library; the worker
imports the user's function when it unpickles it.

A reply is a ``(kind, payload, text)`` tuple of plain values (no class of conveyor's crosses
the boundary, so none needs importing here); the parent turns it into the value or the
exception (``conveyor._offload._load_reply``):

- ``(OK, pickled value, "")``;
- ``(RAISED, pickled exception, worker traceback)``;
- ``(NOT_PICKLABLE, message, traceback)``: the function, the arguments or the result could not
  cross (the parent raises ``conveyor.NotPicklableError``);
- ``(NOT_REBUILDABLE, message, traceback)``: the exception could not be pickled back (the
  parent raises ``conveyor.RemoteError``);
- ``(EXITED, message, traceback)``: the function raised ``SystemExit``, ``KeyboardInterrupt``
  or another ``BaseException``, which must not end the caller's program (the parent raises a
  ``conveyor.RemoteError`` that is never retried).
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "EXITED",
    "NOT_PICKLABLE",
    "NOT_REBUILDABLE",
    "OK",
    "RAISED",
    "Failure",
    "Reply",
    "ready",
    "run_batch",
    "run_jobs",
]

PROTOCOL = pickle.HIGHEST_PROTOCOL

OK = 0
RAISED = 1
NOT_PICKLABLE = 2
NOT_REBUILDABLE = 3
EXITED = 4

Reply = tuple[int, Any, str]
"""``(kind, payload, text)``: see the module docstring."""


def ready(fn_blob: bytes = b"") -> None:
    """The job that readies a fresh worker: it returns once the worker is up and has loaded
    the function (imported its module), so that ``in_process`` with a ``timeout`` starts
    the clock of the real job only then. A function that cannot be loaded is left for the
    real job to report."""
    if fn_blob:
        try:
            pickle.loads(fn_blob)
        except BaseException:
            pass  # the job itself reports it


def run_jobs(
    fn_name: str, fn_blob: bytes, arg_blobs: Sequence[bytes], call_number: int = 0
) -> list[Reply]:
    """Run ``f(*args)`` for each pickled argument tuple; one reply per call, never raising
    for a problem of one call. ``call_number`` only makes each submission distinct (an
    executor that deduplicates identical calls would otherwise reuse an earlier result)."""
    fn, failure = _load_function(fn_name, fn_blob)
    if fn is None:
        assert failure is not None
        return [failure for _ in arg_blobs]
    replies: list[Reply] = []
    for arg_blob in arg_blobs:
        try:
            args = pickle.loads(arg_blob)
        except Exception as exc:
            replies.append(_args_not_loadable(fn_name, exc))
            continue
        try:
            value = fn(*args)
        except Exception as exc:
            replies.append(_error_reply(exc))
            continue
        except BaseException as exc:
            replies.append(_exited(fn_name, exc))
            continue
        try:
            replies.append((OK, pickle.dumps(value, PROTOCOL), ""))
        except Exception as exc:
            replies.append(_result_not_picklable(fn_name, value, exc))
    return replies


class Failure:
    """In the list :func:`run_batch` returns: a call that failed, with its error reply (which
    the caller loads and raises). Any other entry is the call's return value."""

    __slots__ = ("reply",)

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def __reduce__(self) -> tuple[type[Failure], tuple[Reply]]:
        return (Failure, (self.reply,))


def run_batch(
    fn_name: str, fn_blob: bytes, arg_blobs: Sequence[bytes], call_number: int = 0
) -> list[Any]:
    """Like :func:`run_jobs`, but a call that succeeds is answered by its value itself, not
    by a pickle of it: the backend then pickles (and the parent unpickles) the whole list in
    one go instead of once per call. Each value is checked here to pickle, so one that
    cannot is replaced by its own failure and fails only its call."""
    fn, failure = _load_function(fn_name, fn_blob)
    if fn is None:
        assert failure is not None
        return [Failure(failure) for _ in arg_blobs]
    replies: list[Any] = []
    for arg_blob in arg_blobs:
        try:
            args = pickle.loads(arg_blob)
        except Exception as exc:
            replies.append(Failure(_args_not_loadable(fn_name, exc)))
            continue
        try:
            replies.append(fn(*args))
        except Exception as exc:
            replies.append(Failure(_error_reply(exc)))
        except BaseException as exc:
            replies.append(Failure(_exited(fn_name, exc)))
    try:
        pickle.dumps(replies, PROTOCOL)
    except Exception:  # find the culprits; the others go back as they are
        for i, reply in enumerate(replies):
            if not isinstance(reply, Failure):
                try:
                    pickle.dumps(reply, PROTOCOL)
                except Exception as exc:
                    replies[i] = Failure(_result_not_picklable(fn_name, reply, exc))
    return replies


def _load_function(
    fn_name: str, fn_blob: bytes
) -> tuple[Callable[..., Any], None] | tuple[None, Reply]:
    """The function, or None and the error reply that answers each call."""
    try:
        return pickle.loads(fn_blob), None
    except Exception as exc:
        message = (
            f"the worker process cannot load the function {fn_name}"
            f" ({type(exc).__name__}: {exc}); is its module importable there?"
        )
        return None, (NOT_PICKLABLE, message, _format(exc))


def _args_not_loadable(fn_name: str, exc: Exception) -> Reply:
    message = (
        f"the worker process cannot load the arguments of {fn_name}"
        f" ({type(exc).__name__}: {exc})"
    )
    return (NOT_PICKLABLE, message, _format(exc))


def _result_not_picklable(fn_name: str, value: object, exc: Exception) -> Reply:
    message = (
        f"cannot send the result of {fn_name} back from the worker process: the"
        f" {type(value).__name__} it returned cannot be pickled"
        f" ({type(exc).__name__}: {exc})"
    )
    return (NOT_PICKLABLE, message, _format(exc))


def _exited(fn_name: str, error: BaseException) -> Reply:
    message = (
        f"{fn_name} raised {error!r} in the worker process; code running in a worker"
        " process cannot end the caller's program, so this call fails instead (not retried)"
    )
    return (EXITED, message, _format(error))


def _error_reply(error: Exception) -> Reply:
    text = _format(error)
    try:
        blob = pickle.dumps(error, PROTOCOL)
        pickle.loads(blob)  # some exceptions pickle but cannot be rebuilt; find out here
    except Exception as exc:
        message = (
            f"{type(error).__module__}.{type(error).__qualname__}: {error}"
            f" (the original exception could not be pickled: {type(exc).__name__}: {exc})"
        )
        return (NOT_REBUILDABLE, message, text)
    return (RAISED, blob, text)


def _format(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))
