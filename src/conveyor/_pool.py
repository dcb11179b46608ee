"""The pool: the public facade over an engine, and its lifetime (the task tree).

:class:`Pool` is what ``async with conveyor.open_pool(...) as pool`` gives: a thin facade
over an :class:`~conveyor._engine.Engine` (the state and the hot functions) and its
:class:`~conveyor._outbox.Outbox` (the output side). :func:`running` is the lifetime of a
pool, shared by every entry point.

Task tree. :func:`running` opens the *outer* nursery; the caller's ``async with`` block
runs in its body. It starts two tasks:

- ``_run_tasks``: the *inner* nursery (workers, retry scheduler, the feeder of ``items``),
  inside a shielded cancel scope. The shield is what makes a graceful drain possible: an
  outside cancel does not reach the workers directly, it goes through ``stop()``, which
  closes intake and then cancels the inner scope at once or after the ``drain`` grace.
- ``_watch``: sleeps until it is cancelled. If that cancel came from outside (the caller's
  scope, a deadline, an error in the caller's block), it calls ``stop()``.

Whatever is still outstanding when the tasks are gone settles as ``Unfinished``
(``Engine.finalize``); then the observers are told the pool closed.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sized
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar, final

import trio

from . import _linger
from ._engine import Engine
from ._errors import AttemptTimeout
from ._records import Record, Report
from ._stats import Stats

__all__ = ["AttemptTimeout", "Pool", "new_pool", "running", "sole_error"]

T = TypeVar("T")


@final
class Pool(Generic[T]):
    """A running pool of workers, as given by :func:`conveyor.open_pool`.

    Feed it with :meth:`submit`, end intake with :meth:`close` (or leave the block), read
    records as they settle with :meth:`results`, and get the account with :meth:`report`,
    also after a cancel. Made by ``conveyor.open_pool``, never directly.
    """

    __slots__ = ("_engine",)
    _engine: Engine

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError(
            "conveyor.Pool is not made directly: use "
            "`async with conveyor.open_pool(fn, ...) as pool:`"
        )

    async def submit(self, item: Any) -> None:
        """Hand ``item`` to the pool, waiting while it is full (backpressure).

        The pool is full when ``buffer + workers`` accepted items have not settled yet
        (those waiting for a retry count too); a settling item frees a slot.

        Raises:
            trio.ClosedResourceError: intake is closed (:meth:`close` or :meth:`stop`).

        If the call is cancelled, the item was not accepted and will not be processed.
        """
        await self._engine.submit(item)

    def submit_nowait(self, item: Any) -> None:
        """Hand ``item`` to the pool if the work channel has room now.

        Raises:
            trio.WouldBlock: the pool is full; the item was not accepted.
            trio.ClosedResourceError: intake is closed.
        """
        self._engine.submit_nowait(item)

    def close(self) -> None:
        """No more items: the pool finishes what it holds, then ends. Idempotent."""
        self._engine.close()

    def stop(self, drain: float | None = None) -> None:
        """Stop now: take no more items, start no queued item or retry, end the pool.

        Attempts already running get ``drain`` seconds to finish (default: the pool's
        ``drain`` option, 0 unless set), then they are cancelled. Everything not settled by
        then settles as ``Unfinished``. Calling it again can only shorten the grace.
        """
        self._engine.stop(drain)

    def results(self) -> AsyncIterator[Record]:
        """Yield each record (``Succeeded`` or ``Failed``) as its item settles.

        Ends when the pool has ended. A success handed out here is not kept for
        :meth:`report` (only counted), so a long stream does not accumulate.
        """
        reader: AsyncIterator[Record] = self._engine.box.reader()
        return reader

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters now."""
        return self._engine.stats

    async def wait_stats(self, predicate: Callable[[Stats], bool]) -> Stats:
        """Wait until ``predicate(pool.stats)`` is true; return those stats.

        ``await pool.wait_stats(lambda s: s.failed > 10)``: no polling loop. The predicate
        is tested now and again when an item settles or is retried, at most every 10 ms,
        so the returned stats may be a few items past the first moment it held. When the
        pool's tasks have ended it returns the last stats whether or not the predicate
        holds (test it again if that matters). Costs the pool nothing while nobody waits,
        and little while someone does.
        """
        return await self._engine.wait_stats(predicate)

    def report(self) -> Report:
        """The account: every failure and unfinished item, the successes not handed out.

        Complete once the pool's block has ended (also after a cancel or an error);
        inside the block it is a snapshot.
        """
        return self._engine.report()


def new_pool(engine: Engine) -> Pool[Any]:
    """The facade of ``engine`` (the one way a :class:`Pool` is made)."""
    pool: Pool[Any] = object.__new__(Pool)
    pool._engine = engine
    return pool


def _length(feed: object) -> int | None:
    """``len(feed)`` when the input knows it (a list, a range...), else None."""
    if isinstance(feed, Sized) and not isinstance(feed, AsyncIterable):
        try:
            return len(feed)
        except TypeError:
            return None
    return None


