"""A pipeline's stages while it runs: each an engine, linked straight to the next one.

Shape (see docs/design.md, "Pipelines: how it is built")::

    feed / submit() ─► stage 0 ─► stage 1 ─► ... ─► stage n-1 ─► the pipeline's ledger
                       (engine)   (engine, or a collector and a batcher in front of one)

A stage's engine has a :class:`~conveyor._engine.Link` in place of its outbox: when an
attempt succeeds, the worker that ran it hands the value into the next stage's work channel
itself (``send_nowait``; it waits for room only when the next stage is full), or, in the last
stage, settles the input in the pipeline's ledger. There is no task between two stages, no
record per item and stage, and no lookup: the :class:`~conveyor._engine.Job` carries its
input (``job.origin``, the pipeline's ``_Input``, or its index: see ``_pipeline._Input``)
from stage to stage. Between two plain
stages the ``Job`` object itself goes on (``Engine.hand_on``, which is the worker's
``link.pass_nowait``): one call per hop, nothing allocated.

The item keeps its place in its stage until it has been handed on, so a stage never holds
more than its ``buffer + workers`` items, the output it cannot hand on yet included: a full
stage holds up the one before it, back to intake. A value that cannot be handed on because
the pipeline is stopping is ``Unfinished`` in the next stage, with no attempt there.

A batching stage has a :class:`~conveyor._batch.Collector` in front of its engine: items are
put in with a list append, a batcher task takes batches out by size or time and makes each a
job of the engine (its items and their inputs in two lists); the engine's worker calls the
batch function once per batch and hands each item's answer on.
"""

from __future__ import annotations

import dataclasses
import inspect
import traceback
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from trio.lowlevel import ParkingLot

from ._batch import Collector, call_batch_flat
from ._engine import Engine, Job
from ._records import Failed, Unfinished
from ._retry import Retry
from ._stats import Stats

if TYPE_CHECKING:
    from ._pipeline import Stage, _Input, _Run

__all__ = ["BatchStage", "StageRun", "Stopped", "make_stage"]


class Stopped(Exception):
    """Internal: the stage takes no more items (the pipeline is stopping)."""


def make_stage(run: _Run, k: int, spec: Stage) -> StageRun:
    """The running form of stage ``k``: a batching one if ``spec`` has ``batch``."""
    if spec.batch is not None:
        return BatchStage(run, k, spec)
    return StageRun(run, k, spec)


