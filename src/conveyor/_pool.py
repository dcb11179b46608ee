"""The pool: workers fed by a memory channel, a retry scheduler, and the ledger.

Shape (see docs/design.md, "The task tree" and "The life of an item")::

    items / submit() ──► work channel ──► workers ──► outbox ──► results() / report()
                             ▲               │
                             └── scheduler ◄─┘  (a heap of retries by due time)

Task tree. ``Pool._running`` opens the *outer* nursery; the caller's ``async with`` block
runs in its body. It starts two tasks:

- ``_run_tasks``: the *inner* nursery (workers, retry scheduler, the feeder of ``items``),
  inside a shielded cancel scope. The shield is what makes a graceful drain possible: an
  outside cancel does not reach the workers directly, it goes through ``stop()``, which
  closes intake and then cancels the inner scope at once or after the ``drain`` grace.
- ``_watch``: sleeps until it is cancelled. If that cancel came from outside (the caller's
  scope, a deadline, an error in the caller's block), it calls ``stop()``.

The ledger is ``Pool._outstanding``: every accepted item is in it (keyed by its sequence
number, so in submission order) until it settles. The work channel's send side closes when
intake is closed and nothing is outstanding; the workers then see the channel end and exit.
Whatever is still outstanding when the tasks are gone (stopped, cancelled, crashed) settles
as ``Unfinished`` in ``_finalize``: nothing is dropped.
"""

from __future__ import annotations

import dataclasses
import heapq
import inspect
import math
import sys
import traceback
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
    Sized,
)
from contextlib import asynccontextmanager
from types import CoroutineType
from typing import Any, Generic, NoReturn, TypeVar

import trio
from trio.lowlevel import ParkingLot, checkpoint

from . import _linger
from ._errors import AttemptTimeout
from ._limits import Adaptive, Claim, Limit, PerKey
from ._logs import LOG, logger
from ._observe import Attempt, Observer, PoolInfo, overrides
from ._options import check_drain, check_sync_callable
from ._progress import Progress
from ._quantiles import Quantiles, Throughput
from ._records import Failed, Record, Report, Succeeded, Unfinished
from ._retry import Retry
from ._stats import Percentiles, Stats

__all__ = ["AttemptTimeout", "Pool"]

T = TypeVar("T")

# A worker that keeps finding items already in the channel takes them without a checkpoint
# (receive_nowait); after this many in a row it checkpoints anyway, so a task function that
# never awaits cannot starve the rest of the program or miss a cancel.
_STREAK = 64

# Queue-wait and attempt-latency quantiles measure every item of a small pool, then every
# 64th (by sequence number). A measured item costs ~12k instructions more (three clock reads,
# two histogram inserts): every 16th made a no-op item 4% dearer (callgrind), every 64th
# makes it 1.5%, and 1,024 + n/64 samples still give a steady p99.
_SAMPLE_ALL = 1024
_SAMPLE_MASK = 63

# wait_stats() tests its predicate at most this often (seconds): a snapshot costs tens of
# microseconds (quantiles), and testing it at every settle would slow a fast pool 3-4x.
_STATS_EVERY = 0.01


class _StoppedBeforeStart(BaseException):
    """Internal: the pool was stopped while this attempt waited for a limit."""


class _Job:
    """One accepted item on its way through the pool (reused across its attempts).

    ``enqueued``: when it (re-)entered the work channel, for sampled jobs only (queue
    wait). ``claim``: set while a per-key limit has resent it with a claim on its key.
    """

    __slots__ = (
        "attempt", "attempts", "claim", "enqueued", "item", "last_error", "seq", "started",
    )

    def __init__(self, item: Any, seq: int) -> None:
        self.item = item
        self.seq = seq
        self.attempts = 0
        self.last_error: BaseException | None = None
        self.claim: Claim | None = None
        self.enqueued = 0.0
        self.started = 0.0  # when its first attempt started (with a Retry budget only)
        self.attempt: Attempt | None = None  # the failed attempt, for attempt observers


