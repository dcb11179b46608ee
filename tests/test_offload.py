"""Tests for conveyor._offload: in_thread, in_process, in_process_batched.

Layers, as trio-parallel names them:
- contract: argument checks, pinned messages, values and errors crossing the boundary;
- collaboration: the executor bridge against a recording executor (a fake, not a mock);
- end to end: real worker processes that crash, get killed, or are cancelled, through
  ``conveyor.run``; those use the wall clock and are marked ``slow``.

Functions run in worker processes live in tests/_procfuncs.py: a worker imports them by name.
"""

from __future__ import annotations

import ast
import concurrent.futures
import concurrent.futures.process
import copyreg
import functools
import io
import math
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tblib.pickling_support
import trio
import trio.testing
import trio_parallel
from hypothesis import given, settings
from hypothesis import strategies as st

import conveyor
from tests import _procfuncs as pf

# ---------------------------------------------------------------------------------------------
# helpers


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux /proc, else os.kill)."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc").is_dir():
        try:
            text = stat.read_text()
        except OSError:
            return False
        return text.rsplit(")", 1)[1].split()[0] != "Z"
    try:  # pragma: no cover - non-Linux
        os.kill(pid, 0)
    except OSError:  # pragma: no cover
        return False
    return True  # pragma: no cover


def read_pids(directory: Path) -> list[str]:
    return [f.read_text() for f in sorted(directory.glob("*.pid"))]


async def wait_for_files(directory: Path, count: int, limit: float = 20.0) -> list[int]:
    """Wait (real time) until ``count`` pid files exist; return the pids in them."""
    with trio.fail_after(limit):
        while True:
            texts = read_pids(directory)  # a few tiny local files: not worth a thread
            if len(texts) >= count and all(texts):
                return [int(t) for t in texts]
            await trio.sleep(0.02)


