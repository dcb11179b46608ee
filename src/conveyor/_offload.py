"""Heavy work off the event loop: sync functions made async, in threads or worker processes.

``in_thread(f)`` and ``in_process(f)`` turn a plain function into an async callable that a
pool (or any trio code) awaits like any other task function. ``in_process_batched(f)`` ships
many tiny calls to a worker process in one round trip and still answers each caller alone.

How a job travels to a worker process and back (every backend, the same way):

- In the parent, the function is pickled once per wrapper and the arguments once per call,
  with the standard :mod:`pickle`. A failure names what could not be pickled
  (:class:`NotPicklableError`) and, for a lambda or a local function, shows the fix.
- In the worker, ``_conveyor_worker.run_jobs`` unpickles them, calls the function, and
  pickles each result or exception itself. That module is a top-level one that imports only
  the standard library (not this package, whose ``__init__`` imports trio): a fresh worker
  process starts as fast as with trio-parallel alone. An exception travels with its
  formatted worker-side traceback, which the parent attaches as ``__cause__`` (as
  :mod:`concurrent.futures.process` does), so ``traceback.format_exception(error)`` shows
  the frames inside the worker. An exception that cannot itself be pickled is replaced by a
  :class:`RemoteError` carrying its type and text; so is a ``SystemExit`` or
  ``KeyboardInterrupt`` raised by the function (never retried): code in a worker cannot end
  the caller's program. For :func:`in_process_batched`, ``run_batch`` does the same but
  returns the values themselves, after checking that they pickle: a batch's results cross
  in one pickle.
- The backend (trio-parallel, or a ``concurrent.futures.Executor``) therefore only ever moves
  bytes, or values already checked to pickle, so its own pickling (pickle or cloudpickle)
  never decides what works.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import inspect
import itertools
import math
import os
import pickle
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, TypeVarTuple, Unpack

import trio
import trio_parallel  # type: ignore[import-untyped]  # untyped; its API is small

import _conveyor_worker as _worker

from . import _linger
from ._errors import AttemptTimeout, NotPicklableError, RemoteError, WorkerDied
from ._options import (
    check_bool,
    check_callable,
    check_count,
    check_type,
    invalid,
    is_async_callable,
)

__all__ = [
    "NotPicklableError",
    "RemoteError",
    "WorkerDied",
    "in_process",
    "in_process_batched",
    "in_thread",
]

T = TypeVar("T")
R = TypeVar("R")
Ts = TypeVarTuple("Ts")

_PROTOCOL = _worker.PROTOCOL


# ---------------------------------------------------------------------------------------------
# Errors


class _RemoteTraceback(Exception):
    """The formatted worker-side traceback, attached as the ``__cause__`` of the re-raised
    exception so that formatting the exception in the parent shows the worker's frames."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


# ---------------------------------------------------------------------------------------------
# Threads