class Pool(Generic[T]):
    """A running pool of workers, as given by :func:`conveyor.open_pool`.

    Feed it with :meth:`submit`, end intake with :meth:`close` (or leave the block), read
    records as they settle with :meth:`results`, and get the account with :meth:`report`,
    also after a cancel. Do not create it directly.
    """

    def __init__(
        self,
        fn: Callable[[Any], Awaitable[T]],
        *,
        workers: int,
        buffer: int,
        retry: Retry | None,
        timeout: float | None,
        drain: float,
        outbox_limit: int | None = None,
        ordered: bool = False,
        limits: tuple[Limit, ...] = (),
        per_key: PerKey[Any] | None = None,
        adaptive: Adaptive | None = None,
        progress: Progress | None = None,
        name: str = "pool",
        observers: Sequence[Observer] = (),
    ) -> None:
        self._fn = fn if inspect.iscoroutinefunction(fn) else _awaiting(fn)
        self._workers = workers
        self._spawned = 0  # worker tasks started so far (lazily, see _spawn_workers)
        self._linger_nursery: trio.Nursery | None = None  # see _linger
        self._nursery: trio.Nursery | None = None
        self._retry = retry
        self._timeout = timeout
        self._budget = None if retry is None else retry.budget
        self._drain = drain
        self._send, self._receive = trio.open_memory_channel[_Job](buffer)
        # Ledger: accepted and not yet settled, in submission order.
        self._outstanding: dict[int, _Job] = {}
        self._next_seq = 0
        self._intake_closed = False
        self._send_closed = False
        self._stopping = False
        self._started = False
        self._tasks_done = False
        # Retry scheduler: (due time, seq, job); seq breaks ties in submission order.
        self._heap: list[tuple[float, int, _Job]] = []
        # Retries that are due while fresh items wait in the channel: workers take these
        # first (a retry already holds its slot; it should not queue behind the backlog).
        self._due: deque[_Job] = deque()
        self._scheduler_lot = ParkingLot()
        # Settled records not handed out yet: (seq, record).
        # Records only; (seq, record) pairs when an ordered reader needs the sequence
        # number (one allocation less per item for everyone else).
        self._outbox: deque[Any] = deque()
        self._keep_seq = ordered
        self._outbox_limit = outbox_limit
        # Readers of the records waiting for the next one (tasks, woken by _wake_reader).
        self._reader_tasks: list[trio.lowlevel.Task] = []
        self._reader_waiting = False
        self._space_lot = ParkingLot()
        # Intake is gated on the ledger, not on the channel: at most `capacity` items are
        # outstanding, retries waiting for their backoff included (invariant 6). The
        # feeder of `items` waits for half the buffer to be worked off and then refills
        # it in one go, rather than waking once per item.
        self._capacity = buffer + workers
        self._feeder_low = self._capacity - max(1, buffer // 2)
        self._intake_lot = ParkingLot()
        self._intake_waiting = False
        self._intake_low = -1
        self._failed: list[Failed] = []
        self._unfinished: list[Unfinished] = []
        # Counters (plain ints: cheap on the hot path).
        self._submitted = 0
        self._succeeded = 0
        self._retried = 0
        self._attempts = 0
        self._in_flight = 0
        # Limits (see _limits.py): the plain ones stacked around each attempt, the per-key
        # one before them in its parking form.
        self._limits = limits
        self._per_key = per_key
        self._adaptive = adaptive
        self._limited = 0  # held by a worker waiting for a limit
        self._parked = 0  # parked by per_key (in its lines, or resent with a claim)
        self._claims_in_heap = 0  # of those, waiting in the heap for their due time
        # Observability: sampled quantiles, recent throughput, wait_stats() waiters.
        self._wait_q = Quantiles()
        self._latency_q = Quantiles()
        self._throughput = Throughput(window=10.0)
        self._stats_lot = ParkingLot()
        self._stats_waiting = False
        self._progress = progress
        self._progress_scope = trio.CancelScope()
        # The run's clock, read directly: trio.current_time() costs twice as much (it
        # looks the clock up each time), and the samples read it three times per item.
        self._now: Callable[[], float] = trio.current_time
        self._t0 = 0.0
        self._t_end: float | None = None
        self._inner_scope = trio.CancelScope(shield=True)
        self._watch_scope = trio.CancelScope()
        self._feed_scope = trio.CancelScope()
        self._caller_error: BaseException | None = None  # raised by the caller's block
        self._feed_error: Exception | None = None  # raised by `items`: re-raised at the end

        # The journal's intake gate for submit(): False when it settled the item itself.
        self._gate: Callable[[Any], bool] | None = None

        # Observers (see _observe): the log first. At start, each event's list holds the
        # bound methods of the observers that override it; empty lists cost nothing.
        self._name = name
        self._observers: tuple[Observer, ...] = (LOG, *observers)
        self._on_started: tuple[Callable[[Attempt], None], ...] = ()
        self._on_ended: tuple[Callable[[Attempt, BaseException | None, float], None], ...] = ()
        self._on_retry: tuple[Callable[[Attempt, Exception, float], None], ...] = ()
        self._on_succeeded: tuple[Callable[[Any], None], ...] = ()
        self._on_failed: tuple[Callable[[Failed], None], ...] = ()
        self._on_unfinished: tuple[Callable[[Unfinished], None], ...] = ()
        self._on_closed: tuple[Callable[[Report], None], ...] = ()
        self._snapshots: list[Observer] = []
        self._attempt_observed = False
        # Items with a sequence number below this get their queue wait measured (and the
        # rest every 64th); every item when an observer wants attempt events.
        self._sample_below = _SAMPLE_ALL

    # ------------------------------------------------------------------ intake

    async def submit(self, item: Any) -> None:
        """Hand ``item`` to the pool, waiting while it is full (backpressure).

        The pool is full when ``buffer + workers`` accepted items have not settled yet
        (those waiting for a retry count too); a settling item frees a slot.

        Raises:
            trio.ClosedResourceError: intake is closed (:meth:`close` or :meth:`stop`).

        If the call is cancelled, the item was not accepted and will not be processed.
        """
        if self._gate is not None and not self._intake_closed and not self._gate(item):
            return
        if len(self._outstanding) >= self._capacity:
            await self._wait_for_room(self._capacity - 1)
        job = self._accept(item)
        try:
            await self._send.send(job)
        except BaseException as exc:
            self._unaccept(job)
            if isinstance(exc, trio.ClosedResourceError):
                raise trio.ClosedResourceError(self._closed_message()) from None
            raise

    def submit_nowait(self, item: Any) -> None:
        """Hand ``item`` to the pool if the work channel has room now.

        Raises:
            trio.WouldBlock: the pool is full; the item was not accepted.
            trio.ClosedResourceError: intake is closed.
        """
        if self._gate is not None and not self._intake_closed and not self._gate(item):
            return
        if len(self._outstanding) >= self._capacity and not self._intake_closed:
            raise trio.WouldBlock
        job = self._accept(item)
        try:
            self._send.send_nowait(job)
        except BaseException as exc:
            self._unaccept(job)
            if isinstance(exc, trio.ClosedResourceError):
                raise trio.ClosedResourceError(self._closed_message()) from None
            raise

    def close(self) -> None:
        """No more items: the pool finishes what it holds, then ends. Idempotent."""
        self._intake_closed = True
        self._wake_intake()
        if not self._outstanding:
            self._close_channel()

    def stop(self, drain: float | None = None) -> None:
        """Stop now: take no more items, start no queued item or retry, end the pool.

        Attempts already running get ``drain`` seconds to finish (default: the pool's
        ``drain`` option, 0 unless set), then they are cancelled. Everything not settled by
        then settles as ``Unfinished``. Calling it again can only shorten the grace.
        """
        if drain is not None:
            check_drain(drain)
        grace = self._drain if drain is None else drain
        self._stopping = True
        self._intake_closed = True
        self._feed_scope.cancel()
        self._wake_intake()
        self._space_lot.unpark_all()  # workers waiting for a reader: stop waiting
        if grace <= 0:
            self._inner_scope.cancel()
        else:
            deadline = trio.current_time() + grace
            self._inner_scope.deadline = min(self._inner_scope.deadline, deadline)
        self._close_channel()

    def _closed_message(self) -> str:
        how = "stop()" if self._stopping else "close()"
        return f"the pool takes no more items: {how} was called or its block ended"

    async def _wait_for_room(self, low: int) -> None:
        """Wait until fewer than ``capacity`` items are outstanding (woken at ``low``)."""
        while len(self._outstanding) >= self._capacity:
            if self._intake_closed:
                raise trio.ClosedResourceError(self._closed_message())
            self._intake_low = max(self._intake_low, low)
            self._intake_waiting = True
            await self._intake_lot.park()

    def _wake_intake(self) -> None:
        self._intake_waiting = False
        self._intake_low = -1
        self._intake_lot.unpark_all()

    def _accept(self, item: Any) -> _Job:
        if self._intake_closed:
            raise trio.ClosedResourceError(self._closed_message())
        if not self._started:
            raise RuntimeError("submit() is only possible inside the pool's `async with` block")
        return self._take(item)

    def _unaccept(self, job: _Job) -> None:
        del self._outstanding[job.seq]
        self._submitted -= 1
        if self._intake_closed and not self._outstanding:
            self._close_channel()

    def _close_channel(self) -> None:
        if not self._send_closed:
            self._send_closed = True
            self._send.close()
            self._scheduler_lot.unpark_all()

    async def _feed(self, items: Iterable[Any] | AsyncIterable[Any]) -> None:
        """Accept every item of ``items``, lazily, as the channel makes room; then close.

        Room is awaited *before* the next item is taken, and an item taken is put in the
        ledger before anything else can happen, whatever intake's state: an item taken from
        ``items`` is always accounted for (if the pool stopped meanwhile, it settles as
        ``Unfinished`` with no attempt). An exception from ``items`` stops the pool like
        :meth:`stop` and is raised from the pool's block once everything has settled.
        """
        with self._feed_scope:
            try:
                if isinstance(items, AsyncIterable):
                    await self._feed_async(items)
                else:
                    await self._feed_sync(items)
            except trio.ClosedResourceError:
                # stop() closed the channel. The item taken but not sent stays in the
                # ledger and settles as Unfinished: it was taken, so it is accounted.
                return
            except Exception as exc:
                self._feed_error = exc
                self.stop()
                return
        self.close()

    def _take(self, item: Any) -> _Job:
        """Put an item in the ledger (never refused: for ``items``, or after submit's checks)."""
        seq = self._next_seq
        self._next_seq = seq + 1
        job = _Job(item, seq)
        if seq < self._sample_below or not seq & _SAMPLE_MASK:
            job.enqueued = self._now()
        self._outstanding[seq] = job
        self._submitted += 1
        if self._spawned < self._workers:
            self._spawn_workers()
        return job

    async def _feed_async(self, items: AsyncIterable[Any]) -> None:
        send = self._send
        outstanding = self._outstanding
        capacity = self._capacity
        low = self._feeder_low
        take = self._take
        iterator = aiter(items)
        try:
            while True:
                if len(outstanding) >= capacity:
                    await self._wait_for_room(low)
                try:
                    item = await anext(iterator)
                except StopAsyncIteration:
                    break
                await send.send(take(item))
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _feed_sync(self, items: Iterable[Any]) -> None:
        # The hot loop of intake: _take inlined (this task only ever runs between its own
        # awaits, so nothing else changes the ledger's sequence under it).
        send = self._send
        outstanding = self._outstanding
        capacity = self._capacity
        low = self._feeder_low
        workers = self._workers
        spawning = self._spawned < workers
        sync_iterator = iter(items)
        send_nowait = send.send_nowait
        current_time = self._now
        sample_below = self._sample_below
        while True:
            if len(outstanding) >= capacity:
                await self._wait_for_room(low)
            try:
                item = next(sync_iterator)
            except StopIteration:
                break
            seq = self._next_seq
            self._next_seq = seq + 1
            job = _Job(item, seq)
            if seq < sample_below or not seq & _SAMPLE_MASK:
                job.enqueued = current_time()
            outstanding[seq] = job
            self._submitted += 1
            if spawning:
                self._spawn_workers()
                spawning = self._spawned < workers
            try:
                send_nowait(job)
            except trio.WouldBlock:
                await send.send(job)

    # ------------------------------------------------------------------ journal seam

    def _observe_settled(self, observe: Callable[[Record], None]) -> None:
        """Call ``observe(record)`` as each item settles as Succeeded or Failed in a worker
        (the journal's writer); before the pool starts. Costs nothing when not used: the
        outbox becomes a deque whose ``append`` also calls ``observe``."""
        current = self._outbox
        if isinstance(current, _ObservedOutbox):
            current.observers.append(observe)
            return
        outbox = _ObservedOutbox(current)
        outbox.observers = [observe]
        outbox.keep_seq = self._keep_seq
        self._outbox = outbox

    def _settle_unrun(self, record: Succeeded[Any] | Failed) -> None:
        """Settle an item without running it: a success taken from a journal (not this
        run's work: not in the stats), or an item refused before its first attempt
        (``Failed``, attempts 0, counted as submitted and failed). It takes its place in the
        output like any record (in order, for an ordered reader); ``observe`` does not see
        it. Also once intake has closed: an item already taken from ``items`` is settled."""
        if not self._started:
            raise RuntimeError("submit() is only possible inside the pool's `async with` block")
        seq = self._next_seq
        self._next_seq = seq + 1
        if record.index != seq:
            record = dataclasses.replace(record, index=seq)
        if type(record) is Failed:
            self._submitted += 1
            self._failed.append(record)
            for on_failed in self._on_failed:
                _notify(on_failed, record)
        deque.append(self._outbox, (seq, record) if self._keep_seq else record)
        if self._reader_waiting:
            self._wake_reader()
        if self._stats_waiting:
            self._wake_stats()

    # ------------------------------------------------------------------ workers

    async def _worker(self) -> None:
        # A worker may be started from the caller's task (submit() starts them lazily),
        # whose context does not name the pool's linger nursery: name it here, for this
        # task only (each task runs in its own copy of the context).
        _linger.current.set(self._linger_nursery)
        receive = self._receive.receive
        receive_nowait = self._receive.receive_nowait
        fn = self._fn
        # Timed attempts (a per-attempt timeout or a Retry budget) go through _timed;
        # the others call fn directly.
        timed = self._timeout is not None or self._budget is not None
        outstanding = self._outstanding
        outbox = self._outbox
        outbox_limit = self._outbox_limit
        keep_seq = self._keep_seq
        due = self._due
        coroutine_type = CoroutineType
        # Limits and stats: with no limit configured, the only per-item additions are two
        # tests and, for sampled items, two clock reads and two histogram inserts.
        per_key = self._per_key
        # Attempt observers take the guarded path too: the plain one stays as it is.
        guarded = bool(self._limits) or per_key is not None or self._attempt_observed
        key_token: object | None = None
        start = 0.0
        current_time = self._now
        sample_below = self._sample_below
        wait_add = self._wait_q.add
        latency_add = self._latency_q.add
        streak = 0
        while True:
            try:
                job = due.popleft() if due else receive_nowait()
            except trio.WouldBlock:
                try:
                    job = await receive()
                except trio.EndOfChannel:
                    return
                streak = 0
            except trio.EndOfChannel:
                return
            else:
                streak += 1
                if streak >= _STREAK:
                    streak = 0
                    await checkpoint()
            if self._stopping:
                return  # leave it outstanding: it settles as Unfinished
            if per_key is not None:
                # Parking form: a busy key keeps the item, not this worker (see _limits).
                key_token = await self._admit(per_key, job)
                if key_token is None:
                    continue
            seq = job.seq
            sample = seq < sample_below or not seq & _SAMPLE_MASK
            if sample:
                start = current_time()
                wait_add(start - job.enqueued)
            try:
                if guarded:
                    value = await self._guarded_attempt(job, key_token, sample)
                else:
                    job.attempts += 1
                    self._attempts += 1
                    self._in_flight += 1
                    try:
                        if not timed:
                            value = await fn(job.item)  # the hot path: no extra frame
                        else:
                            value = await self._timed(job)
                    finally:
                        self._in_flight -= 1
                        if sample:
                            latency_add(current_time() - start)
            except Exception as error:
                self._attempt_failed(job, error)
            except _StoppedBeforeStart:
                return  # leave it outstanding: it settles as Unfinished
            except BaseException as error:
                # Cancelled, KeyboardInterrupt, SystemExit...: never retried, never kept
                # from propagating. The item stays outstanding and settles as Unfinished.
                if not isinstance(error, trio.Cancelled):
                    job.last_error = error
                raise
            else:
                if type(value) is coroutine_type:  # a forgotten await
                    self._attempt_failed(job, _not_awaited(value))
                    continue
                del outstanding[seq]
                self._succeeded += 1
                record = Succeeded(job.item, value, job.attempts, seq)
                outbox.append((seq, record) if keep_seq else record)
                if self._reader_waiting:
                    self._wake_reader()
                if self._stats_waiting:
                    self._wake_stats()
                if self._intake_waiting and len(outstanding) <= self._intake_low:
                    self._wake_intake()
                    # Let the feeder refill before this worker empties the channel, or
                    # the other workers find it empty and park (a task switch per item).
                    streak = 0
                    await checkpoint()
                elif self._intake_closed and not outstanding:
                    self._close_channel()
            # Streaming with a bounded outbox (map): wait for the reader. A `while`, since
            # a wake-up is shared by every waiting worker (found by the memory benchmark:
            # with `if`, a slow reader let the outbox grow without limit).
            while outbox_limit is not None and len(outbox) >= outbox_limit:
                if self._stopping:
                    break
                await self._space_lot.park()

    async def _admit(self, per_key: PerKey[Any], job: _Job) -> object | None:
        """Ask the per-key limit for ``job``: a token, or None (parked, or failed)."""
        claim = job.claim
        if claim is not None:
            job.claim = None  # a claim is used once
            self._parked -= 1
        try:
            token = await per_key.admit(job.item, job, self._resend, claim)
        except Exception as error:
            # The key function raised on this item: no attempt was made, and it would
            # raise again; the item fails at once.
            error.add_note("conveyor: failed before an attempt: its PerKey key raised")
            self._give_up(job, error)
            return None
        if token is None:
            self._parked += 1
        return token

    def _resend(self, job: _Job, claim: Claim, due: float) -> None:
        """The per-key limit hands a parked job back: into the channel at ``due``."""
        job.claim = claim
        self._claims_in_heap += 1
        heapq.heappush(self._heap, (due, job.seq, job))
        self._scheduler_lot.unpark_all()

    async def _guarded_attempt(self, job: _Job, key_token: object | None, sample: bool) -> Any:
        """One attempt inside the limits: acquired in order, released in reverse order.

        Cancellation-safe: a cancelled acquire holds nothing, and whatever was acquired is
        released in the ``finally``. A limit's wait counts as ``limited``, not in flight.
        """
        item = job.item
        held: list[tuple[Limit, object]] = []
        error: BaseException | None = None
        try:
            if self._limits:
                self._limited += 1
                try:
                    for limit in self._limits:
                        held.append((limit, await limit.acquire(item)))
                finally:
                    self._limited -= 1
            if self._stopping:
                # stop() came while this waited: it starts no queued item, this one included.
                raise _StoppedBeforeStart
            # The attempt starts only now: one cancelled while waiting for a limit is not
            # counted (its item settles as Unfinished with the attempts it really made).
            job.attempts += 1
            self._attempts += 1
            self._in_flight += 1
            start = self._now() if sample else 0.0
            attempt = None
            if self._attempt_observed:
                attempt = Attempt(job.seq, item, job.attempts, start - job.enqueued, start)
                for on_started in self._on_started:
                    _notify(on_started, attempt)
            try:
                if self._timeout is None and self._budget is None:
                    value = await self._fn(item)
                else:
                    value = await self._timed(job)
            except Exception as exc:
                error = exc
                job.attempt = attempt  # its end is told by _attempt_failed, after the retry
                raise
            except BaseException as exc:
                error = exc
                if attempt is not None:
                    self._attempt_ended(attempt, exc)
                raise
            finally:
                self._in_flight -= 1
                if sample:
                    self._latency_q.add(self._now() - start)
            if attempt is not None:
                self._attempt_ended(attempt, None)
            return value
        finally:
            for limit, token in reversed(held):
                limit.release(token, error)
            if key_token is not None:
                assert self._per_key is not None
                self._per_key.release(key_token, error)
            error = None  # no reference cycle through the traceback

    async def _timed(self, job: _Job) -> Any:
        """``fn(item)`` within the attempt's time, else :class:`AttemptTimeout`.

        The attempt's time ends at the per-attempt ``timeout`` or at the end of the item's
        ``Retry.budget`` (counted from the start of its first attempt), whichever is first.
        """
        now = self._now()
        if job.attempts == 1:
            job.started = now
        timeout = self._timeout
        deadline = math.inf if timeout is None else now + timeout
        budget = self._budget
        cut_by_budget = False
        if budget is not None and job.started + budget < deadline:
            deadline = job.started + budget
            cut_by_budget = True
        with trio.move_on_at(deadline):
            return await self._fn(job.item)
        # only reached when the scope's own deadline cancelled the attempt
        if cut_by_budget:
            raise AttemptTimeout(
                f"attempt cut at the end of the item's budget={budget} s (Retry.budget), "
                f"{job.attempts} attempt(s) in"
            )
        raise AttemptTimeout(f"attempt took longer than timeout={timeout} s")

    def _wake_stats(self) -> None:
        self._stats_waiting = False
        self._stats_lot.unpark_all()

    async def wait_stats(self, predicate: Callable[[Stats], bool]) -> Stats:
        """Wait until ``predicate(pool.stats)`` is true; return those stats.

        ``await pool.wait_stats(lambda s: s.failed > 10)``: no polling loop. The predicate
        is tested now and again when an item settles or is retried, at most every 10 ms,
        so the returned stats may be a few items past the first moment it held. When the
        pool's tasks have ended it returns the last stats whether or not the predicate
        holds (test it again if that matters). Costs the pool nothing while nobody waits,
        and little while someone does.
        """
        check_sync_callable("wait_stats predicate", predicate, "a function stats -> bool")
        await checkpoint()
        while True:
            stats = self.stats
            if _truth(predicate, stats) or self._tasks_done:
                return stats
            tested = trio.current_time()
            self._stats_waiting = True
            await self._stats_lot.park()
            if not self._tasks_done:
                await trio.sleep_until(tested + _STATS_EVERY)

    def _wake_reader(self) -> None:
        self._reader_waiting = False
        tasks = self._reader_tasks
        if tasks:
            self._reader_tasks = []
            for task in tasks:
                trio.lowlevel.reschedule(task)

    def _attempt_ended(self, attempt: Attempt, error: BaseException | None) -> None:
        duration = self._now() - attempt.started
        for on_ended in self._on_ended:
            _notify(on_ended, attempt, error, duration)

    def _attempt_failed(self, job: _Job, error: Exception) -> None:
        """An attempt raised ``error``: schedule a retry, or settle the item as Failed.

        An error the policy would retry while the pool is stopping leaves the item
        outstanding: it settles as ``Unfinished`` with ``error`` as its last error (it did
        not give up; the pool did).
        """
        job.last_error = error
        attempt, job.attempt = job.attempt, None
        retry = self._retry
        if retry is not None and retry.should_retry(error, job.attempts):
            if self._stopping:
                if attempt is not None:
                    self._attempt_ended(attempt, error)
                return
            delay = retry.delay(error, job.attempts)
            budget = self._budget
            if budget is not None and trio.current_time() + delay >= job.started + budget:
                error.add_note(
                    f"conveyor: not retried: the next attempt would start after the item's "
                    f"budget={budget} s (Retry.budget) has run out"
                )
                if attempt is not None:
                    self._attempt_ended(attempt, error)
                self._give_up(job, error)
                return
            self._retried += 1
            if self._on_retry:
                told = attempt or Attempt(job.seq, job.item, job.attempts, math.nan, math.nan)
                for on_retry in self._on_retry:
                    _notify(on_retry, told, error, delay)
            if attempt is not None:
                self._attempt_ended(attempt, error)
            if delay <= 0:
                # Due now: straight to the front of the work, where this worker (which is
                # not waiting on the channel) looks first; no scheduler round trip.
                seq = job.seq
                if seq < self._sample_below or not seq & _SAMPLE_MASK:
                    job.enqueued = self._now()
                self._due.append(job)
            else:
                heapq.heappush(self._heap, (trio.current_time() + delay, job.seq, job))
                self._scheduler_lot.unpark_all()
            if self._stats_waiting:
                self._wake_stats()
            return
        if attempt is not None:
            self._attempt_ended(attempt, error)
        self._give_up(job, error)

    def _give_up(self, job: _Job, error: BaseException) -> None:
        """Settle ``job`` as Failed with ``error`` (the one settle step of a failure)."""
        job.last_error = error
        record = Failed(
            job.item, error, job.attempts, "".join(traceback.format_exception(error)), job.seq
        )
        self._failed.append(record)
        for on_failed in self._on_failed:
            _notify(on_failed, record)
        del self._outstanding[job.seq]
        self._outbox.append((job.seq, record) if self._keep_seq else record)
        if self._reader_waiting:
            self._wake_reader()
        if self._stats_waiting:
            self._wake_stats()
        if self._intake_waiting and len(self._outstanding) <= self._intake_low:
            self._wake_intake()
        elif self._intake_closed and not self._outstanding:
            self._close_channel()

    # ------------------------------------------------------------------ retries

    async def _scheduler(self) -> None:
        """Resend each retry over the work channel once its backoff has passed.

        One task and a heap, not a sleeping task per item. It blocks only on sending into
        the channel; the workers never send into their own channel, so a full channel
        cannot deadlock the pool (even with ``buffer=0`` and one worker).
        """
        heap = self._heap
        send = self._send
        lot = self._scheduler_lot
        while not self._send_closed:
            if not heap:
                await lot.park()
                continue
            due = heap[0][0]
            if due > trio.current_time():
                with trio.move_on_at(due):
                    await lot.park()
                continue
            _, seq, job = heapq.heappop(heap)
            if job.claim is not None:
                self._claims_in_heap -= 1
            if seq < self._sample_below or not seq & _SAMPLE_MASK:
                job.enqueued = self._now()
            if send.statistics().current_buffer_used:
                # Fresh items wait in the channel (so no worker waits on it): the retry goes
                # ahead of them, since it already holds its slot (workers look here first).
                self._due.append(job)
                continue
            try:
                await send.send(job)
            except trio.ClosedResourceError:
                return  # stop(): the job stays outstanding and settles as Unfinished

    # ------------------------------------------------------------------ lifetime

    @asynccontextmanager
    async def _running(
        self, feed: Iterable[Any] | AsyncIterable[Any] | None = None
    ) -> AsyncIterator[Pool[T]]:
        """Run the pool around the caller's block (see the module docstring).

        Errors come out as they were raised: the caller's own exception is the very object
        it raised (a group stays the group it was), an exception from ``feed`` is raised
        bare once the pool has stopped and settled, and nursery groups that only wrap one
        real error (plus cancellations) are unwrapped.
        """
        if self._started:
            raise RuntimeError("a pool runs once: call conveyor.open_pool(...) again for a new one")
        self._started = True
        self._now = trio.lowlevel.current_clock().current_time
        self._t0 = trio.current_time()
        self._throughput.observe(self._t0, 0)
        if trio.current_effective_deadline() == -math.inf:
            self._stopping = True  # opened in a cancelled scope: start no attempt at all
        self._open_observers(len(feed) if isinstance(feed, Sized) else None)
        error: BaseException | None = None
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch)
                    for observer in self._snapshots:
                        nursery.start_soon(self._snapshot, observer)
                    # The pool's tasks see this nursery as the place for work that
                    # outlives a cancelled attempt (see _linger); the caller's block does not.
                    self._linger_nursery = nursery
                    token = _linger.current.set(nursery)
                    try:
                        nursery.start_soon(self._run_tasks, feed)
                    finally:
                        _linger.current.reset(token)
                    if self._progress is not None:
                        nursery.start_soon(self._show_progress, self._progress)
                    try:
                        yield self
                    except BaseException as exc:
                        self._caller_error = exc
                        self.stop()
                        raise
                    if feed is None:
                        self.close()
            except BaseExceptionGroup as group:
                error = sole_error(group, self._caller_error)
                if error is None:
                    raise
        finally:
            self._caller_error = None
            self._finalize()
            if self._progress is not None:
                self._progress.finish(self.stats)
            if self._on_closed:
                report = self.report()
                for on_closed in self._on_closed:
                    _notify(on_closed, report)
        if self._feed_error is not None and (error is None or isinstance(error, trio.Cancelled)):
            # An error from `items` is the caller's own: a cancel must not swallow it.
            error, self._feed_error = self._feed_error, None
        if error is not None:
            # Raised outside the `except` so the group does not become its __context__:
            # callers write `except ValueError`, not `except* ValueError`.
            try:
                raise error
            finally:
                error = None

    async def _run_tasks(self, feed: Iterable[Any] | AsyncIterable[Any] | None) -> None:
        own_timeout = getattr(self._fn, "_conveyor_timed", None)
        if own_timeout is not None and self._timeout is not None:
            # in_process times its attempts itself, from the moment a worker process is
            # ready (starting one is not counted); see conveyor._offload.in_process.
            self._fn, self._timeout = own_timeout(self._timeout), None
        try:
            with self._inner_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._spawn_workers()  # for items submitted before this task ran
                    nursery.start_soon(self._scheduler)
                    if feed is not None:
                        nursery.start_soon(self._feed, feed)
        finally:
            self._nursery = None
            self._tasks_done = True
            self._t_end = trio.current_time()
            self._watch_scope.cancel()
            self._progress_scope.cancel()
            self._wake_reader()
            self._space_lot.unpark_all()
            self._wake_stats()

    def _spawn_workers(self) -> None:
        """Start worker tasks lazily: one per outstanding item, up to ``workers``.

        ``workers=200_000`` over ten items starts ten tasks, not 200,000 up front.
        Workers never exit before the channel ends, so this count only grows.
        """
        nursery = self._nursery
        if nursery is None:
            return  # _run_tasks has not run yet; it calls this when it does
        want = min(self._workers, len(self._outstanding))
        while self._spawned < want:
            self._spawned += 1
            nursery.start_soon(self._worker)

    def _open_observers(self, total: int | None) -> None:
        """Tell each observer the pool starts; bind the events each one overrides."""
        info = PoolInfo(
            name=self._name,
            workers=self._workers,
            retry_attempts=1 if self._retry is None else self._retry.attempts,
            total=total,
            stats=lambda: self.stats,
        )
        opened: list[Observer] = []
        for observer in self._observers:
            try:
                mine = observer.opened(info)
            except Exception as error:
                _observer_failed(observer, "opened", error)
                continue
            if mine is not None:
                opened.append(mine)

        def bound(event: str) -> tuple[Any, ...]:
            return tuple(getattr(o, event) for o in opened if overrides(o, event))

        self._on_started = bound("attempt_started")
        self._on_ended = bound("attempt_ended")
        self._on_retry = bound("retry_scheduled")
        self._on_succeeded = bound("succeeded")
        self._on_failed = bound("failed")
        self._on_unfinished = bound("unfinished")
        self._on_closed = bound("closed")
        self._snapshots = [
            o for o in opened if o.snapshot_every is not None and overrides(o, "snapshot")
        ]
        if self._on_started or self._on_ended:
            self._attempt_observed = True
            self._sample_below = sys.maxsize  # every item's queue wait is told
        if self._on_succeeded:
            self._observe_settled(self._told_succeeded)

    def _told_succeeded(self, record: Record) -> None:
        if type(record) is Succeeded:
            for on_succeeded in self._on_succeeded:
                _notify(on_succeeded, record)

    async def _snapshot(self, observer: Observer) -> None:
        every = observer.snapshot_every
        assert every is not None
        with self._progress_scope:
            while True:
                await trio.sleep(every)
                _notify(observer.snapshot, self.stats)

    async def _show_progress(self, progress: Progress) -> None:
        with self._progress_scope:
            await progress.run(lambda: self.stats)

    async def _watch(self) -> None:
        """Stop the pool when a cancel from outside reaches it.

        The workers run in a shielded scope, so they do not see that cancel themselves.
        This task waits with an abort callback, which trio calls the instant the cancel is
        delivered (before any other task runs again): it sets ``_stopping`` there, so no
        worker starts another attempt, even one whose previous attempt finished in the
        same scheduling round. The rest of :meth:`stop` follows when this task runs.
        """

        def abort(_: Any) -> trio.lowlevel.Abort:
            if not self._watch_scope.cancel_called:  # not our own end of the pool
                self._stopping = True
            return trio.lowlevel.Abort.SUCCEEDED

        with self._watch_scope:
            try:
                await trio.lowlevel.wait_task_rescheduled(abort)
            except BaseException:
                if not self._watch_scope.cancel_called:
                    self.stop()  # cancelled from outside: stop, with the configured drain
                raise

    def _finalize(self) -> None:
        """Settle whatever is still outstanding as Unfinished (in submission order)."""
        self._tasks_done = True
        if self._t_end is None:
            self._t_end = trio.current_time()
        per_key = self._per_key
        if per_key is not None:
            # Take this pool's jobs back from the per-key limit (it may be shared, and
            # outlive the pool): parked ones, and the claims of jobs resent to us.
            per_key.withdraw(self._resend)
            for job in self._outstanding.values():
                if job.claim is not None:
                    per_key.discard(job.claim)
                    job.claim = None
        self._parked = self._claims_in_heap = 0
        if not self._outstanding:
            return
        unfinished = [
            Unfinished(job.item, job.attempts, job.last_error, job.seq)
            for job in self._outstanding.values()
        ]
        self._outstanding.clear()
        self._heap.clear()
        self._unfinished.extend(unfinished)
        for on_unfinished in self._on_unfinished:
            for record in unfinished:
                _notify(on_unfinished, record)

    # ------------------------------------------------------------------ output

    def results(self) -> AsyncIterator[Record]:
        """Yield each record (``Succeeded`` or ``Failed``) as its item settles.

        Ends when the pool has ended. A success handed out here is not kept for
        :meth:`report` (only counted), so a long stream does not accumulate.
        """
        return _Records(self)

    def _results_in_order(self, window: trio.Semaphore) -> _OrderedRecords:
        """Records in submission order; each one handed out frees one slot of ``window``."""
        assert self._keep_seq, "an ordered reader needs a pool made with ordered=True"
        return _OrderedRecords(self, window)

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters now."""
        in_flight = self._in_flight
        limited = self._limited
        parked = self._parked
        waiting_retry = len(self._heap) - self._claims_in_heap  # claims count as parked
        end = self._t_end if self._t_end is not None else trio.current_time()
        succeeded = self._succeeded
        failed = len(self._failed)
        unfinished = len(self._unfinished)
        adaptive = self._adaptive
        return Stats(
            submitted=self._submitted,
            succeeded=succeeded,
            failed=failed,
            unfinished=unfinished,
            retried=self._retried,
            attempts=self._attempts,
            in_flight=in_flight,
            queued=max(
                0, len(self._outstanding) - in_flight - waiting_retry - limited - parked
            ),
            waiting_retry=waiting_retry,
            elapsed=max(0.0, end - self._t0) if self._started else 0.0,
            limited=limited,
            parked=parked,
            recent_throughput=(
                self._throughput.observe(end, succeeded + failed + unfinished)
                if self._started
                else None
            ),
            queue_wait=_percentiles(self._wait_q),
            attempt_latency=_percentiles(self._latency_q),
            adaptive_limit=None if adaptive is None else adaptive.limit,
        )

    def report(self) -> Report:
        """The account: every failure and unfinished item, the successes not handed out.

        Complete once the pool's block has ended (also after a cancel or an error);
        inside the block it is a snapshot.
        """
        records = (e[1] for e in self._outbox) if self._keep_seq else self._outbox
        succeeded = [r for r in records if type(r) is Succeeded]
        return Report(succeeded, list(self._failed), list(self._unfinished), self.stats)


class _Records:
    """The reader of a pool's records as they settle (``pool.results()``).

    A class rather than an async generator: the bare ``async for`` form of ``map`` reads
    it from the caller's task while the pool runs in another one, and a class can be
    dropped early without the finalisation problems of async generators. Subclasses hook
    :meth:`_end` (the pool has ended, nothing left) and :meth:`_interrupted` (the reader
    was cancelled or failed while waiting).
    """

    __slots__ = ("_low", "_pool", "_streak")

    def __init__(self, pool: Pool[Any]) -> None:
        self._pool = pool
        # Wake workers waiting for room only once the outbox is down to half its limit,
        # so they refill it in a batch rather than one record per read.
        self._low = (pool._outbox_limit or 0) // 2
        self._streak = 0

    def __aiter__(self) -> _Records:
        return self

    async def __anext__(self) -> Record:
        pool = self._pool
        while True:
            outbox = pool._outbox  # read anew after a wait: a journal may wrap it at start
            if outbox:
                self._streak += 1
                if self._streak >= _STREAK:
                    # A checkpoint now and then, before taking a record (a cancel here
                    # leaves every record in the outbox, so in the report).
                    self._streak = 0
                    await self._wait(checkpoint)
                    continue
                record = outbox.popleft()
                if pool._keep_seq:
                    record = record[1]
                if pool._space_lot and len(outbox) <= self._low:
                    pool._space_lot.unpark_all()
                return record  # type: ignore[no-any-return]
            if pool._tasks_done:
                await self._end()
            self._streak = 0
            await self._wait(self._park)

    async def _wait(self, wait: Callable[[], Awaitable[None]]) -> None:
        try:
            await wait()
        except BaseException:
            await self._interrupted()
            raise

    async def _park(self) -> None:
        """Wait until the pool settles a record or ends (woken by ``_wake_reader``)."""
        pool = self._pool
        task = trio.lowlevel.current_task()
        pool._reader_tasks.append(task)
        pool._reader_waiting = True

        def abort(_: Any) -> trio.lowlevel.Abort:
            if task in pool._reader_tasks:
                pool._reader_tasks.remove(task)
            self._cancelled()
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _cancelled(self) -> None:
        """Called the instant a cancel reaches the parked reader (only sets flags)."""

    async def _end(self) -> NoReturn:
        raise StopAsyncIteration

    async def _interrupted(self) -> None:
        pass

    async def aclose(self) -> None:
        """Stop reading (records not read stay in the pool's report)."""


class _OrderedRecords(_Records):
    """Records in submission order, through the ordered map's reorder window."""

    __slots__ = ("_expected", "_pending", "_window")

    def __init__(self, pool: Pool[Any], window: trio.Semaphore) -> None:
        super().__init__(pool)
        self._window = window
        self._pending: dict[int, Record] = {}
        self._expected = 0

    async def __anext__(self) -> Record:
        pool = self._pool
        pending = self._pending
        await self._wait(checkpoint)  # before taking anything: a cancel loses nothing
        while True:
            outbox = pool._outbox  # read anew after a wait: a journal may wrap it at start
            while outbox:
                seq, record = outbox.popleft()
                pending[seq] = record
            if pool._space_lot:
                pool._space_lot.unpark_all()
            expected = self._expected
            if expected in pending:
                self._expected = expected + 1
                self._window.release()
                return pending.pop(expected)
            if pool._tasks_done:
                if pending:
                    # Stopped early: the gaps will never fill; hand out the rest in order.
                    return pending.pop(min(pending))
                await self._end()
            await self._wait(self._park)

    async def aclose(self) -> None:
        """Stop reading; records waiting for their turn go back to the pool's report."""
        give_back(self._pool, self._pending)


def give_back(pool: Pool[Any], pending: dict[int, Record]) -> None:
    """Put records an ordered reader held back into the pool's outbox, in order."""
    pool._outbox.extendleft((seq, pending[seq]) for seq in sorted(pending, reverse=True))
    pending.clear()


def _percentiles(quantiles: Quantiles) -> Percentiles:
    p50, p90, p99 = quantiles.quantiles(0.5, 0.9, 0.99)
    return Percentiles(quantiles.count, p50, p90, p99, quantiles.max)


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


class _NotAwaitable(TypeError):
    """``fn(item)`` returned something that is not awaitable (never retried)."""

    retryable = False


def _awaiting(fn: Callable[[Any], Any]) -> Callable[[Any], Awaitable[Any]]:
    """Wrap a task callable that is not an ``async def`` (a lambda, a callable object...).

    It may well return an awaitable (``lambda n: fetch(client, n)``): then that is awaited.
    If it returns anything else, the item fails (not retried) with advice that works.
    ``async def`` functions are called directly, without this extra frame.
    """

    async def call(item: Any) -> Any:
        result = fn(item)
        if not inspect.isawaitable(result):
            name = getattr(fn, "__qualname__", None) or repr(fn)
            raise _NotAwaitable(
                f"fn({item!r:.60}) returned {type(result).__name__} {result!r:.60}, not an "
                f"awaitable: fn must be an async function (async def fn(item)) or return an "
                f"awaitable. For a sync function, pass conveyor.in_thread({name}) (blocking "
                f"I/O) or conveyor.in_process({name}) (CPU-heavy work) instead"
            )
        return await result

    return call


def _not_awaited(value: CoroutineType[Any, Any, Any]) -> TypeError:
    """The error of an attempt whose ``fn`` returned a coroutine it did not await."""
    name = getattr(value, "__qualname__", type(value).__name__)
    value.close()  # no "coroutine was never awaited" warning: the error says it
    error = TypeError(
        f"the task returned the coroutine {name}() without awaiting it: write "
        f"`return await {name}(...)` in the task function"
    )
    error.retryable = False  # type: ignore[attr-defined]
    return error


def _truth(predicate: Callable[[Stats], object], stats: Stats) -> bool:
    """``predicate(stats)`` as a bool; an awaitable answer is refused (never true)."""
    answer = predicate(stats)
    if inspect.isawaitable(answer):
        close = getattr(answer, "close", None)
        if close is not None:
            close()  # no "never awaited" warning: the error says it
        raise TypeError(
            f"wait_stats predicate must return a bool, got {type(answer).__name__} (an "
            f"awaitable: it would never run); write it as a plain function stats -> bool"
        )
    return bool(answer)

class _ObservedOutbox(deque[Any]):
    """An outbox that tells ``observe`` of every record appended (see
    :meth:`Pool._observe_settled`)."""

    observers: list[Callable[[Record], None]]
    keep_seq: bool

    def append(self, entry: Any) -> None:
        deque.append(self, entry)
        record = entry[1] if self.keep_seq else entry
        for observe in self.observers:
            observe(record)


_failed_observers: set[tuple[int, str]] = set()


def _notify(event: Callable[..., None], *args: Any) -> None:
    """Call an observer's event; an error is logged (once per observer and event), never
    raised: a broken dashboard loses no item."""
    try:
        event(*args)
    except Exception as error:
        _observer_failed(getattr(event, "__self__", event), event.__name__, error)


def _observer_failed(observer: object, event: str, error: Exception) -> None:
    key = (id(observer), event)
    if key not in _failed_observers:
        _failed_observers.add(key)
        logger.error(
            "observer %r raised in %s (ignored; logged once per observer and event)",
            observer, event, exc_info=error,
        )