async def hold_clock_until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    """Keep this trio run busy until ``condition()`` holds (checked against the wall clock's
    ``limit``): an autojump clock jumps only when every task is blocked, so virtual time
    stands still while a real thread is starting."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await trio.lowlevel.checkpoint()


class RecordingExecutor(concurrent.futures.Executor):
    """Wraps a real executor and keeps every future it hands out."""

    def __init__(self, inner: concurrent.futures.Executor) -> None:
        self.inner = inner
        self.futures: list[concurrent.futures.Future[Any]] = []

    def submit(  # type: ignore[override]
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        future = self.inner.submit(fn, *args, **kwargs)
        self.futures.append(future)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.inner.shutdown(wait=wait, cancel_futures=cancel_futures)


@pytest.fixture(scope="module")
def process_pool() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    # spawn, not fork: forking a process that runs trio (and its threads) is unsafe.
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=2, mp_context=multiprocessing.get_context("spawn")
    )
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


def async_square(x: int) -> int:  # used as a sync function in the checks below
    return x * x


async def really_async(x: int) -> int:
    return x


# ---------------------------------------------------------------------------------------------
# contract: bad input refused at the call


@pytest.mark.parametrize("wrap", [conveyor.in_thread, conveyor.in_process])
def test_async_function_refused(wrap: Callable[..., Any]) -> None:
    api = wrap.__name__
    with pytest.raises(TypeError) as info:
        wrap(really_async)
    where = "a thread" if api == "in_thread" else "a worker process"
    assert str(info.value) == (
        f"{api}: f=really_async is not valid: expected a sync function: "
        f"tests.test_offload.really_async is async, and {api} runs sync code in {where}; "
        f"e.g. give tests.test_offload.really_async to the pool (or await it) directly, "
        f"without {api}"
    )
    with pytest.raises(TypeError, match=rf"^{api}: f=3 is not valid: expected a sync callable; "
                                        rf"e\.g\. f=math\.sqrt$"):
        wrap(3)
    assert wrap(math.sqrt)  # the suggested fix


async def test_batched_refusal_names_f() -> None:
    with pytest.raises(TypeError, match=r"^in_process_batched: f=3 is not valid: expected a "
                                        r"sync callable"):
        async with conveyor.in_process_batched(3):  # type: ignore[arg-type]
            pass  # pragma: no cover
    with pytest.raises(TypeError, match=r"^in_process_batched: f=really_async is not valid: "
                                        r"expected a sync function"):
        async with conveyor.in_process_batched(really_async):
            pass  # pragma: no cover


async def test_advice_for_an_async_function_works() -> None:
    # "give it to the pool directly": the refused function works as the pool's fn.
    report = await conveyor.run(really_async, range(3))
    assert sorted(r.value for r in report.succeeded) == [0, 1, 2]


def test_knobs_are_keyword_only() -> None:
    with pytest.raises(TypeError, match="positional"):
        conveyor.in_thread(pf.square, trio.CapacityLimiter(1))  # type: ignore[misc]
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        with pytest.raises(TypeError, match="positional"):
            conveyor.in_process(pf.square, ex)  # type: ignore[misc]
        with pytest.raises(TypeError, match="positional"):
            conveyor.in_process(pf.square, None, False)  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"^in_process: kill_on_cancel='no' is not valid: "
                                        r"expected True or False; e\.g\. kill_on_cancel=True$"):
        conveyor.in_process(pf.square, kill_on_cancel="no")  # type: ignore[arg-type]
    conveyor.in_process(pf.square, kill_on_cancel=True)  # the suggested fix


def test_in_process_argument_checks() -> None:
    with pytest.raises(TypeError, match=r"^in_process: executor=<object object at .*> is not "
                                        r"valid: expected a concurrent\.futures\.Executor or "
                                        r"None; e\.g\. executor=None \(trio-parallel's"):
        conveyor.in_process(pf.square, executor=object())  # type: ignore[arg-type]
    conveyor.in_process(pf.square, executor=None)  # the suggested fix
    with pytest.raises(TypeError, match=r"^in_process: limiter=2 is not valid: expected a "
                                        r"trio\.CapacityLimiter or None; "
                                        r"e\.g\. limiter=trio\.CapacityLimiter\(2\)$"):
        conveyor.in_process(pf.square, limiter=2)  # type: ignore[arg-type]
    conveyor.in_process(pf.square, limiter=trio.CapacityLimiter(2))  # the suggested fix
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        with pytest.raises(ValueError, match=r"^in_process: limiter=<trio\.CapacityLimiter .*> is "
                                             r"not valid: expected None with an executor: a "
                                             r"limiter applies to the default backend only; "
                                             r".*; e\.g\. limiter=None$"):
            conveyor.in_process(pf.square, executor=ex, limiter=trio.CapacityLimiter(1))
        conveyor.in_process(pf.square, executor=ex, limiter=None)  # the suggested fix
    with pytest.raises(TypeError, match=r"^in_thread: limiter=4 is not valid: expected a "
                                        r"trio\.CapacityLimiter or None; "
                                        r"e\.g\. limiter=trio\.CapacityLimiter\(4\)$"):
        conveyor.in_thread(pf.square, limiter=4)  # type: ignore[arg-type]
    conveyor.in_thread(pf.square, limiter=trio.CapacityLimiter(4))  # the suggested fix


async def test_batched_argument_checks() -> None:
    with pytest.raises(ValueError, match=r"^in_process_batched: batch_size=0 is not valid: "
                                         r"expected an int >= 1; e\.g\. batch_size=1$"):
        async with conveyor.in_process_batched(pf.square, batch_size=0):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match=r"^in_process_batched: max_batches=0 is not valid: "
                                         r"expected an int >= 1 or None; e\.g\. max_batches=1$"):
        async with conveyor.in_process_batched(pf.square, max_batches=0):
            pass  # pragma: no cover
    with pytest.raises(TypeError, match=r"^in_process_batched: batch_size=2\.5 is not valid: "
                                        r"expected an int >= 1; e\.g\. batch_size=2$"):
        async with conveyor.in_process_batched(pf.square, batch_size=2.5):  # type: ignore[arg-type]
            pass  # pragma: no cover
    async with conveyor.in_process_batched(pf.square, batch_size=1, max_batches=1):
        pass  # the suggested fixes
    async with conveyor.in_process_batched(pf.square, batch_size=2):
        pass


def test_wrappers_are_coroutine_functions() -> None:
    import inspect

    for wrapped in (conveyor.in_thread(pf.square), conveyor.in_process(pf.square)):
        assert inspect.iscoroutinefunction(wrapped)
        assert inspect.iscoroutinefunction(inspect.unwrap(wrapped))
    assert conveyor.in_process(pf.square).__name__ == "in_process(square)"


# ---------------------------------------------------------------------------------------------
# in_thread


async def test_in_thread_runs_in_another_thread_and_returns() -> None:
    ident = await conveyor.in_thread(threading.get_ident)()
    assert ident != threading.get_ident()
    assert await conveyor.in_thread(pf.add)(2, 3) == 5


async def test_in_thread_error_keeps_type_and_frames() -> None:
    with pytest.raises(pf.ItemError, match="item 7 is bad") as info:
        await conveyor.in_thread(functools.partial(pf.fail_on, 7))(7)
    text = "".join(traceback.format_exception(info.value))
    assert "_inner_failure" in text and "fail_on" in text


async def test_in_thread_limiter_caps_threads() -> None:
    running = 0
    peak = 0
    lock = threading.Lock()

    def job(_: int) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01)
        with lock:
            running -= 1

    fn = conveyor.in_thread(job, limiter=trio.CapacityLimiter(2))
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(fn, i)
    assert peak == 2


async def test_in_thread_cancel_waits_for_the_thread() -> None:
    release = threading.Event()
    finished = threading.Event()

    def blocking() -> str:
        release.wait(10)
        finished.set()
        return "done"

    async def release_later() -> None:
        await trio.sleep(0.05)
        release.set()

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            scope.cancel()  # already cancelled: the thread must not even start
            await conveyor.in_thread(blocking)()
        assert not finished.is_set()

        returned = []
        with trio.CancelScope() as scope:
            nursery.start_soon(release_later)
            scope.deadline = trio.current_time() + 0.01
            returned.append(await conveyor.in_thread(blocking)())
            await trio.lowlevel.checkpoint()  # the cancel lands here
            returned.append("not reached")
        # The cancel waited for the thread, whose result was kept: no thread left behind.
        assert scope.cancelled_caught
        assert finished.is_set()
        assert returned == ["done"]


async def test_in_thread_timeout_is_enforced_and_retried(autojump_clock: Any) -> None:
    release = threading.Event()
    ended: list[int] = []

    began: list[int] = []

    def blocking(x: int) -> int:  # blocks (for real) until released
        began.append(x)
        release.wait(10)
        ended.append(x)
        return x

    fn = conveyor.in_thread(blocking)
    elapsed: list[float] = []

    async def timed(x: int) -> int:  # the pool's fn: measures each attempt on trio's clock
        attempt = len(elapsed) + 1
        nursery.start_soon(hold_clock_until, lambda: len(began) >= attempt)
        start = trio.current_time()
        try:
            return await fn(x)
        finally:
            elapsed.append(trio.current_time() - start)
            if len(elapsed) == 2:
                two_attempts.set()

    two_attempts = trio.Event()

    async def release_after_two_attempts() -> None:
        await two_attempts.wait()
        assert ended == []  # both attempts ended at their deadline, their threads still run
        release.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_after_two_attempts)
        report = await conveyor.run(
            timed, [7], workers=1, timeout=0.2, retry=conveyor.Retry(attempts=2, backoff=None)
        )
        # The pool's end waited for both abandoned threads.
        assert ended == [7, 7]
    (failed,) = report.failed
    assert isinstance(failed.error, conveyor.AttemptTimeout)
    assert failed.attempts == 2
    assert elapsed == [pytest.approx(0.2), pytest.approx(0.2)]  # exactly at the deadline


async def test_in_thread_abandoned_thread_keeps_its_limiter_slot(autojump_clock: Any) -> None:
    release = threading.Event()
    calls: list[int] = []
    limiter = trio.CapacityLimiter(1)

    def blocking(x: int) -> int:
        calls.append(x)
        release.wait(10)
        return x

    seen: list[float] = []

    async def watch() -> None:
        # After the first attempt timed out (0.2) the thread still holds the only slot, so
        # the retry waits for it, and times out without starting a thread.
        await trio.sleep(0.3)
        seen.append(limiter.borrowed_tokens)
        await trio.sleep(0.2)  # past the second attempt's deadline (0.4)
        seen.append(limiter.borrowed_tokens)
        release.set()

    fn = conveyor.in_thread(blocking, limiter=limiter)

    async def attempt(x: int) -> int:
        if not calls:  # the first attempt: let its thread really start before time runs
            nursery.start_soon(hold_clock_until, lambda: bool(calls))
        return await fn(x)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        report = await conveyor.run(
            attempt,
            [1],
            workers=1,
            timeout=0.2,
            retry=conveyor.Retry(attempts=2, backoff=None),
        )
    assert seen == [1, 1]
    assert calls == [1]  # one thread only
    (failed,) = report.failed
    assert isinstance(failed.error, conveyor.AttemptTimeout) and failed.attempts == 2
    assert limiter.borrowed_tokens == 0  # given back when the thread really returned


@pytest.mark.parametrize("entry", ["run", "open_pool"])
async def test_in_thread_pool_block_waits_for_its_threads_after_an_outside_cancel(
    entry: str,
) -> None:
    started = threading.Event()
    release = threading.Event()
    ended = threading.Event()

    def blocking(x: int) -> int:
        started.set()
        release.wait(10)
        ended.set()
        return x

    fn = conveyor.in_thread(blocking)
    reports: list[conveyor.Report] = []

    async def use_pool() -> None:
        if entry == "run":
            reports.append(await conveyor.run(fn, [1], workers=1))
            return
        async with conveyor.open_pool(fn, workers=1) as pool:
            await pool.submit(1)
            await trio.sleep_forever()

    cancelled_at: list[float] = []

    async def release_later() -> None:
        await trio.to_thread.run_sync(started.wait, 10)
        scope.cancel()
        cancelled_at.append(trio.current_time())
        await trio.sleep(0.2)  # the pool's block is waiting for the thread by now
        assert not ended.is_set()
        release.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_later)
        with trio.CancelScope() as scope:
            await use_pool()
        # The block returned only once the thread had ended.
        assert ended.is_set()
        assert trio.current_time() - cancelled_at[0] >= 0.2
    assert scope.cancelled_caught


async def test_in_thread_cancelled_before_its_thread_started_never_calls_f() -> None:
    calls: list[int] = []
    limiter = trio.CapacityLimiter(1)
    release = threading.Event()
    started = threading.Event()

    def job(x: int) -> int:
        calls.append(x)
        started.set()
        if x == 1:
            release.wait(10)
        return x

    fn = conveyor.in_thread(job, limiter=limiter)
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            async with conveyor.open_pool(fn, workers=2) as pool:
                await pool.submit(1)
                await trio.to_thread.run_sync(started.wait, 10)
                await pool.submit(2)  # waits for the limiter's only slot
                await trio.testing.wait_all_tasks_blocked()
                assert limiter.statistics().tasks_waiting == 1
                scope.cancel()
                nursery.start_soon(trio.to_thread.run_sync, release.set)
    assert calls == [1]
    assert [u.item for u in pool.report().unfinished] == [1, 2]


async def lambda_target(n: int) -> int:
    return n * 10


async def test_in_thread_of_a_function_returning_a_coroutine_fails_with_advice() -> None:
    fn = conveyor.in_thread(lambda n: lambda_target(n))
    report = await conveyor.run(fn, range(3), retry=conveyor.Retry(attempts=3, backoff=None))
    assert not report.succeeded and len(report.failed) == 3
    for failed in report.failed:
        assert isinstance(failed.error, TypeError)
        assert failed.attempts == 1  # never retried: it would fail the same way
        message = str(failed.error)
        assert message.startswith("in_thread(f): f (tests.test_offload.test_in_thread_of_a")
        assert "<lambda>) returned a coroutine, so it is async code" in message
        assert "functools.partial(async_fn, ...) to bind its arguments" in message
    # The advice works: the async function itself, bound with functools.partial.
    report = await conveyor.run(functools.partial(lambda_target), range(3))
    assert sorted(r.value for r in report.succeeded) == [0, 10, 20]
    # Outside a pool too (a coroutine is closed: no "never awaited" warning).
    with pytest.raises(TypeError, match="returned a coroutine"):
        await fn(1)


# ---------------------------------------------------------------------------------------------
# in_process, default backend (trio-parallel): values and errors


async def test_in_process_returns_from_another_process() -> None:
    assert await conveyor.in_process(pf.getpid)() != os.getpid()
    assert await conveyor.in_process(pf.add)(2, 3) == 5
    assert await conveyor.in_process(functools.partial(pf.fail_on, 99))(4) == 8


async def test_in_process_error_keeps_type_and_worker_frames() -> None:
    with pytest.raises(pf.ItemError, match="item 3 is bad") as info:
        await conveyor.in_process(functools.partial(pf.fail_on, 3))(3)
    text = "".join(traceback.format_exception(info.value))
    # the frames inside the worker process, then the caller's
    assert 'in _inner_failure\n    raise ItemError(f"item {x} is bad")' in text
    assert "in fail_on" in text
    assert "test_in_process_error_keeps_type_and_worker_frames" in text


@pytest.mark.parametrize(
    "fn",
    [lambda x: x, functools.partial(lambda x, y: x, y=1)],
    ids=["lambda", "partial-of-lambda"],
)
async def test_lambda_is_refused_with_the_fix(fn: Callable[[int], int]) -> None:
    wrapped = conveyor.in_process(fn)
    with trio.fail_after(1), pytest.raises(conveyor.NotPicklableError) as info:
        await wrapped(1)
    message = str(info.value)
    assert "cannot send the function" in message and "<lambda>" in message
    assert "define it at module level" in message and "functools.partial(" in message


async def test_local_function_is_refused_with_the_fix() -> None:
    def local(x: int) -> int:
        return x

    with trio.fail_after(1), pytest.raises(conveyor.NotPicklableError, match="module level"):
        await conveyor.in_process(local)(1)


async def test_unpicklable_argument_is_named() -> None:
    with trio.fail_after(1), pytest.raises(conveyor.NotPicklableError) as info:
        await conveyor.in_process(pf.add)(1, threading.Lock())
    assert "cannot send argument 1 (lock <unlocked _thread.lock" in str(info.value)
    # Both errors pickle raises for this are caught by the usual handlers.
    assert isinstance(info.value, TypeError)


async def test_unpicklable_result_is_named_and_the_worker_survives() -> None:
    with trio.fail_after(10), pytest.raises(conveyor.NotPicklableError) as info:
        await conveyor.in_process(pf.return_lock)(1)
    assert "cannot send the result of tests._procfuncs.return_lock back" in str(info.value)
    assert "the lock it returned cannot be pickled" in str(info.value)
    assert await conveyor.in_process(pf.square)(3) == 9


async def test_exception_that_cannot_be_rebuilt_becomes_remote_error() -> None:
    with pytest.raises(conveyor.RemoteError) as info:
        await conveyor.in_process(pf.raise_unrebuildable)(4)
    assert "tests._procfuncs.Unrebuildable: 4/4" in str(info.value)
    assert "in raise_unrebuildable" in "".join(traceback.format_exception(info.value))


@pytest.mark.slow
@pytest.mark.parametrize(("how", "exitcode"), [("exit", 3), ("kill", -9)])
async def test_dead_worker_raises_worker_died_then_a_fresh_worker_runs(
    tmp_path: Path, how: str, exitcode: int
) -> None:
    fn = conveyor.in_process(functools.partial(pf.die_once, str(tmp_path), how))
    with pytest.raises(conveyor.WorkerDied, match=f"died \\(exit code {exitcode}\\)") as info:
        await fn(5)
    assert info.value.exitcode == exitcode
    assert isinstance(info.value, trio_parallel.BrokenWorkerError)
    # It pickles (e.g. a Report saved to disk), also the way tblib does, which Dask installs
    # for every exception class and which pickles the exception's chain too.
    copy = pickle.loads(pickle.dumps(info.value))
    assert (str(copy), copy.exitcode) == (str(info.value), exitcode)
    tblib_pickler = pickle.Pickler(io.BytesIO())
    tblib_pickler.dispatch_table = {
        **copyreg.dispatch_table,
        types.TracebackType: tblib.pickling_support.pickle_traceback,
        conveyor.WorkerDied: tblib.pickling_support.pickle_exception,
    }
    tblib_pickler.dump(info.value)
    assert await fn(5) == 5


@pytest.mark.slow
async def test_cancel_kills_the_worker(tmp_path: Path) -> None:
    fn = conveyor.in_process(functools.partial(pf.write_pid_then_sleep, str(tmp_path), 10))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fn, 1)
        (pid,) = await wait_for_files(tmp_path, 1)
        assert pid_running(pid)
        start = time.monotonic()
        nursery.cancel_scope.cancel()
    assert time.monotonic() - start < 1
    assert not pid_running(pid)


@pytest.mark.slow
async def test_no_kill_on_cancel_waits_for_the_job(tmp_path: Path) -> None:
    fn = conveyor.in_process(
        functools.partial(pf.write_pid_then_sleep, str(tmp_path), 0.5), kill_on_cancel=False
    )
    returned: list[int] = []

    async def call() -> None:
        returned.append(await fn(1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        (pid,) = await wait_for_files(tmp_path, 1)
        nursery.cancel_scope.cancel()
    assert returned == [1]  # waited out; the cancel landed at the next checkpoint
    # The job ran to its end (about 0.5 s after it wrote its pid) and its worker lives on,
    # back in trio-parallel's cache for the next job.
    assert (tmp_path / "1.pid").exists()
    assert pid_running(pid)
    assert await conveyor.in_process(pf.getpid)() == pid


# ---------------------------------------------------------------------------------------------
# in_process with an executor (the bridge)


async def test_executor_values_and_worker_frames(
    process_pool: concurrent.futures.ProcessPoolExecutor,
) -> None:
    assert await conveyor.in_process(pf.add, executor=process_pool)(2, 3) == 5
    with pytest.raises(pf.ItemError) as info:
        await conveyor.in_process(functools.partial(pf.fail_on, 3), executor=process_pool)(3)
    text = "".join(traceback.format_exception(info.value))
    assert "in _inner_failure" in text and "in fail_on" in text
    with pytest.raises(conveyor.NotPicklableError, match=r"functools\.partial"):
        await conveyor.in_process(lambda x: x, executor=process_pool)(1)


@pytest.mark.slow
async def test_executor_dead_worker_gives_the_executors_own_error(tmp_path: Path) -> None:
    # Documented: other backends keep their own dead-worker errors (retryable Exceptions);
    # a ProcessPoolExecutor then stays broken, unlike trio-parallel's default backend.
    with concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        fn = conveyor.in_process(
            functools.partial(pf.die_once, str(tmp_path), "exit"), executor=pool
        )
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            await fn(1)
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            await fn(1)


async def test_executor_bridge_parks_no_thread_per_call(
    process_pool: concurrent.futures.ProcessPoolExecutor,
) -> None:
    fn = conveyor.in_process(
        functools.partial(pf.sleep_and_return, 0.05), executor=process_pool
    )
    await fn(0)  # the executor's own threads exist from here on
    baseline = threading.active_count()
    peak = baseline
    results: list[int] = []

    async def one(i: int) -> None:
        results.append(await fn(i))

    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(one, i)
        while len(results) < 30:
            peak = max(peak, threading.active_count())
            await trio.sleep(0.005)
    assert sorted(results) == list(range(30))
    assert peak == baseline  # 30 calls waited, not one more thread


async def test_executor_cancel_drops_queued_jobs_and_abandons_running_ones() -> None:
    started = threading.Event()
    release = threading.Event()
    done: list[int] = []

    def job(x: int) -> int:
        started.set()
        release.wait(10)
        done.append(x)
        return x

    _REGISTRY["job"] = job
    with concurrent.futures.ThreadPoolExecutor(1) as inner:
        executor = RecordingExecutor(inner)
        fn = conveyor.in_process(_call_registered, executor=executor)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fn, "job", 1)
            nursery.start_soon(fn, "job", 2)
            await trio.to_thread.run_sync(started.wait, 10)
            start = time.monotonic()
            nursery.cancel_scope.cancel()
        assert time.monotonic() - start < 0.5  # kill_on_cancel=True: we stopped waiting
        running, queued = sorted(executor.futures, key=lambda f: f.running(), reverse=True)
        assert queued.cancelled()  # it never runs
        assert running.running()  # abandoned, still running
        release.set()
        ((kind, _, _),) = running.result(timeout=10)
        assert kind == 0  # _conveyor_worker.OK  # it ran to completion; its result went nowhere
    assert done == [1] or done == [2]


async def test_executor_cancel_without_kill_waits_for_the_running_job() -> None:
    started = threading.Event()

    def job(x: int) -> int:
        started.set()
        time.sleep(0.2)
        return x

    returned: list[int] = []
    with concurrent.futures.ThreadPoolExecutor(1) as inner:
        executor = RecordingExecutor(inner)
        fn = conveyor.in_process(_call_registered, executor=executor, kill_on_cancel=False)
        _REGISTRY["job"] = job

        async def call() -> None:
            returned.append(await fn("job", 1))
            await trio.lowlevel.checkpoint()  # the cancel lands here
            returned.append(-1)  # pragma: no cover

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await trio.to_thread.run_sync(started.wait, 10)
            nursery.cancel_scope.cancel()
        (running,) = executor.futures
        assert running.done()  # the cancel waited for it
    assert returned == [1]  # and its result was handed over, as trio.to_thread does


# A thread executor runs `_conveyor_worker.run_jobs` in this process, so a registry lets
# tests use local closures (with their Events) while the function that is pickled stays
# module-level.
_REGISTRY: dict[str, Callable[[int], int]] = {}


def _call_registered(name: str, x: int) -> int:
    return _REGISTRY[name](x)


# ---------------------------------------------------------------------------------------------
# in_process_batched


async def test_batched_gives_each_caller_its_own_result_or_error() -> None:
    results: dict[int, object] = {}

    with concurrent.futures.ThreadPoolExecutor(2) as inner:
        executor = RecordingExecutor(inner)
        async with conveyor.in_process_batched(
            functools.partial(pf.fail_on, 13), executor=executor, batch_size=40, max_batches=1
        ) as fn:

            async def one(i: int) -> None:
                try:
                    results[i] = await fn(i)
                except pf.ItemError as exc:
                    results[i] = exc

            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(one, i)

    assert len(executor.futures) == 3  # 100 calls in batches of at most 40
    assert {i: v for i, v in results.items() if i != 13} == {
        i: 2 * i for i in range(100) if i != 13
    }
    error = results[13]
    assert isinstance(error, pf.ItemError) and str(error) == "item 13 is bad"
    assert "in _inner_failure" in "".join(traceback.format_exception(error))


@settings(deadline=None, max_examples=25)
@given(
    items=st.lists(st.integers(-50, 50), max_size=40),
    bad=st.integers(-50, 50),
    batch_size=st.integers(1, 12),
    max_batches=st.integers(1, 3),
)
async def test_batched_outcomes_equal_direct_calls(
    items: list[int], bad: int, batch_size: int, max_batches: int
) -> None:
    """Whatever the batching, each call gets exactly what calling f directly gives."""
    f = functools.partial(pf.fail_on, bad)
    got: dict[int, object] = {}
    with concurrent.futures.ThreadPoolExecutor(max_batches) as executor:
        async with conveyor.in_process_batched(
            f, executor=executor, batch_size=batch_size, max_batches=max_batches
        ) as fn:

            async def one(index: int, x: int) -> None:
                try:
                    got[index] = await fn(x)
                except pf.ItemError as exc:
                    got[index] = str(exc)

            async with trio.open_nursery() as nursery:
                for index, x in enumerate(items):
                    nursery.start_soon(one, index, x)
    expected = {i: (f"item {x} is bad" if x == bad else 2 * x) for i, x in enumerate(items)}
    assert got == expected


async def test_batched_one_unpicklable_argument_fails_only_itself() -> None:
    outcomes: dict[int, object] = {}
    async with conveyor.in_process_batched(pf.add, batch_size=8) as fn:

        async def one(i: int) -> None:
            arg: object = threading.Lock() if i == 2 else i
            try:
                outcomes[i] = await fn(i, arg)
            except conveyor.NotPicklableError as exc:
                outcomes[i] = exc

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(one, i)
    assert isinstance(outcomes.pop(2), conveyor.NotPicklableError)
    assert outcomes == {0: 0, 1: 2, 3: 6, 4: 8}


async def test_batched_callable_is_closed_after_the_block() -> None:
    async with conveyor.in_process_batched(pf.square) as fn:
        assert await fn(4) == 16
    with pytest.raises(trio.ClosedResourceError, match="used after its async with block"):
        await fn(4)


async def test_batched_block_cancel_releases_callers_outside_it() -> None:
    started = threading.Event()
    release = threading.Event()

    def job(x: int) -> int:
        started.set()
        release.wait(10)
        return x

    _REGISTRY["blocking"] = job
    errors: list[BaseException] = []
    with concurrent.futures.ThreadPoolExecutor(1) as inner:
        async with trio.open_nursery() as outside:
            with trio.CancelScope() as block_scope:
                async with conveyor.in_process_batched(
                    _call_registered, executor=inner, batch_size=1, max_batches=1
                ) as fn:

                    async def caller(i: int) -> None:
                        try:
                            await fn("blocking", i)
                        except trio.ClosedResourceError as exc:
                            errors.append(exc)

                    outside.start_soon(caller, 1)  # shipped, running
                    await trio.to_thread.run_sync(started.wait, 10)
                    outside.start_soon(caller, 2)  # waits for capacity: never shipped
                    await trio.sleep(0.01)
                    block_scope.cancel()
                    await trio.sleep_forever()
            assert block_scope.cancelled_caught
        release.set()
    # Both callers outside the block got an answer instead of waiting forever.
    assert len(errors) == 2
    assert all("block ended (cancelled or failed)" in str(e) for e in errors)


@pytest.mark.slow
async def test_batched_dead_worker_fails_every_caller_of_the_batch(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    fn_sync = functools.partial(pf.die_once, str(tmp_path), "exit")
    async with conveyor.in_process_batched(fn_sync, batch_size=10, max_batches=1) as fn:

        async def one() -> None:
            try:
                await fn(7)
            except conveyor.WorkerDied as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
        # each caller has its own exception object, so their tracebacks stay apart
        assert len({id(e) for e in errors}) == 3
        assert await fn(7) == 7  # retried: a fresh worker, and the marker is there now


@pytest.mark.slow
async def test_batched_cancel_of_every_caller_kills_the_batch(tmp_path: Path) -> None:
    fn_sync = functools.partial(pf.write_pid_then_sleep, str(tmp_path), 10)
    async with conveyor.in_process_batched(fn_sync, batch_size=4) as fn:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fn, 1)
                nursery.start_soon(fn, 2)
                (pid,) = await wait_for_files(tmp_path, 1)
                start = time.monotonic()
                scope.cancel()
    assert time.monotonic() - start < 1
    assert not pid_running(pid)


async def test_batched_cancel_of_one_caller_keeps_the_others() -> None:
    started = threading.Event()
    release = threading.Event()

    def job(x: int) -> int:
        started.set()
        release.wait(10)
        return x

    _REGISTRY["slow"] = job
    got: list[int] = []
    scopes: list[trio.CancelScope] = []

    async def keep(i: int) -> None:
        got.append(await fn("slow", i))

    async def drop(i: int) -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            got.append(await fn("slow", i))

    with concurrent.futures.ThreadPoolExecutor(1) as inner:
        executor = RecordingExecutor(inner)
        async with conveyor.in_process_batched(
            _call_registered, executor=executor, batch_size=4, max_batches=1
        ) as fn:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep, 1)
                nursery.start_soon(drop, 2)
                await trio.to_thread.run_sync(started.wait, 10)
                scopes[0].cancel()  # one caller of the running batch goes away...
                await trio.sleep(0.05)
                release.set()
    assert got == [1]  # ...the batch carried on for the other one
    (future,) = executor.futures  # both were in that one batch
    assert len(future.result()) == 2


async def test_batched_unpicklable_result_fails_only_its_call() -> None:
    def lock_on_2(x: int) -> Any:
        return threading.Lock() if x == 2 else -x

    _REGISTRY["lock_on_2"] = lock_on_2
    outcomes: dict[int, object] = {}
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        async with conveyor.in_process_batched(
            _call_registered, executor=executor, batch_size=8, max_batches=1
        ) as fn:

            async def one(i: int) -> None:
                try:
                    outcomes[i] = await fn("lock_on_2", i)
                except conveyor.NotPicklableError as exc:
                    outcomes[i] = exc

            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(one, i)
    error = outcomes.pop(2)
    assert isinstance(error, conveyor.NotPicklableError)
    assert "the lock it returned cannot be pickled" in str(error)
    assert outcomes == {0: 0, 1: -1, 3: -3, 4: -4}


async def test_batched_caller_cancelled_before_shipping_is_withdrawn() -> None:
    started = threading.Event()
    release = threading.Event()

    def job(x: int) -> int:
        started.set()
        release.wait(10)
        return 10 * x

    _REGISTRY["held"] = job
    got: dict[int, int] = {}
    scopes: dict[int, trio.CancelScope] = {}

    async def one(i: int) -> None:
        with trio.CancelScope() as scope:
            scopes[i] = scope
            got[i] = await fn("held", i)

    with concurrent.futures.ThreadPoolExecutor(1) as inner:
        executor = RecordingExecutor(inner)
        async with conveyor.in_process_batched(
            _call_registered, executor=executor, batch_size=2, max_batches=1
        ) as fn:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 1)
                await trio.to_thread.run_sync(started.wait, 10)  # batch [1] runs
                for i in (2, 3, 4):  # wait for capacity, unshipped
                    nursery.start_soon(one, i)
                await trio.sleep(0.01)
                scopes[3].cancel()  # withdrawn before it was shipped
                await trio.sleep(0.01)
                release.set()
    assert got == {1: 10, 2: 20, 4: 40}
    assert scopes[3].cancelled_caught
    # [1], then [2, 4]: 3 never reached the executor
    shipped = [sorted(f_.result()) for f_ in executor.futures]  # one value per call
    assert shipped == [[10], [20, 40]]


# ---------------------------------------------------------------------------------------------
# end to end: through conveyor.run


async def test_run_reports_worker_error_with_worker_frames() -> None:
    report = await conveyor.run(
        conveyor.in_process(functools.partial(pf.fail_on, 3)), range(6), workers=2
    )
    assert sorted(r.value for r in report.succeeded) == [0, 2, 4, 8, 10]
    (failed,) = report.failed
    assert failed.item == 3 and isinstance(failed.error, pf.ItemError)
    assert "in _inner_failure" in failed.traceback and "in fail_on" in failed.traceback


async def test_run_unpicklable_function_fails_fast_and_shows_the_fix() -> None:
    with trio.fail_after(1):
        report = await conveyor.run(
            conveyor.in_process(lambda x: x), range(3), workers=2,
            retry=conveyor.Retry(attempts=5, backoff=None),
        )
    assert len(report.failed) == 3 and not report.succeeded
    assert all("functools.partial" in str(f.error) for f in report.failed)
    assert all(f.attempts == 1 for f in report.failed)  # retryable = False: never retried


async def test_run_batched_keeps_per_item_results_and_failures() -> None:
    async with conveyor.in_process_batched(
        functools.partial(pf.fail_on, 7), batch_size=16
    ) as fn:
        report = await conveyor.run(fn, range(50), workers=64)
    assert sorted(r.value for r in report.succeeded) == [2 * i for i in range(50) if i != 7]
    (failed,) = report.failed
    assert failed.item == 7 and isinstance(failed.error, pf.ItemError)
    assert "in _inner_failure" in failed.traceback


@pytest.mark.slow
async def test_run_retries_a_dead_worker_on_a_fresh_one(tmp_path: Path) -> None:
    fn = conveyor.in_process(functools.partial(pf.die_once, str(tmp_path), "kill"))
    report = await conveyor.run(
        fn, range(4), workers=2, retry=conveyor.Retry(attempts=2, backoff=None)
    )
    assert not report.failed and not report.unfinished
    assert sorted(r.value for r in report.succeeded) == [0, 1, 2, 3]
    assert {r.attempts for r in report.succeeded} == {2}  # each died once, then succeeded


@pytest.mark.slow
async def test_run_cancel_kills_running_jobs(tmp_path: Path) -> None:
    fn = conveyor.in_process(functools.partial(pf.write_pid_then_sleep, str(tmp_path), 10))
    report = None
    async with trio.open_nursery() as nursery:

        async def go() -> None:
            nonlocal report
            report = await conveyor.run(fn, range(2), workers=2)

        nursery.start_soon(go)
        pids = await wait_for_files(tmp_path, 2)
        start = time.monotonic()
        nursery.cancel_scope.cancel()
    assert time.monotonic() - start < 1
    assert not any(pid_running(pid) for pid in pids)


@pytest.mark.slow
async def test_run_attempt_timeout_kills_the_worker(tmp_path: Path) -> None:
    fn = conveyor.in_process(functools.partial(pf.write_pid_then_sleep, str(tmp_path), 10))
    start = time.monotonic()
    report = await conveyor.run(fn, [1], workers=1, timeout=3)
    assert time.monotonic() - start < 5
    (failed,) = report.failed
    assert isinstance(failed.error, conveyor.AttemptTimeout)
    (pid,) = read_pids(tmp_path)
    assert not pid_running(int(pid))


@pytest.mark.slow
async def test_run_timeout_from_a_cold_start_counts_the_job_not_the_worker_start() -> None:
    # A cache scope of its own: no worker process exists when the run starts, and starting
    # one (spawn, imports) takes longer than the 0.1 s timeout.
    async with trio_parallel.cache_scope():
        report = await conveyor.run(
            conveyor.in_process(pf.quick),
            range(4),
            workers=2,
            timeout=0.1,
            retry=conveyor.Retry(attempts=6, backoff=None),
        )
    assert not report.failed and not report.unfinished
    assert sorted(r.value for r in report.succeeded) == [0, 1, 2, 3]
    assert {r.attempts for r in report.succeeded} == {1}


@pytest.mark.slow
async def test_run_timeout_kill_does_not_fail_the_next_attempt_on_a_fresh_worker(
    tmp_path: Path,
) -> None:
    # The first attempt of each item hangs and is killed by the timeout; the retry needs a
    # fresh worker process, whose start must not count against it.
    fn = conveyor.in_process(functools.partial(pf.slow_once, str(tmp_path)))
    async with trio_parallel.cache_scope():
        report = await conveyor.run(
            fn, range(2), workers=2, timeout=0.5, retry=conveyor.Retry(attempts=3, backoff=None)
        )
    assert not report.failed and not report.unfinished
    assert {r.attempts for r in report.succeeded} == {2}


@pytest.mark.slow
async def test_run_timeout_still_kills_a_job_that_runs_too_long(tmp_path: Path) -> None:
    fn = conveyor.in_process(functools.partial(pf.write_pid_then_sleep, str(tmp_path), 10))
    async with trio_parallel.cache_scope():
        with trio.fail_after(8):
            report = await conveyor.run(fn, [1, 2], workers=2, timeout=0.5)
    assert [type(f.error) for f in report.failed] == [conveyor.AttemptTimeout] * 2
    assert "timeout=0.5 s (timed from the moment a worker process was ready" in str(
        report.failed[0].error
    )
    pids = [int(p) for p in read_pids(tmp_path)]
    assert len(pids) == 2 and not any(pid_running(pid) for pid in pids)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["exit", "interrupt"])
@pytest.mark.parametrize("batched", [False, True], ids=["in_process", "in_process_batched"])
async def test_systemexit_or_keyboardinterrupt_in_a_worker_fails_only_its_item(
    how: str, batched: bool
) -> None:
    f = functools.partial(pf.exit_with, how)
    retry = conveyor.Retry(attempts=3, backoff=None)
    if batched:
        async with conveyor.in_process_batched(f, batch_size=4) as fn:
            report = await conveyor.run(fn, range(6), workers=8, retry=retry)
    else:
        report = await conveyor.run(conveyor.in_process(f), range(6), workers=2, retry=retry)
    # The run went on: the even items succeeded, each odd one failed once, never retried.
    assert sorted(r.value for r in report.succeeded) == [0, 2, 4]
    assert sorted(f.item for f in report.failed) == [1, 3, 5]
    raised = "SystemExit(3)" if how == "exit" else "KeyboardInterrupt()"
    (failed,) = (f for f in report.failed if f.item == 3)
    assert failed.attempts == 1
    assert isinstance(failed.error, conveyor.RemoteError)
    assert str(failed.error).startswith(
        f"functools.partial(tests._procfuncs.exit_with, ...) raised {raised} in the worker"
        " process; code running in a worker process cannot end the caller's program"
    )
    assert "in exit_with" in failed.traceback  # the worker's frames


@pytest.mark.slow
async def test_worker_processes_import_neither_trio_nor_conveyor() -> None:
    async with trio_parallel.cache_scope():  # a fresh worker
        loaded = await conveyor.in_process(pf.loaded_modules)(("trio", "conveyor"))
        async with conveyor.in_process_batched(pf.loaded_modules) as fn:
            loaded_batched = await fn(("trio", "conveyor"))
    # Nothing of trio, trio_parallel, trio_util or the conveyor package.
    assert loaded == loaded_batched == []


def test_worker_module_imports_only_the_standard_library() -> None:
    code = (
        "import sys, _conveyor_worker; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('trio', 'trio_parallel', 'conveyor', 'outcome', 'tblib', 'cloudpickle')))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(conveyor.__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, check=True, env=env, timeout=60,
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
async def test_loop_stays_responsive_while_processes_work() -> None:
    lateness: list[float] = []

    async def ticker(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            before = trio.current_time()
            await trio.sleep(0.001)
            lateness.append(trio.current_time() - before - 0.001)

    async with trio.open_nursery() as nursery:
        await nursery.start(ticker)
        report = await conveyor.run(conveyor.in_process(pf.burn), [20_000] * 4, workers=2)
        nursery.cancel_scope.cancel()
    assert len(report.succeeded) == 4
    assert len(lateness) > 50
    assert max(lateness) < 0.2


# ---------------------------------------------------------------------------------------------
# scripts and worker processes


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in (
        "__name__ == '__main__'",
        "'__main__' == __name__",
    )


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).parents[1] / "examples").rglob("*.py")),
    ids=lambda p: str(p.relative_to(Path(__file__).parents[1])),
)
def test_examples_run_nothing_at_import(path: Path) -> None:
    # Worker processes are spawned and re-import the main module: a script's top-level work
    # belongs under `if __name__ == "__main__":` (README, "Heavy work").
    allowed = (
        ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
        ast.Assign, ast.AnnAssign,
    )
    for node in ast.parse(path.read_text()).body:
        if _is_main_guard(node):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        assert isinstance(node, allowed), f"line {node.lineno}: {ast.unparse(node)[:60]}"
        if isinstance(node, ast.Assign | ast.AnnAssign):
            for call in ast.walk(node):
                if isinstance(call, ast.Call):
                    name = ast.unparse(call.func)
                    assert not name.endswith(".run") and name != "main", (
                        f"line {node.lineno} runs {name} at import"
                    )


def test_readme_in_process_example_has_the_main_guard() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Heavy work")[1].split("\n## ")[0]
    assert 'if __name__ == "__main__":' in section
    assert "re-imports your main" in section


async def test_in_thread_timeout_holds_for_workers_started_by_submit() -> None:
    # Workers start lazily; those started by submit() run from the caller's task, and
    # must still see the pool's linger nursery: the timeout is enforced, and the pool's
    # block waits for the abandoned threads (found by writing docs/design.md).
    ended: list[int] = []

    def blocking(x: int) -> int:
        threading.Event().wait(0.5)
        ended.append(x)
        return x

    async with conveyor.open_pool(
        conveyor.in_thread(blocking), workers=2, timeout=0.1, retry=None
    ) as pool:
        await trio.lowlevel.checkpoint()  # the pool starts: workers start from submit()
        await pool.submit(1)
        await pool.submit(2)
    assert sorted(ended) == [1, 2]  # both threads ended before the block did
    report = pool.report()
    assert [type(f.error) for f in report.failed] == [conveyor.AttemptTimeout] * 2