def in_thread(
    f: Callable[[Unpack[Ts]], R], *, limiter: trio.CapacityLimiter | None = None
) -> Callable[[Unpack[Ts]], Awaitable[R]]:
    """Make a sync function an async callable that runs it in a worker thread.

    ``await in_thread(f)(*args)`` runs ``f(*args)`` with ``trio.to_thread.run_sync(...,
    limiter=limiter)``. Use it for blocking I/O or for C code that releases the GIL;
    CPU-bound Python code belongs in :func:`in_process` (threads share one GIL, and a
    CPU-bound thread slows the event loop down too).

    Exceptions from ``f`` reach the caller unchanged, with their traceback. If ``f`` returns
    a coroutine or another awaitable (``in_thread(lambda n: fetch(client, n))`` with an
    async ``fetch``), the call fails with a :class:`TypeError` carrying ``retryable =
    False`` (never retried), and the coroutine is closed: async code is given to the pool
    itself, not through ``in_thread`` (``functools.partial(fetch, client)``).

    **Cancellation handling**: a thread cannot be stopped from outside. Cancellation is
    checked before the thread starts. Once ``f`` runs:

    - *Inside a pool* (the pool's task function, or code it awaits): a cancel (the pool's
      per-attempt ``timeout``, ``stop()``, an outside cancel) abandons the thread at once
      (trio's ``abandon_on_cancel=True``): the attempt raises at its deadline, so a
      ``timeout`` is enforced and fails the attempt with ``AttemptTimeout``, retried like
      any error. The abandoned thread runs ``f`` to its end and its result is discarded;
      it keeps its ``limiter`` slot until ``f`` really returns (so a retry may wait for
      that slot), and the pool's block (``run``, ``map``, ``open_pool``) does not end
      before every thread it started has returned. A call cancelled before its thread
      began (waiting for the ``limiter``, say) never calls ``f``.
    - *Outside a pool*: a cancel waits for ``f`` to finish (trio's
      ``abandon_on_cancel=False``): the call then returns ``f``'s result (or raises its
      error) as if nothing happened, and the cancel takes effect at the caller's next
      checkpoint.

    Either way no thread outlives the pool it was started for. If ``f`` can run for long,
    make it check a flag (a ``threading.Event`` set on cancel) or use :func:`in_process`,
    whose workers can be killed.

    Args:
        f: a sync callable; positional arguments are passed through (bind keyword arguments
            with :func:`functools.partial`).
        limiter: caps the threads running ``f`` at once (keyword only); by default trio's
            default thread limiter (40 threads, shared by all ``trio.to_thread`` calls).

    Returns:
        An ``async def`` callable taking the same positional arguments as ``f``.

    Raises:
        TypeError: ``f`` is not callable, or is already an async function; ``limiter`` is
            not a ``trio.CapacityLimiter``.
    """
    _check_sync_callable("in_thread", f)
    check_type("limiter", limiter, trio.CapacityLimiter, "a trio.CapacityLimiter or None",
               _limiter_example(limiter), allow_none=True, owner="in_thread")
    thread_name = _wrapper_name("in_thread", f)
    isawaitable = inspect.isawaitable

    def call(*args: *Ts) -> R:  # in the thread
        value = f(*args)
        if isawaitable(value):
            raise _returned_awaitable(f, value)
        return value

    async def call_in_thread(*args: *Ts) -> R:
        linger = _linger.current.get()
        if linger is None:  # not in a pool: a cancel waits for the thread
            return await trio.to_thread.run_sync(
                call, *args, limiter=limiter, thread_name=thread_name
            )
        job = _ThreadJob(functools.partial(call, *args))
        try:
            return await trio.to_thread.run_sync(
                job.run, limiter=limiter, abandon_on_cancel=True, thread_name=thread_name
            )
        except BaseException:
            job.abandon(linger)
            raise

    _name_wrapper(call_in_thread, "in_thread", f)
    return call_in_thread


def _returned_awaitable(f: object, value: object) -> TypeError:
    if inspect.iscoroutine(value):
        value.close()  # no "coroutine was never awaited" warning
        what = "a coroutine"
    else:
        what = f"an awaitable ({type(value).__name__})"
    error = TypeError(
        f"in_thread(f): f ({_describe(f)}) returned {what}, so it is async code, and"
        " in_thread runs sync functions in a thread. Give the async function to the pool"
        " itself, without in_thread: an async def function, or functools.partial(async_fn,"
        " ...) to bind its arguments"
    )
    error.retryable = False  # type: ignore[attr-defined]  # read by Retry: never retried
    return error


_QUEUED, _RUNNING, _FINISHED, _ABANDONED = range(4)


class _ThreadJob:
    """One call of ``in_thread`` inside a pool, whose thread may be abandoned on cancel.

    The thread and the trio side agree under a lock on what happened: a job abandoned
    before it began never calls ``f``; one abandoned while it runs signals its end from the
    thread (``run_sync_soon`` on the trio token), and a task in the pool's linger nursery
    waits, shielded, for that signal, so the pool's block ends only after the thread has.
    """

    __slots__ = ("call", "ended", "lock", "state")

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call
        self.lock = threading.Lock()
        self.state = _QUEUED
        self.ended: tuple[trio.Event, trio.lowlevel.TrioToken] | None = None

    def run(self) -> Any:  # in the thread
        with self.lock:
            if self.state == _ABANDONED:
                return None  # nobody waits for it: f is not called
            self.state = _RUNNING
        try:
            return self.call()
        finally:
            with self.lock:
                self.state = _FINISHED
                ended = self.ended
            if ended is not None:
                event, token = ended
                try:
                    token.run_sync_soon(event.set)
                except trio.RunFinishedError:  # pragma: no cover - the run ended first
                    pass

    def abandon(self, linger: trio.Nursery) -> None:  # in trio, the attempt is leaving
        with self.lock:
            if self.state == _FINISHED:
                return
            if self.state == _QUEUED:
                self.state = _ABANDONED
                return
            event = trio.Event()
            self.ended = (event, trio.lowlevel.current_trio_token())
        try:
            linger.start_soon(_wait_for_thread, event)
        except RuntimeError:  # pragma: no cover - called from a task that outlived its pool
            pass  # that pool has ended: nothing is left to hold back