class StageRun:
    """One stage while the pipeline runs: its engine, and the door into it."""

    def __init__(self, run: _Run, k: int, spec: Stage) -> None:
        self.run = run
        self.k = k
        self.spec = spec
        self.name = spec.name
        self.engine: Engine | None = None
        self.next: StageRun | None = None  # set by the run once every stage exists
        self.done = trio.Event()  # this stage's tasks have ended
        self.refused_count = 0  # items that never got in (the pipeline had stopped)

    # -- in

    def make_fn(self) -> Callable[[Any], Awaitable[Any]]:
        """The task function of this stage's engine."""
        if self.spec.fanout:
            return _fan_out(self.spec.fn)
        fn: Callable[[Any], Awaitable[Any]] = self.spec.fn
        return fn

    def link(self) -> _Link:
        """What this stage's engine hands its settled items to."""
        if self.spec.fanout:
            return _FanOutLink(self)
        return _Link(self)

    def bind(self) -> None:
        """This stage's engine exists: bind its door (``hand_in``)."""
        engine = self.engine
        assert engine is not None
        self.hand_in: Callable[[Any, _Input], bool] = engine.hand_in

    def has_room(self) -> bool:
        """Whether one more item would get in now."""
        engine = self.engine
        assert engine is not None
        return len(engine.outstanding) < engine.capacity

    async def accept(self, item: Any, origin: _Input) -> None:
        """Put ``item`` (of ``origin``) into this stage, waiting for room. Raises
        :class:`Stopped` when the stage takes no more items; on any exception the item is
        not in the stage (the caller accounts for it)."""
        engine = self.engine
        assert engine is not None
        while True:
            try:
                if self.hand_in(item, origin):
                    return
            except trio.ClosedResourceError:
                raise Stopped from None
            if len(engine.outstanding) >= engine.capacity:
                await self.wait_room()  # woken once half its buffer is free: in bulk
                continue
            # Room in the ledger but not in the channel (workers not started yet).
            job = engine.take(item)
            job.origin = origin
            try:
                await engine.channel.send(job)
            except BaseException as exc:
                engine.unaccept(job)
                if isinstance(exc, trio.ClosedResourceError):
                    raise Stopped from None
                raise
            return

    async def wait_room(self, low: int | None = None) -> None:
        """Wait until this stage has room for one more item (woken at ``low`` held).

        Raises:
            Stopped: the stage takes no more items.
        """
        engine = self.engine
        assert engine is not None
        if len(engine.outstanding) < engine.capacity:
            if engine.intake_closed:
                raise Stopped
            return
        try:
            await engine.wait_for_room(engine.feeder_low if low is None else low)
        except trio.ClosedResourceError:
            raise Stopped from None

    def refuse(self, origin: _Input | int, item: Any) -> None:
        """An item on its way into this stage that never got in: Unfinished here."""
        self.refused_count += 1
        self.run.branch_unfinished(self.run.full(origin), self.name, item, 0, None)

    def close_intake(self) -> None:
        """The stage before has ended (or intake closed): no more items for this one."""
        assert self.engine is not None
        self.engine.close()

    def stop(self, drain: float) -> None:
        if self.engine is not None:
            self.engine.stop(drain)

    # -- the stage's own tasks

    async def tasks(self) -> None:
        """Tasks of the stage beside its engine's (a batching stage's batcher)."""

    def ended(self) -> None:
        """The engine's tasks have ended: close the next stage (nothing more comes)."""
        self.done.set()
        nxt = self.next
        if nxt is not None and not self.run.stopping:
            nxt.close_intake()

    def sweep(self) -> None:
        """After the pipeline's engines have ended: settle what is left in front of them."""

    def stats(self) -> Stats:
        """This stage's counters: items of this stage (refused ones are unfinished)."""
        engine = self.engine
        stats = engine.stats if engine is not None else Stats()
        refused = self.refused_count
        if not refused:
            return stats
        return dataclasses.replace(
            stats, submitted=stats.submitted + refused, unfinished=stats.unfinished + refused
        )


class _Link:
    """The link of a plain stage's engine: a success goes into the next stage as it is."""

    __slots__ = ("finish", "name", "next", "next_in", "pass_nowait", "run", "stage")

    def __init__(self, stage: StageRun) -> None:
        self.stage = stage
        self.run = stage.run
        self.name = stage.name
        nxt = self.next = stage.next
        self.next_in = None if nxt is None else nxt.hand_in
        self.finish = self.run.finish
        # What the engine's workers call on a success: between two plain stages, the next
        # engine's hand_on itself (the Job goes on; one call per hop, nothing allocated).
        # After the last plain stage (where no stage fans out), the run's finish_job.
        self.pass_nowait: Callable[[Job, Any], bool] = self.hand_nowait
        if type(self) is _Link and type(nxt) is StageRun and nxt.engine is not None:
            self.pass_nowait = nxt.engine.hand_on
        elif type(self) is _Link and nxt is None and not self.run.fans_out:
            self.pass_nowait = self.run.finish_job

    def hand_nowait(self, job: Job, value: Any) -> bool:
        """``pass_nowait`` where the next stage is not a plain one (or there is none)."""
        origin = self.run.full(job.origin)  # (an input known by its index gets its _Input)
        next_in = self.next_in
        if next_in is None:
            origin.attempts += job.prior + job.attempts
            self.finish(origin, value)
            return True
        try:
            if not next_in(value, origin):
                return False
        except trio.ClosedResourceError:
            assert self.next is not None
            self.next.refuse(origin, value)
        origin.attempts += job.prior + job.attempts
        return True

    async def pass_on(self, job: Job, value: Any) -> None:
        origin = self.run.full(job.origin)
        origin.attempts += job.prior + job.attempts
        nxt = self.next
        assert nxt is not None
        try:
            await nxt.accept(value, origin)
        except Stopped:
            nxt.refuse(origin, value)
        except BaseException:
            nxt.refuse(origin, value)  # cancelled on its way: Unfinished there
            raise

    def failed(self, job: Job, record: Failed) -> None:
        self.run.branch_failed(
            self.run.full(job.origin), self.name, job.item, record.error, record.attempts,
            record.traceback,
        )

    def unfinished(self, job: Job, record: Unfinished) -> None:
        self.run.branch_unfinished(
            self.run.full(job.origin), self.name, job.item, record.attempts,
            record.last_error,
        )

    def ended(self) -> None:
        self.stage.ended()


