"""Work a pool started but cannot cancel (a thread), which the pool's end still waits for.

A pool sets :data:`current` for its own tasks to a nursery that its outer block exits
last. Code running inside a pool's attempt (``in_thread``) that leaves something running
after its attempt was cancelled (a thread, which nothing can stop) starts a task there
that waits, shielded, until that thing has really ended. So a pool's block never ends
while a thread started for it still runs, whatever cancelled the attempt.
"""

from __future__ import annotations

from contextvars import ContextVar

import trio

__all__ = ["current"]

current: ContextVar[trio.Nursery | None] = ContextVar("conveyor_linger", default=None)
"""The nursery of the pool whose attempt is running, or None outside any pool."""
