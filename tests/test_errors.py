"""The exception tree (``conveyor._errors``) and the one shape of every refusal.

- Every exception conveyor defines is a ``ConveyorError``, lives in ``conveyor._errors`` and
  is exported; the caller's bad input is a ValueError/TypeError, a failure of the world is
  not (an OSError, a RuntimeError, a trio.TooSlowError).
- ``JournalError`` is the common base of ``JournalInvalid`` (ValueError) and
  ``JournalIOError`` (OSError), shown with real journals: another key function, a journal
  another run holds, a write that fails.
- Refusals whose suggested fix names several arguments, or depends on another argument,
  are tried here (the property in test_surface.py tries the one-argument fixes).
"""

from __future__ import annotations

import inspect
import io
import os
import pickle
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_parallel  # type: ignore[import-untyped]

import conveyor
from conveyor import _errors
from tests._fixes import SHAPE, parts, suggested_fix

# ------------------------------------------------------------------------------- the tree

EXCEPTIONS = [
    value for value in vars(conveyor).values()
    if isinstance(value, type) and issubclass(value, BaseException)
]

BAD_INPUT = {conveyor.JournalInvalid, conveyor.NotPicklableError}
WORLD = {conveyor.JournalIOError, conveyor.WorkerDied, conveyor.RemoteError,
         conveyor.AttemptTimeout}


def test_every_exception_is_in_the_tree_exported_and_documented() -> None:
    assert set(_errors.__all__) == {e.__name__ for e in EXCEPTIONS}
    assert set(_errors.__all__) <= set(conveyor.__all__)
    for error in EXCEPTIONS:
        assert error.__module__ == "conveyor._errors", error
        assert issubclass(error, conveyor.ConveyorError), error
        assert error.__doc__ and len(error.__doc__) > 40, error
        # the tree in the module's docstring names it
        assert re.search(rf"\b{error.__name__}\b", _errors.__doc__ or ""), error


def test_the_callers_input_apart_from_the_world() -> None:
    for error in BAD_INPUT:
        assert issubclass(error, ValueError | TypeError), error
        assert not issubclass(error, OSError | RuntimeError), error
    for error in WORLD:
        assert not issubclass(error, ValueError | TypeError), error
        assert issubclass(error, OSError | RuntimeError | trio.TooSlowError), error
    # JournalError is neither: the base of one of each.
    assert not issubclass(conveyor.JournalError, ValueError | OSError)
    assert issubclass(conveyor.JournalInvalid, conveyor.JournalError)
    assert issubclass(conveyor.JournalIOError, conveyor.JournalError)


def test_each_exception_keeps_its_builtin_bases() -> None:
    assert issubclass(conveyor.JournalInvalid, ValueError)  # as JournalError was
    assert issubclass(conveyor.JournalIOError, OSError)  # as a failed write was
    assert issubclass(conveyor.NotPicklableError, pickle.PicklingError)
    assert issubclass(conveyor.NotPicklableError, TypeError)
    assert issubclass(conveyor.WorkerDied, trio_parallel.BrokenWorkerError)
    assert issubclass(conveyor.RemoteError, RuntimeError)
    assert issubclass(conveyor.AttemptTimeout, trio.TooSlowError)
    assert issubclass(conveyor.ItemUnfinished, RuntimeError)
    assert conveyor.ItemsFailed.__bases__ == (conveyor.ConveyorError,)
    assert conveyor.RetryAfter.__bases__ == (conveyor.ConveyorError,)


def test_the_old_import_paths_give_the_same_classes() -> None:
    from conveyor import _journal, _offload, _pool, _records, _retry

    assert _records.ItemsFailed is conveyor.ItemsFailed
    assert _records.ItemUnfinished is conveyor.ItemUnfinished
    assert _offload.WorkerDied is conveyor.WorkerDied
    assert _offload.NotPicklableError is conveyor.NotPicklableError
    assert _offload.RemoteError is conveyor.RemoteError
    assert _pool.AttemptTimeout is conveyor.AttemptTimeout
    assert _journal.JournalError is conveyor.JournalError
    assert _retry.RetryAfter is conveyor.RetryAfter


def raise_retry_after(item: int) -> int:
    raise conveyor.RetryAfter(0.5, f"busy {item}")


async def test_a_retry_after_from_a_worker_process_stays_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """It used to come back as a RemoteError: RetryAfter(message) could not be unpickled."""
    report = await conveyor.run(conveyor.in_process(raise_retry_after), [7],
                                retry=conveyor.Retry(attempts=1))
    (failed,) = report.failed
    assert type(failed.error) is conveyor.RetryAfter
    assert (failed.error.retry_after, str(failed.error)) == (0.5, "busy 7")


