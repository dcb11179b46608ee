"""The output side of a pool: settled records, their readers, and what the report lists.

An :class:`Outbox` is the hand-over point between the engine's workers (which append records
as items settle) and whoever reads them: ``pool.results()`` (:class:`Records`, in settling
order), the ordered map (:class:`OrderedRecords`, in input order through a reorder window),
the next stage of a pipeline, or ``report()`` at the end (what was not read). Readers know
only the outbox, never the engine.

The engine appends with ``outbox.records.append(...)`` and then, if ``outbox.waiting``,
calls :meth:`Outbox.wake` (two attribute reads per settled item when nobody waits).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import trio
from trio.lowlevel import ParkingLot, checkpoint

from ._records import Record, Succeeded

__all__ = ["STREAK", "OrderedRecords", "Outbox", "Records"]

# A reader that keeps finding records waiting takes them without a checkpoint; after this
# many in a row it checkpoints anyway (a consumer that never awaits must not starve the rest).
STREAK = 64


class Outbox:
    """Settled records not handed out yet, and the readers waiting for the next one.

    ``records``: records, or ``(seq, record)`` pairs when ``keep_seq`` (an ordered reader
    needs the sequence number; one allocation less per item for everyone else).
    ``limit``: when set, workers wait (on ``space``) while this many records are unread
    (streaming with bounded memory). ``ended``: the pool's tasks have ended; nothing more
    will be appended except by :meth:`give_back`.
    """

    __slots__ = ("ended", "keep_seq", "limit", "readers", "records", "space", "waiting")

    def __init__(self, *, keep_seq: bool, limit: int | None) -> None:
        self.records: deque[Any] = deque()
        self.keep_seq = keep_seq
        self.limit = limit
        self.readers: list[trio.lowlevel.Task] = []
        self.waiting = False
        self.space = ParkingLot()
        self.ended = False

    def put(self, seq: int, record: Record) -> None:
        """Append a record, seen by the observers (not on the hot path: the worker inlines
        this for a success)."""
        self.records.append((seq, record) if self.keep_seq else record)
        if self.waiting:
            self.wake()

    def wake(self) -> None:
        """Wake the readers waiting for a record."""
        self.waiting = False
        tasks = self.readers
        if tasks:
            self.readers = []
            for task in tasks:
                trio.lowlevel.reschedule(task)

    def end(self) -> None:
        """The pool's tasks have ended: readers drain what is left and stop."""
        self.ended = True
        self.wake()
        self.space.unpark_all()

    def observe(self, observe: Callable[[Record], None]) -> None:
        """Call ``observe(record)`` for every record appended from now on (the journal's
        writer, observers of successes). Costs nothing when never called: the records
        deque becomes one whose ``append`` also calls the observers."""
        current = self.records
        if isinstance(current, _ObservedDeque):
            current.observers.append(observe)
            return
        observed = _ObservedDeque(current)
        observed.observers = [observe]
        observed.keep_seq = self.keep_seq
        self.records = observed

    def give_back(self, pending: dict[int, Record]) -> None:
        """Put records an ordered reader held back in front again, in order."""
        self.records.extendleft((seq, pending[seq]) for seq in sorted(pending, reverse=True))
        pending.clear()

    def unread_successes(self) -> list[Succeeded[Any]]:
        """The successes not handed out (for the report)."""
        records = (e[1] for e in self.records) if self.keep_seq else self.records
        return [r for r in records if type(r) is Succeeded]

    def reader(self) -> Records:
        """Records as they settle."""
        return Records(self)

    def ordered_reader(self, window: trio.Semaphore) -> OrderedRecords:
        """Records in submission order; each one handed out frees one slot of ``window``."""
        assert self.keep_seq, "an ordered reader needs a pool made with ordered=True"
        return OrderedRecords(self, window)


class Records:
    """The reader of an outbox's records as they settle (``pool.results()``).

    A class rather than an async generator: the bare ``async for`` form of ``map`` reads
    it from the caller's task while the pool runs in another one, and a class can be
    dropped early without the finalisation problems of async generators. Subclasses hook
    :meth:`_end` (the pool has ended, nothing left), :meth:`_interrupted` (the reader was
    cancelled or failed while waiting) and :meth:`_cancelled` (the instant a cancel reaches
    the parked reader).
    """

    __slots__ = ("_box", "_low", "_streak")

    def __init__(self, box: Outbox) -> None:
        self._box = box
        # Wake workers waiting for room only once the outbox is down to half its limit,
        # so they refill it in a batch rather than one record per read.
        self._low = (box.limit or 0) // 2
        self._streak = 0

    def __aiter__(self) -> Records:
        return self

    async def __anext__(self) -> Record:
        box = self._box
        while True:
            records = box.records  # read anew after a wait: a journal may wrap it at start
            if records:
                self._streak += 1
                if self._streak >= STREAK:
                    # A checkpoint now and then, before taking a record (a cancel here
                    # leaves every record in the outbox, so in the report).
                    self._streak = 0
                    await self._wait(checkpoint)
                    continue
                record = records.popleft()
                if box.keep_seq:
                    record = record[1]
                if box.space and len(records) <= self._low:
                    box.space.unpark_all()
                return record  # type: ignore[no-any-return]
            if box.ended:
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
        """Wait until the pool settles a record or ends (woken by :meth:`Outbox.wake`)."""
        box = self._box
        task = trio.lowlevel.current_task()
        box.readers.append(task)
        box.waiting = True

        def abort(_: Any) -> trio.lowlevel.Abort:
            if task in box.readers:
                box.readers.remove(task)
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


class OrderedRecords(Records):
    """Records in submission order, through the ordered map's reorder window."""

    __slots__ = ("_expected", "_pending", "_window")

    def __init__(self, box: Outbox, window: trio.Semaphore) -> None:
        super().__init__(box)
        self._window = window
        self._pending: dict[int, Record] = {}
        self._expected = 0

    @property
    def window(self) -> trio.Semaphore:
        """The reorder window this reader frees a slot of per record handed out."""
        return self._window

    async def __anext__(self) -> Record:
        box = self._box
        pending = self._pending
        await self._wait(checkpoint)  # before taking anything: a cancel loses nothing
        while True:
            records = box.records  # read anew after a wait: a journal may wrap it at start
            while records:
                seq, record = records.popleft()
                pending[seq] = record
            if box.space:
                box.space.unpark_all()
            expected = self._expected
            if expected in pending:
                self._expected = expected + 1
                self._window.release()
                return pending.pop(expected)
            if box.ended:
                if pending:
                    # Stopped early: the gaps will never fill; hand out the rest in order.
                    return pending.pop(min(pending))
                await self._end()
            await self._wait(self._park)

    async def _wait(self, wait: Callable[[], Awaitable[None]]) -> None:
        try:
            await wait()
        except BaseException:
            # Interrupted (a cancel, Ctrl-C): the records held back for their turn go back
            # to the outbox now, not when this reader is collected (its frame may be kept
            # alive by the exception's traceback), so the report has them.
            if self._pending:
                self._box.give_back(self._pending)
            await self._interrupted()
            raise

    async def aclose(self) -> None:
        """Stop reading; records waiting for their turn go back to the pool's report."""
        self._box.give_back(self._pending)


class _ObservedDeque(deque[Any]):
    """A records deque that tells its observers of every record appended."""

    observers: list[Callable[[Record], None]]
    keep_seq: bool

    def append(self, entry: Any) -> None:
        deque.append(self, entry)
        record = entry[1] if self.keep_seq else entry
        for observe in self.observers:
            observe(record)