async def _wait_for_thread(ended: trio.Event) -> None:
    with trio.CancelScope(shield=True):
        await ended.wait()


# ---------------------------------------------------------------------------------------------
# Processes


def in_process(
    f: Callable[[Unpack[Ts]], R],
    *,
    executor: concurrent.futures.Executor | None = None,
    kill_on_cancel: bool = True,
    limiter: trio.CapacityLimiter | None = None,
) -> Callable[[Unpack[Ts]], Awaitable[R]]:
    """Make a sync function an async callable that runs it in a worker process.

    The default backend is trio-parallel: worker processes are started on demand, reused
    between jobs, and at most ``limiter`` jobs run at once (by default trio-parallel's
    limiter, sized to the CPU count). With ``executor=`` any
    :class:`concurrent.futures.Executor` runs the jobs instead: a ``ProcessPoolExecutor``,
    loky, or a Dask distributed client's ``client.get_executor()`` to spread work across
    machines. No thread waits per call: the future's done-callback wakes the waiting trio
    task through the trio token.

    ``f`` and its arguments are pickled with :mod:`pickle` (so ``f`` must be importable by
    name: a module-level function, or a :func:`functools.partial` of one). A worker error
    reaches the caller as the original exception type, with the worker-side traceback as its
    ``__cause__`` (shown by ``traceback.format_exception`` and in ``Failed.traceback``).
    Problems pickling the function, an argument or a result raise
    :class:`NotPicklableError`, whose message names the culprit.

    The function is pickled at the first call and the pickle reused: a function that
    cannot be pickled fails every call (in a pool, one ``Failed`` per item, none lost)
    instead of failing here.

    **Timeouts**: when this callable is the task function of a pool with a per-attempt
    ``timeout`` (default backend), the clock of each attempt starts once a worker process is
    ready for its job: an attempt that finds
    no idle worker first starts one, and that start is not counted (nor is waiting for the
    ``limiter``). So a cold start, or the fresh worker that replaces one killed by a
    timeout, never fails an attempt; an attempt still fails with ``AttemptTimeout`` when
    the job itself runs past ``timeout``, and its worker is killed. With an ``executor``,
    or when the callable is awaited inside another task function, the pool's clock runs
    from the call (queueing in the executor, or a worker's start, included).

    **Cancellation handling**: with the default backend and ``kill_on_cancel=True``, a
    cancel kills the worker process running the job and raises ``trio.Cancelled`` at once
    (trio-parallel starts a new worker for the next job). With an ``executor``, a job still
    queued in the executor is cancelled (``Future.cancel()``) and never runs; a job already
    running cannot be killed through the ``Executor`` interface, so with
    ``kill_on_cancel=True`` the caller raises ``trio.Cancelled`` at once while the job runs
    to completion in the executor, its result discarded. With ``kill_on_cancel=False``
    (either backend) a cancel waits for the running job to finish, like
    ``trio.to_thread.run_sync``: the call returns the job's result (or raises its error)
    and the cancel takes effect at the caller's next checkpoint.

    **Dead workers**: a worker that dies mid-job raises :class:`WorkerDied` (default
    backend); the pool's default retry policy retries it on a fresh worker.

    **SystemExit and KeyboardInterrupt** raised by ``f`` in the worker do not end the
    caller's program: that call fails with a :class:`RemoteError` naming what was raised,
    which is never retried.

    Worker processes are started with ``spawn``: each imports the module that defines
    ``f`` and re-imports the main module of the program, so a script needs the
    ``if __name__ == "__main__":`` guard around its top-level code. The worker-side code of
    conveyor imports only the standard library; keep the module defining ``f`` light too
    (no trio, no conveyor) and fresh workers start faster.

    Args:
        f: a sync callable, picklable by reference.
        executor: a ``concurrent.futures.Executor`` to run the jobs; None for trio-parallel.
        kill_on_cancel: on cancel, kill the job (default backend) or stop waiting for it
            (executor) instead of waiting for it to finish.
        limiter: caps the jobs running at once with the default backend; it must be None
            with an ``executor`` (which has its own ``max_workers``).

        Every argument after ``f`` is keyword only.

    Returns:
        An ``async def`` callable taking the same positional arguments as ``f``.

    Raises:
        TypeError: ``f`` is not callable or is an async function, ``executor`` is not a
            ``concurrent.futures.Executor``, or ``limiter`` is not a ``trio.CapacityLimiter``.
        ValueError: both ``executor`` and ``limiter`` are given.
    """
    backend = _Backend.make("in_process", f, executor, kill_on_cancel, limiter)

    async def call_in_process(*args: *Ts) -> R:
        blob = _dump_args(backend.fn_name, args)
        (reply,) = await backend.run([blob])
        result: R = _load_reply(reply)
        return result

    _name_wrapper(call_in_process, "in_process", f)
    if executor is None:

        def timed(timeout: float) -> Callable[[Unpack[Ts]], Awaitable[R]]:
            """The same callable, enforcing a pool's per-attempt ``timeout`` itself."""

            async def call_in_process_timed(*args: *Ts) -> R:
                blob = _dump_args(backend.fn_name, args)
                (reply,) = await backend.run([blob], timeout)
                result: R = _load_reply(reply)
                return result

            _name_wrapper(call_in_process_timed, "in_process", f)
            return call_in_process_timed

        # A pool with a timeout calls this once, before its workers start, and runs the
        # callable it returns without timing it: see Pool._run_tasks.
        setattr(call_in_process, _OWN_TIMEOUT, timed)
    return call_in_process