def test_attributes_are_kept_and_survive_pickling() -> None:
    died = pickle.loads(pickle.dumps(conveyor.WorkerDied("died", exitcode=-9)))
    assert (type(died), str(died), died.exitcode) == (conveyor.WorkerDied, "died", -9)
    hint = pickle.loads(pickle.dumps(conveyor.RetryAfter(2.5, "slow down")))
    assert (hint.retry_after, str(hint)) == (2.5, "slow down")
    assert conveyor.RetryAfter(3).retry_after == 3.0 and str(conveyor.RetryAfter(3)) == (
        "retry after 3 s")
    assert conveyor.NotPicklableError("x").retryable is False
    io_error = pickle.loads(pickle.dumps(conveyor.JournalIOError("journal 'j': busy")))
    assert (type(io_error), str(io_error), io_error.errno) == (
        conveyor.JournalIOError, "journal 'j': busy", None)
    report = conveyor.Report([], [], [conveyor.Unfinished("z", 1, None)], stats=None)  # type: ignore[arg-type]
    with pytest.raises(conveyor.ItemsFailed, match=r"^1 unfinished: 'z'$") as caught:
        report.raise_for_failures()
    assert caught.value.unfinished == report.unfinished and caught.value.failed == []
    with pytest.raises(conveyor.ItemUnfinished, match="'z' did not finish"):
        report.unfinished[0].unwrap()


# ----------------------------------------------------------------- the journal, for real


def key_a(item: int) -> str:
    return f"a{item}"


def key_b(item: int) -> str:
    return f"b{item}"


async def square(item: int) -> int:
    await trio.lowlevel.checkpoint()
    return item * item


async def test_a_journal_of_another_key_function_is_invalid_input(tmp_path: Path) -> None:
    journal = tmp_path / "job.journal"
    assert (await conveyor.run(square, [1], journal=journal, key=key_a)).ok
    with pytest.raises(conveyor.JournalInvalid, match="written with another key function"):
        await conveyor.run(square, [1], journal=journal, key=key_b)
    for handler in (ValueError, conveyor.JournalError, conveyor.ConveyorError):
        with pytest.raises(handler):  # old and new handlers catch it
            await conveyor.run(square, [1], journal=journal, key=key_b)


async def test_a_journal_another_run_holds_is_the_world_not_the_input(tmp_path: Path) -> None:
    journal = tmp_path / "job.journal"
    async with conveyor.open_pool(square, journal=journal) as pool:  # holds the journal
        await pool.submit(1)
        with pytest.raises(conveyor.JournalIOError, match="is in use by another run") as caught:
            await conveyor.run(square, [1], journal=journal)
    assert isinstance(caught.value, OSError) and isinstance(caught.value, conveyor.JournalError)
    assert not isinstance(caught.value, ValueError)  # not the caller's input
    assert (await conveyor.run(square, [1], journal=journal)).ok  # free again


