"""The engine: the state of a running pool and the functions that move items through it.

Shape (see docs/design.md, "The task tree" and "The life of an item")::

    items / submit() ──► work channel ──► workers ──► outbox ──► results() / report()
                             ▲               │
                             └── scheduler ◄─┘  (a heap of retries by due time)

Modelled on trio's own channels (``MemoryChannelState`` holding the state, small endpoint
classes over it): :class:`Engine` holds the shared state and the hot functions (intake, the
worker loop, an attempt, the settle step, the retry scheduler); ``_outbox.py`` is the output
side; ``_pool.py`` is the public facade and the lifetime (the task tree). Other modules use
the engine's named attributes and methods; none of them has a leading underscore.

The ledger is ``Engine.outstanding``: every accepted item is in it (keyed by its sequence
number, so in submission order) until it settles. The work channel's send side closes when
intake is closed and nothing is outstanding; the workers then see the channel end and exit.
Whatever is still outstanding when the tasks are gone (stopped, cancelled, crashed) settles
as ``Unfinished`` in :meth:`Engine.finalize`: nothing is dropped.

The settle step is written once for failures (:meth:`Engine.give_up`) and once more, inlined,
for a success in the worker loop (the hot path: an extra call costs ~4% per no-op item).
"""

from __future__ import annotations

