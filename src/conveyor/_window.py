"""A pipeline map's window: slots for the inputs taken and not read yet.

``trio.Semaphore``'s counting and its fairness (a slot given back goes to the task that
waited first, handed over directly), with the count and the number of waiting tasks kept in
plain attributes, so that the two steps every input makes (take a slot in the feed, give it
back in the reader) can be written out where they run: two tests and a subtraction or an
addition, where trio's ``acquire_nowait`` and ``release`` are three Python calls per input
(callgrind). The methods are the slow ways, for the cases written out nowhere.
"""

from __future__ import annotations

import trio
from trio.lowlevel import ParkingLot, cancel_shielded_checkpoint, checkpoint_if_cancelled

__all__ = ["Window"]


class Window:
    """``value`` free slots; ``waiting`` tasks parked in ``lot`` for one.

    Written out, taking a slot is ``if w.value: w.value -= 1`` (else ``await w.acquire()``)
    and giving one back is :meth:`release`'s body: while a task waits, the slot is handed to
    it (``waiting`` counts it off at once, so that two releases never hand over one wait).
    """

    __slots__ = ("lot", "value", "waiting")

    def __init__(self, value: int) -> None:
        self.value = value
        self.waiting = 0
        self.lot = ParkingLot()

    def acquire_nowait(self) -> None:
        """Take a slot.

        Raises:
            trio.WouldBlock: no slot is free.
        """
        if not self.value:
            raise trio.WouldBlock
        self.value -= 1

    async def acquire(self) -> None:
        """Take a slot, waiting for one (first come, first served); a checkpoint."""
        await checkpoint_if_cancelled()
        if self.value:
            self.value -= 1
            await cancel_shielded_checkpoint()
            return
        self.waiting += 1
        try:
            await self.lot.park()  # woken by release(), which handed this task the slot
        except BaseException:
            self.waiting -= 1  # cancelled while parked: no slot was handed over
            raise

    async def wait_free(self) -> None:
        """Wait until a slot is free, without taking it (a chunked feed then counts the
        free slots again); a checkpoint."""
        await self.acquire()
        self.release()

    def release(self) -> None:
        """Give a slot back: to the task that waited first, or to the free count."""
        if self.waiting:
            self.waiting -= 1
            self.lot.unpark()
        else:
            self.value += 1
