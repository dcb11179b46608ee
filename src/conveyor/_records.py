"""What became of each item: `Succeeded`, `Failed` or `Unfinished`, and the `Report`.

Every item a pool accepts ends as exactly one of these records (invariant 1 in docs/design.md).

Records are immutable values with their own equality, made on the hot path (one per item), so
they are small tuple subclasses: making one is a single C call (``tuple.__new__``), about
4x cheaper than a frozen dataclass, whose ``__init__`` sets each field through
``object.__setattr__`` (callgrind: ~1,500 instructions per item of a no-op run). The fields
are read through properties; assigning one raises AttributeError. Equality and hashing
leave ``index`` out and tell the three kinds apart; ``repr`` names the fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import outcome

from ._errors import ItemsFailed, ItemUnfinished

if TYPE_CHECKING:
    from ._stats import Stats

T = TypeVar("T")

__all__ = [
    "Failed", "ItemsFailed", "Record", "Report", "Succeeded", "Unfinished", "with_index",
]

_INDEX_DOC = (
    "The item's position in the input: 0 for the first item of ``items``, or the order of "
    "``submit`` calls (-1 on a record made by hand). Not part of equality: two records say "
    "the same when the same thing happened to the same item."
)

_STAGE_DOC = "In a pipeline, the name of the stage where it ended; None for a single pool."
_STAGE_ITEM_DOC = (
    "In a pipeline, the item as it entered that stage (``item`` is the pipeline's input); "
    "None for a single pool."
)


class _Record(tuple):  # type: ignore[type-arg]
    """The shared behaviour of the three records: fields by name, equality without
    ``index`` (the last field), a repr that names the fields, pickling."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]]
    _hidden: ClassVar[frozenset[str]] = frozenset()
    _optional: ClassVar[frozenset[str]] = frozenset()  # shown only when not None

    def __eq__(self, other: object) -> bool:
        # False, not NotImplemented, for anything else: a plain tuple with the same fields
        # is not a record (and would otherwise compare its index too)
        if type(other) is not type(self):
            return False
        return self[:-1] == tuple.__getitem__(other, slice(None, -1))

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash((type(self), self[:-1]))

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={value!r}"
            for name, value in zip(self._fields, self, strict=True)
            if name not in self._hidden and (value is not None or name not in self._optional)
        )
        return f"{type(self).__name__}({shown})"

    def __getnewargs__(self) -> tuple[Any, ...]:
        return tuple(self)


class Succeeded(_Record, Generic[T]):
    """The item's task returned ``value`` on attempt number ``attempts``.

    ``index`` (on every record) is the item's position in the input: 0 for the first item
    of ``items``, or the order of ``submit`` calls. It is not part of equality (two records
    say the same when the same thing happened to the same item); -1 on a record made by hand.
    """

    __slots__ = ()
    _fields = ("item", "value", "attempts", "index")
    __match_args__ = ("item", "value", "attempts")

    def __new__(cls, item: Any, value: T, attempts: int, index: int = -1) -> Succeeded[T]:
        return tuple.__new__(cls, (item, value, attempts, index))

    if TYPE_CHECKING:

        @property
        def item(self) -> Any: ...
        @property
        def value(self) -> T: ...
        @property
        def attempts(self) -> int: ...
        @property
        def index(self) -> int: ...  # type: ignore[override]
    else:
        item = property(itemgetter(0), doc="The item, as it was taken from the input.")
        value = property(itemgetter(1), doc="What the task returned.")
        attempts = property(itemgetter(2), doc="The attempt that succeeded (1 for the first).")
        index = property(itemgetter(3), doc=_INDEX_DOC)

    @property
    def outcome(self) -> outcome.Value[T]:
        """The result as an :class:`outcome.Value`."""
        return outcome.Value(self.value)

    def unwrap(self) -> T:
        """Return ``value``."""
        return self.value