_OWN_TIMEOUT = "_conveyor_timed"


@asynccontextmanager
async def in_process_batched(
    f: Callable[[Unpack[Ts]], R],
    *,
    executor: concurrent.futures.Executor | None = None,
    kill_on_cancel: bool = True,
    batch_size: int = 256,
    max_batches: int | None = None,
    limiter: trio.CapacityLimiter | None = None,
) -> AsyncIterator[Callable[[Unpack[Ts]], Awaitable[R]]]:
    """Like :func:`in_process`, but many concurrent calls share one round trip to a worker.

    For tiny jobs the cost of :func:`in_process` is the inter-process round trip (hundreds of
    microseconds), not the work. Here, calls made while the worker processes are busy (or
    in the same scheduling tick) wait together and go to a worker as one batch of up to
    ``batch_size`` calls: one message there, one back. Each caller still gets its own result
    or its own exception (with its worker traceback); one bad item fails only itself. The
    results of a batch travel back as one list, checked in the worker to pickle (a result
    that cannot fails only its own call); so a result that pickles in the worker but cannot
    be unpickled in the parent fails every call of its batch, each with its own copy of
    the error. Batches form on their own: give the pool more workers than one batch, e.g.::

        async with conveyor.in_process_batched(score, batch_size=256) as fn:
            report = await conveyor.run(fn, items, workers=1024)

    The returned callable is valid inside the ``async with`` block only: the block owns the
    task that ships the batches, and leaving it waits for the batches in flight (cancel the
    block to stop them).

    **Cancellation handling**: a caller that is cancelled stops waiting at once; its result
    is discarded. A batch whose callers have all been cancelled is itself cancelled, with the
    same semantics as :func:`in_process` (``kill_on_cancel`` kills the worker running it).

    **Dead workers**: if the worker dies, every caller of that batch gets
    :class:`WorkerDied` (default backend), so a pool retries each of those items.

    Args:
        f: a sync callable, picklable by reference.
        executor: a ``concurrent.futures.Executor``; None for trio-parallel.
        kill_on_cancel: as for :func:`in_process`.
        batch_size: the most calls in one batch (>= 1).
        max_batches: the most batches in flight at once (>= 1); by default the limiter's
            total tokens (default backend) or the CPU count (executor). Calls arriving while
            that many batches run wait and form the next batch.
        limiter: as for :func:`in_process`.

    Yields:
        An ``async def`` callable taking the same positional arguments as ``f``.

    Raises:
        TypeError, ValueError: as for :func:`in_process`; ``ValueError`` also for a
            ``batch_size`` or ``max_batches`` below 1.
    """
    backend = _Backend.make("in_process_batched", f, executor, kill_on_cancel, limiter)
    check_count("batch_size", batch_size, minimum=1, owner="in_process_batched")
    if max_batches is None:
        if executor is None:
            total = (limiter or trio_parallel.current_default_worker_limiter()).total_tokens
            finite = isinstance(total, int) or math.isfinite(total)  # an int may not fit a float
            max_batches = int(total) if finite else os.cpu_count() or 1
        else:
            max_batches = os.cpu_count() or 1
    else:
        check_count("max_batches", max_batches, minimum=1, allow_none=True,
                    owner="in_process_batched")

    batcher: _Batcher[R] = _Batcher(backend, batch_size, max_batches)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batcher.dispatch, nursery)
            try:
                yield batcher.call  # type: ignore[misc]
            finally:
                batcher.close()
    finally:
        # After a cancel or an error, calls made from tasks outside the block may still be
        # waiting (never shipped, or their batch was cancelled): they must not wait forever.
        batcher.fail_leftovers()