class _FanOutLink(_Link):
    """A fan-out stage's link: each output of an attempt is a branch of the same input."""

    __slots__ = ()

    def hand_nowait(self, job: Job, value: Any) -> bool:
        if self.next is not None and value:
            return False  # outputs to hand on, maybe waiting: pass_on
        origin = self.run.full(job.origin)
        origin.attempts += job.prior + job.attempts
        if value:  # the last stage: the input's final outputs
            if origin.outputs is None:
                origin.outputs = []
            origin.outputs.extend(value)
        self.run.branch_done(origin)
        return True

    async def pass_on(self, job: Job, value: Any) -> None:
        outputs: list[Any] = value
        origin = self.run.full(job.origin)
        origin.attempts += job.prior + job.attempts
        nxt = self.next
        assert nxt is not None
        origin.alive += len(outputs) - 1
        for i, output in enumerate(outputs):
            try:
                await nxt.accept(output, origin)
            except Stopped:
                nxt.refuse(origin, output)
            except BaseException:
                # Cancelled while waiting for room: this output and the rest were on their
                # way to the next stage: Unfinished there.
                for rest in outputs[i:]:
                    nxt.refuse(origin, rest)
                raise


def _fan_out(fn: Callable[[Any], AsyncIterable[Any]]) -> Callable[[Any], Awaitable[list[Any]]]:
    """A task function collecting what ``fn(item)`` yields (sent on once it ends)."""

    async def fan_out(item: Any) -> list[Any]:
        generator = fn(item)
        outputs = []
        try:
            async for value in generator:
                outputs.append(value)
        finally:
            aclose = getattr(generator, "aclose", None)
            if aclose is not None:
                await aclose()
        return outputs

    return fan_out


# ---------------------------------------------------------------------------- batching