async def test_a_failing_write_during_a_run_is_a_journal_io_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's own journal fills up (SQLite's page limit stands in for a full disk)."""
    journal = tmp_path / "job.journal"
    assert (await conveyor.run(square, [0], journal=journal)).ok
    with sqlite3.connect(journal) as conn:  # a journal that cannot grow: as a full disk
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    from conveyor import _journal

    real_connect = _journal._connect

    def small_connect(path: str, fingerprint: str) -> sqlite3.Connection:
        conn = real_connect(path, fingerprint)
        conn.execute(f"PRAGMA max_page_count = {pages + 1}")
        return conn

    async def big(item: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return bytes(10_000)

    monkeypatch.setattr(_journal, "_connect", small_connect)
    with pytest.raises(conveyor.JournalIOError, match="cannot write to it") as caught:
        await conveyor.run(big, range(1, 200), journal=journal)
    assert isinstance(caught.value, OSError) and isinstance(caught.value, conveyor.JournalError)
    assert isinstance(caught.value.__cause__, sqlite3.Error)


# ------------------------------------------- refusals whose fix is more than one argument


async def _call(make: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    result = make(**kwargs)
    if inspect.iscoroutine(result):
        return await result
    if hasattr(result, "__aenter__"):  # in_process_batched: its checks run on entering
        async with result:
            pass
    return result


async def _run(**kwargs: Any) -> conveyor.Report:
    return await conveyor.run(square, [1, 2], **kwargs)


def _map(**kwargs: Any) -> conveyor.MapStream[Any]:
    return conveyor.map(square, [1, 2], **kwargs)


def _progress(**kwargs: Any) -> conveyor.Progress:
    return conveyor.Progress(**kwargs)


def _adaptive(**kwargs: Any) -> conveyor.Adaptive:
    return conveyor.Adaptive(**kwargs)


def _per_key(**kwargs: Any) -> conveyor.PerKey[Any]:
    return conveyor.PerKey(lambda item: item % 2, **kwargs)


def _in_process(**kwargs: Any) -> Any:
    return conveyor.in_process(abs, **kwargs)


class Overloaded(Exception):
    pass


MORE = [
    # (what, the call's arguments, the refusal, the fix's arguments)
    (_run, {"key": key_a}, ValueError, {"journal": "job.journal"}),
    (_map, {"window": 4}, ValueError, {"ordered": True, "window": 4}),
    (_progress, {"stream": 5}, TypeError, {"stream": None, "total": 5}),
    (_adaptive, {}, ValueError, {"overload_on": TimeoutError}),
    (_adaptive, {"overload_on": Overloaded, "min": 5, "max": 2}, ValueError, {"min": 2}),
    (_adaptive, {"overload_on": Overloaded, "min": 2, "max": 4, "initial": 8}, ValueError,
     {"initial": 4}),
    (_adaptive, {"overload_on": Overloaded, "min": 10**30}, ValueError, {"min": 1}),
    (_adaptive, {"overload_on": Overloaded, "decrease": "5"}, TypeError, {"decrease": 0.5}),
    (_adaptive, {"overload_on": Overloaded, "decrease": "0.3"}, TypeError, {"decrease": 0.3}),
    (_per_key, {}, ValueError, {"limit": 2}),
    (_per_key, {"key": None}, TypeError, None),  # the key is the wrapper's: not a kwarg here
    (conveyor.Backoff, {"initial": 40, "max": 1}, ValueError, {"max": 40}),
    (_run, {"journal": "."}, ValueError, {"journal": os.path.join(".", "job.journal")}),
]


@pytest.mark.parametrize(("make", "kwargs", "kind", "fix"), MORE)
async def test_refusals_in_the_one_shape_and_their_fix_works(
    make: Callable[..., Any], kwargs: dict[str, Any], kind: type[Exception],
    fix: dict[str, Any] | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    if fix is None:  # only the shape: PerKey(key=...) twice is a TypeError of Python's own
        with pytest.raises(TypeError):
            await _call(make, kwargs)
        return
    with pytest.raises(kind) as caught:
        await _call(make, kwargs)
    message = str(caught.value)
    assert SHAPE.match(message), message
    assert suggested_fix(message) == fix, message
    await _call(make, {**kwargs, **fix})  # accepted


async def test_in_process_limiter_with_an_executor_and_its_fix() -> None:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        kwargs = {"executor": executor, "limiter": trio.CapacityLimiter(1)}
        with pytest.raises(ValueError) as caught:
            _in_process(**kwargs)
        fix = suggested_fix(str(caught.value))
        assert fix == {"limiter": None}
        assert await _in_process(**{**kwargs, **fix})(-3) == 3


async def test_a_huge_int_limiter_suggests_a_limiter_that_works() -> None:
    """Found by the surface sweep: limiter=10**400 suggested trio.CapacityLimiter(10**400)."""
    with pytest.raises(TypeError) as caught:
        conveyor.in_thread(abs, limiter=10**400)  # type: ignore[arg-type]
    fix = suggested_fix(str(caught.value))
    assert fix == {"limiter": fix["limiter"]} and fix["limiter"].total_tokens == 4
    assert await conveyor.in_thread(abs, **fix)(-2) == 2
    # A huge limiter itself is valid: in_process_batched sizes its batches from it.
    async with conveyor.in_process_batched(
        abs, limiter=trio.CapacityLimiter(10**400)
    ) as batched:
        del batched


async def test_wait_stats_refuses_a_non_callable_and_its_fix_works() -> None:
    async with conveyor.open_pool(square) as pool:
        await pool.submit(1)
        with pytest.raises(TypeError) as caught:
            await pool.wait_stats(5)  # type: ignore[arg-type]
        assert parts(str(caught.value))["owner"] == "wait_stats"
        fix = suggested_fix(str(caught.value))
        assert fix is not None and set(fix) == {"predicate"}
        await pool.wait_stats(**fix)  # accepted: returns once one item is in


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_a_value_is_shown_short_and_a_callable_by_name() -> None:
    with pytest.raises(TypeError) as caught:
        conveyor.Retry(backoff=print)  # type: ignore[arg-type]
    assert str(caught.value).startswith("Retry: backoff=print is not valid: ")
    with pytest.raises(ValueError) as caught2:
        conveyor.Retry(attempts=-(10**100))
    value = parts(str(caught2.value))["value"]
    assert len(value) == 60 and value.endswith("...")
    with pytest.raises(TypeError) as caught3:
        conveyor.Progress(io.BytesIO())  # type: ignore[arg-type]
    assert parts(str(caught3.value))["param"] == "stream"
    with pytest.raises(TypeError) as caught4:
        conveyor.Retry(attempts=Unprintable())  # type: ignore[arg-type]
    assert str(caught4.value).startswith("Retry: attempts=<Unprintable object> is not valid")