# ---------------------------------------------------------------------------------------------
# The backends: move a list of pickled argument tuples to a worker, get replies back.

# A reply from the worker for one call: (kind, payload, text), see _conveyor_worker.
_Reply = _worker.Reply


@dataclass(eq=False)
class _Backend:
    fn: Callable[..., Any]
    fn_name: str
    executor: concurrent.futures.Executor | None
    kill_on_cancel: bool
    limiter: trio.CapacityLimiter | None

    @classmethod
    def make(
        cls,
        api: str,
        f: Callable[..., Any],
        executor: concurrent.futures.Executor | None,
        kill_on_cancel: bool,
        limiter: trio.CapacityLimiter | None,
    ) -> _Backend:
        _check_sync_callable(api, f)
        check_type("executor", executor, concurrent.futures.Executor,
                   "a concurrent.futures.Executor or None",
                   "executor=None (trio-parallel's worker processes; or a "
                   "concurrent.futures.ProcessPoolExecutor)", allow_none=True, owner=api)
        if limiter is not None:
            check_type("limiter", limiter, trio.CapacityLimiter,
                       "a trio.CapacityLimiter or None", _limiter_example(limiter), owner=api)
            if executor is not None:
                raise invalid(
                    "limiter", limiter, "None with an executor: a limiter applies to the "
                    "default backend only; size the executor itself (its max_workers)",
                    "limiter=None", owner=api,
                )
        check_bool("kill_on_cancel", kill_on_cancel, owner=api)
        return cls(f, _describe(f), executor, kill_on_cancel, limiter)

    @functools.cached_property
    def fn_blob(self) -> bytes:
        # Pickled at the first call, not when wrapping: a function that cannot be pickled
        # then fails each call (a Failed record per item in a pool, none lost), and the
        # pickle is reused by every later call.
        return pickle.dumps(self.fn, _PROTOCOL)

    async def run(self, arg_blobs: list[bytes], timeout: float | None = None) -> list[_Reply]:
        replies: list[_Reply] = await self.submit(_worker.run_jobs, arg_blobs, timeout)
        return replies

    async def submit(
        self,
        worker: Callable[[str, bytes, Sequence[bytes], int], list[T]],
        arg_blobs: list[bytes],
        timeout: float | None = None,
    ) -> list[T]:
        """Run ``worker(fn_name, fn_blob, arg_blobs, call_number)`` in a worker process;
        with a ``timeout`` (default backend only), raise :class:`AttemptTimeout` if the job
        runs longer than that once a worker process is ready for it."""
        try:
            fn_blob = self.fn_blob
        except Exception as exc:
            raise _not_picklable_function(self.fn_name, self.fn, exc) from exc
        if self.executor is None:
            gate = None if timeout is None else _ReadyWorker(self.limiter, timeout, fn_blob)
            try:
                if gate is None:
                    replies: list[T] = await trio_parallel.run_sync(
                        worker,
                        self.fn_name,
                        fn_blob,
                        arg_blobs,
                        0,
                        kill_on_cancel=self.kill_on_cancel,
                        limiter=self.limiter,
                    )
                    return replies
                with gate.scope:
                    replies = await trio_parallel.run_sync(
                        worker,
                        self.fn_name,
                        fn_blob,
                        arg_blobs,
                        0,
                        kill_on_cancel=self.kill_on_cancel,
                        limiter=gate,
                    )
                    return replies
            except trio_parallel.BrokenWorkerError as exc:
                died = _worker_died(self.fn_name, exc)
            else:
                # only reached when the gate's own deadline cancelled the job
                raise AttemptTimeout(
                    f"attempt took longer than timeout={timeout} s (timed from the moment a"
                    " worker process was ready for the job)"
                )
            # Raised outside the except block, so not chained to trio-parallel's error: that
            # one holds the multiprocessing.Process, which cannot be pickled, and tblib (which
            # Dask installs for every exception class) pickles the chain. WorkerDied's message
            # carries what it said.
            raise died
        # The call number makes each submission unique: an executor that deduplicates
        # identical calls (Dask's pure=True, its default) would otherwise hand a retry the
        # cached result of the attempt that failed.
        future = self.executor.submit(
            worker, self.fn_name, fn_blob, arg_blobs, next(_call_numbers)
        )
        return await _wait_future(future, self.kill_on_cancel)