@asynccontextmanager
async def running(
    engine: Engine, feed: Iterable[Any] | AsyncIterable[Any] | None = None
) -> AsyncIterator[Pool[Any]]:
    """Run the pool around the caller's block (see the module docstring).

    Errors come out as they were raised: the caller's own exception is the very object
    it raised (a group stays the group it was), an exception from ``feed`` is raised
    bare once the pool has stopped and settled, and nursery groups that only wrap one
    real error (plus cancellations) are unwrapped.
    """
    if engine.started:
        raise RuntimeError("a pool runs once: call conveyor.open_pool(...) again for a new one")
    engine.started = True
    engine.now = trio.lowlevel.current_clock().current_time
    engine.t0 = trio.current_time()
    engine.throughput.observe(engine.t0, 0)
    if trio.current_effective_deadline() == -math.inf:
        engine.stopping = True  # opened in a cancelled scope: start no attempt at all
    engine.open_observers(engine.total if engine.total is not None else _length(feed))
    pool = new_pool(engine)
    error: BaseException | None = None
    try:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch, engine)
                for observer in engine.snapshots:
                    nursery.start_soon(engine.snapshot, observer)
                # The pool's tasks see this nursery as the place for work that
                # outlives a cancelled attempt (see _linger); the caller's block does not.
                engine.linger_nursery = nursery
                token = _linger.current.set(nursery)
                try:
                    nursery.start_soon(_run_tasks, engine, feed)
                finally:
                    _linger.current.reset(token)
                try:
                    yield pool
                except BaseException as exc:
                    engine.caller_error = exc
                    engine.stop()
                    raise
                if feed is None:
                    engine.close()
        except BaseExceptionGroup as group:
            error = sole_error(group, engine.caller_error)
            if error is None:
                raise
    finally:
        engine.caller_error = None
        engine.finalize()
        engine.tell_closed()
    if engine.feed_error is not None and (error is None or isinstance(error, trio.Cancelled)):
        # An error from `items` is the caller's own: a cancel must not swallow it.
        error, engine.feed_error = engine.feed_error, None
    if error is not None:
        # Raised outside the `except` so the group does not become its __context__:
        # callers write `except ValueError`, not `except* ValueError`.
        try:
            raise error
        finally:
            error = None


async def _run_tasks(engine: Engine, feed: Iterable[Any] | AsyncIterable[Any] | None) -> None:
    own_timeout = getattr(engine.fn, "_conveyor_timed", None)
    if own_timeout is not None and engine.timeout is not None:
        # in_process times its attempts itself, from the moment a worker process is
        # ready (starting one is not counted); see conveyor._offload.in_process.
        engine.fn, engine.timeout = own_timeout(engine.timeout), None
    try:
        with engine.inner_scope:
            async with trio.open_nursery() as nursery:
                engine.nursery = nursery
                engine.spawn_workers()  # for items submitted before this task ran
                nursery.start_soon(engine.scheduler)
                if feed is not None:
                    nursery.start_soon(engine.feed, feed)
    finally:
        engine.nursery = None
        engine.tasks_done = True
        engine.t_end = trio.current_time()
        engine.watch_scope.cancel()
        engine.end_periodic()
        engine.end_output()


async def _watch(engine: Engine) -> None:
    """Stop the pool when a cancel from outside reaches it.

    The workers run in a shielded scope, so they do not see that cancel themselves.
    This task waits with an abort callback, which trio calls the instant the cancel is
    delivered (before any other task runs again): it sets ``_stopping`` there, so no
    worker starts another attempt, even one whose previous attempt finished in the
    same scheduling round. The rest of :meth:`stop` follows when this task runs.
    """

    def abort(_: Any) -> trio.lowlevel.Abort:
        if not engine.watch_scope.cancel_called:  # not our own end of the pool
            engine.stopping = True
        return trio.lowlevel.Abort.SUCCEEDED

    with engine.watch_scope:
        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        except BaseException:
            if not engine.watch_scope.cancel_called:
                engine.stop()  # cancelled from outside: stop, with the configured drain
            raise




def sole_error(
    group: BaseExceptionGroup[BaseException], caller_error: BaseException | None
) -> BaseException | None:
    """What to raise for a nursery group, or None to raise the group as it is.

    The caller's own exception, when the group holds nothing else but cancellations:
    the very object raised, a group kept whole (trio's nurseries may copy the groups they
    pass through, but never the leaves, so it is recognised by its leaves). Otherwise the
    one real error (ignoring Cancelled), or a Cancelled if that is all there is.
    """
    leaves = list(_leaves(group))
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if caller_error is not None and real:
        mine = {id(e) for e in _leaves(caller_error)}
        if all(id(e) in mine for e in real):
            return caller_error
    if len(real) == 1:
        return real[0]
    if not real and leaves:
        return leaves[0]
    return None


def _leaves(error: BaseException) -> Iterable[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for sub in error.exceptions:
            yield from _leaves(sub)
    else:
        yield error



