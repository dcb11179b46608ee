"""The ``conveyor`` logger, as the pool's first observer.

INFO for each retry, WARNING for each give-up and for the unfinished items of a pool that
stopped early. A library does not configure logging: a NullHandler is installed, so programs
that never asked for conveyor's logs do not get them on stderr.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ._observe import Attempt, Observer, PoolInfo

if TYPE_CHECKING:
    from ._records import Failed, Report

__all__ = ["LOG", "logger"]

logger = logging.getLogger("conveyor")
logger.addHandler(logging.NullHandler())


class _PoolLog(Observer):
    """The log of one pool (knows its retry policy's attempts, for the messages)."""

    __slots__ = ("_attempts",)

    def __init__(self, retry_attempts: int) -> None:
        self._attempts = retry_attempts

    def retry_scheduled(self, attempt: Attempt, error: Exception, delay: float) -> None:
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "item %r failed on attempt %d of %d (%s: %s); retrying in %.3f s",
                attempt.item, attempt.number, self._attempts, type(error).__name__, error,
                delay,
            )

    def failed(self, record: Failed) -> None:
        if not logger.isEnabledFor(logging.WARNING):
            return
        if record.attempts == 0:
            why = "failed before an attempt"
        elif record.attempts >= self._attempts > 1:
            why = f"gave up after {record.attempts} attempts"
        else:
            why = f"failed on attempt {record.attempts}"
        error = record.error
        logger.warning("item %r %s: %s: %s", record.item, why, type(error).__name__, error)

    def closed(self, report: Report) -> None:
        if report.unfinished:
            logger.warning(
                "%d item(s) unfinished: the pool stopped before they settled",
                len(report.unfinished),
            )


class _Log(Observer):
    def opened(self, info: PoolInfo) -> Observer:
        return _PoolLog(info.retry_attempts)


LOG: Any = _Log()
"""The observer every pool has first: the ``conveyor`` logger."""