class _ReadyWorker:
    """The limiter handed to trio-parallel for a job with a timeout: it acquires the real
    limiter, makes sure an idle worker process is ready (if none is, it starts one with a
    job that only loads the function), then starts the job's clock (``scope.deadline``).

    trio-parallel enters its limiter and then takes the newest idle worker from its cache
    with no checkpoint in between, so the job gets a ready worker: the start of a worker
    process never counts against the job's ``timeout``.
    """

    __slots__ = ("fn_blob", "limiter", "scope", "timeout")

    def __init__(
        self, limiter: trio.CapacityLimiter | None, timeout: float, fn_blob: bytes
    ) -> None:
        self.limiter = limiter or trio_parallel.current_default_worker_limiter()
        self.timeout = timeout
        self.fn_blob = fn_blob
        self.scope = trio.CancelScope()

    async def __aenter__(self) -> None:
        await self.limiter.acquire()
        try:
            if not trio_parallel.default_context_statistics().idle_workers:
                # Holds this job's limiter token: the worker started here is the one the
                # job runs in (unless a worker that was busy became idle meanwhile).
                await trio_parallel.run_sync(
                    _worker.ready, self.fn_blob, kill_on_cancel=True, limiter=_NO_LIMIT
                )
        except BaseException:
            self.limiter.release()
            raise
        self.scope.deadline = trio.current_time() + self.timeout

    async def __aexit__(self, *exc_info: object) -> None:
        self.limiter.release()


class _NoLimit:
    """An async context manager that limits nothing (for the warm-up job, which runs under
    the token its job already holds)."""

    async def __aenter__(self) -> None:
        pass

    async def __aexit__(self, *exc_info: object) -> None:
        pass


_NO_LIMIT = _NoLimit()


_call_numbers = itertools.count()


def _worker_died(fn_name: str, exc: trio_parallel.BrokenWorkerError) -> WorkerDied:
    exitcode = pid = None
    for arg in exc.args:
        code = getattr(arg, "exitcode", None)
        if isinstance(code, int):
            exitcode, pid = code, getattr(arg, "pid", None)
    which = "" if pid is None else f" (pid {pid})"
    how = "" if exitcode is None else f" (exit code {exitcode})"
    return WorkerDied(
        f"the worker process{which} running {fn_name} died{how} before returning a result"
        f" [{type(exc).__name__}: {exc.args[0] if exc.args else ''}]",
        exitcode,
    )


