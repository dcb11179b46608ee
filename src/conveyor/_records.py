"""What became of each item: `Succeeded`, `Failed` or `Unfinished`, and the `Report`.

Every item a pool accepts ends as exactly one of these records (invariant 1 in docs/design.md).
Records are small frozen dataclasses; they are created on the hot path, so they keep
``__slots__`` and do no work in ``__init__``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import outcome

from ._errors import ItemsFailed, ItemUnfinished

if TYPE_CHECKING:
    from ._stats import Stats

T = TypeVar("T")

__all__ = ["Failed", "ItemsFailed", "Record", "Report", "Succeeded", "Unfinished"]


@dataclass(frozen=True, slots=True)
class Succeeded(Generic[T]):
    """The item's task returned ``value`` on attempt number ``attempts``.

    ``index`` (on every record) is the item's position in the input: 0 for the first item
    of ``items``, or the order of ``submit`` calls. It is not part of equality (two records
    say the same when the same thing happened to the same item); -1 on a record made by hand.
    """

    item: Any
    value: T
    attempts: int
    index: int = field(default=-1, compare=False)

    @property
    def outcome(self) -> outcome.Value[T]:
        """The result as an :class:`outcome.Value`."""
        return outcome.Value(self.value)

    def unwrap(self) -> T:
        """Return ``value``."""
        return self.value


@dataclass(frozen=True, slots=True)
class Failed:
    """The item gave up after ``attempts`` attempts; ``error`` is the last exception.

    ``traceback`` is the formatted text of that exception, its chain included, so frames
    from a worker thread or process (carried as the exception's cause) are part of it.
    """

    item: Any
    error: BaseException
    attempts: int
    traceback: str = field(repr=False)
    index: int = field(default=-1, compare=False)

    @property
    def outcome(self) -> outcome.Error:
        """The result as an :class:`outcome.Error`."""
        return outcome.Error(self.error)

    def unwrap(self) -> Any:
        """Raise ``error``."""
        raise self.error


@dataclass(frozen=True, slots=True)
class Unfinished:
    """The pool stopped (cancel, deadline, error, stop()) before this item settled.

    ``attempts`` counts the attempts that started (an attempt cut off by the stop counts);
    ``last_error`` is the error of the last attempt that finished, or None.
    """

    item: Any
    attempts: int
    last_error: BaseException | None
    index: int = field(default=-1, compare=False)

    @property
    def outcome(self) -> None:
        """Always None: an unfinished item has no outcome."""
        return None

    def unwrap(self) -> Any:
        """Raise :class:`ItemUnfinished`: the item has no result."""
        raise ItemUnfinished(f"item {self.item!r} did not finish (attempts={self.attempts})")


Record = Succeeded[Any] | Failed | Unfinished
"""Any of the three records."""


@dataclass(frozen=True, slots=True)
class Report:
    """The account of a pool after it ended.

    ``failed`` and ``unfinished`` always hold every such item. ``succeeded`` holds the
    successes that were not already handed out: all of them for :func:`conveyor.run`, none
    of those a streaming pool (``map``, ``pool.results()``) yielded; ``stats.succeeded``
    always counts them all.
    """

    succeeded: list[Succeeded[Any]]
    failed: list[Failed]
    unfinished: list[Unfinished]
    stats: Stats

    @property
    def ok(self) -> bool:
        """True when no item failed and none was left unfinished."""
        return not self.failed and not self.unfinished

    def values(self, *, ordered: bool = False) -> list[Any]:
        """The values of ``succeeded``: in the order they are listed (the order they
        settled in), or with ``ordered=True`` in input order (by ``index``)."""
        records = sorted(self.succeeded, key=_index) if ordered else self.succeeded
        return [r.value for r in records]

    def records(self) -> list[Record]:
        """Every record of the report (succeeded, failed, unfinished) in input order."""
        return sorted([*self.succeeded, *self.failed, *self.unfinished], key=_index)

    def raise_for_failures(self) -> None:
        """Raise :class:`ItemsFailed` if any item failed or was left unfinished."""
        if self.failed or self.unfinished:
            raise ItemsFailed(self.failed, self.unfinished)


def _index(record: Record) -> int:
    return record.index
