"""An engine's work channel: a bounded FIFO of jobs between intake and the workers.

It does what the engine used ``trio.open_memory_channel`` for, and nothing more: one object
for both ends (the engine never clones or closes a receive side), no statistics but the
number buffered, no per-send bookkeeping. A send and a receive are the hot path of every
item (and of every hop of a pipeline), and trio's memory channel spends about three times
the bytecode on them (a clone-safe state object, an ``OrderedDict`` of waiting tasks popped
with a keyword argument, a ``max`` per send for its peak statistic).

Semantics are trio's memory channel's, for one sender side and one receiver side, but for
how a waiting receiver gets a job:

- :meth:`send_nowait` buffers the job if there is room, else raises ``trio.WouldBlock``;
  :meth:`send` waits for room. The room is ``size`` plus a slot for each receiver that
  waits (or has been woken and not run yet): with ``size`` 0, a job goes in only for a
  receiver.
- A job put while receivers wait wakes the one that has waited longest, unless one is
  woken already. A woken receiver takes the oldest job when it runs and, if jobs are left
  and receivers still wait, wakes the next one. Trio's channel hands each job to its own
  receiver, which is a task switch per job when the workers are quicker than their
  feed (every hop of a pipeline of no-op stages was one); here one woken receiver takes
  what a running one has not taken, and the chain still starts a receiver per job as
  fast as the scheduler runs them when each waits in its work (I/O). A woken receiver
  that finds nothing left (a running one took it) waits again, at the back.
- :meth:`receive_nowait` takes the oldest buffered job (letting the oldest waiting sender's
  job into the buffer), else raises ``trio.WouldBlock``, or ``trio.EndOfChannel`` once the
  channel is closed and empty; :meth:`receive` waits.
- :meth:`close` (the sending side is done): waiting receivers take what is buffered, then
  get ``trio.EndOfChannel``; waiting senders get ``trio.ClosedResourceError``.
- Waiting tasks are woken first come, first served. Both waits are checkpoints, and a
  cancelled wait has taken or given nothing. A woken receiver can no longer be cancelled
  out of its wait: it takes a job when it runs (a cancel then reaches it at its next
  checkpoint, job in hand).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import trio
from outcome import Error
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

    __slots__ = ("buffered", "closed", "limit", "receivers", "senders", "size", "woken")

    # The engine's worker reads `buffered` and `senders` directly for the common receive
    # (a job buffered, no sender waiting): they are never replaced, only changed in place.
    # The engine's hops read `limit` and `woken` and call `wake` (see hand_on).

    def __init__(self, size: int) -> None:
        self.size = size
        self.buffered: deque[Any] = deque()
        self.receivers: deque[Task] = deque()
        self.senders: deque[list[Any]] = deque()  # [task, job], in arrival order
        self.closed = False
        # Receivers woken and not run yet: each will take a job when it runs.
        self.woken = 0
        # The buffer's bound: `size`, and a slot for each receiver waiting or woken (a job
        # buffered for it is as good as handed to it). Kept up to date by the slow paths.
        self.limit = size

    def __len__(self) -> int:
        """The number of jobs buffered."""
        return len(self.buffered)

    def send_nowait(self, job: Any) -> None:
        """Buffer ``job``, waking a waiting receiver if none is woken yet.

        Raises:
            trio.WouldBlock: the buffer is full (``size``, and a slot per receiver waiting).
            trio.ClosedResourceError: the channel is closed.
        """
        if self.closed:
            raise trio.ClosedResourceError("the channel is closed")
        if len(self.buffered) >= self.limit:
            raise trio.WouldBlock
        self.buffered.append(job)
        if self.receivers and not self.woken:
            self.wake()

    def wake(self) -> None:
        """Wake the receiver that has waited longest: it takes a job when it runs (and
        wakes the next one if jobs are left then). One woken at a time: a job put while
        one is woken waits for it, or for a worker that is running."""
        self.woken += 1
        reschedule(self.receivers.popleft())

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
        receivers = self.receivers
        task = current_task()

        def abort(_: Any) -> Abort:
            receivers.remove(task)
            self.limit -= 1
            return Abort.SUCCEEDED

        while not self.closed:
            receivers.append(task)
            self.limit += 1
            await wait_task_rescheduled(abort)
            self.woken -= 1
            self.limit -= 1
            if self.buffered or self.senders:
                job = self.receive_nowait()
                if self.buffered and receivers and not self.woken:
                    self.wake()  # jobs are left: the next receiver, in case this one waits
                return job
            # Another receiver took it first: wait again.
        raise trio.EndOfChannel

    def close(self) -> None:
        """No more jobs will be sent. Idempotent."""
        if self.closed:
            return
        self.closed = True
        # Waiting receivers take what is buffered, then get EndOfChannel.
        while self.receivers:
            self.wake()
        # (cleared, not replaced: the engine's workers hold `buffered` and `senders`)
        while self.senders:
            task, _ = self.senders.popleft()
            reschedule(task, Error(trio.ClosedResourceError("the channel is closed")))
