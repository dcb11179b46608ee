"""The three ways in: `run` (all at once), `map` (a stream of records), `open_pool` (by hand).

All three share the same keyword-only options, typed once (:class:`PoolOptions`, with their
defaults, in ``_pool_options.py``), and check them at the call, before any work starts.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sized
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from typing import Any, ClassVar, Generic, NoReturn, TypeVar, Unpack, final

import trio

from ._engine import Engine
from ._final import NoPublicConstructor
from ._host import BareHost, Entered, EnteredStream
from ._journal import JournalSpec, check_journal, journaled, open_journaled_pool, run_journaled
from ._limits import build_limits
from ._observe import Observer
from ._options import check_bool, check_count, check_fn, check_items, check_options, invalid
from ._outbox import OrderedRecords, Records
from ._pool import Pool, running
from ._pool_options import PoolOptions, check_name, check_observers, resolve
from ._progress import Progress
from ._records import Record, Report

__all__ = ["MapStream", "map", "open_pool", "run"]

T = TypeVar("T")

Items = Iterable[Any] | AsyncIterable[Any]


def default_buffer(workers: int) -> int:
    """The work channel's size when ``buffer`` is not given: ``max(256, workers)``.

    Big enough that workers find the next item waiting and the feeder refills it in
    batches, so a task switch is not paid per item (measured with callgrind on no-op
    items: 64 costs 1.2x the instructions per item of 256); small enough to keep memory
    bounded.
    """
    return max(256, workers)


def make_engine(
    fn: Callable[[Any], Awaitable[T]],
    options: PoolOptions,
    *,
    total: int | None = None,
    outbox_limit: int | None = None,
    ordered: bool = False,
) -> Engine:
    """The engine of ``fn`` with ``options`` (resolved: every option is there), checked."""
    workers, buffer = options["workers"], options["buffer"]
    check_fn(fn)
    check_options(workers=workers, buffer=buffer, retry=options["retry"],
                  timeout=options["timeout"], drain=options["drain"])
    check_name(options["name"])
    observers = check_observers(options["observers"])
    limits, per_key, adaptive = build_limits(
        limiter=options["limiter"], rate=options["rate"], per_key=options["per_key"],
        adaptive=options["adaptive"],
    )
    engine = Engine(
        fn,
        workers=workers,
        buffer=default_buffer(workers) if buffer is None else buffer,
        retry=options["retry"],
        timeout=options["timeout"],
        drain=options["drain"],
        outbox_limit=outbox_limit,
        ordered=ordered,
        limits=limits,
        per_key=per_key,
        adaptive=adaptive,
        name=options["name"],
        observers=with_progress(observers, options["progress"]),
    )
    engine.total = total  # PoolInfo.total: a gated or journaled feed has no len()
    return engine


def with_progress(observers: tuple[Observer, ...], progress: object) -> tuple[Observer, ...]:
    """The observers, and the progress line (``progress=``) as one more of them."""
    if progress is True:
        progress = Progress()
    if progress is False:
        return observers
    if isinstance(progress, Progress):
        return (progress, *observers)
    raise invalid("progress", progress, "True, False or a conveyor.Progress",
                  "progress=True", kind=TypeError)


def items_total(items: Items) -> int | None:
    """The number of items when ``items`` knows it (a list, a range...), for progress."""
    if isinstance(items, Sized) and not isinstance(items, AsyncIterable):
        try:
            return len(items)
        except TypeError:
            return None
    return None


async def run(
    fn: Callable[[Any], Awaitable[T]],
    items: Items,
    **options: Unpack[PoolOptions],
) -> Report:
    """Run ``await fn(item)`` for every item, ``workers`` at a time, and return the account.

    Args:
        fn: an ``async def fn(item)``; its return value is the item's value. Wrap a sync
            function with :func:`conveyor.in_thread` or :func:`conveyor.in_process`.
        items: any iterable or async iterable, consumed lazily as the work channel makes
            room (a million items never sit in memory at once).
        options: keyword only, each optional: ``workers``, ``buffer``,
            ``retry``, ``timeout``, ``drain``, ``limiter``, ``rate``, ``per_key``,
            ``adaptive``, ``progress``, ``journal``, ``key``, ``name``, ``observers``.
            What each does and its default: :class:`conveyor.PoolOptions`. A name that
            is not an option raises TypeError.

    Returns:
        A :class:`conveyor.Report` with every ``Succeeded``, ``Failed`` and (after a stop)
        ``Unfinished`` item. With a journal, ``succeeded`` also holds the items taken from
        it (as they are taken from ``items``), while ``stats`` counts this run's work only.

    Stopping: when the caller's cancel scope or deadline fires, or KeyboardInterrupt
    arrives, the run stops taking items and starts no queued item or retry; attempts
    already running get ``drain`` seconds to finish, then they are cancelled; then the
    cancel (or exception) propagates. A cancelled call returns no value, so to keep the
    account of a stopped run use :func:`open_pool` and ``pool.report()``.

    Errors: exceptions from ``fn`` never escape: they are retried or recorded as
    ``Failed``. An exception from ``items`` itself (the caller's own code) is raised as it
    is, not wrapped in an ExceptionGroup.
    """
    resolved = resolve("run", options)
    check_items(items)
    journal_spec = check_journal(resolved["journal"], resolved["key"])
    pool = make_engine(fn, resolved, total=items_total(items))
    if journal_spec is not None:
        return await run_journaled(pool, items, journal_spec)
    async with running(pool, items):
        pass
    return pool.report()


def open_pool(
    fn: Callable[[Any], Awaitable[T]],
    **options: Unpack[PoolOptions],
) -> AbstractAsyncContextManager[Pool[T]]:
    """Open a pool and feed it by hand; the options (:class:`conveyor.PoolOptions`) are
    those of :func:`run`.

    ::

        async with conveyor.open_pool(fetch, workers=20) as pool:
            for url in urls:
                await pool.submit(url)      # waits while the work channel is full
            pool.close()                    # optional: leaving the block closes it too
            async for record in pool.results():
                ...
        report = pool.report()              # also after a cancel or an error

    Leaving the block normally closes intake and waits until every accepted item has
    settled. Leaving it by an exception or a cancel stops the pool like
    :meth:`Pool.stop` (with the ``drain`` grace); the items still outstanding settle as
    ``Unfinished``, and the exception propagates as it was raised.

    With ``journal=``: an item submitted that the journal holds as succeeded is not run: it
    settles at once, with its stored value, in ``results()`` like the others; the journal
    records every item as it settles (read or not), and is committed when the block ends,
    however it ends.
    """
    resolved = resolve("open_pool", options)
    journal_spec = check_journal(resolved["journal"], resolved["key"])
    pool = make_engine(fn, resolved)
    return _OpenPool(pool, journal_spec)


class _OpenPool(Entered, Generic[T]):
    """What :func:`open_pool` returns: enter it once with ``async with``."""

    __slots__ = ("_journal", "_pool")

    def __init__(self, pool: Engine, journal: JournalSpec | None) -> None:
        self._pool = pool
        self._journal = journal
        self._cm: AbstractAsyncContextManager[Pool[T]] | None = None

    async def __aenter__(self) -> Pool[T]:
        pool = self._pool
        if pool.started:
            raise RuntimeError("a pool runs once: call conveyor.open_pool(...) again for a new one")
        cm = running(pool) if self._journal is None else open_journaled_pool(pool, self._journal)
        facade = await cm.__aenter__()
        self._cm = cm
        return facade


def map(  # the contract's name; it shadows the builtin inside this module only
    fn: Callable[[Any], Awaitable[T]],
    items: Items,
    *,
    ordered: bool = False,
    window: int | None = None,
    **options: Unpack[PoolOptions],
) -> MapStream[T]:
    """Stream a record for every item as it settles; the options
    (:class:`conveyor.PoolOptions`) are those of :func:`run`, plus ``ordered`` and ``window``.

    ``ordered=False`` yields records as they complete. ``ordered=True`` yields them in
    input order through a reorder window of ``window`` items (default
    ``2 * workers + buffer``): the pool never runs more than ``window`` items ahead of
    the oldest one not yet yielded, so memory stays bounded.

    Two forms::

        async for record in conveyor.map(fn, items):          # simple
            ...

        async with conveyor.map(fn, items) as records:         # structured
            async for record in records:
                ...

    Successes that were yielded are not kept, so streaming a million items holds only
    the window. Leaving the loop early stops the pool: with the ``async with`` form that
    happens, and is waited for, when the block ends; with the bare ``async for`` form
    (a ``break``, an exception in the loop body) no attempt starts once the loop is left,
    and the pool's tasks end promptly (use ``async with`` when you need to know it has
    ended). The bare form's pool runs in a system task, outside the caller's cancel
    scopes: a cancel stops it the instant it reaches the loop's wait for a record, or when
    the loop next asks for one; the ``async with`` form's pool is inside them.

    With ``journal=``: the items the journal holds as succeeded are not run, and are
    yielded all the same (in their place with ``ordered=True``) with their stored value;
    the journal records every item as it settles and is committed however the stream ends
    (the end, a ``break``, an error, a cancel, Ctrl-C).
    """
    resolved = resolve("map", options)
    workers, buffer = resolved["workers"], resolved["buffer"]
    check_items(items)
    journal_spec = check_journal(resolved["journal"], resolved["key"])
    check_bool("ordered", ordered)
    check_count("window", window, minimum=1, allow_none=True)
    if window is not None and not ordered:
        raise invalid("window", window, "None when ordered=False (the window bounds how far "
                      "past the oldest unsettled item an ordered map runs)",
                      f"ordered=True, window={window}")
    check_fn(fn)
    check_options(workers=workers, buffer=buffer, retry=resolved["retry"],
                  timeout=resolved["timeout"], drain=resolved["drain"])
    size = default_buffer(workers) if buffer is None else buffer
    pool = make_engine(
        fn, resolved, total=items_total(items),
        # Unordered: workers wait when this many records are unread (bounded memory).
        # Ordered: the window bounds everything already.
        outbox_limit=None if ordered else workers + size,
        ordered=ordered,
    )
    if ordered and window is None:
        window = 2 * workers + size
    return MapStream[T]._create(pool, items, window if ordered else None, journal_spec)


@final
class MapStream(EnteredStream, Generic[T], metaclass=NoPublicConstructor):
    """What :func:`conveyor.map` returns: iterate it, or enter it with ``async with``.

    Only :func:`conveyor.map` makes one (``MapStream(...)`` raises TypeError).
    """

    _factory: ClassVar[str] = "conveyor.map(fn, items, ...)"

    def __init__(
        self, pool: Engine, items: Items, window: int | None, journal: JournalSpec | None = None
    ) -> None:
        self._pool = pool
        self._journal = journal
        self._items = items
        self._window = window
        self._cm: AbstractAsyncContextManager[AsyncIterator[Record]] | None = None
        self._used = False

    def _feed_and_records(self) -> tuple[Items, Records]:
        if self._used:
            raise RuntimeError("a conveyor.map stream can be iterated once")
        self._used = True
        pool = self._pool
        if self._window is None:
            return self._items, pool.box.reader()
        window = trio.Semaphore(self._window)
        return _gated(self._items, window), pool.box.ordered_reader(window)

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[AsyncIterator[Record]]:
        feed, records = self._feed_and_records()
        pool = self._pool
        async with (
            journaled(pool, self._journal, feed) as fed,
            running(pool, fed),
            aclosing(records),
        ):
            yield records
            if not pool.tasks_done:
                pool.stop()  # the caller left before the end: take and start nothing more

    def __aiter__(self) -> AsyncIterator[Record]:
        feed, records = self._feed_and_records()
        host = _Host(self._pool, feed, self._journal)
        reader: Records
        if isinstance(records, OrderedRecords):
            reader = _BareOrdered(self._pool.box, records.window)
        else:
            reader = _BareUnordered(self._pool.box)
        reader._host = host
        host.start()
        return reader

    def report(self) -> Report:
        """The account of the stream's pool (complete once it has ended)."""
        return self._pool.report()