import heapq
import inspect
import math
import sys
import traceback
from collections import deque
from collections.abc import (
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from itertools import islice, repeat
from types import CoroutineType
from typing import Any, Protocol, TypeVar

import trio
from trio.lowlevel import ParkingLot, checkpoint

from . import _linger
from ._errors import AttemptTimeout
from ._limits import Adaptive, Claim, Limit, PerKey
from ._logs import LOG
from ._observe import Attempt, Observer, PoolInfo, notify, open_all, overrides
from ._options import check_drain, check_sync_callable
from ._outbox import Outbox
from ._quantiles import Quantiles, Throughput
from ._records import Failed, Record, Report, Succeeded, Unfinished, with_index
from ._retry import Retry
from ._stats import Percentiles, Stats
from ._workchannel import WorkChannel

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
_CHUNK = 1 << 16  # the most items a chunked intake takes in one go

# wait_stats() tests its predicate at most this often (seconds): a snapshot costs tens of
# microseconds (quantiles), and testing it at every settle would slow a fast pool 3-4x.
_STATS_EVERY = 0.01


class _StoppedBeforeStart(BaseException):
    """Internal: the pool was stopped while this attempt waited for a limit."""


class Job:
    """One accepted item on its way through the pool (reused across its attempts).

    ``enqueued``: when it (re-)entered the work channel, for sampled jobs only (queue
    wait). ``claim``: set while a per-key limit has resent it with a claim on its key.
    ``origin``: what a pipeline knows of the item (its input: an ``_Input``, or its index);
    None in a plain pool. ``prior``: in a pipeline, the attempts the input made in the
    stages before this one that its ``origin`` does not count yet (``hand_on`` adds them up
    as the job goes on; the pipeline's links count them in when it leaves the chain of plain
    stages).
    """

    __slots__ = (
        "attempts", "claim", "enqueued", "item", "last_error", "origin", "prior", "seq",
        "started",
    )

    def __init__(self, item: Any, seq: int, origin: Any = None) -> None:
        self.item = item
        self.seq = seq
        self.attempts = 0
        self.last_error: BaseException | None = None
        self.claim: Claim | None = None
        self.enqueued = 0.0
        self.started = 0.0  # when its first attempt started (with a Retry budget only)
        self.origin = origin
        self.prior = 0


class Link(Protocol):
    """Where a pipeline stage's engine sends what settles, instead of its outbox.

    A stage of a pipeline is an engine whose ``link`` is set: a success goes on to the next
    stage (or to the pipeline's ledger, from the last stage) while the item still holds its
    place in this stage (so a stage's bound covers the output it cannot hand on yet); a
    failure or an unfinished item goes to the pipeline's ledger. See ``_stages``.
    """

    #: Hand ``value`` on without waiting; False when it must wait (then :meth:`pass_on`).
    #: An attribute (read once per worker): between two plain stages it is the next
    #: engine's :meth:`Engine.hand_on` itself.
    pass_nowait: Callable[[Job, Any], bool]

    async def pass_on(self, job: Job, value: Any) -> None:
        """Hand ``value`` on, waiting for room. Cancelled: the value is accounted for."""
        ...

    def failed(self, job: Job, record: Failed) -> None:
        """``job`` gave up in this stage."""
        ...

    def unfinished(self, job: Job, record: Unfinished) -> None:
        """``job`` was still in this stage when it ended."""
        ...

    def ended(self) -> None:
        """This stage's tasks have ended: nothing more will come out of it."""
        ...



class Engine:
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
        name: str = "pool",
        observers: Sequence[Observer] = (),
    ) -> None:
        self.fn = fn if inspect.iscoroutinefunction(fn) else _awaiting(fn)
        self.workers = workers
        self.spawned = 0  # worker tasks started so far (lazily, see _spawn_workers)
        self.linger_nursery: trio.Nursery | None = None  # see _linger
        self.nursery: trio.Nursery | None = None
        self.retry = retry
        self.timeout = timeout
        self.budget = None if retry is None else retry.budget
        self.drain = drain
        self.channel = WorkChannel(buffer)  # intake (and retries) to the workers
        # Ledger: accepted and not yet settled, in submission order.
        self.outstanding: dict[int, Job] = {}
        self.next_seq = 0
        self.intake_closed = False
        self.send_closed = False
        self.stopping = False
        self.started = False
        self.tasks_done = False
        # Retry scheduler: (due time, seq, job); seq breaks ties in submission order.
        self.heap: list[tuple[float, int, Job]] = []
        # Retries that are due while fresh items wait in the channel: workers take these
        # first (a retry already holds its slot; it should not queue behind the backlog).
        self.due: deque[Job] = deque()
        self.scheduler_lot = ParkingLot()
        # The output side: settled records not handed out yet, and their readers.
        self.box = Outbox(keep_seq=ordered, limit=outbox_limit)
        # Intake is gated on the ledger, not on the channel: at most `capacity` items are
        # outstanding, retries waiting for their backoff included (invariant 6). The
        # feeder of `items` waits for half the buffer to be worked off and then refills
        # it in one go, rather than waking once per item.
        self.capacity = buffer + workers
        self.feeder_low = self.capacity - max(1, buffer // 2)
        self.intake_lot = ParkingLot()
        self.intake_waiting = False
        self.intake_low = -1
        # Whether a worker has more to do after a success: one test on the hot path for
        # three flags. True while intake_closed, intake_waiting or stats_waiting is: each
        # assignment to those keeps it.
        self.after_success = False
        self.failed: list[Failed] = []
        self.unfinished: list[Unfinished] = []
        # Counters (plain ints: cheap on the hot path). Two are derived, to spare the hot
        # path an update each: `submitted` from next_seq (see not_submitted), `in_flight`
        # from attempts (see attempts_not_succeeded).
        self.succeeded = 0
        self.retried = 0
        self.attempts = 0  # attempts started
        # Numbered but not accepted: a hand-off taken back (unaccept), or a success
        # settled from the journal (settle_unrun).
        self.not_submitted = 0
        # Attempts that ended other than in a success (raised, cancelled, a forgotten
        # await); one that succeeded is counted by `succeeded`.
        self.attempts_not_succeeded = 0
        # Limits (see _limits.py): the plain ones stacked around each attempt, the per-key
        # one before them in its parking form.
        self.limits = limits
        self.per_key = per_key
        self.adaptive = adaptive
        self.limited = 0  # held by a worker waiting for a limit
        self.parked = 0  # parked by per_key (in its lines, or resent with a claim)
        self.claims_in_heap = 0  # of those, waiting in the heap for their due time
        # Observability: sampled quantiles, recent throughput, wait_stats() waiters.
        self.wait_q = Quantiles()
        self.latency_q = Quantiles()
        self.throughput = Throughput(window=10.0)
        self.stats_lot = ParkingLot()
        self.stats_waiting = False
        self.progress_scope = trio.CancelScope()
        self.periodic_scopes: list[trio.CancelScope] = []
        # The number of items when known up front, for observers (PoolInfo.total); the
        # journal sets it to the number that will run.
        self.total: int | None = None
        # The run's clock, read directly: trio.current_time() costs twice as much (it
        # looks the clock up each time), and the samples read it three times per item.
        self.now: Callable[[], float] = trio.current_time
        self.t0 = 0.0
        self.t_end: float | None = None
        self.inner_scope = trio.CancelScope(shield=True)
        self.watch_scope = trio.CancelScope()
        self.feed_scope = trio.CancelScope()
        self.caller_error: BaseException | None = None  # raised by the caller's block
        self.feed_error: Exception | None = None  # raised by `items`: re-raised at the end

        # The journal's intake gate for submit(): False when it settled the item itself.
        self.gate: Callable[[Any], bool] | None = None
        # A pipeline stage: where what settles goes instead of the outbox (see Link).
        self.link: Link | None = None

        # Observers (see _observe): the log first. At start, each event's list holds the
        # bound methods of the observers that override it; empty lists cost nothing.
        self.name = name
        self.observers: tuple[Observer, ...] = (LOG, *observers)
        self.on_started: tuple[Callable[[Attempt], None], ...] = ()
        self.on_ended: tuple[Callable[[Attempt, BaseException | None, float], None], ...] = ()
        self.on_retry: tuple[Callable[[Attempt, Exception, float], None], ...] = ()
        self.on_succeeded: tuple[Callable[[Any], None], ...] = ()
        self.on_failed: tuple[Callable[[Failed], None], ...] = ()
        self.on_unfinished: tuple[Callable[[Unfinished], None], ...] = ()
        self.on_closed: tuple[Callable[[Report], None], ...] = ()
        self.snapshots: list[Observer] = []
        self.attempt_observed = False
        # A failed attempt whose end is told once its retry is decided (by sequence number).
        self.failed_attempts: dict[int, Attempt] = {}
        # Items with a sequence number below this have the time they were queued stamped
        # (and the rest every 64th), for the queue-wait quantiles; every item when an
        # observer wants attempt events (Attempt.queued). The quantiles still sample.
        self.sample_below = _SAMPLE_ALL

    # ------------------------------------------------------------------ intake

    async def submit(self, item: Any) -> None:
        """Hand ``item`` to the pool, waiting while it is full (backpressure).

        The pool is full when ``buffer + workers`` accepted items have not settled yet
        (those waiting for a retry count too); a settling item frees a slot.

        Raises:
            trio.ClosedResourceError: intake is closed (:meth:`close` or :meth:`stop`).

        If the call is cancelled, the item was not accepted and will not be processed.
        """
        if self.gate is not None and not self.intake_closed and not self.gate(item):
            return
        if len(self.outstanding) >= self.capacity:
            await self.wait_for_room(self.capacity - 1)
        job = self.accept(item)
        try:
            await self.channel.send(job)
        except BaseException as exc:
            self.unaccept(job)
            if isinstance(exc, trio.ClosedResourceError):
                raise trio.ClosedResourceError(self.closed_message()) from None
            raise

    def submit_nowait(self, item: Any) -> None:
        """Hand ``item`` to the pool if the work channel has room now.

        Raises:
            trio.WouldBlock: the pool is full; the item was not accepted.
            trio.ClosedResourceError: intake is closed.
        """
        if self.gate is not None and not self.intake_closed and not self.gate(item):
            return
        if len(self.outstanding) >= self.capacity and not self.intake_closed:
            raise trio.WouldBlock
        job = self.accept(item)
        try:
            self.channel.send_nowait(job)
        except BaseException as exc:
            self.unaccept(job)
            if isinstance(exc, trio.ClosedResourceError):
                raise trio.ClosedResourceError(self.closed_message()) from None
            raise

    def hand_in(self, item: Any, origin: Any) -> bool:
        """Accept ``item`` (of a pipeline's input ``origin``) if there is room now: a
        pipeline's hop from the stage before, or its intake. False: full, nothing taken.

        Raises:
            trio.ClosedResourceError: intake is closed (nothing taken).
        """
        if self.intake_closed:
            raise trio.ClosedResourceError(self.closed_message())
        outstanding = self.outstanding
        if len(outstanding) >= self.capacity:
            return False
        # The admission below is take()'s and hand_on's too, written out in each: one frame
        # per hop and per input is what a shared helper would add (callgrind). Change the
        # three together.
        seq = self.next_seq
        self.next_seq = seq + 1
        job = Job(item, seq, origin)
        if seq < self.sample_below or not seq & _SAMPLE_MASK:
            job.enqueued = self.now()
        outstanding[seq] = job
        if self.spawned < self.workers:
            self.spawn_workers()
        channel = self.channel
        buffered = channel.buffered
        if channel.closed or len(buffered) >= channel.limit:
            try:
                channel.send_nowait(job)
            except trio.WouldBlock:
                self.unaccept(job)
                return False
        else:
            buffered.append(job)  # WorkChannel.send_nowait, inlined
            if channel.receivers and not channel.woken:
                channel.wake()
        return True

    def room_now(self) -> int:
        """How many items :meth:`hand_in_many` may take now: the room in the ledger, and
        in the channel (a worker waiting counts as room). 0 once intake is closed."""
        if self.intake_closed:
            return 0
        channel = self.channel
        return min(self.capacity - len(self.outstanding), channel.limit - len(channel.buffered))

    def hand_in_many(self, items: list[Any], origins: Iterable[Any]) -> None:
        """:meth:`hand_in` for each of ``items`` (of the pipeline inputs ``origins``, or
        ``repeat(None)`` for a pool's own items), in C loops: a chunked intake. The caller
        has counted the room (:meth:`room_now`), with no await since."""
        n = len(items)
        seq = self.next_seq
        end = self.next_seq = seq + n
        jobs = list(map(Job, items, range(seq, end), origins))
        # The sampled ones' queue wait starts now (hand_in's test, for a range of seqs).
        sample_below = self.sample_below
        now = self.now()
        for s in range(seq, min(end, sample_below)):
            jobs[s - seq].enqueued = now
        step = _SAMPLE_MASK + 1
        for s in range(-(-max(seq, sample_below) // step) * step, end, step):
            jobs[s - seq].enqueued = now
        self.outstanding.update(zip(range(seq, end), jobs, strict=True))
        if self.spawned < self.workers:
            self.spawn_workers()
        channel = self.channel
        channel.buffered.extend(jobs)  # (WorkChannel.send_nowait for each, written out)
        if channel.receivers and not channel.woken:
            channel.wake()

    def hand_on(self, job: Job, value: Any) -> bool:
        """A pipeline's hop into this (plain) stage: ``value``, the success of ``job`` in
        the stage before, goes in as a new job of this engine, and the ``Job`` object itself
        goes on (its fields reset), so a hop allocates nothing; ``job.prior`` counts the
        attempts of the stage before (for the pipeline's input). This is the worker's
        ``link.pass_nowait`` itself between two plain stages: one call per hop.

        False: full (the ledger, or the channel: a waiting worker's slot counts), or
        intake closed (the caller's ``link.pass_on`` then waits for room, or finds the
        stage closed); nothing taken, ``job`` untouched.
        """
        outstanding = self.outstanding
        if self.intake_closed or len(outstanding) >= self.capacity:
            return False
        # Room in the channel, tested first (WorkChannel.send_nowait's tests, inlined): a
        # closed channel means intake is closed, tested above.
        channel = self.channel
        buffered = channel.buffered
        if len(buffered) >= channel.limit:
            return False
        seq = self.next_seq  # (hand_in's admission, the Job reused: change them together)
        self.next_seq = seq + 1
        job.item = value
        job.seq = seq
        if seq < self.sample_below or not seq & _SAMPLE_MASK:
            job.enqueued = self.now()
        outstanding[seq] = job
        if self.spawned < self.workers:
            self.spawn_workers()
        buffered.append(job)
        if channel.receivers and not channel.woken:
            channel.wake()  # a worker waits: it takes the job when it runs
        job.prior += job.attempts
        job.attempts = 0
        job.last_error = None
        job.started = 0.0
        return True

    def close(self) -> None:
        """No more items: the pool finishes what it holds, then ends. Idempotent."""
        self.intake_closed = True
        self.after_success = True
        self.wake_intake()
        if not self.outstanding:
            self.close_channel()

    def stop(self, drain: float | None = None) -> None:
        """Stop now: take no more items, start no queued item or retry, end the pool.

        Attempts already running get ``drain`` seconds to finish (default: the pool's
        ``drain`` option, 0 unless set), then they are cancelled. Everything not settled by
        then settles as ``Unfinished``. Calling it again can only shorten the grace.
        """
        if drain is not None:
            check_drain(drain)
        grace = self.drain if drain is None else drain
        self.stopping = True
        self.intake_closed = True
        self.after_success = True
        self.feed_scope.cancel()
        self.wake_intake()
        self.box.space.unpark_all()  # workers waiting for a reader: stop waiting
        if grace <= 0:
            self.inner_scope.cancel()
        else:
            deadline = trio.current_time() + grace
            self.inner_scope.deadline = min(self.inner_scope.deadline, deadline)
        self.close_channel()

    def closed_message(self) -> str:
        how = "stop()" if self.stopping else "close()"
        return f"the pool takes no more items: {how} was called or its block ended"

    async def wait_for_room(self, low: int) -> None:
        """Wait until fewer than ``capacity`` items are outstanding (woken at ``low``)."""
        while len(self.outstanding) >= self.capacity:
            if self.intake_closed:
                raise trio.ClosedResourceError(self.closed_message())
            self.intake_low = max(self.intake_low, low)
            self.intake_waiting = True
            self.after_success = True
            await self.intake_lot.park()

    def wake_intake(self) -> None:
        self.intake_waiting = False
        self.after_success = self.intake_closed or self.stats_waiting
        self.intake_low = -1
        self.intake_lot.unpark_all()

    def accept(self, item: Any) -> Job:
        if self.intake_closed:
            raise trio.ClosedResourceError(self.closed_message())
        if not self.started:
            raise RuntimeError("submit() is only possible inside the pool's `async with` block")
        return self.take(item)

    def unaccept(self, job: Job) -> None:
        del self.outstanding[job.seq]
        self.not_submitted += 1
        if self.intake_closed and not self.outstanding:
            self.close_channel()

    def close_channel(self) -> None:
        if not self.send_closed:
            self.send_closed = True
            self.channel.close()
            self.scheduler_lot.unpark_all()

    async def feed(self, items: Iterable[Any] | AsyncIterable[Any]) -> None:
        """Accept every item of ``items``, lazily, as the channel makes room; then close.

        Room is awaited *before* the next item is taken, and an item taken is put in the
        ledger before anything else can happen, whatever intake's state: an item taken from
        ``items`` is always accounted for (if the pool stopped meanwhile, it settles as
        ``Unfinished`` with no attempt). An exception from ``items`` stops the pool like
        :meth:`stop` and is raised from the pool's block once everything has settled.
        """
        with self.feed_scope:
            try:
                if isinstance(items, AsyncIterable):
                    await self.feed_async(items)
                else:
                    await self.feed_sync(items)
            except trio.ClosedResourceError:
                # stop() closed the channel. The item taken but not sent stays in the
                # ledger and settles as Unfinished: it was taken, so it is accounted.
                return
            except Exception as exc:
                self.feed_error = exc
                self.stop()
                return
        self.close()

    def take(self, item: Any) -> Job:
        """Put an item in the ledger (never refused: for ``items``, or after submit's checks)."""
        seq = self.next_seq
        self.next_seq = seq + 1
        job = Job(item, seq)
        if seq < self.sample_below or not seq & _SAMPLE_MASK:
            job.enqueued = self.now()
        self.outstanding[seq] = job
        if self.spawned < self.workers:
            self.spawn_workers()
        return job

    async def feed_async(self, items: AsyncIterable[Any]) -> None:
        send = self.channel
        outstanding = self.outstanding
        capacity = self.capacity
        low = self.feeder_low
        take = self.take
        iterator = aiter(items)
        try:
            while True:
                if len(outstanding) >= capacity:
                    await self.wait_for_room(low)
                try:
                    item = await anext(iterator)
                except StopAsyncIteration:
                    break
                await send.send(take(item))
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    async def feed_sync(self, items: Iterable[Any]) -> None:
        """Intake from a plain iterable, in chunks: as many items as the ledger and the
        channel have room for (:meth:`room_now`), taken with ``islice`` and handed in with
        C loops (:meth:`hand_in_many`), before any await. When the ledger has room and the
        channel none (a worker between two items), one item the per-item way. With a
        journal, item by item (:meth:`feed_each`): its filter settles a skipped item with
        the next seq while it is iterated, so an item is numbered as soon as it comes."""
        if self.gate is not None:
            await self.feed_each(items)
            return
        iterator = iter(items)
        channel = self.channel
        outstanding = self.outstanding
        while True:
            room = self.room_now()
            if room <= 0:
                if self.intake_closed:
                    raise trio.ClosedResourceError(self.closed_message())
                if len(outstanding) >= self.capacity:
                    await self.wait_for_room(self.feeder_low)
                    continue
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                await channel.send(self.take(item))
                continue
            room = min(room, _CHUNK)
            taken: list[Any] = []
            error: BaseException | None = None
            try:
                taken.extend(islice(iterator, room))  # keeps what it took if items raises
            except BaseException as exc:
                error = exc
            if taken:
                self.hand_in_many(taken, repeat(None))
            if error is not None:
                raise error
            if len(taken) < room:
                return  # the end of the items

    async def feed_each(self, items: Iterable[Any]) -> None:
        # The per-item loop of intake: _take inlined (this task only ever runs between its
        # own awaits, so nothing else changes the ledger's sequence under it).
        send = self.channel
        outstanding = self.outstanding
        capacity = self.capacity
        low = self.feeder_low
        workers = self.workers
        spawning = self.spawned < workers
        sync_iterator = iter(items)
        send_nowait = send.send_nowait
        current_time = self.now
        sample_below = self.sample_below
        while True:
            if len(outstanding) >= capacity:
                await self.wait_for_room(low)
            try:
                item = next(sync_iterator)
            except StopIteration:
                break
            seq = self.next_seq
            self.next_seq = seq + 1
            job = Job(item, seq)
            if seq < sample_below or not seq & _SAMPLE_MASK:
                job.enqueued = current_time()
            outstanding[seq] = job
            if spawning:
                self.spawn_workers()
                spawning = self.spawned < workers
            try:
                send_nowait(job)
            except trio.WouldBlock:
                await send.send(job)

    # ------------------------------------------------------------------ journal seam

    def observe_settled(self, observe: Callable[[Record], None]) -> None:
        """Call ``observe(record)`` as each item settles as Succeeded or Failed in a worker
        (the journal's writer); before the pool starts (see :meth:`Outbox.observe`)."""
        self.box.observe(observe)

    def settle_unrun(self, record: Succeeded[Any] | Failed) -> None:
        """Settle an item without running it: a success taken from a journal (not this
        run's work: not in the stats), or an item refused before its first attempt
        (``Failed``, attempts 0, counted as submitted and failed). It takes its place in the
        output like any record (in order, for an ordered reader); ``observe`` does not see
        it. Also once intake has closed: an item already taken from ``items`` is settled."""
        if not self.started:
            raise RuntimeError("submit() is only possible inside the pool's `async with` block")
        seq = self.next_seq
        self.next_seq = seq + 1
        if record.index != seq:
            record = with_index(record, seq)
        if type(record) is Failed:
            self.failed.append(record)
            for on_failed in self.on_failed:
                notify(on_failed, record)
        else:
            self.not_submitted += 1  # a journal's success: not this run's work
        records = self.box.records
        deque.append(records, (seq, record) if self.box.keep_seq else record)  # unobserved
        if self.box.waiting:
            self.box.wake()
        if self.stats_waiting:
            self.wake_stats()

    # ------------------------------------------------------------------ workers

    async def worker(self) -> None:
        # A worker may be started from the caller's task (submit() starts them lazily),
        # whose context does not name the pool's linger nursery: name it here, for this
        # task only (each task runs in its own copy of the context).
        _linger.current.set(self.linger_nursery)
        channel = self.channel
        receive = channel.receive
        receive_nowait = channel.receive_nowait
        buffered = channel.buffered  # WorkChannel.receive_nowait's common case, inlined
        senders = channel.senders
        fn = self.fn
        # Timed attempts (a per-attempt timeout or a Retry budget) go through _timed;
        # the others call fn directly.
        timed = self.timeout is not None or self.budget is not None
        outstanding = self.outstanding
        box = self.box
        outbox = box.records
        outbox_limit = box.limit
        keep_seq = box.keep_seq
        due = self.due
        link = self.link
        pass_nowait: Callable[[Job, Any], bool] = (  # read once: the hop's one call
            link.pass_nowait if link is not None else _unlinked
        )
        coroutine_type = CoroutineType
        make = tuple.__new__
        succeeded_type = Succeeded
        # Limits and stats: with no limit configured, the only per-item additions are two
        # tests and, for sampled items, two clock reads and two histogram inserts.
        per_key = self.per_key
        # Attempt observers take the guarded path too: the plain one stays as it is.
        guarded = bool(self.limits) or per_key is not None or self.attempt_observed
        # Stage observers' successes (bound before any worker starts, like the above).
        told = self.told_succeeded if self.on_succeeded else None
        key_token: object | None = None
        start = 0.0
        current_time = self.now
        sample_all = _SAMPLE_ALL  # the quantiles' sample (not sample_below: see __init__)
        wait_add = self.wait_q.add
        latency_add = self.latency_q.add
        streak = _STREAK
        while True:
            if buffered and not senders and not due:
                job = buffered.popleft()  # the common case, tested first
            elif due:
                job = due.popleft()
            elif buffered or senders:
                job = receive_nowait()
            else:
                # Nothing there: wait (tested, not tried: a WouldBlock costs a traceback).
                try:
                    job = await receive()
                except trio.EndOfChannel:
                    return
                streak = _STREAK + 1  # a wait is a checkpoint: the count starts again
            streak -= 1  # items taken without waiting, counted down to a checkpoint
            if not streak:
                streak = _STREAK
                await checkpoint()
            if self.stopping:
                return  # leave it outstanding: it settles as Unfinished
            if per_key is not None:
                # Parking form: a busy key keeps the item, not this worker (see _limits).
                key_token = await self.admit(per_key, job)
                if key_token is None:
                    continue
            seq = job.seq
            sample = seq < sample_all or not seq & _SAMPLE_MASK
            if sample:
                start = current_time()
                wait_add(start - job.enqueued)
            try:
                if guarded:
                    value = await self.guarded_attempt(job, key_token, sample)
                else:
                    job.attempts += 1
                    self.attempts += 1  # in flight until it succeeds or ends otherwise
                    try:
                        if not timed:
                            value = await fn(job.item)  # the hot path: no extra frame
                        else:
                            value = await self.timed(job)
                    except BaseException:
                        self.attempts_not_succeeded += 1
                        raise
                    finally:
                        if sample:
                            latency_add(current_time() - start)
            except Exception as error:
                self.attempt_failed(job, error)
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
                    self.attempts_not_succeeded += 1
                    self.attempt_failed(job, _not_awaited(value))
                    continue
                self.succeeded += 1
                if link is None:
                    del outstanding[seq]
                    # Succeeded(item, value, attempts, index), made in one C call
                    record = make(succeeded_type, (job.item, value, job.attempts, seq))
                    # The settle step of a success, inlined (give_up is the one of a failure).
                    outbox.append((seq, record) if keep_seq else record)
                    if box.waiting:
                        box.wake()
                else:
                    # A pipeline stage: on to the next stage, the item keeping its place
                    # here until it is handed on (a cancelled pass_on accounts for it).
                    if told is not None:
                        told(make(succeeded_type, (job.item, value, job.attempts, seq)))
                    if not pass_nowait(job, value):
                        try:
                            await link.pass_on(job, value)
                        finally:
                            del outstanding[seq]
                    else:
                        del outstanding[seq]
                if self.after_success:
                    if self.stats_waiting:
                        self.wake_stats()
                    if self.intake_waiting and len(outstanding) <= self.intake_low:
                        self.wake_intake()
                        # Let the feeder refill before this worker empties the channel,
                        # or the other workers find it empty and park (a task switch
                        # per item).
                        streak = _STREAK
                        await checkpoint()
                    elif self.intake_closed and not outstanding:
                        self.close_channel()
            # Streaming with a bounded outbox (map): wait for the reader. A `while`, since
            # a wake-up is shared by every waiting worker (found by the memory benchmark:
            # with `if`, a slow reader let the outbox grow without limit).
            while outbox_limit is not None and len(outbox) >= outbox_limit:
                if self.stopping:
                    break
                await box.space.park()

    async def admit(self, per_key: PerKey[Any], job: Job) -> object | None:
        """Ask the per-key limit for ``job``: a token, or None (parked, or failed)."""
        claim = job.claim
        if claim is not None:
            job.claim = None  # a claim is used once
            self.parked -= 1
        try:
            token = await per_key.admit(job.item, job, self.resend, claim)
        except Exception as error:
            # The key function raised on this item: no attempt was made, and it would
            # raise again; the item fails at once.
            error.add_note("conveyor: failed before an attempt: its PerKey key raised")
            self.give_up(job, error)
            return None
        if token is None:
            self.parked += 1
        return token

    def resend(self, job: Job, claim: Claim, due: float) -> None:
        """The per-key limit hands a parked job back: into the channel at ``due``."""
        job.claim = claim
        self.claims_in_heap += 1
        heapq.heappush(self.heap, (due, job.seq, job))
        self.scheduler_lot.unpark_all()

    async def guarded_attempt(self, job: Job, key_token: object | None, sample: bool) -> Any:
        """One attempt inside the limits: acquired in order, released in reverse order.

        Cancellation-safe: a cancelled acquire holds nothing, and whatever was acquired is
        released in the ``finally``. A limit's wait counts as ``limited``, not in flight.
        """
        item = job.item
        held: list[tuple[Limit, object]] = []
        error: BaseException | None = None
        try:
            if self.limits:
                self.limited += 1
                try:
                    for limit in self.limits:
                        held.append((limit, await limit.acquire(item)))
                finally:
                    self.limited -= 1
            if self.stopping:
                # stop() came while this waited: it starts no queued item, this one included.
                raise _StoppedBeforeStart
            # The attempt starts only now: one cancelled while waiting for a limit is not
            # counted (its item settles as Unfinished with the attempts it really made).
            job.attempts += 1
            self.attempts += 1  # in flight until it succeeds or ends otherwise
            observed = self.attempt_observed
            start = self.now() if sample or observed else 0.0
            attempt = None
            if observed:
                attempt = Attempt(job.seq, item, job.attempts, start - job.enqueued, start)
                for on_started in self.on_started:
                    notify(on_started, attempt)
            try:
                if self.timeout is None and self.budget is None:
                    value = await self.fn(item)
                else:
                    value = await self.timed(job)
            except Exception as exc:
                error = exc
                self.attempts_not_succeeded += 1
                if attempt is not None:  # its end is told by attempt_failed, after the retry
                    self.failed_attempts[job.seq] = attempt
                raise
            except BaseException as exc:
                error = exc
                self.attempts_not_succeeded += 1
                if attempt is not None:
                    self.attempt_ended(attempt, exc)
                raise
            finally:
                if sample:
                    self.latency_q.add(self.now() - start)
            if attempt is not None:
                # Not in flight while its observers hear that it ended: counted as ended
                # here until `succeeded` counts it (in the worker, no await between).
                self.attempts_not_succeeded += 1
                try:
                    self.attempt_ended(attempt, None)
                finally:
                    self.attempts_not_succeeded -= 1
            return value
        finally:
            for limit, token in reversed(held):
                limit.release(token, error)
            if key_token is not None:
                assert self.per_key is not None
                self.per_key.release(key_token, error)
            error = None  # no reference cycle through the traceback

    async def timed(self, job: Job) -> Any:
        """``fn(item)`` within the attempt's time, else :class:`AttemptTimeout`.

        The attempt's time ends at the per-attempt ``timeout`` or at the end of the item's
        ``Retry.budget`` (counted from the start of its first attempt), whichever is first.
        """
        now = self.now()
        if job.attempts == 1:
            job.started = now
        timeout = self.timeout
        deadline = math.inf if timeout is None else now + timeout
        budget = self.budget
        cut_by_budget = False
        if budget is not None and job.started + budget < deadline:
            deadline = job.started + budget
            cut_by_budget = True
        with trio.move_on_at(deadline):
            return await self.fn(job.item)
        # only reached when the scope's own deadline cancelled the attempt
        if cut_by_budget:
            raise AttemptTimeout(
                f"attempt cut at the end of the item's budget={budget} s (Retry.budget), "
                f"{job.attempts} attempt(s) in"
            )
        raise AttemptTimeout(f"attempt took longer than timeout={timeout} s")

    def wake_stats(self) -> None:
        self.stats_waiting = False
        self.after_success = self.intake_closed or self.intake_waiting
        self.stats_lot.unpark_all()

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
            if _truth(predicate, stats) or self.tasks_done:
                return stats
            tested = trio.current_time()
            self.stats_waiting = True
            self.after_success = True
            await self.stats_lot.park()
            if not self.tasks_done:
                await trio.sleep_until(tested + _STATS_EVERY)

    def attempt_ended(self, attempt: Attempt, error: BaseException | None) -> None:
        duration = self.now() - attempt.started
        for on_ended in self.on_ended:
            notify(on_ended, attempt, error, duration)

    def attempt_failed(self, job: Job, error: Exception) -> None:
        """An attempt raised ``error``: schedule a retry, or settle the item as Failed.

        An error the policy would retry while the pool is stopping leaves the item
        outstanding: it settles as ``Unfinished`` with ``error`` as its last error (it did
        not give up; the pool did).
        """
        job.last_error = error
        attempt = self.failed_attempts.pop(job.seq, None) if self.failed_attempts else None
        retry = self.retry
        if retry is not None and retry.should_retry(error, job.attempts):
            if self.stopping:
                if attempt is not None:
                    self.attempt_ended(attempt, error)
                return
            delay = retry.delay(error, job.attempts)
            budget = self.budget
            if budget is not None and trio.current_time() + delay >= job.started + budget:
                error.add_note(
                    f"conveyor: not retried: the next attempt would start after the item's "
                    f"budget={budget} s (Retry.budget) has run out"
                )
                if attempt is not None:
                    self.attempt_ended(attempt, error)
                self.give_up(job, error)
                return
            self.retried += 1
            if self.on_retry:
                told = attempt or Attempt(job.seq, job.item, job.attempts, math.nan, math.nan)
                for on_retry in self.on_retry:
                    notify(on_retry, told, error, delay)
            if attempt is not None:
                self.attempt_ended(attempt, error)
            if delay <= 0:
                # Due now: straight to the front of the work, where this worker (which is
                # not waiting on the channel) looks first; no scheduler round trip.
                seq = job.seq
                if seq < self.sample_below or not seq & _SAMPLE_MASK:
                    job.enqueued = self.now()
                self.due.append(job)
            else:
                heapq.heappush(self.heap, (trio.current_time() + delay, job.seq, job))
                self.scheduler_lot.unpark_all()
            if self.stats_waiting:
                self.wake_stats()
            return
        if attempt is not None:
            self.attempt_ended(attempt, error)
        self.give_up(job, error)

    def give_up(self, job: Job, error: BaseException) -> None:
        """Settle ``job`` as Failed with ``error`` (the one settle step of a failure)."""
        job.last_error = error
        record = Failed(
            job.item, error, job.attempts, "".join(traceback.format_exception(error)), job.seq
        )
        self.failed.append(record)
        for on_failed in self.on_failed:
            notify(on_failed, record)
        del self.outstanding[job.seq]
        if self.link is None:
            self.box.put(job.seq, record)
        else:
            self.link.failed(job, record)
        if self.stats_waiting:
            self.wake_stats()
        if self.intake_waiting and len(self.outstanding) <= self.intake_low:
            self.wake_intake()
        elif self.intake_closed and not self.outstanding:
            self.close_channel()

    # ------------------------------------------------------------------ retries

    async def scheduler(self) -> None:
        """Resend each retry over the work channel once its backoff has passed.

        One task and a heap, not a sleeping task per item. It blocks only on sending into
        the channel; the workers never send into their own channel, so a full channel
        cannot deadlock the pool (even with ``buffer=0`` and one worker).
        """
        heap = self.heap
        send = self.channel
        lot = self.scheduler_lot
        while not self.send_closed:
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
                self.claims_in_heap -= 1
            if seq < self.sample_below or not seq & _SAMPLE_MASK:
                job.enqueued = self.now()
            if len(send) and not send.receivers:
                # Fresh items wait in the channel and no worker waits on it: the retry goes
                # ahead of them, since it already holds its slot (workers look here first).
                # (A worker waiting with items buffered has been woken for them: the retry
                # goes into the channel, where the next one woken finds it.)
                self.due.append(job)
                continue
            try:
                await send.send(job)
            except trio.ClosedResourceError:
                return  # stop(): the job stays outstanding and settles as Unfinished

    # ------------------------------------------------------------------ lifetime

    def spawn_workers(self) -> None:
        """Start worker tasks lazily: one per outstanding item, up to ``workers``.

        ``workers=200_000`` over ten items starts ten tasks, not 200,000 up front.
        Workers never exit before the channel ends, so this count only grows.
        """
        nursery = self.nursery
        if nursery is None:
            return  # _run_tasks has not run yet; it calls this when it does
        want = min(self.workers, len(self.outstanding))
        while self.spawned < want:
            self.spawned += 1
            nursery.start_soon(self.worker)

    def open_observers(self, total: int | None) -> None:
        """Tell each observer the pool starts; bind the events each one overrides."""
        info = PoolInfo(
            name=self.name,
            workers=self.workers,
            retry_attempts=1 if self.retry is None else self.retry.attempts,
            total=total,
            stats=lambda: self.stats,
        )
        opened = open_all(self.observers, info)

        def bound(event: str) -> tuple[Any, ...]:
            return tuple(getattr(o, event) for o in opened if overrides(o, event))

        self.on_started = bound("attempt_started")
        self.on_ended = bound("attempt_ended")
        self.on_retry = bound("retry_scheduled")
        self.on_succeeded = bound("succeeded")
        self.on_failed = bound("failed")
        self.on_unfinished = bound("unfinished")
        self.on_closed = bound("closed")
        self.snapshots = [
            o for o in opened if o.snapshot_every is not None and overrides(o, "snapshot")
        ]
        if self.on_started or self.on_ended:
            self.attempt_observed = True
            self.sample_below = sys.maxsize  # every item's queue wait is told
        if self.on_succeeded:
            self.observe_settled(self.told_succeeded)

    def told_succeeded(self, record: Record) -> None:
        if type(record) is Succeeded:
            for on_succeeded in self.on_succeeded:
                notify(on_succeeded, record)

    async def snapshot(self, observer: Observer) -> None:
        """Tell ``observer`` the stats every ``snapshot_every`` seconds until the pool's
        tasks end (each observer its own task and scope)."""
        every = observer.snapshot_every
        assert every is not None
        scope = trio.CancelScope()
        self.periodic_scopes.append(scope)
        if self.tasks_done:
            return
        with scope:
            while True:
                await trio.sleep(every)
                notify(observer.snapshot, self.stats)

    def end_periodic(self) -> None:
        """Stop the periodic tasks (snapshots, the progress line): the pool's tasks ended."""
        self.progress_scope.cancel()
        for scope in self.periodic_scopes:
            scope.cancel()

    def tell_closed(self) -> None:
        """Tell the observers the pool has closed, with its final report."""
        if self.on_closed:
            report = self.report()
            for on_closed in self.on_closed:
                notify(on_closed, report)

    def end_output(self) -> None:
        """The pool's tasks have ended: wake whoever waits for records or stats."""
        self.tasks_done = True
        self.box.end()
        self.wake_stats()
        if self.link is not None:
            self.link.ended()

    def finalize(self) -> None:
        """Settle whatever is still outstanding as Unfinished (in submission order)."""
        self.tasks_done = True
        self.box.ended = True
        if self.t_end is None:
            self.t_end = trio.current_time()
        per_key = self.per_key
        if per_key is not None:
            # Take this pool's jobs back from the per-key limit (it may be shared, and
            # outlive the pool): parked ones, and the claims of jobs resent to us.
            per_key.withdraw(self.resend)
            for job in self.outstanding.values():
                if job.claim is not None:
                    per_key.discard(job.claim)
                    job.claim = None
        self.parked = self.claims_in_heap = 0
        if not self.outstanding:
            return
        jobs = list(self.outstanding.values())
        unfinished = [Unfinished(job.item, job.attempts, job.last_error, job.seq) for job in jobs]
        self.outstanding.clear()
        self.heap.clear()
        self.unfinished.extend(unfinished)
        for on_unfinished in self.on_unfinished:
            for record in unfinished:
                notify(on_unfinished, record)
        link = self.link
        if link is not None:
            for job, record in zip(jobs, unfinished, strict=True):
                link.unfinished(job, record)

    @property
    def submitted(self) -> int:
        """Items accepted so far (numbered, less the ones not accepted after all)."""
        return self.next_seq - self.not_submitted

    @property
    def in_flight(self) -> int:
        """Attempts running now (started, less the ones that ended)."""
        return self.attempts - self.succeeded - self.attempts_not_succeeded

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters now."""
        in_flight = self.in_flight
        limited = self.limited
        parked = self.parked
        waiting_retry = len(self.heap) - self.claims_in_heap  # claims count as parked
        end = self.t_end if self.t_end is not None else trio.current_time()
        succeeded = self.succeeded
        failed = len(self.failed)
        unfinished = len(self.unfinished)
        adaptive = self.adaptive
        return Stats(
            submitted=self.submitted,
            succeeded=succeeded,
            failed=failed,
            unfinished=unfinished,
            retried=self.retried,
            attempts=self.attempts,
            in_flight=in_flight,
            queued=max(
                0, len(self.outstanding) - in_flight - waiting_retry - limited - parked
            ),
            waiting_retry=waiting_retry,
            elapsed=max(0.0, end - self.t0) if self.started else 0.0,
            limited=limited,
            parked=parked,
            recent_throughput=(
                self.throughput.observe(end, succeeded + failed + unfinished)
                if self.started
                else None
            ),
            queue_wait=_percentiles(self.wait_q),
            attempt_latency=_percentiles(self.latency_q),
            adaptive_limit=None if adaptive is None else adaptive.limit,
        )

    def report(self) -> Report:
        """The account: every failure and unfinished item, the successes not handed out.

        Complete once the pool's block has ended (also after a cancel or an error);
        inside the block it is a snapshot.
        """
        return Report(
            self.box.unread_successes(), list(self.failed), list(self.unfinished), self.stats
        )




def _unlinked(job: Job, value: Any) -> bool:
    raise AssertionError("a pool without a link has no pass_nowait")  # pragma: no cover


def _percentiles(quantiles: Quantiles) -> Percentiles:
    p50, p90, p99 = quantiles.quantiles(0.5, 0.9, 0.99)
    return Percentiles(quantiles.count, p50, p90, p99, quantiles.max)



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