async def _wait_future(future: concurrent.futures.Future[T], kill_on_cancel: bool) -> T:
    """Wait for a concurrent.futures.Future without a thread: its done-callback (run in some
    executor thread, or here if it is already done) schedules ``done.set`` on the trio loop."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: concurrent.futures.Future[T]) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:  # the trio run ended first; nobody is waiting
            pass

    future.add_done_callback(wake)
    try:
        await done.wait()
    except trio.Cancelled:
        # A queued job is dropped; a running one cannot be stopped through the Executor
        # interface: either stop waiting (its result is discarded) or wait it out.
        if future.cancel() or kill_on_cancel:
            raise
        # Waited out like trio.to_thread.run_sync(abandon_on_cancel=False): the call returns
        # the job's outcome, and the cancel lands at the caller's next checkpoint.
        with trio.CancelScope(shield=True):
            await done.wait()
    return future.result()


# ---------------------------------------------------------------------------------------------
# Batching


_BLOCK_ENDED = (
    "the in_process_batched block ended (cancelled or failed) before this call was answered"
)


class _Call:
    """One waiting caller. It parks with ``wait_task_rescheduled`` (no Event, no cancel
    scope of its own) and is woken exactly once: by :meth:`_Batcher._answer` with its
    ``value``, ``failure`` (the worker's error reply) or ``error`` set, or by trio itself
    when it is cancelled (see ``abort`` in :meth:`_Batcher.call`)."""

    __slots__ = ("abandoned", "batch", "blob", "error", "failure", "task", "value")

    def __init__(self, blob: bytes, task: trio.lowlevel.Task) -> None:
        self.blob = blob
        self.task = task
        self.batch: _Batch | None = None
        self.value: Any = None
        self.failure: _Reply | None = None
        self.error: BaseException | None = None
        self.abandoned = False


class _Batch:
    """Calls shipped together; cancelled (``scope``) only once none of them waits any more."""

    __slots__ = ("calls", "live", "scope")

    def __init__(self, calls: list[_Call]) -> None:
        self.calls = calls
        self.live = len(calls)
        self.scope = trio.CancelScope()


class _Batcher(Generic[R]):
    """Collects calls; one dispatcher task ships them in batches as capacity frees up.

    Per call, the parent only pickles the arguments, appends to a list, parks the caller
    and later reschedules it: one ``reschedule`` per caller, all from the batch's own task.
    """

    def __init__(self, backend: _Backend, batch_size: int, max_batches: int) -> None:
        self._backend = backend
        self._batch_size = batch_size
        self._capacity = trio.Semaphore(max_batches)
        self._pending: list[_Call] = []
        self._arrived = trio.Event()
        self._dispatcher_idle = False  # waiting on _arrived: the next call sets it
        self._closed = False

    def close(self) -> None:
        self._closed = True
        self._arrived.set()

    @trio.lowlevel.enable_ki_protection
    def fail_leftovers(self) -> None:
        # Only calls never shipped can be left: every shipped batch answers its callers in
        # _ship's finally, and all _ship tasks have ended when the block's nursery has.
        self._closed = True
        pending, self._pending = self._pending, []
        for call in pending:
            call.error = trio.ClosedResourceError(_BLOCK_ENDED)
            trio.lowlevel.reschedule(call.task)

    async def call(self, *args: Any) -> R:
        if self._closed:
            raise trio.ClosedResourceError(
                "this in_process_batched callable was used after its async with block ended"
            )
        try:  # the hot path inlined; _dump_args finds the culprit and raises
            blob = pickle.dumps(args, _PROTOCOL)
        except Exception:
            blob = _dump_args(self._backend.fn_name, args)
        call = _Call(blob, trio.lowlevel.current_task())
        self._pending.append(call)
        if self._dispatcher_idle:
            self._dispatcher_idle = False
            self._arrived.set()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            # The caller is cancelled before it was answered: it stops waiting at once.
            batch = call.batch
            if batch is None:  # not shipped yet: just withdraw it
                self._pending.remove(call)
            else:  # its result will be discarded; the last one out cancels the batch
                call.abandoned = True
                batch.live -= 1
                if not batch.live:
                    batch.scope.cancel()
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if call.failure is not None:
            _load_reply(call.failure)  # raises the worker's exception
        if call.error is not None:
            raise call.error
        result: R = call.value
        return result

    async def dispatch(self, nursery: trio.Nursery) -> None:
        while True:
            await self._capacity.acquire()
            while not self._pending:
                if self._closed:
                    self._capacity.release()
                    return
                self._arrived = trio.Event()
                self._dispatcher_idle = True
                await self._arrived.wait()
            # One more tick, so that callers woken together join the same batch.
            await trio.lowlevel.checkpoint()
            calls = self._pending[: self._batch_size]
            del self._pending[: self._batch_size]
            batch = _Batch(calls)
            for call in calls:
                call.batch = batch
            nursery.start_soon(self._ship, batch)

    async def _ship(self, batch: _Batch) -> None:
        replies: list[Any] | None = None
        error: Exception | None = None
        try:
            with batch.scope:
                replies = await self._backend.submit(
                    _worker.run_batch, [c.blob for c in batch.calls]
                )
        except Exception as exc:
            error = exc
        finally:
            self._capacity.release()
            self._answer(batch, replies, error)

    @staticmethod
    @trio.lowlevel.enable_ki_protection
    def _answer(batch: _Batch, replies: list[Any] | None, error: Exception | None) -> None:
        # Wakes every caller still waiting, each exactly once. Neither replies nor error:
        # the batch was cancelled, by its callers (all abandoned: nobody to wake) or from
        # outside (the block is ending).
        if not batch.live:
            return
        reschedule = trio.lowlevel.reschedule
        if replies is not None:
            for call, reply in zip(batch.calls, replies, strict=True):
                if not call.abandoned:
                    if type(reply) is _worker.Failure:
                        call.failure = reply.reply
                    else:
                        call.value = reply
                    reschedule(call.task)
            return
        for call in batch.calls:
            if call.abandoned:
                continue
            if error is None:
                call.error = trio.ClosedResourceError(_BLOCK_ENDED)
            else:
                # Each caller raises its own copy: one exception object raised from many
                # tasks would collect all their frames in one traceback.
                call.error = copy.copy(error)
                call.error.__cause__ = error.__cause__
                call.error.__traceback__ = error.__traceback__
            reschedule(call.task)


# ---------------------------------------------------------------------------------------------
# Pickling, in the parent


def _not_picklable_function(
    name: str, f: Callable[..., Any], exc: Exception
) -> NotPicklableError:
    hint = ""
    qualname = getattr(_unwrap_partial(f), "__qualname__", "")
    if "<lambda>" in qualname or "<locals>" in qualname:
        hint = (
            " A lambda or a function defined inside another function cannot be sent to a"
            " worker process. Fix: define it at module level (def my_fn(item): ...), and"
            " bind extra arguments with functools.partial(my_fn, extra=...)."
        )
    return NotPicklableError(
        f"cannot send the function {name} to a worker process: it cannot be pickled"
        f" ({type(exc).__name__}: {exc}).{hint}"
    )


def _dump_args(fn_name: str, args: tuple[Any, ...]) -> bytes:
    try:
        return pickle.dumps(args, _PROTOCOL)
    except Exception as exc:
        culprit = "an argument"
        for i, arg in enumerate(args):
            try:
                pickle.dumps(arg, _PROTOCOL)
            except Exception:
                culprit = f"argument {i} ({type(arg).__name__} {_short_repr(arg)})"
                break
        raise NotPicklableError(
            f"cannot send {culprit} of {fn_name} to a worker process: it cannot be pickled"
            f" ({type(exc).__name__}: {exc})"
        ) from exc


def _load_reply(reply: _Reply) -> Any:
    kind, payload, remote_tb = reply
    if kind == _worker.OK:
        return pickle.loads(payload)
    error: BaseException
    if kind == _worker.RAISED:
        error = pickle.loads(payload)
        assert isinstance(error, BaseException)
    elif kind == _worker.NOT_PICKLABLE:
        error = NotPicklableError(payload)
    else:
        error = RemoteError(payload)
        if kind == _worker.EXITED:
            error.retryable = False  # type: ignore[attr-defined]  # read by Retry
    # The worker's text shows the whole chain; drop whatever a tblib-enabled pickle (Dask
    # installs one) restored, so each frame shows once, the same way on every backend.
    error.__traceback__ = None
    error.__context__ = None
    error.__cause__ = _RemoteTraceback(remote_tb)
    raise error


# ---------------------------------------------------------------------------------------------
# Small helpers


def _check_sync_callable(api: str, f: object) -> None:
    if is_async_callable(f):
        raise invalid(
            "f", f, f"a sync function: {_describe(f)} is async, and {api} runs sync code in "
            f"a {'thread' if api == 'in_thread' else 'worker process'}",
            f"give {_describe(f)} to the pool (or await it) directly, without {api}",
            owner=api, kind=TypeError,
        )
    check_callable("f", f, "a sync callable", "f=math.sqrt", owner=api)


def _limiter_example(limiter: object) -> str:
    """``limiter=4`` suggests ``limiter=trio.CapacityLimiter(4)``."""
    size = limiter if type(limiter) is int and 1 <= limiter <= 1_000_000 else 4
    return f"limiter=trio.CapacityLimiter({size})"


def _unwrap_partial(f: object) -> object:
    while isinstance(f, functools.partial):
        f = f.func
    return f


def _describe(f: object) -> str:
    target = _unwrap_partial(f)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if name is None:
        return repr(f)
    module = getattr(target, "__module__", None)
    name = f"{module}.{name}" if module else name
    return f"functools.partial({name}, ...)" if target is not f else name


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _wrapper_name(api: str, f: object) -> str:
    return f"{api}({getattr(_unwrap_partial(f), '__name__', type(f).__name__)})"


def _name_wrapper(wrapper: Callable[..., Any], api: str, f: object) -> None:
    # A readable name in stats, logs and reprs; deliberately no __wrapped__, so that
    # inspect.unwrap() does not lead a coroutine-function check to the sync function.
    wrapper.__name__ = wrapper.__qualname__ = _wrapper_name(api, f)