class BatchStage(StageRun):
    """A batching stage: a collector in front of an engine whose items are batches.

    It holds at most ``capacity`` items (``Stage.capacity``): those in the collector, and
    those of the batches in its engine until each is handed on. Its counts are of items.
    """

    def __init__(self, run: _Run, k: int, spec: Stage) -> None:
        super().__init__(run, k, spec)
        batch = spec.batch
        assert batch is not None
        self.batch = batch
        # The collector holds the inputs; `waiting` their items, in the same order (no
        # pair per item): a batch of n inputs takes the first n items.
        self.collector: Collector[_Input | int] = Collector(batch.size, batch.max_wait)
        # Every input put in so far is known by its index only (see _pipeline._Input): a
        # batching first stage fed in chunks. put() (an item at a time) ends it.
        self.indexes_only = True
        self.waiting: list[Any] = []
        self.waiting_head = 0  # the items waiting are waiting[waiting_head:] (as in Collector)
        self.capacity = spec.capacity
        self.used = 0
        self.closed = False
        self.room_lot = ParkingLot()
        self.batcher_scope = trio.CancelScope()
        self.submitted = 0
        self.succeeded = 0
        self.failed = 0
        self.unfinished = 0

    def make_fn(self) -> Callable[[Any], Awaitable[Any]]:
        return _BatchCall(self.spec.fn, self.batch.split, self.spec.options["retry"])

    def link(self) -> _Link:
        return _BatchLink(self)

    def bind(self) -> None:
        self.hand_in = self.put

    def put(self, item: Any, origin: _Input) -> bool:
        """Put ``item`` into the collector if the stage has room now (its ``hand_in``).

        Raises:
            trio.ClosedResourceError: the stage takes no more items.
        """
        if self.closed:
            raise trio.ClosedResourceError("the pipeline is stopping")
        if self.used >= self.capacity:
            return False
        self.used += 1
        self.submitted += 1
        self.indexes_only = False
        self.collector.put(origin)
        self.waiting.append(item)
        return True

    def has_room(self) -> bool:
        return self.used < self.capacity

    def room_now(self) -> int:
        """How many more items would get in now.

        Raises:
            Stopped: the stage takes no more items.
        """
        if self.closed:
            raise Stopped
        return self.capacity - self.used

    def put_many(self, origins: list[_Input | int], items: list[Any]) -> None:
        """Put ``items`` (of ``origins``, in the same order; indexes, from a chunked feed)
        into the collector: the caller counted the room."""
        self.used += len(origins)
        self.submitted += len(origins)
        self.collector.put_many(origins)
        self.waiting.extend(items)

    async def accept(self, item: Any, origin: _Input) -> None:
        while True:
            try:
                if self.put(item, origin):
                    return
            except trio.ClosedResourceError:
                raise Stopped from None
            await self.room_lot.park()

    async def wait_room(self, low: int | None = None) -> None:
        while self.used >= self.capacity and not self.closed:
            await self.room_lot.park()
        if self.closed:
            raise Stopped

    def give(self, n: int) -> None:
        """``n`` items left the stage: room for as many."""
        self.used -= n
        if self.room_lot:
            self.room_lot.unpark(count=n)

    def refuse(self, origin: _Input | int, item: Any) -> None:
        self.submitted += 1
        self.unfinished += 1
        self.run.branch_unfinished(self.run.full(origin), self.name, item, 0, None)

    def close_intake(self) -> None:
        self.collector.close()

    def stop(self, drain: float) -> None:
        self.closed = True
        self.room_lot.unpark_all()
        self.batcher_scope.cancel()
        self.collector.close()
        super().stop(drain)

    async def tasks(self) -> None:
        """The batcher: batches out of the collector, each a job of the engine."""
        engine = self.engine
        assert engine is not None
        with self.batcher_scope:
            while True:
                origins = await self.collector.take()
                if not origins:
                    break
                items = self.take_items(len(origins))
                try:
                    if len(engine.outstanding) >= engine.capacity:
                        await engine.wait_for_room(engine.capacity - 1)
                    if engine.intake_closed:  # stopped: take() would start a worker
                        raise trio.ClosedResourceError
                    job = engine.take(items)
                    job.origin = origins
                    try:
                        try:
                            engine.channel.send_nowait(job)
                        except trio.WouldBlock:
                            await engine.channel.send(job)
                    except BaseException:
                        engine.unaccept(job)  # not in the engine: unsent, below
                        raise
                except BaseException as exc:
                    self.unsent(origins, items)
                    if isinstance(exc, trio.ClosedResourceError):
                        return
                    raise
            engine.close()

    def take_items(self, n: int) -> list[Any]:
        """The items of the ``n`` inputs the collector gave out (the first ``n`` waiting)."""
        waiting = self.waiting
        head = self.waiting_head
        items = waiting[head:head + n]
        head += n
        if head * 2 >= len(waiting):  # cut the taken ones off once they are half the list
            del waiting[:head]
            head = 0
        self.waiting_head = head
        return items

    def unsent(self, origins: list[_Input | int], items: list[Any]) -> None:
        """Items taken into the stage but never made a batch of the engine."""
        self.give(len(origins))
        for origin, item in zip(origins, items, strict=True):
            self.submitted -= 1  # refuse() counts it again
            self.refuse(origin, item)

    def sweep(self) -> None:
        items = self.waiting[self.waiting_head:]
        self.waiting = []
        self.waiting_head = 0
        self.unsent(self.collector.drain(), items)

    def stats(self) -> Stats:
        engine = self.engine
        stats = engine.stats if engine is not None else Stats()
        return dataclasses.replace(
            stats,
            submitted=self.submitted,
            succeeded=self.succeeded,
            failed=self.failed,
            unfinished=self.unfinished,
        )


