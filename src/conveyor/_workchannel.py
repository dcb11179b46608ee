"""An engine's work channel: a bounded FIFO of jobs between intake and the workers.

It does what the engine used ``trio.open_memory_channel`` for, and nothing more: one object
for both ends (the engine never clones or closes a receive side), no statistics but the
number buffered, no per-send bookkeeping. A send and a receive are the hot path of every
item (and of every hop of a pipeline), and trio's memory channel spends about three times
the bytecode on them (a clone-safe state object, an ``OrderedDict`` of waiting tasks popped
with a keyword argument, a ``max`` per send for its peak statistic).

Semantics are trio's memory channel's, for one sender side and one receiver side:

- :meth:`send_nowait` hands the job straight to a waiting receiver, else buffers it if
  there is room, else raises ``trio.WouldBlock``; :meth:`send` waits for room.
- :meth:`receive_nowait` takes the oldest buffered job (letting the oldest waiting sender's
  job into the buffer), else raises ``trio.WouldBlock``, or ``trio.EndOfChannel`` once the
  channel is closed and empty; :meth:`receive` waits.
- :meth:`close` (the sending side is done): waiting receivers get ``trio.EndOfChannel``,
  waiting senders ``trio.ClosedResourceError``; jobs already buffered are still received.
- Waiting tasks are served first come, first served. Both waits are checkpoints, and a
  cancelled wait has taken or given nothing. A job handed to a receiver is its own from
  that moment (a cancel then reaches the receiver at its next checkpoint, job in hand).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import trio
from outcome import Error, Value
from trio.lowlevel import (
    Abort,
    Task,
    cancel_shielded_checkpoint,
    checkpoint_if_cancelled,
    current_task,
    reschedule,
    wait_task_rescheduled,
)

__all__ = ["WorkChannel"]


class WorkChannel:
    """A bounded FIFO of jobs with trio's memory channel semantics (see the module)."""

    __slots__ = ("buffered", "closed", "receivers", "senders", "size")

    # The engine's worker reads `buffered` and `senders` directly for the common receive
    # (a job buffered, no sender waiting): they are never replaced, only changed in place.

    def __init__(self, size: int) -> None:
        self.size = size
        self.buffered: deque[Any] = deque()
        self.receivers: deque[Task] = deque()
        self.senders: deque[list[Any]] = deque()  # [task, job], in arrival order
        self.closed = False

    def __len__(self) -> int:
        """The number of jobs buffered."""
        return len(self.buffered)

    def send_nowait(self, job: Any) -> None:
        """Hand ``job`` to a waiting receiver, or buffer it.

        Raises:
            trio.WouldBlock: no receiver waits and the buffer is full.
            trio.ClosedResourceError: the channel is closed.
        """
        if self.closed:
            raise trio.ClosedResourceError("the channel is closed")
        if self.receivers:
            reschedule(self.receivers.popleft(), Value(job))
        elif len(self.buffered) < self.size:
            self.buffered.append(job)
        else:
            raise trio.WouldBlock

    async def send(self, job: Any) -> None:
        """:meth:`send_nowait`, waiting for room.

        Raises:
            trio.ClosedResourceError: the channel is (or gets) closed; ``job`` was not sent.
        """
        await checkpoint_if_cancelled()
        try:
            self.send_nowait(job)
        except trio.WouldBlock:
            pass
        else:
            await cancel_shielded_checkpoint()
            return
        entry = [current_task(), job]
        self.senders.append(entry)

        def abort(_: Any) -> Abort:
            self.senders.remove(entry)
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)

    def receive_nowait(self) -> Any:
        """The oldest job.

        Raises:
            trio.WouldBlock: none is there yet.
            trio.EndOfChannel: the channel is closed and empty.
        """
        buffered = self.buffered
        if buffered:
            job = buffered.popleft()
            if self.senders:  # a sender waits for room: its job takes the slot
                task, waiting = self.senders.popleft()
                buffered.append(waiting)
                reschedule(task)
            return job
        if self.senders:  # no buffer (size 0): straight from the sender
            task, job = self.senders.popleft()
            reschedule(task)
            return job
        if self.closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive(self) -> Any:
        """:meth:`receive_nowait`, waiting for a job.

        Raises:
            trio.EndOfChannel: the channel is (or gets) closed and is empty.
        """
        await checkpoint_if_cancelled()
        if self.buffered or self.senders:  # (tested, not tried: a raise costs a traceback)
            job = self.receive_nowait()
            await cancel_shielded_checkpoint()
            return job
        if self.closed:
            raise trio.EndOfChannel
        task = current_task()
        self.receivers.append(task)

        def abort(_: Any) -> Abort:
            self.receivers.remove(task)
            return Abort.SUCCEEDED

        return await wait_task_rescheduled(abort)

    def close(self) -> None:
        """No more jobs will be sent. Idempotent."""
        if self.closed:
            return
        self.closed = True
        # (cleared, not replaced: the engine's workers hold `buffered` and `senders`)
        while self.receivers:
            reschedule(self.receivers.popleft(), Error(trio.EndOfChannel()))
        while self.senders:
            task, _ = self.senders.popleft()
            reschedule(task, Error(trio.ClosedResourceError("the channel is closed")))