class _Host(BareHost):
    """The pool of a bare ``async for record in conveyor.map(...)`` loop, in a system task
    (see ``_host``); the caller's loop reads the pool's records directly (no channel between
    them: it costs what the ``async with`` form costs)."""

    __slots__ = ("_feed", "_journal", "pool")
    task_name = "conveyor.map"

    def __init__(self, pool: Engine, feed: Items, journal: JournalSpec | None) -> None:
        super().__init__()
        self.pool = pool
        self._journal = journal
        self._feed: Items | None = feed

    async def body(self) -> None:
        feed, self._feed = self._feed, None
        async with journaled(self.pool, self._journal, feed) as fed, running(self.pool, fed):
            pass

    def ended(self) -> None:
        # The reader waits for the pool's end; if the pool never ran (the journal was
        # refused), that end is now.
        self.pool.end_output()

    def halt(self) -> None:
        self.pool.stopping = True
        self.scope.cancel()

    def left(self, pending: dict[int, Record] | None) -> None:
        """The caller left its loop: no new attempt from now on, then stop the pool.

        Called from ``__del__``, so it only sets a flag here and asks trio to do the rest
        (run_sync_soon is the one trio call that is safe from a finaliser). ``pending``:
        records an ordered reader held back, which go back to the pool's report.
        """
        if not self.done.is_set():
            self.pool.stopping = True  # read by every worker before it starts an attempt
        try:
            self.token.run_sync_soon(self._stop, pending)
        except trio.RunFinishedError:
            self._stop(pending)

    def _stop(self, pending: dict[int, Record] | None) -> None:
        if pending:
            self.pool.box.give_back(pending)
        self.scope.cancel()