class Failed(_Record):
    """The item gave up after ``attempts`` attempts; ``error`` is the last exception.

    ``traceback`` is the formatted text of that exception, its chain included, so frames
    from a worker thread or process (carried as the exception's cause) are part of it.
    """

    __slots__ = ()
    _fields = ("item", "error", "attempts", "traceback", "stage", "stage_item", "index")
    _hidden = frozenset({"traceback"})
    _optional = frozenset({"stage", "stage_item"})
    __match_args__ = ("item", "error", "attempts")

    def __new__(
        cls, item: Any, error: BaseException, attempts: int, traceback: str, index: int = -1,
        stage: str | None = None, stage_item: Any = None,
    ) -> Failed:
        return tuple.__new__(cls, (item, error, attempts, traceback, stage, stage_item, index))

    def __getnewargs__(self) -> tuple[Any, ...]:
        item, error, attempts, traceback, stage, stage_item, index = self
        return (item, error, attempts, traceback, index, stage, stage_item)

    if TYPE_CHECKING:

        @property
        def item(self) -> Any: ...
        @property
        def error(self) -> BaseException: ...
        @property
        def attempts(self) -> int: ...
        @property
        def traceback(self) -> str: ...
        @property
        def stage(self) -> str | None: ...
        @property
        def stage_item(self) -> Any: ...
        @property
        def index(self) -> int: ...  # type: ignore[override]
    else:
        item = property(itemgetter(0), doc="The item, as it was taken from the input.")
        error = property(itemgetter(1), doc="The exception of the last attempt.")
        attempts = property(itemgetter(2), doc="Attempts made (0: refused before one).")
        traceback = property(itemgetter(3), doc="The formatted text of ``error``.")
        stage = property(itemgetter(4), doc=_STAGE_DOC)
        stage_item = property(itemgetter(5), doc=_STAGE_ITEM_DOC)
        index = property(itemgetter(6), doc=_INDEX_DOC)

    @property
    def outcome(self) -> outcome.Error:
        """The result as an :class:`outcome.Error`."""
        return outcome.Error(self.error)

    def unwrap(self) -> Any:
        """Raise ``error``."""
        raise self.error


class Unfinished(_Record):
    """The pool stopped (cancel, deadline, error, stop()) before this item settled.

    ``attempts`` counts the attempts that started (an attempt cut off by the stop counts);
    ``last_error`` is the error of the last attempt that finished, or None.
    """

    __slots__ = ()
    _fields = ("item", "attempts", "last_error", "stage", "stage_item", "index")
    _optional = frozenset({"stage", "stage_item"})
    __match_args__ = ("item", "attempts", "last_error")

    def __new__(
        cls, item: Any, attempts: int, last_error: BaseException | None, index: int = -1,
        stage: str | None = None, stage_item: Any = None,
    ) -> Unfinished:
        return tuple.__new__(cls, (item, attempts, last_error, stage, stage_item, index))

    def __getnewargs__(self) -> tuple[Any, ...]:
        item, attempts, last_error, stage, stage_item, index = self
        return (item, attempts, last_error, index, stage, stage_item)

    if TYPE_CHECKING:

        @property
        def item(self) -> Any: ...
        @property
        def attempts(self) -> int: ...
        @property
        def last_error(self) -> BaseException | None: ...
        @property
        def stage(self) -> str | None: ...
        @property
        def stage_item(self) -> Any: ...
        @property
        def index(self) -> int: ...  # type: ignore[override]
    else:
        item = property(itemgetter(0), doc="The item, as it was taken from the input.")
        attempts = property(itemgetter(1), doc="Attempts that started.")
        last_error = property(itemgetter(2), doc="The last finished attempt's error, or None.")
        stage = property(itemgetter(3), doc=_STAGE_DOC)
        stage_item = property(itemgetter(4), doc=_STAGE_ITEM_DOC)
        index = property(itemgetter(5), doc=_INDEX_DOC)

    @property
    def outcome(self) -> None:
        """Always None: an unfinished item has no outcome."""
        return None

    def unwrap(self) -> Any:
        """Raise :class:`ItemUnfinished`: the item has no result."""
        raise ItemUnfinished(f"item {self.item!r} did not finish (attempts={self.attempts})")


Record = Succeeded[Any] | Failed | Unfinished
"""Any of the three records."""


def with_index(record: Succeeded[Any] | Failed, index: int) -> Succeeded[Any] | Failed:
    """``record`` with ``index`` as its input position."""
    made: Succeeded[Any] | Failed = tuple.__new__(type(record), (*record[:-1], index))
    return made


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
    #: A pipeline's report: each stage's own stats, by stage name (empty for a pool).
    stages: dict[str, Stats] = field(default_factory=dict, compare=False)

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