class _BatchLink(_Link):
    """A batching stage's link: a batch's answer, item by item, on to the next stage."""

    __slots__ = ()
    stage: BatchStage

    def hand_nowait(self, job: Job, value: Any) -> bool:
        if self.next is not None:
            return False
        stage = self.stage
        origins: list[_Input | int] = job.origin
        stage.give(len(origins))
        attempts = job.attempts
        failed = self.run.finish_many(origins, value, attempts, stage.indexes_only)
        for i in failed:
            self.item_failed(origins[i], job.item[i], value[i], attempts)
        stage.succeeded += len(origins) - len(failed)
        return True

    async def pass_on(self, job: Job, value: Any) -> None:
        stage = self.stage
        origins: list[_Input | int] = job.origin
        items: list[Any] = job.item
        full = self.run.full  # an input known by its index gets its _Input to go on
        nxt = self.next
        assert nxt is not None
        n = len(origins)
        i = 0
        pending = False  # origins[i - 1]'s answer is on its way into the next stage
        try:
            while i < n:
                answer = value[i]
                origin = full(origins[i])
                i += 1
                if isinstance(answer, Exception):
                    self.item_failed(origin, items[i - 1], answer, job.attempts)
                    continue
                stage.succeeded += 1
                origin.attempts += job.attempts  # before it is in the next stage: it may
                pending = True                   # settle there while `accept` yields
                try:
                    if not nxt.hand_in(answer, origin):
                        await nxt.accept(answer, origin)
                except (Stopped, trio.ClosedResourceError):
                    nxt.refuse(origin, answer)
                pending = False
        except BaseException:
            # Cancelled on its way: this answer and the ones not handed on yet are
            # Unfinished in the next stage (each a success of this stage).
            if pending:
                nxt.refuse(full(origins[i - 1]), value[i - 1])
            for j in range(i, n):
                origin, answer = full(origins[j]), value[j]
                if isinstance(answer, Exception):
                    self.item_failed(origin, items[j], answer, job.attempts)
                else:
                    stage.succeeded += 1
                    nxt.refuse(origin, answer)
            raise
        finally:
            stage.give(n)

    def item_failed(
        self, origin: _Input | int, item: Any, error: Exception, attempts: int
    ) -> None:
        self.stage.failed += 1
        self.run.branch_failed(
            self.run.full(origin), self.name, item, error, attempts,
            "".join(traceback.format_exception(error)),
        )

    def failed(self, job: Job, record: Failed) -> None:
        stage = self.stage
        stage.give(len(job.origin))
        for origin, item in zip(job.origin, job.item, strict=True):
            stage.failed += 1
            self.run.branch_failed(
                self.run.full(origin), self.name, item, record.error, record.attempts,
                record.traceback,
            )

    def unfinished(self, job: Job, record: Unfinished) -> None:
        stage = self.stage
        stage.give(len(job.origin))
        for origin, item in zip(job.origin, job.item, strict=True):
            stage.unfinished += 1
            self.run.branch_unfinished(
                self.run.full(origin), self.name, item, record.attempts, record.last_error
            )


class _BatchCall:
    """The task function of a batching stage's engine: one call per batch, an answer per
    item (its value, or an ``Exception`` instance: ``call_batch_flat``).

    A call that raises an error ``retry`` would retry is raised (the engine retries the
    whole batch); another error, with ``split``, splits the batch in halves (each half
    retried by the policy on its own, so a 503 met while isolating a poison row does not
    fail the good rows); without ``split``, the error is raised and every item gets it.
    """

    __slots__ = ("fn", "retry", "split")

    def __init__(self, fn: Callable[[list[Any]], Any], split: bool, retry: Retry | None) -> None:
        self.fn = fn
        self.split = split
        self.retry = retry

    def retried(self, error: Exception) -> bool:
        return self.retry is not None and self.retry.should_retry(error, 0)

    async def __call__(self, items: list[Any]) -> list[Any]:
        raised: list[Exception] = []
        fn = self.fn

        async def whole(batch: list[Any]) -> Any:
            try:
                answer = fn(batch)
                if inspect.isawaitable(answer):
                    answer = await answer
            except Exception as error:
                raised.append(error)
                raise
            return answer

        answers = await call_batch_flat(whole, items, split=False)
        if not raised:
            return answers
        error = raised[0]
        if not self.split or len(items) < 2 or self.retried(error):
            raise error
        # Not retryable: isolate the items that make it fail.
        half = len(items) // 2
        split_on = self._split_on
        retry = self.retry
        first = await call_batch_flat(fn, items[:half], split=True, split_on=split_on,
                                      retry=retry)
        return first + await call_batch_flat(fn, items[half:], split=True, split_on=split_on,
                                             retry=retry)

    def _split_on(self, error: Exception) -> bool:
        return not self.retried(error)