class _Bare:
    """The hooks of a reader used in the bare ``async for`` form (see :class:`_Host`)."""

    __slots__ = ()
    _host: _Host

    async def _end(self) -> NoReturn:
        await self._host.end()

    async def _interrupted(self) -> None:
        await self._host.interrupted()

    def _cancelled(self) -> None:
        # The pool runs outside the caller's cancel scopes: this reader is what the
        # caller's cancel reaches, so it stops the pool's attempts at that very instant.
        self._host.pool.stopping = True

    def __del__(self) -> None:
        host = getattr(self, "_host", None)
        if host is not None:
            host.left(getattr(self, "_pending", None))


class _BareUnordered(_Bare, Records):
    __slots__ = ("_host",)


class _BareOrdered(_Bare, OrderedRecords):
    __slots__ = ("_host",)


async def _gated(items: Items, window: trio.Semaphore) -> AsyncIterator[Any]:
    """Yield from ``items``, one window slot per item, taken before the item is."""
    if isinstance(items, AsyncIterable):
        async_iterator = aiter(items)
        while True:
            await window.acquire()
            try:
                item = await anext(async_iterator)
            except StopAsyncIteration:
                return
            yield item
    else:
        iterator = iter(items)
        while True:
            await window.acquire()
            try:
                item = next(iterator)
            except StopIteration:
                return
            yield item
